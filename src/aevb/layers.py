"""The layers aevb's networks are built from: torch's, with two differences.

* Under :func:`aevb.precision.matmul_dtype` they multiply in that dtype
  (bf16) and return float32 (see :mod:`aevb.precision`; convolutions on the
  CPU stay float32).
* A 4×4, stride-2 transposed convolution to few channels (the last layer of
  a convolutional decoder: 16 → 1 for MNIST) runs as a 3×3 convolution to
  4·C_out channels followed by a pixel shuffle.  oneDNN computes the
  transposed convolution as the backward pass of a convolution, which for one
  output channel is its slowest path (1.2 ms for a batch of 128 against
  0.4 ms this way on the 2-core CPU); the sums are the same, in another order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .precision import compute_dtype

# For output phase a (row 2i + a) and 3×3 offset u (input row i + u − 1), the row
# of the 4×4 transposed-convolution kernel that connects them; 4 means none
# (a zero tap).  Derived from o = 2r − 1 + k (stride 2, padding 1); columns alike.
_SUBPIXEL_TAPS = torch.tensor(((3, 1, 4), (4, 2, 0)))


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """[C_in, C_out, 4, 4] transposed-convolution kernel -> [4·C_out, C_in, 3, 3] convolution kernel.

    Output channel 4·o + 2·a + b holds phase (a, b) of output channel o, the
    order ``pixel_shuffle(·, 2)`` expects.
    """
    c_in, c_out = weight.shape[:2]
    padded = F.pad(weight.transpose(0, 1), (0, 1, 0, 1))  # [C_out, C_in, 5, 5]; index 4 is 0
    taps = _SUBPIXEL_TAPS.to(weight.device)  # no copy on the CPU
    kernel = padded[:, :, taps[:, :, None, None], taps[None, None, :, :]]  # [o, c, a, u, b, v]
    return kernel.permute(0, 2, 4, 1, 3, 5).reshape(4 * c_out, c_in, 3, 3)


class _SubpixelConvTranspose2d(torch.autograd.Function):
    """conv_transpose2d(x, W, b, stride=2, padding=1) for a 4×4 kernel: x [B, C_in, H, W] -> [B, C_out, 2H, 2W].

    Forward by the sub-pixel convolution; backward by torch's own kernels for
    the transposed convolution (a stride-2 convolution for x, the weight
    gradient of the transposed convolution), which are fast.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        phases = F.conv2d(x, subpixel_weight(weight), None if bias is None else bias.repeat_interleave(4),
                          padding=1)  # [B, 4·C_out, H, W]
        return F.pixel_shuffle(phases, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = F.conv2d(grad, weight, stride=2, padding=1) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        want_w, want_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        if want_w or want_b:
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[1]], [2, 2], [1, 1], [1, 1], True, [0, 0], 1,
                [False, want_w, want_b])
        return grad_x, grad_w, grad_b


def _lowered(dtype: torch.dtype, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """x, weight and bias in the multiply dtype of the context."""
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


class Linear(nn.Linear):
    """``nn.Linear`` that multiplies in the :func:`~aevb.precision.matmul_dtype` of its context.  [*, in] -> [*, out]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(self.weight)
        if dtype is None:
            return F.linear(x, self.weight, self.bias)
        return F.linear(*_lowered(dtype, x, self.weight, self.bias)).to(x.dtype)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that convolves in the :func:`~aevb.precision.matmul_dtype` of its context (GPUs).  [B, C, H, W] -> [B, C', H', W']."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(self.weight, convolution=True)
        if dtype is None:
            return self._conv_forward(x, self.weight, self.bias)
        return self._conv_forward(*_lowered(dtype, x, self.weight, self.bias)).to(x.dtype)


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with bf16 multiplies in context and the sub-pixel form where it is faster.

    The sub-pixel form is used for 4×4 kernels with stride 2 and padding 1 when
    4·C_out ≤ C_in (it does 9/4 of the multiplies, into 4·C_out channels, which
    only pays where the direct form is at its slowest: few output channels).
    """

    def _subpixel(self) -> bool:
        return (self.kernel_size == (4, 4) and self.stride == (2, 2) and self.padding == (1, 1)
                and self.output_padding == (0, 0) and self.dilation == (1, 1) and self.groups == 1
                and self.padding_mode == "zeros" and 4 * self.out_channels <= self.in_channels)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        dtype = compute_dtype(self.weight, convolution=True)
        subpixel = output_size is None and self._subpixel()
        if dtype is None and not subpixel:
            return super().forward(x, output_size)
        out_dtype = x.dtype
        weight, bias = self.weight, self.bias
        if dtype is not None:
            x, weight, bias = _lowered(dtype, x, weight, bias)
        if subpixel:
            return _SubpixelConvTranspose2d.apply(x, weight, bias).to(out_dtype)
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                              2, self.dilation)
        return F.conv_transpose2d(x, weight, bias, self.stride, self.padding, output_padding, self.groups,
                                  self.dilation).to(out_dtype)
