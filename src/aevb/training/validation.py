"""Validation at each epoch's end: the mean ELBO and its terms on the held-out split."""

from __future__ import annotations

import torch

from aevb.model.base import Model
from aevb.model.objectives import elbo_terms


@torch.no_grad()
def mean_elbo_terms(model: Model, x: torch.Tensor, batch_size: int = 1000,
                    labels: torch.Tensor | None = None) -> dict[str, float]:
    """Mean ELBO, reconstruction and KL (nats per example) over x [N, ...], in eval mode; given the labels [N] of
    a conditional model, of log p(x|y).

    A model with a point-mass posterior (the AE) has no ELBO: only its
    reconstruction term −log p(x|z = f(x)) is returned.
    """
    was_training = model.training
    model.eval()
    device = model.device
    has_density = model.posterior.has_density
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        yb = None if labels is None else labels[start:start + batch_size].to(device)
        if has_density:
            terms = elbo_terms(model, xb, label=yb)
            totals += torch.stack([terms.reconstruction.sum(), terms.kl.sum()]).double()
        else:
            totals[0] += -model.decode(model.encode(xb).mean).log_prob(xb).double().sum()
    model.train(was_training)
    reconstruction, kl = (totals / x.shape[0]).tolist()
    if not has_density:
        return {"reconstruction": reconstruction}
    return {"elbo": -(reconstruction + kl), "reconstruction": reconstruction, "kl": kl}


def epoch_line(epoch: int, split: str, terms: dict[str, float]) -> str:
    """The line printed under the progress bar at an epoch's end."""
    if "elbo" in terms:
        return (f"epoch {epoch}: {split} ELBO {terms['elbo']:.2f} nats "
                f"(reconstruction {terms['reconstruction']:.2f}, KL {terms['kl']:.2f})")
    return f"epoch {epoch}: {split} reconstruction −log p(x|z) {terms['reconstruction']:.2f} nats"
