"""Posteriors q(z|x): the encoder heads; and the standard normal p(z) and its KL.

A *posterior* is an encoder head: it turns the encoder's output
([*, k·D] with k = ``params_per_latent``) into q(z|x) with event shape [D].
The diagonal Gaussian reads the encoder's (μ, log σ²) or (μ, log σ)
(:func:`diagonal_normal`); a deterministic autoencoder's posterior is a
:class:`PointMass`.  The standard normal (:func:`standard_normal`) and its
closed-form KL against a diagonal Gaussian (:func:`standard_normal_kl`,
registered with ``torch.distributions.register_kl``) live here too: the priors
(:mod:`aevb.model.priors`) and the fused loss use them.

Adding a posterior is one ``@POSTERIORS.register("name")`` class here (or in a
user's module), a :class:`Posterior` subclass: it implements ``forward(params)``,
declares ``params_per_latent`` and ``has_density`` (False where q has no
log-density, so there is no ELBO), and returns its constructor arguments from
:meth:`Posterior.extra_config`; nothing else in the library needs to change.
The likelihoods p(x|z) are in :mod:`aevb.model.likelihoods`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal, constraints, register_kl

from aevb.config import POSTERIOR_SCALES
from aevb.errors import UserError
from aevb.model import noise
from aevb.registry import POSTERIORS


class PointMass(Distribution):
    """A Dirac delta at ``loc``: the 'posterior' of a deterministic autoencoder.

    It has a mean and (zero) spread and can be sampled, but no density: there
    is no ELBO for a model with a point-mass posterior.
    """

    arg_constraints = {"loc": constraints.real}
    support = constraints.real
    has_rsample = True

    def __init__(self, loc: torch.Tensor, event_dims: int = 1):
        self.loc = loc
        shape = loc.shape
        split = len(shape) - event_dims
        super().__init__(shape[:split], shape[split:], validate_args=False)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def mode(self) -> torch.Tensor:
        return self.loc

    @property
    def variance(self) -> torch.Tensor:
        return torch.zeros_like(self.loc)

    @property
    def stddev(self) -> torch.Tensor:
        return torch.zeros_like(self.loc)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self.loc.expand(torch.Size(sample_shape) + self.loc.shape)

    def log_prob(self, value):
        raise NotImplementedError("a point mass has no density")


class Posterior(nn.Module):
    """Base of encoder heads: ``forward(params [*, k·D]) -> q(z|x)`` with event shape [D]."""

    params_per_latent = 1
    has_density = True
    factorises = True  # a product over the latent dimensions, so that the KL splits per dimension
    sized = False  # its constructor takes latent_dim (a flow's steps are built for it), which the model passes

    def extra_config(self) -> dict:
        """Constructor arguments to store with a saved model."""
        return {}


def diagonal_normal(params: torch.Tensor, scale_param: str = "log-variance") -> Distribution:
    """N(μ, diag σ²) with event shape [D] from params [*, 2·D] = (μ, log σ²) or (μ, log σ).

    ``log-variance`` is the parametrisation of Kingma & Welling's code and of most
    VAE libraries.  It matters for training, not for the model: under Adam a
    log σ output moves twice as fast as a log σ² output, and the
    convolutional VAE of ``bench/`` trained 3.6 nats worse after 10 epochs with
    it (mean of 3 seeds).  ``log-scale`` reads models saved before the change.
    """
    loc, log_scale = loc_and_log_scale(params, scale_param)
    return Independent(LogScaleNormal(loc, log_scale), 1)


def loc_and_log_scale(params: torch.Tensor, scale_param: str = "log-variance") -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, log σ), each [*, D], from params [*, 2·D] as :func:`diagonal_normal` reads them."""
    loc, raw = params.chunk(2, dim=-1)
    return loc, (raw * 0.5 if scale_param == "log-variance" else raw)


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class LogScaleNormal(Normal):
    """``Normal(loc, exp(log_scale))`` that keeps ``log_scale``: log-densities and the KL read it.

    The encoder outputs log σ (or log σ²); torch's ``Normal`` would take the
    log of σ = exp(log σ) again in each ``log_prob`` and KL: an op and its
    backward a step, and a rounding error, for a value already at hand.
    """

    def __init__(self, loc: torch.Tensor, log_scale: torch.Tensor):
        if loc.shape != log_scale.shape:
            loc, log_scale = torch.broadcast_tensors(loc, log_scale)
        # Normal.__init__ would broadcast the two again (two more ops a step)
        self.loc, self.log_scale, self.scale = loc, log_scale, log_scale.exp()
        Distribution.__init__(self, loc.shape, validate_args=False)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Normal's reparameterised draw; inside :func:`aevb.model.noise.batch_rows` its noise is the rows of this
        process's examples (the examples run over dimension −2 of loc [..., B, D])."""
        if not noise.active():
            return super().rsample(sample_shape)
        shape = self._extended_shape(sample_shape)
        eps = noise.randn(shape, -2, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + eps * self.scale

    def expand(self, batch_shape, _instance=None):
        new = Normal.expand(self, batch_shape, self._get_checked_instance(LogScaleNormal, _instance))
        new.log_scale = self.log_scale.expand(new.batch_shape)
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return ((value - self.loc) / self.scale).square().mul(-0.5) - self.log_scale - _HALF_LOG_2PI

    def entropy(self) -> torch.Tensor:
        return self.log_scale + (0.5 + _HALF_LOG_2PI)


def _log_scale(p: Normal) -> torch.Tensor:
    return p.log_scale if isinstance(p, LogScaleNormal) else p.scale.log()


@POSTERIORS.register("gaussian")
class GaussianPosterior(Posterior):
    """Diagonal Gaussian q(z|x) = N(μ, diag σ²) from the encoder's (μ, log σ²) (see :func:`diagonal_normal`)."""

    params_per_latent = 2

    def __init__(self, scale_param: str = "log-variance"):
        super().__init__()
        if scale_param not in POSTERIOR_SCALES:
            raise UserError(f"unknown posterior scale parametrisation {scale_param!r}; "
                            f"choose one of: {', '.join(POSTERIOR_SCALES)}")
        self.scale_param = scale_param

    def extra_config(self) -> dict:
        return {"scale_param": self.scale_param}

    def forward(self, params: torch.Tensor) -> Distribution:
        return diagonal_normal(params, self.scale_param)


@POSTERIORS.register("point-mass")
class PointMassPosterior(Posterior):
    """q(z|x) = δ(z − f(x)): the deterministic autoencoder's code."""

    params_per_latent = 1
    has_density = False

    def forward(self, params: torch.Tensor) -> Distribution:
        return PointMass(params, event_dims=1)


class StandardNormal(Normal):
    """``Normal(0, 1)`` of batch shape ``zeros.shape``, whose log-density and KL use that loc = 0 and scale = 1.

    torch's ``Normal`` works its closed forms out for any loc and scale: ten
    ops for KL(q ‖ p) and six for log p(z), each with its backward.  Here the
    KL of a diagonal Gaussian q is ½(μ² + σ² − 1) − log σ and
    log p(z) = −½ z² − ½ log 2π; the values are those of ``Normal(0, 1)``
    (``tests/test_distributions.py``).
    """

    def __init__(self, zeros: torch.Tensor):
        super().__init__(zeros, torch.ones_like(zeros), validate_args=False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if value.shape[value.dim() - len(self.batch_shape):] != self.batch_shape:
            return super().log_prob(value)  # broadcast up to the batch shape
        return value.square().mul_(-0.5).sub_(_HALF_LOG_2PI)


def standard_normal_kl(loc: torch.Tensor, scale: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) elementwise: ½(μ² + σ² − 1) − log σ."""
    return (loc.square() + scale.square() - 1).mul(0.5) - log_scale


@register_kl(Normal, StandardNormal)
def _kl_normal_standard_normal(p: Normal, q: StandardNormal) -> torch.Tensor:
    return standard_normal_kl(p.loc, p.scale, _log_scale(p))


def standard_normal(latent_dim: int, like: torch.Tensor) -> Distribution:
    """p(z) = N(0, I) with event shape [latent_dim], on ``like``'s device and dtype."""
    return Independent(StandardNormal(like.new_zeros(latent_dim)), 1)
