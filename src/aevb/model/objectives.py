"""Objectives and estimators, as functions of a model and a batch.

The whole data path of a latent-variable model is here, top to bottom:

    posterior = model.encode(x)            q(z|x), batch [B], event [D]
    z = posterior.rsample((L,))            [L, B, D]
    likelihood = model.decode(z)           p(x|z), batch [L, B]
    log p(x|z) = likelihood.log_prob(x)    [L, B]
    KL(q || p) = kl_divergence(posterior, model.prior())   [B]

and everything else (ELBO, the importance-weighted bound of Burda et al.
2016, the importance-sampled log-likelihood) is a reduction of these
quantities.  All values are in nats per example; reductions over samples run
in at least float32 (a bfloat16 model reduces in float32, a float64 model in
float64).

A conditional model (``n_classes``) takes the examples' labels y [B] as one
more argument of encode and decode, ``label=``, which every function here
passes on: its ELBO bounds log p(x|y), its importance sampler estimates
log p(x|y), and the prior p(z) is the same.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributions import Distribution, kl_divergence

from aevb.errors import NoLikelihoodError, UserError
from aevb.model.precision import at_least_float32


@dataclass
class ElboTerms:
    """The two terms of the ELBO for a batch, each [B] in nats.

    ``reconstruction`` is −E_q[log p(x|z)] averaged over the L samples drawn,
    ``kl`` is KL(q(z|x) ‖ p(z)) (analytic where torch knows a closed form,
    else the Monte Carlo estimate from the same samples).
    """

    reconstruction: torch.Tensor
    kl: torch.Tensor
    posterior: Distribution
    kl_layers: tuple[torch.Tensor, ...] | None = None  # [B] per stochastic layer (hierarchical models), top last
    z: torch.Tensor | None = None  # the draws the terms were estimated with ([B, D] or [L, B, D]; one layer)

    @property
    def elbo(self) -> torch.Tensor:
        return -(self.reconstruction + self.kl)


def kl_term(posterior: Distribution, prior: Distribution, z: torch.Tensor | None = None) -> torch.Tensor:
    """KL(q ‖ p) per example [B]; Monte Carlo over ``z`` [L, B, D] where no closed form exists."""
    try:
        return kl_divergence(posterior, prior)
    except NotImplementedError:
        if z is None:
            raise
        return (posterior.log_prob(z) - prior.log_prob(z)).mean(0)


def kl_per_dimension(posterior: Distribution, prior: Distribution) -> torch.Tensor:
    """KL(q(z_d|x) ‖ p(z_d)) per latent dimension, [B, D]: for a factorising prior and posterior
    (``Independent`` over [D]), whose KL is the sum of these."""
    return kl_divergence(posterior.base_dist, prior.base_dist)


def free_bits_kl(posterior: Distribution, prior: Distribution, free_bits: float) -> torch.Tensor:
    """Σ_d max(λ, mean_B KL(q(z_d|x) ‖ p(z_d))), a scalar in nats (Kingma et al. 2016).

    One group per latent dimension; the batch mean comes before the floor, so
    a dimension is free to carry up to λ nats on average, not per example.
    Needs a factorising prior and posterior (``Independent`` over [D]).
    """
    kl_per_dim = kl_per_dimension(posterior, prior)  # [B, D]
    return at_least_float32(kl_per_dim).mean(0).clamp(min=free_bits).sum()


def _check(model, x: torch.Tensor, what: str, likelihood: bool = False, **counts: int | None) -> None:
    """One clear error for a model without the density ``what`` needs, an empty batch or a count below 1."""
    if not model.posterior.has_density:
        raise NoLikelihoodError(f"model {model.name!r} has a point-mass code and defines no {what}; "
                                f"train a VAE or IWAE (--model vae) for one")
    if likelihood and not model.likelihood.normalized:
        raise NoLikelihoodError(f"likelihood {model.config.get('likelihood')!r} is not a normalised density of x "
                                f"(σ is fitted to each example), so it has no {what}")
    if x.shape[0] == 0:
        raise UserError(f"{what} of an empty batch: pass at least one example")
    for name, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise UserError(f"{name} must be a whole number ≥ 1, got {value!r}")


def elbo_terms(model, x: torch.Tensor, n_samples: int = 1, label: Any = None) -> ElboTerms:
    """Reconstruction and KL terms with ``n_samples`` reparameterised samples, each [B] in nats.

    The arguments are checked here; the estimate is the model's own
    (:meth:`aevb.model.base.Model.elbo_terms`): :func:`sgvb_terms` for a
    model with one stochastic layer, the sum over layers for a hierarchical one.
    """
    _check(model, x, "ELBO", n_samples=n_samples)
    return model.elbo_terms(x, n_samples, label)


def sgvb_terms(model, x: torch.Tensor, n_samples: int = 1, label: Any = None) -> ElboTerms:
    """The ELBO's terms of a one-layer model, by SGVB (Kingma & Welling 2014): the data path, top to bottom.

    x: [B, *data_shape]; label: [B] for a conditional model (q(z|x, y), p(x|z, y)), else None.  Gradients flow
    to encoder and decoder through rsample.
    """
    posterior = model.encode(x, label)  # q(z|x), batch [B]
    # one sample has no sample dimension: its broadcast in rsample and the mean over L
    # would each add an op and a backward reduction to every training step
    z = posterior.rsample(() if n_samples == 1 else (n_samples,))  # [B, D] or [L, B, D]
    log_px_z = model.decode(z, label).log_prob(x.to(z.dtype))  # [B] or [L, B], in z's (≥ float32) dtype
    reconstruction = -(log_px_z if n_samples == 1 else log_px_z.mean(0))  # [B]
    kl = at_least_float32(kl_term(posterior, model.prior(), z.view(n_samples, *z.shape[-2:])))  # [B]
    return ElboTerms(reconstruction, kl, posterior, z=z)


def elbo(model, x: torch.Tensor, n_samples: int = 1, label: Any = None) -> torch.Tensor:
    """The evidence lower bound E_q[log p(x|z)] − KL(q ‖ p), [B] in nats, β = 1."""
    return elbo_terms(model, x, n_samples, label).elbo


def log_weights(model, x: torch.Tensor, n_samples: int, posterior: Distribution | None = None,
                label: Any = None) -> torch.Tensor:
    """Importance log-weights log p(x, z) − log q(z|x), [n_samples, B], at least float32: the model's own
    (:meth:`aevb.model.base.Model.log_weights`, over every stochastic layer)."""
    return model.log_weights(x, n_samples, posterior, label)


def single_layer_log_weights(model, x: torch.Tensor, n_samples: int, posterior: Distribution | None = None,
                             label: Any = None) -> torch.Tensor:
    """log p(x|z) + log p(z) − log q(z|x) for z ~ q(z|x), [n_samples, B], at least float32.

    z is drawn with ``rsample`` so the weights can be differentiated (IWAE).
    Pass ``posterior`` to reuse an encoder pass across chunks.
    """
    if posterior is None:
        posterior = model.encode(x, label)
    z = posterior.rsample((n_samples,))  # [S, B, D]
    log_px_z = model.decode(z, label).log_prob(x.to(z.dtype))  # [S, B]
    log_pz = model.prior().log_prob(z)  # [S, B]
    log_qz = posterior.log_prob(z)  # [S, B]
    return (at_least_float32(log_px_z) + at_least_float32(log_pz)) - at_least_float32(log_qz)


def iwae_bound(model, x: torch.Tensor, k: int, label: Any = None) -> torch.Tensor:
    """The importance-weighted bound log (1/k) Σ_i w_i (Burda et al. 2016), [B] in nats.

    Equals the ELBO for k = 1 and rises towards log p(x) as k grows.
    """
    _check(model, x, "importance-weighted bound", k=k)
    return torch.logsumexp(log_weights(model, x, k, label=label), dim=0) - math.log(k)


# Rows (samples × examples) decoded at once by the importance sampler: small
# enough that a chunk's logits stay in cache (bench: 1.3× faster than 16k).  Memory
# is proportional to this, never to n_samples.
DEFAULT_ROWS = 4096


@torch.no_grad()
def log_likelihood(model, x: torch.Tensor, n_samples: int = 5000, chunk_size: int | None = None,
                   label: Any = None) -> torch.Tensor:
    """Importance-sampled estimate of log p(x) with q(z|x) as proposal, [B] in nats.

    log p(x) ≈ log (1/S) Σ_s p(x|z_s) p(z_s) / q(z_s|x),  z_s ~ q(z|x)

    The S samples are drawn in chunks of ``chunk_size`` (default: enough to
    decode about 4k rows at a time) and combined with a log-sum-exp of the
    per-chunk log-sum-exps, so memory does not grow with S.  On average the
    estimate is a lower bound that rises towards log p(x) as S grows.

    It runs at its measured CPU speed inside
    :func:`aevb.acceleration.runtime.denormals_flushed` (and after
    ``keep_freed_memory()``), as :func:`aevb.evaluate` calls it.
    """
    _check(model, x, "log-likelihood", likelihood=True, n_samples=n_samples, chunk_size=chunk_size)
    posterior = model.encode(x, label)
    batch = x.shape[0]
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_ROWS // max(batch, 1))
    chunk_size = min(chunk_size, n_samples)
    total = None  # log Σ_s w_s over the chunks so far, [B], at least float32
    for start in range(0, n_samples, chunk_size):
        n = min(chunk_size, n_samples - start)
        chunk = torch.logsumexp(log_weights(model, x, n, posterior, label), dim=0)
        # a running sum, not a list of per-chunk results: small tensors that live across
        # the loop sit between the chunks' large blocks and fragment the heap
        total = chunk if total is None else torch.logaddexp(total, chunk)
    return total - math.log(n_samples)
