"""The codes of a data set: the posterior mean and σ of q(z|x) per example (``aevb encode``; what samplers are
fitted to)."""

from __future__ import annotations

import torch

from aevb.model.base import Model


@torch.no_grad()
def codes(model: Model, x: torch.Tensor, batch_size: int = 1000,
          labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, σ) of q(z|x) per example, each [N, D] float32 on the CPU; x [N, *data_shape] read a batch at a time
    (q(z|x, y) with the labels [N] of a conditional model)."""
    means, sigmas = [], []
    was_training = model.training
    model.eval()
    for start in range(0, len(x), batch_size):
        y = None if labels is None else labels[start:start + batch_size].to(model.device)
        posterior = model.encode(x[start:start + batch_size].to(model.device), y)
        means.append(posterior.mean.float().cpu())
        sigmas.append(posterior.stddev.float().cpu())
    model.train(was_training)
    return torch.cat(means), torch.cat(sigmas)
