"""The layers aevb's networks are built from: torch's, with two differences.

* Under :func:`aevb.precision.matmul_dtype` they multiply in that dtype
  (bf16) and their outputs stay in it, so consecutive layers pass bf16
  activations (a ReLU between them is exact in any dtype) instead of casting
  each output to float32 and back; the model casts what its networks return
  to float32 (``objectives.at_least_float32``) before any distribution sees
  it.  Convolutions on the CPU also take their input channels-last, the
  layout oneDNN's bf16 kernels compute in (see :mod:`aevb.precision`).
* A 4×4, stride-2 transposed convolution (the up-sampling layers of a
  convolutional decoder) has its own backward pass, and to few channels (the
  last layer: 16 → 1 for MNIST) its own forward pass: a 3×3 convolution to
  4·C_out channels followed by a pixel shuffle.  oneDNN computes the
  transposed convolution as the backward pass of a convolution, which for one
  output channel is its slowest path (1.2 ms for a batch of 128 against
  0.4 ms this way on the 2-core CPU), and it sums a bf16 transposed
  convolution's bias gradient in a reference loop; the sums are the same, in
  another order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .precision import MIN_LOWERED_MACS, compute_dtype, convolution_memory_format

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


class _ConvTranspose4x4Stride2(torch.autograd.Function):
    """conv_transpose2d(x, W, b, stride=2, padding=1) for a 4×4 kernel: x [B, C_in, H, W] -> [B, C_out, 2H, 2W].

    Forward directly, or by the sub-pixel convolution (``subpixel``).  Backward
    by fast kernels whatever the forward: a stride-2 convolution for x,
    torch's weight gradient of the transposed convolution for W, and the bias
    gradient as the sum of the output gradient over (B, H, W).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                subpixel: bool) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if not subpixel:
            return F.conv_transpose2d(x, weight, bias, stride=2, padding=1)
        phases = F.conv2d(x, subpixel_weight(weight), None if bias is None else bias.repeat_interleave(4),
                          padding=1)  # [B, 4·C_out, H, W]
        return _pixel_shuffle(phases)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # differentiable ops only: second derivatives work
        x, weight = ctx.saved_tensors
        grad = _channels_last(grad) if _is_channels_last(x) else grad.contiguous()  # grad_x in x's layout
        grad_x = F.conv2d(grad, weight, stride=2, padding=1) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            _, grad_w, _ = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [2, 2], [1, 1], [1, 1], True, [0, 0], 1, [False, True, False])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))  # accumulated in float32 for any dtype, as every layer's
        return grad_x, grad_w, grad_b, None


def _pixel_shuffle(phases: torch.Tensor) -> torch.Tensor:
    """``pixel_shuffle(phases, 2)``: [B, 4·C, H, W] -> [B, C, 2H, 2W], half the time for channels-last input.

    torch's kernel gathers channels-last input element by element; read as
    [B, H, W, C, 2, 2] it is one permuted copy.
    """
    if not _is_channels_last(phases):
        return F.pixel_shuffle(phases, 2)
    b, c4, h, w = phases.shape
    nhwc = phases.permute(0, 2, 3, 1).reshape(b, h, w, c4 // 4, 2, 2)  # a view: [B, H, W, C, a, b]
    return nhwc.permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, 2 * h, 2 * w)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] with channels-last strides, copied only where its bytes are in another order.

    A one-channel tensor is NCHW and NHWC at once, and oneDNN reads the
    strides to choose the layout of what it returns: restrided as a view, it
    returns channels-last too.
    """
    if t.shape[1] == 1 and t.is_contiguous():
        return t.as_strided(t.shape, (t.shape[2] * t.shape[3], 1, t.shape[3], 1))
    return t.contiguous(memory_format=torch.channels_last)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without dispatching a no-op (about 5 µs a call inside a small model's step on the CPU)."""
    return t if t.dtype == dtype else t.to(dtype)


def lowered(dtype: torch.dtype, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            memory_format: torch.memory_format = torch.preserve_format):
    """x (in ``memory_format``), weight and bias in the multiply dtype of the context (also :mod:`aevb.fused`'s).

    A linear layer too small to lower asks for its own dtype: then nothing is cast.
    """
    x = cast(x, dtype) if memory_format == torch.preserve_format else x.to(dtype, memory_format=memory_format)
    return x, cast(weight, dtype), None if bias is None else cast(bias, dtype)


class Linear(nn.Linear):
    """``nn.Linear`` that multiplies in the :func:`~aevb.precision.matmul_dtype` of its context.

    [*, in] -> [*, out], in that dtype inside the context (in float32 for a
    call of fewer than ``precision.MIN_LOWERED_MACS`` multiply-accumulates).
    """

    def multiply_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype :meth:`forward` multiplies ``x`` in; None outside the context (no cast at all)."""
        dtype = compute_dtype(self.weight)
        if dtype is None:
            return None
        if x.numel() * self.out_features < MIN_LOWERED_MACS:  # too small to gain; the input may come lowered
            return self.weight.dtype
        return dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.multiply_dtype(x)
        if dtype is None:
            return F.linear(x, self.weight, self.bias)
        return F.linear(*lowered(dtype, x, self.weight, self.bias))


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that convolves in the :func:`~aevb.precision.matmul_dtype` of its context.

    [B, C, H, W] -> [B, C', H', W'], in that dtype (and channels-last on the
    CPU) inside the context.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(self.weight)
        if dtype is None:
            return self._conv_forward(x, self.weight, self.bias)
        return self._conv_forward(*lowered(dtype, x, self.weight, self.bias, convolution_memory_format(x)))


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with bf16 multiplies in context and faster passes for 4×4, stride-2 kernels.

    [B, C, H, W] -> [B, C', H', W'], in the multiply dtype (channels-last on
    the CPU) inside the context.  The sub-pixel forward is used when
    4·C_out ≤ C_in (it does 9/4 of the multiplies, into 4·C_out channels,
    which only pays where the direct form is at its slowest: few output
    channels); in float32 only there, since torch's float32 backward is as
    fast as :class:`_ConvTranspose4x4Stride2`'s.
    """

    def _stride2_4x4(self) -> bool:
        return (self.kernel_size == (4, 4) and self.stride == (2, 2) and self.padding == (1, 1)
                and self.output_padding == (0, 0) and self.dilation == (1, 1) and self.groups == 1
                and self.padding_mode == "zeros")

    def _subpixel(self) -> bool:
        return self._stride2_4x4() and 4 * self.out_channels <= self.in_channels

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        dtype = compute_dtype(self.weight)
        own = output_size is None and x.dim() == 4 and self._stride2_4x4()
        subpixel = own and self._subpixel()
        if dtype is None and not subpixel:
            return super().forward(x, output_size)
        weight, bias = self.weight, self.bias
        if dtype is not None:
            x, weight, bias = lowered(dtype, x, weight, bias, convolution_memory_format(x))
        if own:
            return _ConvTranspose4x4Stride2.apply(x, weight, bias, subpixel)
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                              2, self.dilation)
        return F.conv_transpose2d(x, weight, bias, self.stride, self.padding, output_padding, self.groups,
                                  self.dilation)
