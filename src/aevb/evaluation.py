"""Test metrics of a trained model, in nats per example.

``evaluate(model, x)`` returns one flat dictionary: the negative ELBO and its
two terms, the importance-sampled negative log-likelihood with k samples
(Burda et al. 2016), their gap, bits per dimension where the numbers are
likelihoods of 8-bit or binary data, the reconstruction error, and the
posterior diagnostics (KL per latent dimension, active units).
"""

from __future__ import annotations

import math

import torch

from .models import Model
from .objectives import elbo_terms

# Burda et al. (2016): a latent dimension is active when the variance over the
# data of its posterior mean exceeds this.
ACTIVE_UNIT_THRESHOLD = 0.01


@torch.no_grad()
def posterior_statistics(model: Model, x: torch.Tensor, batch_size: int = 1000) -> dict[str, torch.Tensor]:
    """Posterior means [N, D], standard deviations [N, D] and per-dimension KL [N, D] over x."""
    device = next(model.parameters()).device
    means, stds, kls = [], [], []
    prior = model.prior()
    for start in range(0, x.shape[0], batch_size):
        posterior = model.encode(x[start:start + batch_size].to(device))
        means.append(posterior.mean.float())
        stds.append(posterior.stddev.float())
        if model.posterior.has_density:
            # KL of a diagonal Gaussian to N(0, I) factorises over dimensions
            kls.append(torch.distributions.kl_divergence(posterior.base_dist, prior.base_dist).float())
    return {
        "mean": torch.cat(means),
        "std": torch.cat(stds),
        "kl": torch.cat(kls) if kls else None,
    }


def active_units(posterior_means: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> torch.Tensor:
    """Boolean [D]: Var_x(E_q[z_d | x]) > threshold (Burda et al. 2016)."""
    return posterior_means.var(dim=0, unbiased=True) > threshold


def bits_per_dim(nll: float, model: Model, x: torch.Tensor, levels: int | None) -> float | None:
    """Bits per dimension, where the negative log-likelihood is one of discrete data.

    Binary data under a Bernoulli likelihood: nll / (n·ln 2).  8-bit images
    (scaled to [0, 1]) under a density: the density times the bin width
    1/(levels − 1) gives the probability of each value, so
    (nll + n·ln(levels − 1)) / (n·ln 2).  Otherwise (grey values under a
    Bernoulli, real-valued data) there is no such number: None.
    """
    n = math.prod(model.data_shape)
    binary = bool(((x == 0) | (x == 1)).all())
    if getattr(model.likelihood, "discrete", False):
        return nll / (n * math.log(2)) if binary else None
    if levels and not binary:
        return (nll + n * math.log(levels - 1)) / (n * math.log(2))
    return None


@torch.no_grad()
def evaluate(model: Model, x: torch.Tensor, *, iw_samples: int = 5000, batch_size: int = 500,
             levels: int | None = None, progress: bool = False) -> dict:
    """Metrics of ``model`` on x [N, *data_shape] (already binarised if the model expects it)."""
    model.eval()
    device = next(model.parameters()).device
    n = x.shape[0]
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # rec, kl, log p, sq. error, abs. error
    has_density = model.posterior.has_density
    batches = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"evaluating (k={iw_samples})", unit="batch", leave=False)
    for start in batches:
        xb = x[start:start + batch_size].to(device)
        recon = model.reconstruct(xb)
        squared = (recon - xb).pow(2).flatten(1).sum(1).double().sum()
        absolute = (recon - xb).abs().flatten(1).sum(1).double().sum()
        if has_density:
            terms = elbo_terms(model, xb)
            log_px = model.log_likelihood(xb, n_samples=iw_samples)
            batch_sums = [terms.reconstruction.sum(), terms.kl.sum(), log_px.sum()]
        else:
            reconstruction = -model.decode(model.encode(xb).mean).log_prob(xb).float().sum()
            batch_sums = [reconstruction, torch.zeros((), device=device), torch.zeros((), device=device)]
        sums += torch.stack([*(t.double() for t in batch_sums), squared, absolute])
    rec, kl, log_px, squared, absolute = (sums / n).tolist()
    dims = math.prod(model.data_shape)

    stats = posterior_statistics(model, x)
    metrics: dict = {
        "examples": n,
        "model": model.name,
        "likelihood": model.config["likelihood"],
        "reconstruction_nll": rec,
        "mse_per_dim": squared / dims,
        "mae_per_dim": absolute / dims,
        "posterior_mu": stats["mean"].mean().item(),
        "posterior_sigma": stats["std"].mean().item(),
    }
    if has_density:
        nll = -log_px
        metrics.update({
            "neg_elbo": rec + kl,
            "kl": kl,
            "iw_samples": iw_samples,
            "nll": nll,
            "elbo_gap": (rec + kl) - nll,
            "bits_per_dim": bits_per_dim(nll, model, x, levels),
            "kl_per_dim": stats["kl"].mean(0).tolist(),
        })
        active = active_units(stats["mean"])
        metrics["active_units"] = int(active.sum())
        metrics["latent_dim"] = model.latent_dim
        metrics["collapsed"] = bool(active.sum() <= max(1, model.latent_dim // 10))
    return metrics
