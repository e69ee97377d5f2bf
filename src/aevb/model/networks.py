"""Encoder and decoder bodies, chosen by name and by data shape.

Every entry is a function

    build(data_shape, latent_dim, encoder_outputs, decoder_channels, hidden)
        -> (encoder, decoder)

where the encoder maps x [B, *data_shape] to the posterior's parameters
[B, encoder_outputs], and the decoder maps z [B, latent_dim] to the
likelihood's parameters [B, decoder_channels, *data_shape[1:]].  The model
decides how many parameters each head needs (two per latent dimension for a
Gaussian posterior, two channels per data channel for a per-pixel σ), so the
networks know nothing about distributions.

Register a new body with ``@NETWORKS.register("name")``, or keep such a
function in a package of your own and name it by its import path
(``arch="my_package.nets:build"``, ``--arch my_package.nets:build``):
``config.json`` records the path, and every process that rebuilds the model
imports it (its output sizes are checked when the model is built).  Build it from the
layers of :mod:`aevb.layers` (``Linear``, ``Conv2d``, ``ConvTranspose2d``:
the torch layers, plus bf16 multiplies under mixed-precision training and a
faster form of the last transposed convolution).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from aevb.errors import UserError
from aevb.model.layers import Conv2d, ConvTranspose2d, Linear
from aevb.registry import NETWORKS

Shape = tuple[int, ...]


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _mlp(sizes: Sequence[int]) -> list[nn.Module]:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    return layers


@NETWORKS.register("linear")
def build_linear(data_shape: Shape, latent_dim: int, encoder_outputs: int,
                 decoder_channels: int, hidden: Sequence[int] | None = None):
    """Affine encoder and decoder: with a Gaussian likelihood, probabilistic PCA."""
    if hidden:
        raise UserError("the linear network has no hidden layers; drop --hidden or use --arch mlp")
    out_shape = (decoder_channels, *data_shape[1:])
    encoder = nn.Sequential(nn.Flatten(), Linear(_numel(data_shape), encoder_outputs))
    decoder = nn.Sequential(Linear(latent_dim, _numel(out_shape)), nn.Unflatten(1, out_shape))
    return encoder, decoder


@NETWORKS.register("mlp")
def build_mlp(data_shape: Shape, latent_dim: int, encoder_outputs: int,
              decoder_channels: int, hidden: Sequence[int] | None = None):
    """Fully connected, ReLU.  Default: Kingma & Welling's one hidden layer of 400."""
    hidden = list(hidden) if hidden else [400]
    out_shape = (decoder_channels, *data_shape[1:])
    encoder = nn.Sequential(nn.Flatten(), *_mlp([_numel(data_shape), *hidden, encoder_outputs]))
    decoder = nn.Sequential(
        *_mlp([latent_dim, *reversed(hidden), _numel(out_shape)]),
        nn.Unflatten(1, out_shape),
    )
    return encoder, decoder


def _conv_channels(height: int) -> list[int]:
    """Channels of the stride-2 convolutions for an image of this height.

    Small grey images (28×28, 8×8): the tutorial's 16 and 32.  32×32 and larger
    (CIFAR-10, CelebA at 64×64): 32, 32, 64, 64, … down to a 4×4 map, as in the
    β-VAE papers' CelebA network.
    """
    if height < 32:
        return [16, 32]
    n_layers = max(1, int(math.log2(height // 4)))
    return [32 if i < 2 else 64 for i in range(n_layers)]


@NETWORKS.register("conv")
def build_conv(data_shape: Shape, latent_dim: int, encoder_outputs: int,
               decoder_channels: int, hidden: Sequence[int] | None = None):
    """4×4 stride-2 convolutions, a hidden linear layer, and the mirror image.

    28×28 grey: conv 16 → conv 32 → linear 128 (the tutorial network);
    32×32 / 64×64 RGB: conv 32-32-(64-64) → linear 256.
    """
    if len(data_shape) != 3:
        raise UserError(
            f"--arch conv needs images shaped (channels, height, width), got data of shape "
            f"{tuple(data_shape)}; use --arch mlp for tabular data"
        )
    channels_in, height, width = data_shape
    channels = _conv_channels(height)
    factor = 2 ** len(channels)
    if height % factor or width % factor:
        raise UserError(
            f"--arch conv halves the image {len(channels)} times, so height and width must be "
            f"multiples of {factor}; got {height}×{width}: resize an image folder with --image-size, pad or resize "
            f"the images of a data file, or use --arch mlp"
        )
    hidden = list(hidden) if hidden else [128 if height < 32 else 256]
    feature_shape = (channels[-1], height // factor, width // factor)

    down: list[nn.Module] = []
    for c_in, c_out in zip([channels_in, *channels[:-1]], channels):
        down += [Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
    # the last ReLU after the flattening (elementwise, so the same function): a
    # channels-last feature map is copied to NCHW order there, and the ReLU's
    # backward would otherwise see its output and its gradient in two layouts
    # (ten times slower on the CPU).  Indices of the layers with weights are unchanged.
    down.insert(-1, nn.Flatten())
    encoder = nn.Sequential(
        *down,  # [B, C_last·H/f·W/f]
        *_mlp([_numel(feature_shape), *hidden, encoder_outputs]),
    )

    up: list[nn.Module] = []
    reversed_channels = [*reversed(channels), decoder_channels]
    for i, (c_in, c_out) in enumerate(zip(reversed_channels[:-1], reversed_channels[1:])):
        up.append(ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
        if i < len(channels) - 1:
            up.append(nn.ReLU(inplace=True))
    decoder = nn.Sequential(
        *_mlp([latent_dim, *reversed(hidden), _numel(feature_shape)]),
        nn.ReLU(inplace=True),
        nn.Unflatten(1, feature_shape),
        *up,  # [B, decoder_channels, H, W]
    )
    return encoder, decoder


# -- a network of any origin: built by name or import path, or given, and checked ------------------------------


def built_networks(arch: str, data_shape: tuple[int, ...], latent_dim: int, encoder_outputs: int,
                    decoder_channels: int, hidden: list[int] | None) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) from the network ``arch`` names: registered, or a function found by its import path."""
    built = NETWORKS.get(arch)(data_shape, latent_dim, encoder_outputs, decoder_channels, hidden)
    if not (isinstance(built, tuple) and len(built) == 2 and all(isinstance(m, nn.Module) for m in built)):
        raise UserError(f"network {arch!r} returned {type(built).__name__}, not (encoder, decoder): two "
                        f"torch.nn.Modules (see aevb.model.networks)")
    return built


def check_network(network: nn.Module, name: str, input_shape: tuple[int, ...], output_shape: tuple[int, ...],
                  holding: str) -> None:
    """A UserError unless ``network`` maps a batch [2, *input_shape] to [2, *output_shape] (``holding`` says
    what the output holds).  Run in eval mode without gradients, so that no statistics and no weights change."""
    if not isinstance(network, nn.Module):
        raise UserError(f"{name} is a {type(network).__name__}; pass a torch.nn.Module")
    weight = next(network.parameters(), None)
    inputs = torch.zeros(2, *input_shape, dtype=torch.float32 if weight is None else weight.dtype,
                         device=None if weight is None else weight.device)
    expected = f"[B, {', '.join(map(str, output_shape))}]"
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            output = network(inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{name} fails on a batch [2, {', '.join(map(str, input_shape))}] ({first_line}); it must map "
                        f"[B, {', '.join(map(str, input_shape))}] to {expected}") from None
    finally:
        network.train(was_training)
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
    if shape != (2, *output_shape):
        got = f"[{', '.join(map(str, shape))}]" if shape is not None else f"a {type(output).__name__}"
        raise UserError(f"{name} returns {got} for a batch of 2; it must return {expected}, {holding}")
