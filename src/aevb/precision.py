"""Mixed precision for training: matrix multiplies in bfloat16, everything else in float32.

On processors with native bfloat16 dot products (x86 with AVX512-BF16 or
AMX, CUDA GPUs from Ampere on) a bf16 matrix multiply runs 2–4× faster than
an fp32 one; at batch 128 the multiplies are most of a VAE's training step.
Inside :func:`matmul_dtype`, the network layers below cast their input,
weight and bias to bf16 for the multiply (which accumulates in fp32) and
return fp32.  Only the layer outputs are rounded to bf16 (3 significant
digits): weights, optimiser state, activations between layers, the
likelihood, the KL and every sum stay fp32, and so does everything outside
the context — evaluation and the reported ELBO never use it.

This is a different rule from ``torch.autocast``, which keeps the layer
outputs, and so the activations and distribution parameters after them, in
bf16.  ``tests/test_precision.py`` checks that a bf16 step gives the fp32
loss and gradients to bf16 rounding and that training reaches the same test
ELBO; ``bench/`` measures the speed.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import PRECISIONS
from .errors import UserError

_matmul_dtype: ContextVar[torch.dtype | None] = ContextVar("aevb_matmul_dtype", default=None)


@contextmanager
def matmul_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Run the multiplies of aevb's layers in ``dtype`` (None: the weights' own dtype)."""
    token = _matmul_dtype.set(dtype)
    try:
        yield
    finally:
        _matmul_dtype.reset(token)


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware (not by emulation, which is slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The multiply dtype for ``--precision``: None (fp32) or torch.bfloat16.

    ``auto`` is bf16 where the device has native bf16 multiplies, else fp32;
    ``bf16`` on a device without them is refused rather than silently slow.
    """
    if precision == "fp32":
        return None
    native = bf16_is_native(device)
    if precision == "bf16" and not native:
        raise UserError(f"--precision bf16: this {device.type} device has no native bfloat16 matrix multiply "
                        f"(it would be emulated, slower than fp32); use --precision fp32 or auto")
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    return torch.bfloat16 if native else None


def _compute_dtype(weight: torch.Tensor) -> torch.dtype | None:
    dtype = _matmul_dtype.get()
    # only fp32 weights are lowered: a float64 model asked for float64 on purpose
    return dtype if dtype is not None and weight.dtype == torch.float32 else None


class Linear(nn.Linear):
    """``nn.Linear`` that multiplies in the :func:`matmul_dtype` of its context.  x [*, in] -> [*, out]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(self.weight)
        if dtype is None:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias).to(x.dtype)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that convolves in the :func:`matmul_dtype` of its context.  [B, C, H, W] -> [B, C', H', W']."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(self.weight)
        if dtype is None:
            return self._conv_forward(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.to(dtype)
        return self._conv_forward(x.to(dtype), self.weight.to(dtype), bias).to(x.dtype)


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` that convolves in the :func:`matmul_dtype` of its context."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        dtype = _compute_dtype(self.weight)
        if dtype is None:
            return super().forward(x, output_size)
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                              2, self.dilation)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.conv_transpose2d(x.to(dtype), self.weight.to(dtype), bias, self.stride, self.padding,
                                  output_padding, self.groups, self.dilation).to(x.dtype)
