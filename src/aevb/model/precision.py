"""Mixed precision in the layers: matrix multiplies and convolutions in bfloat16, everything else in float32.

Inside :func:`matmul_dtype`, the layers of :mod:`aevb.model.layers` cast their input,
weight and bias to bf16 for the multiply (which accumulates in fp32) and
return bf16 (linear layers too small to gain stay fp32: ``MIN_LOWERED_MACS``);
the model casts its networks' outputs back to fp32 (:func:`at_least_float32`).
Only the layer outputs are rounded to bf16 (3 significant digits), as they
would be by casting each one to fp32 and back: weights, optimiser state, the
likelihood, the KL and every sum stay fp32, and so does everything outside
the context.  Whether to ask for it on a device is the acceleration layer's
choice (:mod:`aevb.acceleration.bf16`, ``--precision``); the test ELBO that
training reports never uses it.

This is a different rule from ``torch.autocast``, which also keeps the
distribution parameters, and so the log-densities computed from them, in
bf16.  ``tests/test_precision.py`` checks that a bf16 step gives the fp32
loss and gradients to bf16 rounding, that training reaches the same test
ELBO, and that bf16 moves an importance-sampled log p(x) several times less
than drawing other samples does; ``bench/`` measures the speed.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch


_matmul_dtype: ContextVar[torch.dtype | None] = ContextVar("aevb_matmul_dtype", default=None)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 if its dtype is narrower (bf16, fp16), else unchanged (float32, float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


@contextmanager
def matmul_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Run the multiplies of aevb's layers in ``dtype`` (None: the weights' own dtype)."""
    token = _matmul_dtype.set(dtype)
    try:
        yield
    finally:
        _matmul_dtype.reset(token)


def cpu_flag(name: str) -> bool:
    """torch.cpu's private test ``name`` of a CPU feature; False where this build has none."""
    test = getattr(torch.cpu, name, None)
    return bool(test()) if test is not None else False


@functools.cache
def amx_usable() -> bool:
    """Whether this CPU has AMX tiles and the kernel lets this process use them (what oneDNN's bf16 kernels need)."""
    try:  # _init_amx asks the kernel for the tile state: False where it is refused
        return bool(torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx())
    except AttributeError:  # private API of torch.cpu, absent from other builds
        return False


# Multiply-accumulates in one call below which a linear layer stays in float32 inside
# the context: its bf16 multiply saves less time than casting its weight,
# input and gradients costs, which does not shrink with the batch.  MLP VAE
# step at batch 128 on the 2-core AMX CPU: its 400 → 40 and 20 → 400 layers
# (2.0M and 1.0M MACs) took 0.34 ms of backward in bf16 against 0.22 in float32,
# and the step was 4% faster with them in float32; its 784 → 400 layers (40M) and
# every layer of an importance-sampled evaluation (4,096 rows) stay bf16.
MIN_LOWERED_MACS = 1 << 22


def compute_dtype(weight: torch.Tensor) -> torch.dtype | None:
    """The dtype a layer with this weight multiplies in: the context's, for float32 weights only."""
    dtype = _matmul_dtype.get()
    if dtype is None or weight.dtype != torch.float32:  # a float64 model asked for float64 on purpose
        return None
    return dtype


def convolution_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout a convolution in the multiply dtype takes its input in: channels-last on the CPU.

    oneDNN's bf16 convolutions compute in channels-last (NHWC).  Given NCHW
    tensors they convert each input and output, and the elementwise kernels
    between layers slow down tenfold where two operands differ in layout;
    given channels-last ones, a layer's output is already the next one's
    input.  MNIST conv VAE step at batch 128, interleaved in one process:
    10.0 ms with float32 NCHW convolutions, 7.4 ms in bf16 channels-last
    (with the bf16 linear layers in both).  GPUs keep the layout they are
    given (not measured here).
    """
    return torch.channels_last if x.device.type == "cpu" and x.dim() == 4 else torch.preserve_format
