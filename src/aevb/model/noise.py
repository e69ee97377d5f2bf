"""Where the noise of a training step comes from: torch's global generator, or the rows of a global batch.

Outside training (a user's loop, evaluation) every draw is torch's own, from
the global generator, as before.  Inside :func:`batch_rows` (the trainer, at
each step) a draw of shape [..., b, ...] for the b examples of this process
is taken as rows ``start:stop`` of a draw of shape [..., total, ...] for the
whole global batch, from the step's generator.  So an example gets the same
noise whichever process computes it and however many there are: the
reparameterisation noise, IWAE samples, a denoising AE's corruption and a
contractive AE's projections all come from here (the trainer's dynamic
binarisation and dequantisation too).  The model layer knows no processes:
the trainer (:mod:`aevb.training.distributed`) says which rows are its own.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


@dataclass(frozen=True)
class BatchRows:
    """This process's rows ``start:stop`` of a global batch of ``total`` examples, and the step's generator."""

    generator: torch.Generator
    start: int
    stop: int
    total: int


_ROWS: ContextVar[BatchRows | None] = ContextVar("aevb_batch_rows", default=None)


@contextmanager
def batch_rows(generator: torch.Generator, start: int, stop: int, total: int) -> Iterator[None]:
    """Draw the noise of the examples ``start:stop`` of a global batch of ``total`` from ``generator``."""
    token = _ROWS.set(BatchRows(generator, start, stop, total))
    try:
        yield
    finally:
        _ROWS.reset(token)


def active() -> bool:
    """Whether draws are being taken as rows of a global batch (inside :func:`batch_rows`)."""
    return _ROWS.get() is not None


def randn(shape: Sequence[int], example_dim: int, *, dtype: torch.dtype | None = None,
          device: torch.device | None = None) -> torch.Tensor:
    """Standard normal noise of ``shape``, whose dimension ``example_dim`` runs over the batch's examples."""
    return _draw(torch.randn, shape, example_dim, dtype, device)


def rand(shape: Sequence[int], example_dim: int, *, dtype: torch.dtype | None = None,
         device: torch.device | None = None) -> torch.Tensor:
    """Uniform noise in [0, 1) of ``shape``, whose dimension ``example_dim`` runs over the batch's examples."""
    return _draw(torch.rand, shape, example_dim, dtype, device)


def _draw(draw, shape: Sequence[int], example_dim: int, dtype, device) -> torch.Tensor:
    rows = _ROWS.get()
    if rows is None:
        return draw(tuple(shape), dtype=dtype, device=device)
    shape = list(shape)
    dim = example_dim % len(shape)
    if shape[dim] != rows.stop - rows.start:
        raise ValueError(f"noise of shape {tuple(shape)} for {rows.stop - rows.start} examples along dimension {dim}")
    shape[dim] = rows.total
    whole = draw(tuple(shape), generator=rows.generator, dtype=dtype, device=device)
    return whole if rows.stop - rows.start == rows.total else whole.narrow(dim, rows.start, rows.stop - rows.start)
