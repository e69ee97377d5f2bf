"""Transforms of examples for training and figures: binarisation, dequantisation, a fixed held-out set.

:func:`binarize` and :func:`dequantize` draw their noise from the
``torch.Generator`` they are given, and apply to
:class:`~aevb.data.streaming.StreamedImages` batch by batch, as they are
read; :func:`holdout_indices` picks the examples of reconstruction pictures.
"""

from __future__ import annotations

import torch

from aevb.config import BINARIZE_MODES
from aevb.data.streaming import StreamedImages
from aevb.errors import UserError


def binarize(x: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Binarise pixels x in [0, 1] (any shape): "none" returns x, "threshold" (x > 0.5),
    "dynamic" a fresh Bernoulli(x) sample on every call (Salakhutdinov & Murray 2008).

    The generator must live on x's device.  Streamed images are binarised
    batch by batch, as they are read.
    """
    if isinstance(x, StreamedImages) and mode in BINARIZE_MODES:
        return x if mode == "none" else x.transformed(lambda batch: binarize(batch, mode, generator))
    if mode == "none":
        return x
    if mode == "threshold":
        return (x > 0.5).to(x.dtype)
    if mode == "dynamic":
        return torch.bernoulli(x, generator=generator)
    raise UserError(f"unknown binarization {mode!r}; choose one of: {', '.join(BINARIZE_MODES)}")


def dequantize(x: torch.Tensor, levels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniformly dequantised pixels (k + u) / levels, u ~ U[0, 1), of x = k / (levels − 1) (any shape).

    The bins [k, k + 1) / levels tile [0, 1], one a level, and each holds its
    level's value k / (levels − 1); a density p over [0, 1] then gives each
    level the probability P_k = ∫ p over its bin, and by Jensen's inequality
    E_u[−log p((k + u) / levels)] + log levels ≥ −log P_k: the bits per
    dimension of a continuous likelihood on dequantised data bound those of
    the discrete data from above (Theis et al. 2016).  The generator must
    live on x's device; without one the global generator draws u.  Streamed
    images are dequantised batch by batch, as they are read.
    """
    if isinstance(x, StreamedImages):
        return x.transformed(lambda batch: dequantize(batch, levels, generator))
    k = (x * (levels - 1)).round_()
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (k + u).div_(levels)


def holdout_indices(labels: torch.Tensor | None, n: int = 10, *, num_examples: int | None = None) -> torch.Tensor:
    """Indices [≤ n] of a small fixed set of examples for reconstruction pictures.

    With labels [N]: the first example of each class (classes in ascending
    order), then the second of each, and so on, until there are n; without:
    the first n examples.  Never more than there are (``num_examples``, or
    the number of labels).
    """
    if labels is None:
        return torch.arange(n if num_examples is None else min(n, num_examples))
    labels = labels.reshape(-1).cpu()
    order = torch.argsort(labels, stable=True)  # [N] grouped by class, file order within a class
    grouped = labels[order]
    starts = torch.ones_like(grouped, dtype=torch.bool)  # [N] True at the first example of a class
    starts[1:] = grouped[1:] != grouped[:-1]
    group_start = torch.cummax(torch.where(starts, torch.arange(len(grouped)), 0), dim=0).values
    rank = torch.arange(len(grouped)) - group_start  # [N] place of each example within its class
    by_rank = torch.argsort(rank, stable=True)  # first of every class, then second of every class, …
    return order[by_rank][:n]
