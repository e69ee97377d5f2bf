"""Autoencoders as probability models: prior p(z), encoder → q(z|x), decoder → p(x|z).

A model is composed of four registered parts — a network body (``arch``), a
likelihood family, a posterior family and the standard normal prior — and
differs from the others only in its training objective (:meth:`Model.loss`):

* ``AE``   point-mass posterior, loss = −log p(x|z = f(x)) (no KL, no likelihood);
* ``VAE``  Gaussian posterior, loss = −E_q[log p(x|z)] + β·KL, with L samples
  (β = 1 is Kingma & Welling 2014, β > 1 the β-VAE of Higgins et al. 2017);
* ``IWAE`` Gaussian posterior, loss = −log (1/k) Σ w_i (Burda et al. 2016).

The data path itself lives in :mod:`aevb.objectives`.  Saved models are a
folder with ``config.json`` (the constructor's arguments) and
``weights.safetensors``; :func:`load` rebuilds the model from the registry.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn
from torch.distributions import Distribution

from . import objectives
from .distributions import standard_normal
from .errors import NoLikelihoodError, UserError
from .io import write_json, write_safetensors
from .registry import LIKELIHOODS, MODELS, NETWORKS, POSTERIORS

FORMAT = "aevb-model"
FORMAT_VERSION = 1


@dataclass
class LossOutput:
    """What :meth:`Model.loss` returns, whatever the model (scalars, nats per example).

    ``loss`` is what training minimises (with gradient); the other fields are
    detached diagnostics: the reconstruction term −E_q[log p(x|z)], the KL
    term KL(q ‖ p) (0 for the AE), and the mean over batch and latent
    dimensions of the posterior mean μ and standard deviation σ.
    """

    loss: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor

    def as_tensor(self) -> torch.Tensor:
        """[5] float32: loss, reconstruction, kl, mu, sigma (one copy, no host sync)."""
        return torch.stack([self.loss.detach().float(), self.reconstruction.float(), self.kl.float(),
                            self.mu.float(), self.sigma.float()])

    FIELDS: ClassVar[tuple[str, ...]] = ("loss", "reconstruction", "kl", "mu", "sigma")


class Model(nn.Module):
    """The parts every model shares.  Subclasses define ``loss`` and their extra arguments.

    Args:
        data_shape: shape of one example, e.g. (1, 28, 28) or (D,) for tabular rows.
        latent_dim: dimension D of z.
        arch: network body, a name in ``aevb.registry.NETWORKS`` (linear, mlp, conv).
        likelihood: family of p(x|z), a name in ``LIKELIHOODS``.
        hidden: hidden layer sizes of the network (its default when None).
        likelihood_args: extra arguments of the likelihood (``{"scale": 0.1}``).
    """

    posterior_family: ClassVar[str] = "gaussian"
    name: ClassVar[str]

    def __init__(self, data_shape: Sequence[int], latent_dim: int = 20, arch: str = "mlp",
                 likelihood: str = "bernoulli", hidden: Sequence[int] | None = None,
                 likelihood_args: dict[str, Any] | None = None):
        super().__init__()
        if latent_dim < 1:
            raise UserError(f"latent_dim must be at least 1, got {latent_dim}")
        self.data_shape = tuple(int(n) for n in data_shape)
        self.latent_dim = int(latent_dim)
        try:
            self.likelihood = LIKELIHOODS.get(likelihood)(**(likelihood_args or {}))
        except TypeError as e:
            raise UserError(f"bad likelihood_args for {likelihood!r}: {e}") from None
        self.posterior = POSTERIORS.get(self.posterior_family)()
        self.encoder, self.decoder = NETWORKS.get(arch)(
            self.data_shape,
            self.latent_dim,
            self.posterior.params_per_latent * self.latent_dim,
            self.likelihood.params_per_channel * self.data_shape[0],
            hidden,
        )
        self.config: dict[str, Any] = {
            "data_shape": list(self.data_shape),
            "latent_dim": self.latent_dim,
            "arch": arch,
            "likelihood": likelihood,
            "hidden": list(hidden) if hidden else None,
            "likelihood_args": {**self.likelihood.extra_config(), **(likelihood_args or {})},
        }

    # -- the three distributions -------------------------------------------

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    def _check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.data_shape:
            raise UserError(
                f"input of shape {tuple(x.shape)} does not fit this model, which expects "
                f"[batch, {', '.join(map(str, self.data_shape))}]; resize the data to the model's "
                f"data shape or train a model for this data"
            )

    def prior(self) -> Distribution:
        """p(z) = N(0, I), event shape [D], on the model's device (float32)."""
        return standard_normal(self.latent_dim, next(self.parameters()).new_zeros((), dtype=torch.float32))

    def encode(self, x: torch.Tensor) -> Distribution:
        """q(z|x) for x [B, *data_shape]: batch shape [B], event shape [D], at least float32."""
        self._check_input(x)
        params = self.encoder(x.to(self._dtype))  # [B, k·D]
        return self.posterior(objectives.at_least_float32(params))

    def decode(self, z: torch.Tensor) -> Distribution:
        """p(x|z) for z [*S, B, D]: batch shape [*S, B], event shape data_shape, at least float32."""
        batch_shape = z.shape[:-1]
        params = self.decoder(z.reshape(-1, self.latent_dim).to(self._dtype))  # [N, k·C, ...]
        params = objectives.at_least_float32(params.reshape(*batch_shape, *params.shape[1:]))
        return self.likelihood(params, len(self.data_shape))

    # -- objectives -----------------------------------------------------------

    def loss(self, x: torch.Tensor, beta: float | None = None) -> LossOutput:
        """The training objective for a batch x [B, *data_shape].

        ``beta`` overrides the KL weight for this call (warm-up schedules);
        models without a KL term ignore it.
        """
        raise NotImplementedError

    def elbo(self, x: torch.Tensor, n_samples: int = 1) -> torch.Tensor:
        """ELBO per example [B] in nats, β = 1, analytic KL; averaged over ``n_samples``."""
        return objectives.elbo(self, x, n_samples)

    def log_likelihood(self, x: torch.Tensor, n_samples: int = 5000, chunk_size: int | None = None) -> torch.Tensor:
        """Importance-sampled log p(x) per example [B] in nats (Burda et al. 2016)."""
        return objectives.log_likelihood(self, x, n_samples, chunk_size)

    # -- using a trained model ----------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """[n, *data_shape]: means of p(x|z) for z ~ N(0, temperature² I)."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device) * temperature
        return self.decode(z).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """[B, *data_shape]: mean of p(x|z) at the posterior mean z = E_q[z]."""
        return self.decode(self.encode(x).mean).mean

    def save(self, path: str | Path) -> None:
        """Write ``path/config.json`` and ``path/weights.safetensors`` (each atomically)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_safetensors(path / "weights.safetensors", self.state_dict(), metadata={"format": FORMAT})
        write_json(path / "config.json", {"format": FORMAT, "version": FORMAT_VERSION,
                                          "model": self.name, "args": self.config})

    def extra_repr(self) -> str:
        return f"data_shape={self.data_shape}, latent_dim={self.latent_dim}"


def _posterior_stats(posterior: Distribution) -> tuple[torch.Tensor, torch.Tensor]:
    return posterior.mean.detach().mean(), posterior.stddev.detach().mean()


@MODELS.register("ae")
class AE(Model):
    """Deterministic autoencoder: z = f(x), loss = −log p(x|z).

    With the Gaussian likelihood (σ = 1) this is the MSE autoencoder, with
    the Bernoulli likelihood the BCE autoencoder.  Having a point-mass
    posterior it defines no likelihood of x: ``elbo`` and ``log_likelihood``
    raise :class:`NoLikelihoodError`.
    """

    name = "ae"
    posterior_family = "point-mass"

    def loss(self, x: torch.Tensor, beta: float | None = None) -> LossOutput:
        posterior = self.encode(x)
        reconstruction = -self.decode(posterior.mean).log_prob(x.to(posterior.mean.dtype)).mean()
        mu, sigma = _posterior_stats(posterior)
        return LossOutput(reconstruction, reconstruction.detach(), torch.zeros_like(reconstruction.detach()), mu, sigma)

    def _no_likelihood(self, *args, **kwargs):
        raise NoLikelihoodError(
            "a deterministic autoencoder (model 'ae') has a point-mass posterior and defines no "
            "likelihood of x; train a VAE or IWAE (--model vae) for an ELBO or log-likelihood"
        )

    elbo = _no_likelihood
    log_likelihood = _no_likelihood


@MODELS.register("vae")
class VAE(Model):
    """Variational autoencoder; loss = mean over the batch of −E_q[log p(x|z)] + β·KL.

    Args (besides :class:`Model`'s):
        beta: weight of the KL term in the training loss only (``elbo`` always uses 1).
        mc_samples: L reparameterised samples averaged per example (SGVB).
    """

    name = "vae"

    def __init__(self, *args, beta: float = 1.0, mc_samples: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if beta < 0 or mc_samples < 1:
            raise UserError(f"need beta ≥ 0 and mc_samples ≥ 1, got beta={beta}, mc_samples={mc_samples}")
        self.beta = float(beta)
        self.mc_samples = int(mc_samples)
        self.config.update(beta=self.beta, mc_samples=self.mc_samples)

    def loss(self, x: torch.Tensor, beta: float | None = None) -> LossOutput:
        """``beta`` overrides the model's β for this call (KL warm-up schedules)."""
        beta = self.beta if beta is None else beta
        terms = objectives.elbo_terms(self, x, self.mc_samples)
        reconstruction, kl = terms.reconstruction.mean(), terms.kl.mean()
        mu, sigma = _posterior_stats(terms.posterior)
        return LossOutput(reconstruction + beta * kl, reconstruction.detach(), kl.detach(), mu, sigma)


@MODELS.register("iwae")
class IWAE(Model):
    """Importance-weighted autoencoder (Burda et al. 2016): loss = −log (1/k) Σ_i w_i.

    ``reconstruction`` and ``kl`` in its :class:`LossOutput` are the ELBO's
    terms at the posterior mean, logged for comparison with the VAE.
    """

    name = "iwae"

    def __init__(self, *args, k: int = 5, **kwargs):
        super().__init__(*args, **kwargs)
        if k < 1:
            raise UserError(f"IWAE needs k ≥ 1 importance samples, got {k}")
        self.k = int(k)
        self.config.update(k=self.k)

    def loss(self, x: torch.Tensor, beta: float | None = None) -> LossOutput:
        posterior = self.encode(x)
        bound = torch.logsumexp(objectives.log_weights(self, x, self.k, posterior), 0) - math.log(self.k)
        with torch.no_grad():
            z = posterior.mean
            reconstruction = -self.decode(z).log_prob(x).float().mean()
            kl = objectives.kl_term(posterior, self.prior()).float().mean()
        mu, sigma = _posterior_stats(posterior)
        return LossOutput(-bound.mean(), reconstruction, kl, mu, sigma)


def build_model(name: str, **kwargs: Any) -> Model:
    """Build a registered model by name: ``build_model("vae", data_shape=(1, 28, 28))``."""
    cls = MODELS.get(name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UserError(f"bad arguments for model {name!r}: {e}") from None


def load(path: str | Path, device: str | torch.device | None = None) -> Model:
    """Load a model saved with :meth:`Model.save`.  Nothing is unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config_path, weights_path = path / "config.json", path / "weights.safetensors"
    if not path.is_dir():
        raise UserError(f"no saved model at {path}: expected a folder with config.json and weights.safetensors")
    for required in (config_path, weights_path):
        if not required.is_file():
            raise UserError(f"{path} is not a saved aevb model: {required.name} is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        name, args = config["model"], config["args"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path} is corrupt ({e}); re-export the model") from None
    if config.get("format") != FORMAT:
        raise UserError(f"{config_path} is not an aevb model config (format {config.get('format')!r})")
    model = build_model(name, **args)
    try:
        state = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights_path} is corrupt or unreadable ({e}); re-export the model") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        details = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if keys
        )
        raise UserError(f"{weights_path} does not match {config_path} ({details}); the two files come from different models")
    model.load_state_dict(state)
    model.eval()
    return model.to(device) if device is not None else model
