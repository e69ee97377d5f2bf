"""The layers aevb's networks are built from: torch's, with these differences:

* Under :func:`aevb.precision.matmul_dtype` they multiply in that dtype
  (bf16) and their outputs stay in it, so consecutive layers pass bf16
  activations (a ReLU between them is exact in any dtype) instead of casting
  each output to float32 and back; the model casts what its networks return
  to float32 (``objectives.at_least_float32``) before any distribution sees
  it.
* Convolutions on the CPU take their input channels-last, in any dtype: the
  layout oneDNN's kernels compute fastest in (bf16: :mod:`aevb.precision`;
  float32: :func:`in_convolution_layout`).
* A 4×4, stride-2 transposed convolution (the up-sampling layers of a
  convolutional decoder) has its own backward pass, and to few channels (the
  last layer: 16 → 1 for MNIST) its own forward pass: a 3×3 convolution to
  4·C_out channels followed by a pixel shuffle.  oneDNN computes the
  transposed convolution as the backward pass of a convolution, which for one
  output channel is its slowest path (1.2 ms for a batch of 128 against
  0.4 ms this way on the 2-core CPU), and it sums a bf16 transposed
  convolution's bias gradient in a reference loop; the sums are the same, in
  another order.
* In bf16 on the CPU, a 4×4, stride-2 layer (either kind) between 16 channels
  or more takes its weight gradient as one matrix multiply of the output
  gradient with the input's patches, where the patches stay small
  (:func:`weight_grad_by_matmul`): without AMX, oneDNN's bf16
  weight-gradient kernels run these layers at a third of the speed of their
  forward pass; with AMX, only on small maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aevb.model import precision
from aevb.model.precision import MIN_LOWERED_MACS, compute_dtype, convolution_memory_format

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


# When a 4×4, stride-2 layer's weight gradient is one matrix multiply
# (:func:`conv_weight_grad`) instead of oneDNN's kernel: in bf16 on the CPU,
# between enough channels, where the patch matrix (a copy 16·C wide) stays
# small, and only on CPUs with AMX tiles (measured at batch 128 on a 2-core
# CPU, oneDNN's time over the multiply's, cold cache; patch elements in brackets).
# Without AMX (AVX512-BF16 alone) the multiply won layer by layer on one CPU
# (16 → 32 on 14×14 1.59×) but not in the step: bench/accelerations.py measured
# the MNIST conv VAE's bf16 step 0.94× and 0.99× with it on a 2-core AMD EPYC
# (2026-12-06), after 1.00–1.15× in earlier runs, so oneDNN's kernel serves there.
# * AMX, whose oneDNN kernels are fast on larger maps, so the map decides,
#   whatever the batch: on 4×4 output maps with 32+ channels each side the
#   multiply wins (32 → 32 1.22×, 32 → 64 1.58–1.68×, 64 → 32 1.46×,
#   64 → 64 2.26×, 64 → 128 2.55×, 128 → 128 2.48×; at batch 512 32 → 64
#   1.43×, 64 → 64 2.02× with 8.4M patch elements; on 2×2 maps 1.57–3.90×),
#   with 16 channels it loses or ties (16 → 16 0.87×, 16 → 32 0.96×,
#   32 → 16 0.86×), and on 7×7 maps and larger it loses (16 → 32 on 14×14
#   0.56–0.68× at batch 128, 0.87× at 32, 0.56× at 512; 32 → 64 0.88×).
#   Rule: 32+ channels each side, an output map of at most 16 positions, at
#   most 8M patch elements (the largest measured).  The MNIST conv VAE's step
#   (no layer by the multiply under this rule) was 1.11× faster than with the
#   non-AMX rule of then (16+ channels, at most 2M patch elements; 20 rounds,
#   interleaved); the 64×64 RGB network's 64 → 64 layer 2.3× faster alone.
# The input gradient and the transposed convolution as multiplies (2×2
# windows of the padded input times a [4·C_in, 4·C_out] matrix) were 1.4×
# faster on their own but 0.95× in the step: gathering the phases of the
# output is a strided copy.
MIN_MATMUL_CHANNELS_AMX = 32
MAX_OUTPUT_POSITIONS_AMX = 16
MAX_PATCH_ELEMENTS_AMX = 1 << 23


def weight_grad_by_matmul(x: torch.Tensor, patch_shape: tuple[int, int, int], other_channels: int) -> bool:
    """Whether a 4×4, stride-2 layer on ``x`` takes its weight gradient by :func:`conv_weight_grad`.

    ``patch_shape`` (C, H, W) is the tensor whose patches the multiply takes
    (a convolution's input, a transposed convolution's output),
    ``other_channels`` the other side's.  Only where the CPU has AMX
    (:func:`aevb.model.precision.amx_usable`), as measured above.
    """
    if not (x.device.type == "cpu" and x.dtype == torch.bfloat16 and precision.amx_usable()):
        return False
    c, h, w = patch_shape
    channels, positions = min(c, other_channels), (h // 2) * (w // 2)  # positions: of one image's output map
    patches = x.shape[0] * positions * 16 * c
    return (channels >= MIN_MATMUL_CHANNELS_AMX and positions <= MAX_OUTPUT_POSITIONS_AMX
            and patches <= MAX_PATCH_ELEMENTS_AMX)


def conv_weight_grad(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The weight gradient of conv2d(x, W, stride=2, padding=1) for a 4×4 W, as one matrix multiply.

    x [B, C, H, W], grad [B, O, ⌊H/2⌋, ⌊W/2⌋] -> [O, C, 4, 4]: the output
    gradient [B·⌊H/2⌋·⌊W/2⌋, O], transposed, times the input's 4×4 patches
    [B·⌊H/2⌋·⌊W/2⌋, 16·C].  It is also the weight gradient [C_in, C_out, 4, 4]
    of a transposed convolution, with its output gradient as x and its input
    as grad.
    """
    o, c = grad.shape[1], x.shape[1]
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # [B, H+2, W+2, C]
    patches = padded.unfold(1, 4, 2).unfold(2, 4, 2)  # [B, ⌊H/2⌋, ⌊W/2⌋, C, 4, 4], a view
    patches = patches.permute(0, 1, 2, 4, 5, 3).reshape(-1, 16 * c)  # (ky, kx, c): contiguous runs of C
    rows = grad.permute(0, 2, 3, 1).reshape(-1, o)  # a view for channels-last grad
    return (rows.t() @ patches).view(o, 4, 4, c).permute(0, 3, 1, 2)


class _Conv4x4Stride2(torch.autograd.Function):
    """conv2d(x, W, b, stride=2, padding=1) for a 4×4 kernel: x [B, C_in, H, W] -> [B, C_out, ⌊H/2⌋, ⌊W/2⌋].

    Torch's convolution forward and input gradient; the weight gradient by
    :func:`conv_weight_grad`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride=2, padding=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # differentiable ops only: second derivatives work
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # torch's own kernel, as its convolution's backward
            grad_x, _, _ = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False])
        if ctx.needs_input_grad[1]:
            grad_w = conv_weight_grad(x, grad)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


class _ConvTranspose4x4Stride2(torch.autograd.Function):
    """conv_transpose2d(x, W, b, stride=2, padding=1) for a 4×4 kernel: x [B, C_in, H, W] -> [B, C_out, 2H, 2W].

    Forward directly, or by the sub-pixel convolution (``subpixel``).  Backward
    by fast kernels whatever the forward: a stride-2 convolution for x,
    torch's weight gradient of the transposed convolution for W, or
    :func:`conv_weight_grad` (``matmul_weight_grad``), and the bias gradient
    as the sum of the output gradient over (B, H, W).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                subpixel: bool, matmul_weight_grad: bool = False) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.matmul_weight_grad = matmul_weight_grad
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
            if ctx.matmul_weight_grad:
                grad_w = conv_weight_grad(grad, x)
            else:
                _, grad_w, _ = torch.ops.aten.convolution_backward(
                    grad, x, weight, None, [2, 2], [1, 1], [1, 1], True, [0, 0], 1, [False, True, False])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))  # accumulated in float32 for any dtype, as every layer's
        return grad_x, grad_w, grad_b, None, None


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


def in_convolution_layout(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] in the layout convolutions take on its device (channels-last on the CPU), in its dtype.

    On the CPU oneDNN's float32 kernels are faster channels-last too: on a
    2-core AVX512 Xeon the 32 → 16 transposed convolution's forward took 0.96
    against 1.97 ms NCHW at batch 128, and the MNIST conv VAE's float32 step
    was 1.05–1.08× faster (two runs of 24 rounds, interleaved).
    """
    if convolution_memory_format(x) is torch.channels_last:
        return _channels_last(x)
    return x


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


def _is_4x4_stride2(layer: nn.Conv2d | nn.ConvTranspose2d) -> bool:
    """Whether ``layer`` is a plain 4×4 convolution (or transposed one) of stride 2 and padding 1."""
    return (layer.kernel_size == (4, 4) and layer.stride == (2, 2) and layer.padding == (1, 1)
            and layer.output_padding == (0, 0) and layer.dilation == (1, 1) and layer.groups == 1
            and layer.padding_mode == "zeros")


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that convolves in the :func:`~aevb.precision.matmul_dtype` of its context.

    [B, C, H, W] -> [B, C', H', W'], channels-last on the CPU; in that dtype
    inside the context, where a 4×4, stride-2 layer between enough
    channels takes its weight gradient by a matrix multiply
    (:func:`weight_grad_by_matmul`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(self.weight)
        if dtype is None:
            return self._conv_forward(in_convolution_layout(x), self.weight, self.bias)
        x, weight, bias = lowered(dtype, x, self.weight, self.bias, convolution_memory_format(x))
        if x.dim() == 4 and _is_4x4_stride2(self) and weight_grad_by_matmul(x, x.shape[1:], self.out_channels):
            return _Conv4x4Stride2.apply(x, weight, bias)
        return self._conv_forward(x, weight, bias)


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with bf16 multiplies in context and faster passes for 4×4, stride-2 kernels.

    [B, C, H, W] -> [B, C', H', W'], channels-last on the CPU (a 4×4, stride-2
    layer by :class:`_ConvTranspose4x4Stride2` there), in the multiply dtype
    inside the context.  The sub-pixel forward is used when
    4·C_out ≤ C_in (it does 9/4 of the multiplies, into 4·C_out channels,
    which only pays where the direct form is at its slowest: few output
    channels).  Off the CPU a float32 layer takes its own passes only in the
    sub-pixel form, since torch's float32 backward there is as fast as
    :class:`_ConvTranspose4x4Stride2`'s.  Between enough channels in
    bf16 on the CPU, the weight gradient is a matrix multiply
    (:func:`weight_grad_by_matmul`).
    """

    def _stride2_4x4(self) -> bool:
        return _is_4x4_stride2(self)

    def _subpixel(self) -> bool:
        return self._stride2_4x4() and 4 * self.out_channels <= self.in_channels

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        dtype = compute_dtype(self.weight)
        own = output_size is None and x.dim() == 4 and self._stride2_4x4()
        subpixel = own and self._subpixel()
        # float32: torch's layer, except where the own passes are faster: the sub-pixel form, and
        # any 4×4 stride-2 layer where convolutions run channels-last (the CPU)
        if dtype is None and not (subpixel or own and convolution_memory_format(x) is torch.channels_last):
            return super().forward(x, output_size)
        weight, bias = self.weight, self.bias
        if dtype is None:
            x = in_convolution_layout(x)
        else:
            x, weight, bias = lowered(dtype, x, weight, bias, convolution_memory_format(x))
        if own:
            output = (self.out_channels, 2 * x.shape[2], 2 * x.shape[3])
            return _ConvTranspose4x4Stride2.apply(x, weight, bias, subpixel,
                                                  weight_grad_by_matmul(x, output, self.in_channels))
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                              2, self.dilation)
        return F.conv_transpose2d(x, weight, bias, self.stride, self.padding, output_padding, self.groups,
                                  self.dilation)
