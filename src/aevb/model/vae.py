"""Latent-variable models with a Gaussian posterior and a KL to a registered prior: VAE and IWAE."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from aevb.errors import UserError
from aevb.model import objectives
from aevb.model.base import LossOutput, Model, _posterior_stats
from aevb.model.precision import at_least_float32
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


POSTERIOR_FLOW = Option("posterior_flow", "none", "vae, iwae: the Gaussian posterior through a normalising flow: none, "
                        "iaf (inverse autoregressive, Kingma et al. 2016) or planar (Rezende & Mohamed 2015); its "
                        "log-density is exact, its KL by Monte Carlo", choices=("none", "iaf", "planar"))
FLOW_STEPS = Option("flow_steps", 2, "vae, iwae: steps of --posterior-flow", low=1, below=COUNTS, metavar="K")
FLOW_HIDDEN = Option("flow_hidden", None, "vae, iwae: hidden units of each IAF step's masked network (default "
                     "4·latent_dim)", kind="int", low=1, below=COUNTS, metavar="N")
FLOW_OPTIONS = (POSTERIOR_FLOW, FLOW_STEPS, FLOW_HIDDEN)


def flow_posterior(model_kwargs: dict[str, Any], posterior_flow: str, flow_steps: int,
                   flow_hidden: int | None) -> tuple[str, dict[str, Any]]:
    """(the posterior family, the model's kwargs with the flow's posterior_args) of a --posterior-flow choice."""
    if posterior_flow == "none":
        return "gaussian", model_kwargs
    posterior_args = {**(model_kwargs.get("posterior_args") or {}), "steps": flow_steps, "hidden": flow_hidden}
    return posterior_flow, {**model_kwargs, "posterior_args": posterior_args}


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
    options = (*LatentVariableModel.options, BETA, MC_SAMPLES, FREE_BITS, *FLOW_OPTIONS)

    def __init__(self, *args, beta: float = BETA.default, mc_samples: int = MC_SAMPLES.default,
                 free_bits: float = FREE_BITS.default, posterior_flow: str = POSTERIOR_FLOW.default,
                 flow_steps: int = FLOW_STEPS.default, flow_hidden: int | None = FLOW_HIDDEN.default, **kwargs):
        flow = self.check_options({"posterior_flow": posterior_flow, "flow_steps": flow_steps,
                                   "flow_hidden": flow_hidden})
        self.posterior_family, kwargs = flow_posterior(kwargs, **flow)
        super().__init__(*args, **kwargs)
        if flow["posterior_flow"] != "none":  # only then, so configs of Gaussian VAEs stay as they were
            self.config.update(flow)
        options = self.check_options({"beta": beta, "mc_samples": mc_samples, "free_bits": free_bits})
        if options["free_bits"] and not (self.prior_module.factorises and self.posterior.factorises):
            raise UserError(f"free bits are a KL floor per latent dimension, which the {self.config['prior']!r} "
                            f"prior or a flow posterior does not have; use --prior standard and no "
                            f"--posterior-flow with --free-bits")
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
IWAE_VARIANT = Option("iwae_variant", "iwae", "iwae: the bound trained (Rainforth et al. 2018): iwae, log mean of k "
                      "weights; miwae, the mean of --iwae-m such bounds; ciwae, --ciwae-beta·ELBO + (1 − β)·IWAE; "
                      "piwae, the decoder on the IWAE bound of m·k samples, the encoder on the MIWAE bound",
                      choices=("iwae", "miwae", "ciwae", "piwae"))
IWAE_M = Option("iwae_m", 1, "miwae, piwae: M, the number of k-sample bounds averaged (m·k samples in all)", low=1,
                below=COUNTS, metavar="M", memory=True)
CIWAE_BETA = Option("ciwae_beta", 0.5, "ciwae: weight β of the ELBO in the convex combination with the IWAE bound",
                    low=0, high=1)


class _Decoding(nn.Module):
    """log p(x|z) + log p(z) of a model as a module's forward, so that torch.func can swap its weights."""

    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, x: torch.Tensor, label: Any = None) -> torch.Tensor:
        return (at_least_float32(self.model.decode(z, label).log_prob(x.to(z.dtype)))
                + at_least_float32(self.model.prior().log_prob(z)))


@MODELS.register("iwae")
class IWAE(LatentVariableModel):
    """Importance-weighted autoencoder (Burda et al. 2016): loss = −log (1/k) Σ_i w_i.

    ``iwae_variant`` trains another bound on the same weights (Rainforth et
    al. 2018, "Tighter variational bounds are not necessarily better"):
    ``miwae`` the mean of M bounds of k weights each; ``ciwae`` β·ELBO +
    (1 − β)·IWAE over the same k weights; ``piwae`` the generative model on
    the IWAE bound of M·k weights and the encoder on the MIWAE bound of the
    same weights (two decoder passes: one whose encoder side is constant, one
    whose decoder weights are); its logged loss is the IWAE bound's.

    ``reconstruction`` and ``kl`` in its :class:`LossOutput` are the ELBO's
    terms at the posterior mean, logged for comparison with the VAE.  The
    bound has no separate KL term, so β, its schedules and free bits do not
    apply (the command line refuses them).
    """

    name = "iwae"
    options = (*LatentVariableModel.options, K, IWAE_VARIANT, IWAE_M, CIWAE_BETA, *FLOW_OPTIONS)

    def __init__(self, *args, k: int = K.default, iwae_variant: str = IWAE_VARIANT.default,
                 iwae_m: int = IWAE_M.default, ciwae_beta: float = CIWAE_BETA.default,
                 posterior_flow: str = POSTERIOR_FLOW.default, flow_steps: int = FLOW_STEPS.default,
                 flow_hidden: int | None = FLOW_HIDDEN.default, **kwargs):
        flow = self.check_options({"posterior_flow": posterior_flow, "flow_steps": flow_steps,
                                   "flow_hidden": flow_hidden})
        self.posterior_family, kwargs = flow_posterior(kwargs, **flow)
        super().__init__(*args, **kwargs)
        if flow["posterior_flow"] != "none":
            self.config.update(flow)
        options = self.check_options({"k": k, "iwae_variant": iwae_variant, "iwae_m": iwae_m,
                                      "ciwae_beta": ciwae_beta})
        self.k, self.variant = options["k"], options["iwae_variant"]
        self.m, self.ciwae_beta = options["iwae_m"], options["ciwae_beta"]
        if self.variant == "piwae" and self.config["prior"] != "standard":
            raise UserError("piwae trains the prior with the decoder and the encoder apart, which a learned prior "
                            "(the VampPrior's pseudo-inputs go through the encoder) would mix: use --prior standard")
        self.config.update(k=self.k)
        if self.variant != "iwae":  # only then, so configs of plain IWAEs stay as they were
            self.config.update(iwae_variant=self.variant, iwae_m=self.m, ciwae_beta=self.ciwae_beta)

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        """The trained bound [B] from log-weights [m·k, B] (the variant's; ``piwae``: the MIWAE bound)."""
        if self.variant == "ciwae":
            iwae = torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
            return self.ciwae_beta * log_w.mean(0) + (1 - self.ciwae_beta) * iwae
        groups = log_w.reshape(self.m if self.variant != "iwae" else 1, -1, log_w.shape[-1])  # [M, k, B]
        return (torch.logsumexp(groups, 1) - math.log(groups.shape[1])).mean(0)

    def samples(self) -> int:
        """Importance samples per example in a step: m·k for miwae and piwae, else k."""
        return self.k * self.m if self.variant in ("miwae", "piwae") else self.k

    def loss(self, x: torch.Tensor, beta: float | None = None, label: Any = None) -> LossOutput:
        posterior = self.encode(x, label)
        if self.variant == "piwae":
            bound = self._partitioned_bound(x, posterior, label)
        else:
            bound = self.bound(objectives.log_weights(self, x, self.samples(), posterior, label))
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

    def _partitioned_bound(self, x: torch.Tensor, posterior, label: Any = None) -> torch.Tensor:
        """PIWAE: a value equal to the IWAE bound of m·k weights [B], whose gradient reaches the decoder and
        the prior from that bound and the encoder from the MIWAE bound (Rainforth et al. 2018, §5)."""
        z = posterior.rsample((self.samples(),))  # [m·k, B, D]
        log_q = at_least_float32(posterior.log_prob(z))  # [m·k, B]
        # the generative side: z and q(z|x) constants, the decoder's and prior's weights live
        log_w_decoder = _Decoding(self)(z.detach(), x, label) - log_q.detach()
        iwae = torch.logsumexp(log_w_decoder, 0) - math.log(log_w_decoder.shape[0])
        # the inference side: the decoder's weights constants, z and q(z|x) live
        decoding = _Decoding(self)
        frozen = {name: p.detach() for name, p in decoding.named_parameters() if not name.startswith("model.encoder")}
        log_w_encoder = functional_call(decoding, frozen, (z, x, label), strict=False) - log_q
        miwae = self.bound_of_groups(log_w_encoder)
        # the value of the IWAE bound, the gradients of the two
        return iwae + (miwae - miwae.detach())

    def bound_of_groups(self, log_w: torch.Tensor) -> torch.Tensor:
        """The MIWAE bound [B] of log-weights [m·k, B]: m groups of k."""
        groups = log_w.reshape(self.m, -1, log_w.shape[-1])
        return (torch.logsumexp(groups, 1) - math.log(groups.shape[1])).mean(0)
