"""Priors p(z): the standard normal, a learned mixture of Gaussians and the VampPrior.

A prior is a module that owns its parameters (saved with the model) and,
asked with the model, returns p(z) as a ``torch.distributions`` object with
event shape [D]:

    prior = model.prior_module(model)     # what model.prior() returns

The model is passed in because the VampPrior is made of the model's own
posteriors.  ``sample(model, n, generator, temperature)`` draws z [n, D] with
a seeded generator (``MixtureSameFamily.sample`` takes none, so the mixtures
draw the component index and the noise themselves); the temperature scales
the noise of each Gaussian component (for the standard normal z = T·ε).

``factorises`` is True where p(z) is a product over latent dimensions (the
standard normal): per-dimension KL terms (free bits, ``kl_per_dim`` in
evaluation) exist only then.  Register a new prior with
``@PRIORS.register("name")``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, Normal

from aevb.model.posteriors import standard_normal
from aevb.model.precision import at_least_float32
from aevb.registry import PRIORS


class Prior(nn.Module):
    """Base of priors: ``Prior(latent_dim, data_shape, **prior_args)``."""

    factorises = False
    encodes = False  # p(z) runs the model's encoder (on inputs of its own, without labels: no conditional model)

    def __init__(self, latent_dim: int, data_shape):
        super().__init__()

    def extra_config(self) -> dict:
        """Constructor arguments to store in ``config.json``."""
        return {}

    def forward(self, model) -> Distribution:
        raise NotImplementedError

    def sample(self, model, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        raise NotImplementedError


def _mixture_sample(logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, n: int,
                    generator: torch.Generator | None, temperature: float) -> torch.Tensor:
    """z [n, D] from Σ_k π_k N(loc_k, scale_k²): k ~ Cat(π), z = loc_k + T·scale_k·ε."""
    index = torch.multinomial(logits.softmax(-1), n, replacement=True, generator=generator)  # [n]
    eps = torch.randn(n, loc.shape[-1], generator=generator, device=loc.device, dtype=loc.dtype)
    return loc[index] + temperature * scale[index] * eps


@PRIORS.register("standard")
class StandardNormalPrior(Prior):
    """p(z) = N(0, I): no parameters."""

    factorises = True

    def __init__(self, latent_dim: int, data_shape):
        super().__init__(latent_dim, data_shape)
        self._cached: tuple[torch.device, Distribution] | None = None

    def forward(self, model) -> Distribution:
        device = model.device
        if self._cached is None or self._cached[0] != device:  # immutable, so built once per device
            with torch.inference_mode(False):  # first asked under inference_mode: still usable in training
                like = torch.zeros((), device=device, dtype=torch.float32)
                self._cached = (device, standard_normal(model.latent_dim, like))
        return self._cached[1]

    def sample(self, model, n, generator=None, temperature=1.0):
        device = model.device
        return torch.randn(n, model.latent_dim, generator=generator, device=device) * temperature


@PRIORS.register("mog")
class MixtureOfGaussiansPrior(Prior):
    """p(z) = Σ_k π_k N(μ_k, diag σ_k²) with learned means, log-scales and logits.

    Means start spread as N(0, I) draws (fixed seed, so a model is rebuilt
    identically before its weights are loaded), scales at 1, weights uniform.
    """

    def __init__(self, latent_dim: int, data_shape, components: int = 10):
        super().__init__(latent_dim, data_shape)
        if components < 1:
            raise ValueError(f"a mixture prior needs at least one component, got {components}")
        self.components = int(components)
        init = torch.randn(self.components, latent_dim, generator=torch.Generator().manual_seed(0))
        self.loc = nn.Parameter(init)  # [K, D]
        self.log_scale = nn.Parameter(torch.zeros(self.components, latent_dim))  # [K, D]
        self.logits = nn.Parameter(torch.zeros(self.components))  # [K]

    def extra_config(self) -> dict:
        return {"components": self.components}

    def forward(self, model) -> Distribution:
        loc, scale = at_least_float32(self.loc), at_least_float32(self.log_scale).exp()
        components = Independent(Normal(loc, scale, validate_args=False), 1)  # batch [K], event [D]
        return MixtureSameFamily(Categorical(logits=at_least_float32(self.logits), validate_args=False), components,
                                 validate_args=False)

    def sample(self, model, n, generator=None, temperature=1.0):
        return _mixture_sample(at_least_float32(self.logits), at_least_float32(self.loc), at_least_float32(self.log_scale).exp(), n,
                               generator, temperature)


@PRIORS.register("vamp")
class VampPrior(Prior):
    """The VampPrior (Tomczak & Welling 2018): p(z) = (1/K) Σ_k q(z | u_k).

    The K pseudo-inputs u_k [K, *data_shape] are learned with the model; the
    prior is the model's own encoder at those inputs, so it follows the
    posterior as training goes.  Pseudo-inputs start near 0.5 (mid-grey).
    """

    encodes = True

    def __init__(self, latent_dim: int, data_shape, components: int = 100):
        super().__init__(latent_dim, data_shape)
        if components < 1:
            raise ValueError(f"the VampPrior needs at least one pseudo-input, got {components}")
        self.components = int(components)
        init = 0.5 + 0.01 * torch.randn(self.components, *data_shape, generator=torch.Generator().manual_seed(0))
        self.pseudo_inputs = nn.Parameter(init)  # [K, *data_shape]

    def extra_config(self) -> dict:
        return {"components": self.components}

    def _posteriors(self, model) -> Distribution:
        return model.encode(self.pseudo_inputs)  # q(z|u_k): batch [K], event [D]

    def forward(self, model) -> Distribution:
        q = self._posteriors(model)
        logits = q.mean.new_zeros(self.components)  # uniform weights
        return MixtureSameFamily(Categorical(logits=logits, validate_args=False), q, validate_args=False)

    def sample(self, model, n, generator=None, temperature=1.0):
        q = self._posteriors(model)
        return _mixture_sample(q.mean.new_zeros(self.components), q.mean, q.stddev, n, generator, temperature)


def build_prior(name: str, latent_dim: int, data_shape, args: dict | None = None) -> Prior:
    """A prior module by name; ``args`` from ``config.json`` (``{"components": 10}``)."""
    from aevb.errors import UserError

    try:
        return PRIORS.get(name)(latent_dim, tuple(data_shape), **(args or {}))
    except (TypeError, ValueError) as e:
        raise UserError(f"bad prior_args for prior {name!r}: {e}") from None
