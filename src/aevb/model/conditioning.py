"""A class label as an input of the networks: the conditional VAE (Sohn et al. 2015, "Learning Structured Output
Representation using Deep Conditional Generative Models"; Kingma et al. 2014's M2 with y observed).

A conditional model is the same model with the label y one more input of
both networks, q(z|x, y) and p(x|z, y), and the prior p(z) unchanged.  It is
built by composition, for any network (registered, a user's by import path,
or modules given): the networks are built for augmented shapes, and the model
appends the one-hot label to what it feeds them:

    encoder input  x [B, C, H, W]  →  [B, C + K, H, W]   (K constant channels, one of them 1/√(H·W))
                   x [B, D]        →  [B, D + K]         (K features, one of them 1)
    decoder input  z [B, latent]   →  [B, latent + K]

So no architecture knows about labels, and a network's weights are stored
under the same names as the unconditional model's.

The label's plane holds 1/√(H·W), not 1: each plane then has the norm of
one feature.  An MLP flattens the image, and a plane of ones is H·W copies
of the label whose weights Adam moves each by about the learning rate, so
the label's effect moved H·W times as fast as a pixel's: on the MNIST split
(MLP 400, 20 latent dimensions, dynamic binarisation, 2 epochs) the
validation ELBO was −170.3 nats with planes of ones, −132.0 with unit-norm
planes, and −136.9 without labels.  A convolution sees the smaller value
in every window and learns its weight as it does a pixel's.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from aevb.errors import UserError

MAX_CLASSES = 100_000  # a one-hot input wider than this is a labels file of ids, not of classes


def check_classes(n_classes: Any) -> int:
    """K, the number of classes, as an int ≥ 2 (a UserError names a bad value)."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral) or not 2 <= n_classes <= MAX_CLASSES:
        raise UserError(f"n_classes must be a whole number of classes in [2, {MAX_CLASSES}], got {n_classes!r}")
    return int(n_classes)


def encoder_input_shape(data_shape: tuple[int, ...], n_classes: int) -> tuple[int, ...]:
    """The shape of one example with its label appended: channels for images, features for vectors."""
    return (data_shape[0] + n_classes, *data_shape[1:])


def one_hot(label: torch.Tensor, n_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """[B] class indices → [B, K] in ``dtype`` (scatter, so no check reads the values back from the device)."""
    return torch.zeros(*label.shape, n_classes, dtype=dtype, device=label.device).scatter_(
        -1, label.unsqueeze(-1), 1.0)


def with_label(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [B, C, *spatial] and one-hot y [B, K] → [B, C + K, *spatial]: y as K constant channels (features), each
    plane of unit norm (the module's docstring says why)."""
    spatial = x.shape[2:]
    y = y * math.prod(spatial) ** -0.5  # 1 for vectors
    channels = y.reshape(*y.shape, *(1,) * len(spatial)).expand(*y.shape, *spatial)  # [B, K, *spatial]
    return torch.cat([x, channels.to(x.dtype)], dim=1)


def with_label_code(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z [*S, B, D] and one-hot y [B, K] → [*S, B, D + K] (the same label for every sample of an example)."""
    return torch.cat([z, y.to(z.dtype).expand(*z.shape[:-1], y.shape[-1])], dim=-1)


def checked_label(label: Any, n_classes: int, batch: int, device: torch.device) -> torch.Tensor:
    """``label`` as class indices [batch] (int64, on ``device``): a tensor or array [batch], or one int for all.

    The range is checked where the labels are on the CPU (free); on an
    accelerator that would wait for the device at every step, so the data
    are checked once where they are loaded (:class:`aevb.training.data.TrainingData`).
    """
    if isinstance(label, numbers.Integral) and not isinstance(label, bool):
        label = torch.full((batch,), int(label), dtype=torch.long)
    label = torch.as_tensor(label)
    if label.is_floating_point() or label.dtype == torch.bool or label.is_complex():
        raise UserError(f"label of dtype {label.dtype}: pass class indices, whole numbers in [0, {n_classes})")
    if tuple(label.shape) != (batch,):
        raise UserError(f"label of shape {tuple(label.shape)} does not fit a batch of {batch}: pass one class "
                        f"index per example, [{batch}], or one int for all")
    if label.device.type == "cpu" and batch and not (0 <= int(label.min()) and int(label.max()) < n_classes):
        raise UserError(f"label {int(label.min()) if int(label.min()) < 0 else int(label.max())} is out of range: "
                        f"this model knows {n_classes} classes, 0 … {n_classes - 1}")
    return label.to(device=device, dtype=torch.long)
