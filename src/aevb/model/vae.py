"""Latent-variable models with a Gaussian posterior and a KL to a registered prior: VAE and IWAE."""

from __future__ import annotations

import math
from typing import Any

import torch

from aevb.errors import UserError
from aevb.model import objectives
from aevb.model.base import LossOutput, Model, _posterior_stats
from aevb.options import COUNTS, Option
from aevb.registry import MODELS, PRIORS

PRIOR = Option("prior", "standard", "prior p(z): standard normal, a learned mixture of Gaussians (mog) or the "
               "VampPrior (vamp)", choices=PRIORS)
PRIOR_COMPONENTS = Option("prior_components", None, "components K of the mog prior (default 10) or pseudo-inputs of "
                          "the vamp prior (default 100)", kind="int", low=1, below=COUNTS, metavar="K",
                          memory=True)
# the KL weight of the models whose loss is reconstruction + β·KL (VAE, HVAE); the run's β schedules need it
BETA = Option("beta", 1.0, "weight of the KL term in the training loss (β-VAE); the reported ELBO always uses 1",
              low=0)


class LatentVariableModel(Model):
    """A model with a Gaussian posterior and a KL to a registered prior.

    Args (besides :class:`Model`'s):
        prior: a name in ``aevb.registry.PRIORS`` (standard, mog, vamp).
        prior_args: its arguments (``{"components": 10}``; the run option ``prior_components``).

    Each can be conditional on a class label (``n_classes=``; ``--conditional``, which takes K from the data).
    """

    options = (PRIOR, PRIOR_COMPONENTS)
    takes_labels = True

    def __init__(self, *args, prior: str = PRIOR.default, prior_args: dict[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_prior(prior, prior_args)

    @classmethod
    def run_kwargs(cls, config) -> dict[str, Any]:
        kwargs = super().run_kwargs(config)
        components = kwargs.pop("prior_components", None)  # an entry of prior_args, not an argument of its own
        if components is not None:
            if config.prior == "standard":
                raise UserError("--prior-components needs a mixture prior (--prior mog or vamp)")
            kwargs["prior_args"] = {"components": components}
        return kwargs


MC_SAMPLES = Option("mc_samples", 1, "Monte Carlo samples of z per example in the VAE loss", low=1, below=COUNTS,
                    metavar="L", memory=True)
FREE_BITS = Option("free_bits", 0.0, "free bits λ (Kingma et al. 2016): the training loss uses Σ_d max(λ, batch-mean "
                   "KL_d) per latent dimension d, in nats (0: off); VAE with a factorising prior", low=0, metavar="NATS")


@MODELS.register("vae")
class VAE(LatentVariableModel):
    """Variational autoencoder; loss = mean over the batch of −E_q[log p(x|z)] + β·KL.

    Args (besides :class:`LatentVariableModel`'s):
        beta: weight of the KL term in the training loss only (``elbo`` always uses 1).
        mc_samples: L reparameterised samples averaged per example (SGVB).
        free_bits: λ ≥ 0 in nats.  The training loss uses Σ_d max(λ, KL_d), where
            KL_d = KL(q(z_d|x) ‖ p(z_d)) is averaged over the batch *before* the
            floor, one group per latent dimension (Kingma et al. 2016, §C.8).
            Needs a factorising prior (the standard normal); the logged ``kl``
            stays the true KL, the floored one is logged as ``kl_free_bits``.
    """

    name = "vae"
    options = (*LatentVariableModel.options, BETA, MC_SAMPLES, FREE_BITS)

    def __init__(self, *args, beta: float = BETA.default, mc_samples: int = MC_SAMPLES.default,
                 free_bits: float = FREE_BITS.default, **kwargs):
        super().__init__(*args, **kwargs)
        options = self.check_options({"beta": beta, "mc_samples": mc_samples, "free_bits": free_bits})
        if options["free_bits"] and not self.prior_module.factorises:
            raise UserError(f"free bits are a KL floor per latent dimension, which the {self.config['prior']!r} "
                            f"prior does not have; use --prior standard with --free-bits")
        self.beta, self.mc_samples, self.free_bits = options["beta"], options["mc_samples"], options["free_bits"]
        self.config.update(beta=self.beta, mc_samples=self.mc_samples)
        if self.free_bits:  # only then, so configs of models without free bits stay as they were
            self.config.update(free_bits=self.free_bits)

    def loss(self, x: torch.Tensor, beta: float | None = None, label: Any = None) -> LossOutput:
        """``beta`` overrides the model's β for this call (KL warm-up schedules); ``label`` [B]: the batch's
        classes, for a conditional model."""
        beta = self.beta if beta is None else beta
        terms = objectives.elbo_terms(self, x, self.mc_samples, label)
        reconstruction, kl = terms.reconstruction.mean(), terms.kl.mean()
        mu, sigma = _posterior_stats(terms.posterior)
        if not self.free_bits:
            return LossOutput(reconstruction + beta * kl, reconstruction.detach(), kl.detach(), mu, sigma)
        kl_floored = objectives.free_bits_kl(terms.posterior, self.prior(), self.free_bits)
        return LossOutput(reconstruction + beta * kl_floored, reconstruction.detach(), kl.detach(), mu, sigma,
                          {"kl_free_bits": kl_floored.detach()})


K = Option("k", 5, "importance samples of the IWAE bound", low=1, below=COUNTS, memory=True)


@MODELS.register("iwae")
class IWAE(LatentVariableModel):
    """Importance-weighted autoencoder (Burda et al. 2016): loss = −log (1/k) Σ_i w_i.

    ``reconstruction`` and ``kl`` in its :class:`LossOutput` are the ELBO's
    terms at the posterior mean, logged for comparison with the VAE.  The
    bound has no separate KL term, so β, its schedules and free bits do not
    apply (the command line refuses them).
    """

    name = "iwae"
    options = (*LatentVariableModel.options, K)

    def __init__(self, *args, k: int = K.default, **kwargs):
        super().__init__(*args, **kwargs)
        self.k = self.check_options({"k": k})["k"]
        self.config.update(k=self.k)

    def loss(self, x: torch.Tensor, beta: float | None = None, label: Any = None) -> LossOutput:
        posterior = self.encode(x, label)
        bound = torch.logsumexp(objectives.log_weights(self, x, self.k, posterior, label), 0) - math.log(self.k)
        with torch.no_grad():
            z = posterior.mean
            reconstruction = -self.decode(z, label).log_prob(x).float().mean()
            prior = self.prior()
            try:
                kl = objectives.kl_term(posterior, prior)
            except NotImplementedError:  # no closed form (mixture priors): Monte Carlo
                kl = objectives.kl_term(posterior, prior, posterior.sample((self.k,)))
            kl = kl.float().mean()
        mu, sigma = _posterior_stats(posterior)
        return LossOutput(-bound.mean(), reconstruction, kl, mu, sigma)
