"""aevb.layers: the sub-pixel transposed convolution computes torch's transposed convolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import aevb
from aevb.layers import ConvTranspose2d, _SubpixelConvTranspose2d, subpixel_weight


@pytest.mark.parametrize("c_in,c_out,size", [(16, 1, 14), (32, 3, 16), (8, 2, 5), (4, 1, 1)])
def test_subpixel_transposed_convolution_equals_torchs(c_in, c_out, size):
    gen = torch.Generator().manual_seed(c_in + c_out)
    x = torch.randn(3, c_in, size, size, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c_in, c_out, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c_out, generator=gen, dtype=torch.float64, requires_grad=True)
    ours = _SubpixelConvTranspose2d.apply(x, weight, bias)
    torchs = F.conv_transpose2d(x, weight, bias, stride=2, padding=1)
    assert ours.shape == torchs.shape == (3, c_out, 2 * size, 2 * size)
    torch.testing.assert_close(ours, torchs, rtol=1e-12, atol=1e-12)
    grad = torch.randn(torchs.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(ours, (x, weight, bias), grad),
                    torch.autograd.grad(torchs, (x, weight, bias), grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    small = (x[:1, :, :2, :2].detach().requires_grad_(), weight.detach().requires_grad_(),
             bias.detach().requires_grad_())
    assert torch.autograd.gradcheck(_SubpixelConvTranspose2d.apply, small)


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
    assert not ConvTranspose2d(16, 1, 3, stride=2, padding=1)._subpixel()
    assert not ConvTranspose2d(16, 1, 4, stride=2, padding=1, output_padding=1)._subpixel()
    # the MNIST conv decoder ends in one, and the model's output equals torch's layer
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(1, 28, 28), latent_dim=4, arch="conv")
    last = [m for m in model.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)][-1]
    assert last._subpixel()
    h = torch.randn(5, 16, 14, 14)
    torch.testing.assert_close(last(h), F.conv_transpose2d(h, last.weight, last.bias, stride=2, padding=1),
                               rtol=1e-5, atol=1e-5)
