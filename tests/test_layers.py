"""aevb.model.layers: the transposed convolution's own passes compute torch's, and the bf16 path keeps its layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import aevb
from aevb.model.layers import (ConvTranspose2d, Conv2d, Linear, _Conv4x4Stride2, _ConvTranspose4x4Stride2, _channels_last,
                         _pixel_shuffle, conv_weight_grad, subpixel_weight, weight_grad_by_matmul)
from aevb.acceleration.bf16 import bf16_is_native
from aevb.model.precision import matmul_dtype

BF16 = torch.bfloat16
native_bf16 = pytest.mark.skipif(not bf16_is_native(torch.device("cpu")),
                                 reason="this CPU has no native bf16 multiplies")


@pytest.mark.parametrize("subpixel", [True, False])
@pytest.mark.parametrize("c_in,c_out,size", [(16, 1, 14), (32, 3, 16), (8, 2, 5), (4, 1, 1)])
def test_own_transposed_convolution_equals_torchs(c_in, c_out, size, subpixel):
    gen = torch.Generator().manual_seed(c_in + c_out)
    x = torch.randn(3, c_in, size, size, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c_in, c_out, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c_out, generator=gen, dtype=torch.float64, requires_grad=True)
    ours = _ConvTranspose4x4Stride2.apply(x, weight, bias, subpixel)
    torchs = F.conv_transpose2d(x, weight, bias, stride=2, padding=1)
    assert ours.shape == torchs.shape == (3, c_out, 2 * size, 2 * size)
    torch.testing.assert_close(ours, torchs, rtol=1e-12, atol=1e-12)
    grad = torch.randn(torchs.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(ours, (x, weight, bias), grad),
                    torch.autograd.grad(torchs, (x, weight, bias), grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    small = (x[:1, :, :2, :2].detach().requires_grad_(), weight.detach().requires_grad_(),
             bias.detach().requires_grad_(), subpixel)
    assert torch.autograd.gradcheck(_ConvTranspose4x4Stride2.apply, small)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("subpixel", [True, False])
def test_own_transposed_convolution_has_second_derivatives(subpixel, channels_last):
    """Its backward is made of differentiable operations: a penalty on a gradient trains through it."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 3, 3, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = (x.requires_grad_(), torch.randn(8, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True),
              torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradgradcheck(lambda *a: _ConvTranspose4x4Stride2.apply(*a, subpixel), inputs)


def test_own_transposed_convolution_in_channels_last_keeps_the_layout():
    """Channels-last in, channels-last out, and the gradient of x in x's layout (a one-channel gradient too)."""
    gen = torch.Generator().manual_seed(0)
    for c_in, c_out, subpixel in ((16, 1, True), (32, 16, False)):
        x = torch.randn(4, c_in, 7, 7, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
        weight = torch.randn(c_in, c_out, 4, 4, generator=gen, requires_grad=True)
        bias = torch.randn(c_out, generator=gen, requires_grad=True)
        y = _ConvTranspose4x4Stride2.apply(x, weight, bias, subpixel)
        torch.testing.assert_close(y, F.conv_transpose2d(x, weight, bias, stride=2, padding=1), rtol=1e-5, atol=1e-5)
        if c_out > 1:
            assert y.is_contiguous(memory_format=torch.channels_last)
        (grad_x,) = torch.autograd.grad(y, x, torch.randn(y.shape, generator=gen))
        assert grad_x.is_contiguous(memory_format=torch.channels_last) and not grad_x.is_contiguous()


@pytest.mark.parametrize("c,o,height,width", [(16, 32, 14, 14), (3, 5, 7, 6), (2, 1, 2, 3)])
def test_weight_gradient_by_matrix_multiply_is_torchs(c, o, height, width):
    """One multiply of the output gradient with the input's 4×4 patches gives torch's weight gradient of a
    stride-2 convolution (odd sizes too), and with the roles swapped that of a transposed convolution."""
    gen = torch.Generator().manual_seed(c + o)
    x = torch.randn(3, c, height, width, generator=gen, dtype=torch.float64)
    weight = torch.randn(o, c, 4, 4, generator=gen, dtype=torch.float64)
    grad = torch.randn(F.conv2d(x, weight, stride=2, padding=1).shape, generator=gen, dtype=torch.float64)
    _, torchs, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, [2, 2], [1, 1], [1, 1], False,
                                                       [0, 0], 1, [False, True, False])
    torch.testing.assert_close(conv_weight_grad(x, grad), torchs, rtol=1e-12, atol=1e-12)
    small = torch.randn(3, o, 3, 2, generator=gen, dtype=torch.float64)  # a transposed convolution's input
    transposed = torch.randn(o, c, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = F.conv_transpose2d(small, transposed, stride=2, padding=1)
    out_grad = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (torchs,) = torch.autograd.grad(y, transposed, out_grad)
    torch.testing.assert_close(conv_weight_grad(out_grad, small), torchs, rtol=1e-12, atol=1e-12)


def test_layers_with_the_weight_gradient_by_multiply_have_first_and_second_derivatives():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    inputs = (x, torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True),
              torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(_Conv4x4Stride2.apply, inputs)
    assert torch.autograd.gradgradcheck(_Conv4x4Stride2.apply, inputs)
    torch.testing.assert_close(_Conv4x4Stride2.apply(*inputs), F.conv2d(*inputs, stride=2, padding=1))
    inputs = (torch.randn(1, 3, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True),
              torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True), inputs[2])
    for subpixel in (False, True):
        transposed = lambda *a: _ConvTranspose4x4Stride2.apply(*a, subpixel, True)  # noqa: E731
        assert torch.autograd.gradcheck(transposed, inputs)
        assert torch.autograd.gradgradcheck(transposed, inputs)


def test_the_weight_gradient_is_a_multiply_only_where_it_was_measured_faster(monkeypatch):
    """bf16 on a CPU with AMX only: 32+ channels each side and output maps of at most 4×4, whatever the
    batch (without AMX, oneDNN's kernel was as fast in the step: bench/accelerations.py)."""
    from aevb.model import precision

    x = torch.empty(128, 16, 14, 14, dtype=BF16)
    monkeypatch.setattr(precision, "amx_usable", lambda: False)
    y = torch.empty(128, 32, 8, 8, dtype=BF16)
    assert not weight_grad_by_matmul(x, (16, 14, 14), 32)
    assert not weight_grad_by_matmul(y, (32, 8, 8), 64)  # what the AMX rule takes, without AMX
    monkeypatch.setattr(precision, "amx_usable", lambda: True)
    assert not weight_grad_by_matmul(y.float(), (32, 8, 8), 64)  # bf16 only
    assert not weight_grad_by_matmul(x, (16, 14, 14), 32)  # a 7×7 output map: oneDNN's AMX kernel is faster
    assert not weight_grad_by_matmul(torch.empty(32, 32, 14, 14, dtype=BF16), (32, 14, 14), 32)
    y = torch.empty(128, 32, 8, 8, dtype=BF16)
    assert weight_grad_by_matmul(y, (32, 8, 8), 64)  # a 4×4 output map, 32+ channels each side
    assert weight_grad_by_matmul(torch.empty(512, 64, 8, 8, dtype=BF16), (64, 8, 8), 64)  # 8.4M, at the limit
    assert not weight_grad_by_matmul(torch.empty(1024, 64, 8, 8, dtype=BF16), (64, 8, 8), 64)
    assert not weight_grad_by_matmul(y, (32, 8, 8), 16)
    assert not weight_grad_by_matmul(torch.empty(128, 16, 8, 8, dtype=BF16), (16, 8, 8), 32)
    assert not weight_grad_by_matmul(y.float(), (32, 8, 8), 64)
    calls = []
    original = conv_weight_grad

    def layers_by_multiply(data_shape, amx):
        """The input shapes of the layers whose weight gradient a bf16 step of the conv VAE takes by multiply."""
        monkeypatch.setattr(precision, "amx_usable", lambda: amx)
        torch.manual_seed(0)
        model = aevb.VAE(data_shape=data_shape, latent_dim=4, arch="conv")
        calls.clear()
        with matmul_dtype(BF16):
            out = model.loss(torch.rand(8, *data_shape))
        out.loss.backward()
        return sorted(tuple(s) for s in calls)

    monkeypatch.setattr(aevb.model.layers, "conv_weight_grad", lambda *a: calls.append(a[0].shape) or original(*a))
    assert layers_by_multiply((1, 28, 28), amx=True) == []  # the MNIST network's maps are 7×7 and larger
    assert layers_by_multiply((3, 64, 64), amx=False) == []
    # the 64×64 RGB network's 4×4 maps with 32+ channels each side: the convolution into 64 channels
    # and the transposed convolution out of them (its output's patches)
    assert layers_by_multiply((3, 64, 64), amx=True) == [(8, 64, 8, 8), (8, 64, 8, 8)]


def test_channels_last_helpers():
    x = torch.randn(2, 8, 3, 5).contiguous(memory_format=torch.channels_last)
    assert torch.equal(_pixel_shuffle(x), F.pixel_shuffle(x, 2))
    assert torch.equal(_pixel_shuffle(x.contiguous()), F.pixel_shuffle(x, 2))
    one = torch.randn(2, 1, 3, 5)
    view = _channels_last(one)
    assert torch.equal(view, one) and view.data_ptr() == one.data_ptr() and view.stride() == (15, 1, 5, 1)
    assert torch.equal(_channels_last(x.contiguous()), x)


def test_subpixel_weight_places_every_tap_once():
    """Each of the 16 taps of every (input, output) channel pair lands in exactly one phase."""
    weight = torch.arange(1.0, 2 * 3 * 16 + 1).reshape(2, 3, 4, 4)
    kernel = subpixel_weight(weight)  # [12, 2, 3, 3]
    assert kernel.shape == (12, 2, 3, 3)
    for o in range(3):
        for c in range(2):
            taps = kernel[4 * o:4 * o + 4, c].flatten()
            assert sorted(taps[taps != 0].tolist()) == sorted(weight[c, o].flatten().tolist())


def test_the_layer_takes_the_subpixel_path_only_where_it_applies():
    assert ConvTranspose2d(16, 1, 4, stride=2, padding=1)._subpixel()
    assert not ConvTranspose2d(32, 16, 4, stride=2, padding=1)._subpixel()  # direct form is faster here
    assert ConvTranspose2d(32, 16, 4, stride=2, padding=1)._stride2_4x4()
    assert not ConvTranspose2d(16, 1, 3, stride=2, padding=1)._stride2_4x4()
    assert not ConvTranspose2d(16, 1, 4, stride=2, padding=1, output_padding=1)._stride2_4x4()
    # the MNIST conv decoder ends in one, and the model's output equals torch's layer
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(1, 28, 28), latent_dim=4, arch="conv")
    last = [m for m in model.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)][-1]
    assert last._subpixel()
    h = torch.randn(5, 16, 14, 14)
    torch.testing.assert_close(last(h), F.conv_transpose2d(h, last.weight, last.bias, stride=2, padding=1),
                               rtol=1e-5, atol=1e-5)


@native_bf16
@pytest.mark.parametrize("layer", [Linear(256, 256), Conv2d(3, 16, 4, stride=2, padding=1),
                                   Conv2d(16, 32, 4, stride=2, padding=1),
                                   ConvTranspose2d(32, 16, 4, stride=2, padding=1),
                                   ConvTranspose2d(16, 1, 4, stride=2, padding=1),
                                   ConvTranspose2d(6, 4, 3, stride=1, padding=1)])
def test_in_bf16_a_layer_is_its_float32_self_rounded(layer):
    """Output in bf16 (channels-last for a convolution on the CPU), values and gradients those of float32
    to bf16's precision: the inputs, weights and outputs are rounded, the sums are not."""
    torch.manual_seed(0)
    shape = (128, 256) if isinstance(layer, Linear) else (5, layer.in_channels, 8, 8)  # a Linear worth lowering
    x = torch.randn(shape, requires_grad=True)
    reference = layer(x)
    grad = torch.randn(reference.shape)
    ref_grads = torch.autograd.grad(reference, (x, layer.weight, layer.bias), grad)
    with matmul_dtype(BF16):
        y = layer(x)
    assert y.dtype == BF16
    if y.dim() == 4 and y.shape[1] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    scale = reference.detach().abs().max()
    torch.testing.assert_close(y.float(), reference, rtol=2e-2, atol=2e-2 * float(scale))
    grads = torch.autograd.grad(y.float(), (x, layer.weight, layer.bias), grad)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32 and g.shape == r.shape
        cosine = F.cosine_similarity(g.flatten(), r.flatten(), dim=0)
        assert cosine > 0.999, float(cosine)



@native_bf16
def test_in_bf16_unbatched_images_and_what_the_model_returns_keep_torchs_layouts():
    """[C, H, W] input works as with torch's layers, and nothing channels-last leaves the model."""
    torch.manual_seed(0)
    for layer in (Conv2d(3, 8, 4, stride=2, padding=1), ConvTranspose2d(8, 4, 4, stride=2, padding=1),
                  ConvTranspose2d(8, 4, 3, padding=1)):
        x = torch.randn(layer.in_channels, 8, 8, requires_grad=True)
        with matmul_dtype(BF16):
            y = layer(x)
        assert y.dim() == 3
        torch.testing.assert_close(y.float(), layer(x.detach()), rtol=3e-2, atol=3e-2)
        y.float().sum().backward()
        assert x.grad.shape == x.shape
    # 16 → 5 channels takes the direct transposed convolution, whose bf16 output is channels-last
    model = aevb.VAE(data_shape=(5, 16, 16), latent_dim=4, arch="conv")
    with matmul_dtype(BF16):
        outputs = (model.sample(2), model.reconstruct(torch.rand(2, 5, 16, 16)), model.decode(torch.zeros(2, 4)).mean)
    for out in outputs:
        assert out.dtype == torch.float32 and out.is_contiguous()


@pytest.mark.parametrize("layer", [Conv2d(1, 16, 4, stride=2, padding=1), Conv2d(16, 32, 4, stride=2, padding=1),
                                   ConvTranspose2d(32, 16, 4, stride=2, padding=1),
                                   ConvTranspose2d(16, 1, 4, stride=2, padding=1),
                                   ConvTranspose2d(6, 4, 3, stride=1, padding=1)])
def test_in_float32_on_the_cpu_a_layer_computes_torchs_in_channels_last(layer):
    """Outside any bf16 context the convolutions take channels-last input on the CPU (faster in oneDNN's
    float32 kernels too): the values and gradients are torch's NCHW layer's, in float32 and float64."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        layer = layer.to(dtype)
        torch.manual_seed(0)
        x = torch.randn(5, layer.in_channels, 8, 8, dtype=dtype, requires_grad=True)
        torchs = type(layer).__mro__[1].forward(layer, x)  # nn.Conv2d / nn.ConvTranspose2d on NCHW
        ours = layer(x)
        assert ours.dtype == dtype and ours.shape == torchs.shape
        if ours.shape[1] > 1 and layer.kernel_size == (4, 4):
            assert ours.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(ours, torchs, rtol=tol, atol=tol)
        grad = torch.randn(torchs.shape, dtype=dtype)
        for a, b in zip(torch.autograd.grad(ours, (x, layer.weight, layer.bias), grad),
                        torch.autograd.grad(torchs, (x, layer.weight, layer.bias), grad)):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))
