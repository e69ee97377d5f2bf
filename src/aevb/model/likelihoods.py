"""Likelihoods p(x|z): the decoder heads, one registered family each.

A *likelihood* is a decoder head: a small module that turns the decoder's raw
output ``params`` ([*S, B, k·C, H, W] where k = ``params_per_channel``) into a
``torch.distributions.Distribution`` over one data point, with the data
dimensions as event dimensions (``Independent``).  ``log_prob(x)`` is then the
log-density of a whole example in nats, constants included, so values are
comparable across likelihood families.

Adding a family is one ``@LIKELIHOODS.register("name")`` class here (or in a
user's module), a :class:`Likelihood` subclass; nothing else in the library
needs to change.  It implements ``forward(params, event_dims)`` and declares
what evaluation, the figures and training read of it:

* ``params_per_channel``: decoder outputs per data value (2 for a mean and a scale);
* ``discrete`` (a mass function), ``normalized`` (log p(x) and bits/dim are
  defined), ``unit_interval`` (data in [0, 1] only) and
  ``unbounded_at_endpoints`` (its density has no bound at exactly 0 or 1, so
  training refuses data holding those values) and ``takes_scale`` (its
  constructor takes ``scale=``, which ``--likelihood-scale`` sets);
* :meth:`Likelihood.scale_summary` where one scale serves every dimension;
* :meth:`Likelihood.params_for_mean` where the mean is invertible (the decoder's
  last bias then starts at the data's average image);
* :meth:`Likelihood.data_scale` where one scale serves every dimension
  (``aevb train`` then starts at the scale that best fits the data around
  that average, not at 1);
* :meth:`Likelihood.extra_config`: its constructor arguments for ``config.json``.

A learned scale is log-parametrised and floored (:data:`SCALE_FLOOR`).
The posteriors q(z|x) and the standard normal are in :mod:`aevb.model.posteriors`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import (
    Bernoulli,
    ContinuousBernoulli,
    Distribution,
    Independent,
    Laplace,
    Normal,
)

from aevb.model.precision import at_least_float32
from aevb.registry import LIKELIHOODS

# Learned scales live in log space and are clamped from below: the Gaussian and
# Laplace densities grow without bound as the scale goes to zero, so a model
# that reconstructs some pixel exactly (the black border of MNIST) would
# otherwise drive log p(x|z) to +inf instead of learning anything.  The floor
# bounds the density, not the probability of a quantised value: at σ = 1e-3 a
# Gaussian puts up to 1.57× the bin width 1/255 of 8-bit data into a bin's
# density times width, so a density's log p(x) on 8-bit data is no
# log-probability; train and evaluate on dequantised data (--dequantize) for
# that, and bits per dimension are only reported then.
SCALE_FLOOR = 1e-3


def _independent(base: Distribution, event_dims: int) -> Distribution:
    """Sum log-densities over the trailing ``event_dims`` (the data dimensions)."""
    return Independent(base, event_dims)


class Likelihood(nn.Module):
    """Base of decoder heads.  Subclasses implement :meth:`forward`.

    ``forward(params, event_dims)`` maps raw decoder output
    [*S, B, k·C, *spatial] to a distribution with event shape [C, *spatial].
    """

    # What a family declares about itself; evaluation, the figures and training read these.
    params_per_channel = 1
    discrete = False  # a probability mass function (bits/dim need no bin width)
    normalized = True  # a normalised density or mass: log p(x) and bits/dim are defined
    unit_interval = False  # defined for data in [0, 1] only
    unbounded_at_endpoints = False  # the density has no bound at x = 0 or 1 as the parameters run off
    takes_scale = False  # its constructor takes scale= (--likelihood-scale): one σ or b, fixed or initial

    def extra_config(self) -> dict:
        """Constructor arguments to store in ``config.json``."""
        return {}

    def scale_summary(self) -> tuple[str, float] | None:
        """(family, scale) where one scale serves every dimension, else None.

        ``family`` names the registered fixed-scale likelihood of the same
        shape (``"gaussian"``: the scale is σ; ``"laplace"``: it is b), so that
        the likelihood figure can mark this model's scale on that family's curve.
        """
        return None

    def params_for_mean(self, mean: torch.Tensor) -> torch.Tensor | None:
        """Raw decoder output [k·C, *spatial] under which p(x|z) has mean ``mean`` [C, *spatial].

        Used to start training from the data's average image (the decoder's last
        bias); None where a family has no such inverse (then the bias keeps its init).
        """
        return None

    @classmethod
    def data_scale(cls, residuals: torch.Tensor) -> float | None:
        """The scale most likely for ``residuals`` = x − mean [N, *data_shape], floored; None for a family with
        no one scale.

        ``aevb train`` starts a learned scale, and sets a fixed one, at it unless given: a σ of 1 on images
        in [0, 1] weighs the reconstruction 10–100 times less than it will end up weighing it, and the KL
        term shuts the latent units meanwhile (a folder of 32×32 shapes ended with 1 active unit of 16, at
        9.2 bits/dim).  Starting at the σ of the data around their mean, which the decoder's bias starts
        at, gives the reconstruction its weight from the first step.
        """
        return None



class _LocationFamily(Likelihood):
    """A family whose one decoder output per value is its location (Gaussian, Laplace)."""

    def params_for_mean(self, mean: torch.Tensor) -> torch.Tensor:
        return mean


def bernoulli_log_prob(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """x·l − softplus(l) elementwise (no gradient: see :class:`_BernoulliLogProb`), logits and value one shape."""
    log_prob = logits.abs().sigmoid_().log_()  # −log(1 + e^−|l|)
    return log_prob.addcmul_(value, logits).sub_(logits.clamp_min(0))


def bernoulli_log_prob_grad(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """∂/∂l of x·l − softplus(l): x − σ(l)."""
    return value - torch.sigmoid(logits)


class _BernoulliLogProb(torch.autograd.Function):
    """x·l − softplus(l) elementwise for logits l, with the gradient x − σ(l) in one step.

    torch's ``Bernoulli.log_prob`` goes through ``binary_cross_entropy_with_logits``,
    whose ``log1p`` runs scalar on x86 CPUs (about 5 ns per element: more than
    the decoder's matrix multiplies at batch 128, and most of an
    importance-sampled evaluation); so do ``F.softplus`` and ``F.logsigmoid``.
    Here softplus(l) = max(l, 0) − log σ(|l|), from two vectorised passes
    (``sigmoid``, ``log``) whose argument σ(|l|) lies in [½, 1]: no overflow,
    and rounding costs about an ulp of 1 (1e-7 nats per element in float32),
    the error of torch's own formula (``tests/test_distributions.py`` checks
    both against float64).  Six passes over the logits instead of ten: 1.5×
    faster than exp/log of 1 + e^−|l|, a third of an fp32 importance-sampled
    evaluation's time.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, value)
        return bernoulli_log_prob(logits, value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, value = ctx.saved_tensors
        grad_logits = grad_value = None
        if ctx.needs_input_grad[0]:
            grad_logits = (grad * bernoulli_log_prob_grad(logits, value)).sum_to_size(logits.shape)
        if ctx.needs_input_grad[1]:
            grad_value = (grad * logits).sum_to_size(value.shape)
        return grad_logits, grad_value


class FastBernoulli(Bernoulli):
    """``torch.distributions.Bernoulli`` whose ``log_prob`` is :class:`_BernoulliLogProb`."""

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = False):
        # Bernoulli.__init__ broadcasts its one tensor against nothing: an op a step
        self.logits = self._param = logits
        Distribution.__init__(self, logits.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return Bernoulli.expand(self, batch_shape, self._get_checked_instance(FastBernoulli, _instance))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, value = torch.broadcast_tensors(self.logits, value.to(self.logits.dtype))
        return _BernoulliLogProb.apply(logits, value)


@LIKELIHOODS.register("bernoulli")
class BernoulliLikelihood(Likelihood):
    """Bernoulli with logits: log p(x|z) = −BCE(x, σ(logits)), the tutorials' loss.

    Defined for x in {0, 1}.  Grey values in [0, 1] are accepted (as in the
    tutorials) but the result is then not a normalised density; binarise the
    data for a true likelihood.
    """

    discrete = True
    unit_interval = True

    def forward(self, params: torch.Tensor, event_dims: int) -> Distribution:
        return _independent(FastBernoulli(logits=params), event_dims)

    def params_for_mean(self, mean: torch.Tensor) -> torch.Tensor:
        # pixels that are always 0 (the MNIST border) start at p = 1e-3, not at logit −inf
        return torch.logit(mean.clamp(1e-3, 1 - 1e-3))


# |logit| below which the continuous Bernoulli's closed forms lose digits to
# cancellation (two terms of size ~1/l, or 1/l², leave a result of size ~1) and
# its series are used; each series is cut where its first omitted term is
# below float32 rounding.
_CB_SERIES = 1e-2
_CB_MEAN_SERIES = 0.1
_CB_VARIANCE_SERIES = 1.0
_CB_QUANTILE_SERIES = 1e-6  # cdf and icdf have no cancellation, only 0/0 at l = 0


class LogitContinuousBernoulli(ContinuousBernoulli):
    """``torch.distributions.ContinuousBernoulli`` computed from its logits l, at any l.

    torch's class evaluates the normaliser, mean, variance and quantiles from
    λ = σ(l) clamped to [ε, 1 − ε]; in float32 that freezes every |l| beyond
    about 16, where a trained decoder puts many pixels, and then log p(x|z)
    is off by up to several nats a pixel with no gradient.  In l, with
    a = |l| and q = 1 / (1 − e^(−a)):

    * log C(l) = log(l / tanh(l/2)) = log a + log1p(e^(−a)) − log(−expm1(−a));
      log 2 + l²/12 near 0;
    * mean = 1/(1 − e^(−l)) − 1/l; ½ + l/12 − l³/720 near 0;
    * variance = 1/l² − e^(−a)·q²; 1/12 − l²/240 + l⁴/6048 − l⁶/172800 + l⁸/5322240 near 0;
    * icdf(u) = log1p(u·expm1(l)) / l (l < 0), 1 + log1p((1 − u)·expm1(−l)) / l
      (l > 0); u + l·u(1 − u)/2 at l ≈ 0.

    Both branches of each ``where`` are evaluated at safe arguments, so no NaN
    gradient comes from the branch not taken.
    """

    def _split(self, series: float = _CB_SERIES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(l, whether |l| is in the series region, l with the series region moved to 1)."""
        logits = self.logits
        small = logits.abs() < series
        return logits, small, torch.where(small, torch.ones_like(logits), logits)

    def _cont_bern_log_norm(self) -> torch.Tensor:
        logits, small, safe = self._split()
        a = safe.abs()
        closed = a.log() + torch.log1p(torch.exp(-a)) - torch.log(-torch.expm1(-a))
        return torch.where(small, math.log(2.0) + logits.pow(2) / 12, closed)

    @staticmethod
    def _q(a: torch.Tensor) -> torch.Tensor:
        """q = 1 / (1 − e^(−a)) for a = |l| > 0."""
        return 1 / -torch.expm1(-a)

    def _first_term(self, safe: torch.Tensor) -> torch.Tensor:
        """1 / (1 − e^(−l)) without overflow for either sign of l."""
        a = safe.abs()
        q = self._q(a)
        return torch.where(safe > 0, q, -torch.exp(-a) * q)

    @property
    def mean(self) -> torch.Tensor:
        logits, small, safe = self._split(_CB_MEAN_SERIES)
        return torch.where(small, 0.5 + logits / 12 - logits.pow(3) / 720, self._first_term(safe) - 1 / safe)

    @property
    def variance(self) -> torch.Tensor:
        logits, small, safe = self._split(_CB_VARIANCE_SERIES)
        a = safe.abs()
        q = self._q(a)
        l2 = logits.pow(2)
        series = 1 / 12 - l2 / 240 + l2.pow(2) / 6048 - l2.pow(3) / 172800 + l2.pow(4) / 5322240
        return torch.where(small, series, 1 / safe.pow(2) - torch.exp(-a) * q.pow(2))

    def icdf(self, value: torch.Tensor) -> torch.Tensor:
        logits, small, safe = self._split(_CB_QUANTILE_SERIES)
        negative = torch.log1p(value * torch.expm1(safe.clamp(max=0))) / safe
        positive = 1 + torch.log1p((1 - value) * torch.expm1(-safe.clamp(min=0))) / safe
        closed = torch.where(safe > 0, positive, negative)
        return torch.where(small, value + logits * value * (1 - value) / 2, closed).clamp(0, 1)

    def cdf(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, small, safe = self._split(_CB_QUANTILE_SERIES)
        x = value.clamp(0, 1)
        negative = torch.expm1(safe.clamp(max=0) * x) / torch.expm1(safe.clamp(max=0))
        positive = torch.exp(safe.clamp(min=0) * (x - 1)) * torch.expm1(-safe.clamp(min=0) * x) \
            / torch.expm1(-safe.clamp(min=0))
        closed = torch.where(safe > 0, positive, negative)
        return torch.where(small, x + logits * x * (x - 1) / 2, closed)

    def entropy(self) -> torch.Tensor:
        # −E[log p(x)] with log p(x) = x·l − softplus(l) + log C(l)
        return F.softplus(self.logits) - self.mean * self.logits - self._cont_bern_log_norm()


@LIKELIHOODS.register("continuous-bernoulli")
class ContinuousBernoulliLikelihood(Likelihood):
    """Continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): the Bernoulli
    density renormalised over [0, 1], a proper density for grey values.

    At x exactly 0 or 1 its density grows without bound as the logits run to
    ±∞ (raw 8-bit MNIST reached an ELBO of +3,068 nats), so training takes it
    on values inside (0, 1) only: dequantised pixels.
    """

    unit_interval = True
    unbounded_at_endpoints = True

    def forward(self, params: torch.Tensor, event_dims: int) -> Distribution:
        return _independent(LogitContinuousBernoulli(logits=params, validate_args=False), event_dims)


def _root_mean_square(residuals: torch.Tensor) -> float:
    """A Gaussian's maximum-likelihood σ for zero-located residuals [N, ...]: σ² = their mean square."""
    return float(residuals.pow(2).mean().sqrt())


def _mean_absolute(residuals: torch.Tensor) -> float:
    """A Laplace's maximum-likelihood scale for zero-located residuals [N, ...]: b = their mean |r|."""
    return float(residuals.abs().mean())


class _FixedScale(_LocationFamily):
    """A location family (``family``: Normal or Laplace) with one fixed scale for all dimensions."""

    family: type[Distribution]
    family_name: str  # the name of the fixed-scale likelihood of this family, for scale_summary
    takes_scale = True

    def __init__(self, scale: float = 1.0):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"{type(self).__name__}: the scale must be positive, got {scale}")
        self.scale = float(scale)

    def extra_config(self) -> dict:
        return {"scale": self.scale}

    def scale_summary(self) -> tuple[str, float]:
        return self.family_name, self.scale

    @classmethod
    def data_scale(cls, residuals: torch.Tensor) -> float:
        return max(cls.most_likely_scale(residuals.double()), SCALE_FLOOR)

    def forward(self, params: torch.Tensor, event_dims: int) -> Distribution:
        return _independent(self.family(params, self.scale, validate_args=False), event_dims)


class _FloorWithUpwardGradient(torch.autograd.Function):
    """max(x, floor), whose gradient below the floor still reaches x when descending on it raises x.

    A plain clamp has no gradient below the floor, so a learned log-scale that
    Adam's momentum carries under it would stay there for good, whatever the
    data say; this one climbs back once the loss wants a larger scale.  The
    values are the clamp's.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, floor: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.floor = floor
        return x.clamp(min=floor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return torch.where((x >= ctx.floor) | (grad < 0), grad, torch.zeros_like(grad)), None


def _positive_floor(head: nn.Module, floor: float) -> float:
    """``floor`` as a float, refused unless > 0: at σ → 0 a Gaussian's or Laplace's density is unbounded."""
    if not floor > 0:
        raise ValueError(f"{type(head).__name__}: the scale's floor must be positive, got {floor}")
    return float(floor)


class _LearnedScale(_LocationFamily):
    """A location family with one learned log-scale shared by all dimensions, clamped to a floor."""

    family: type[Distribution]
    family_name: str  # the name of the fixed-scale likelihood of this family, for scale_summary
    takes_scale = True

    def __init__(self, scale: float = 1.0, floor: float = SCALE_FLOOR):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"{type(self).__name__}: the initial scale must be positive, got {scale}")
        self.floor = _positive_floor(self, floor)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def extra_config(self) -> dict:
        return {"floor": self.floor}

    @property
    def scale(self) -> torch.Tensor:
        """σ = exp(max(log σ, log floor)), a float32 scalar with gradient (a fixed-scale head's ``scale`` is a float)."""
        # exp in float32 even for a bf16 model: bf16's 8-bit mantissa would put up to 0.4% into σ,
        # and n·log σ into every example's log-density (0.3 nats at 784 pixels)
        return _FloorWithUpwardGradient.apply(at_least_float32(self.log_scale), math.log(self.floor)).exp()

    def scale_summary(self) -> tuple[str, float]:
        return self.family_name, float(self.scale.detach())

    @classmethod
    def data_scale(cls, residuals: torch.Tensor) -> float:
        return max(cls.most_likely_scale(residuals.double()), SCALE_FLOOR)

    def forward(self, params: torch.Tensor, event_dims: int) -> Distribution:
        scale = self.scale.to(params.dtype)
        return _independent(self.family(params, scale, validate_args=False), event_dims)


@LIKELIHOODS.register("gaussian")
class GaussianLikelihood(_FixedScale):
    """Gaussian with a fixed σ.  σ = 1 gives ½·SSE + ½·n·log 2π: the MSE loss."""

    family = Normal
    family_name = "gaussian"
    most_likely_scale = staticmethod(_root_mean_square)


@LIKELIHOODS.register("gaussian-learned")
class LearnedGaussianLikelihood(_LearnedScale):
    """Gaussian with one learned σ for all pixels (log-parametrised, floored)."""

    family = Normal
    family_name = "gaussian"
    most_likely_scale = staticmethod(_root_mean_square)


class OptimalScaleNormal(Normal):
    """Normal whose σ is chosen, for each example, to maximise its own log-density.

    The σ-VAE (Rybkin et al. 2021): for a fixed mean μ, the σ that maximises
    log N(x; μ, σ²I) over the n dimensions of one example is σ* = √MSE(x, μ).
    ``log_prob(x)`` evaluates the density at that σ (floored), which makes it a
    profile likelihood: an upper bound of every shared-σ Gaussian on the same
    example, not a normalised density in x.  ``sample`` uses ``sample_scale``
    (the running σ* seen in training).

    Shapes: ``loc`` [*S, B, *event]; ``event_dims`` trailing dimensions form an example.
    """

    def __init__(self, loc, sample_scale, event_dims: int, floor: float, observe=None):
        super().__init__(loc, sample_scale, validate_args=False)
        self._event_dims = event_dims
        self._floor = floor
        self._observe = observe

    def optimal_scale(self, value: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-self._event_dims, 0))
        mse = (value - self.loc).pow(2).mean(dim=dims, keepdim=True)
        return mse.clamp(min=self._floor**2).sqrt()  # clamped first: √ has no finite gradient at an exact fit

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        scale = self.optimal_scale(value)
        if self._observe is not None:
            self._observe(scale)
        return Normal(self.loc, scale, validate_args=False).log_prob(value)


@LIKELIHOODS.register("gaussian-optimal")
class OptimalGaussianLikelihood(_LocationFamily):
    """Gaussian with σ at its analytic optimum √MSE per example (σ-VAE).

    There is nothing to learn; a running average of σ* is kept as a buffer so
    that samples from p(x|z) have a sensible noise level.
    """

    normalized = False  # σ is fitted to each example: a profile likelihood, no density in x

    def __init__(self, floor: float = SCALE_FLOOR, momentum: float = 0.01):
        super().__init__()
        self.floor = _positive_floor(self, floor)
        self.momentum = float(momentum)
        self.register_buffer("running_scale", torch.tensor(1.0))

    def extra_config(self) -> dict:
        return {"floor": self.floor}

    def _observe(self, scale: torch.Tensor) -> None:
        # training steps only: not evaluations, which run without gradients (even in train mode)
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                mean = scale.detach().float().mean().to(self.running_scale.dtype)
                self.running_scale.lerp_(mean, self.momentum)

    def forward(self, params: torch.Tensor, event_dims: int) -> Distribution:
        base = OptimalScaleNormal(
            params, self.running_scale.to(params.dtype), event_dims, self.floor, self._observe
        )
        return _independent(base, event_dims)


@LIKELIHOODS.register("gaussian-diag")
class DiagonalGaussianLikelihood(Likelihood):
    """Gaussian with a per-pixel σ predicted by the decoder (2·C output channels).

    Why the floor: the density of a Gaussian is unbounded as σ → 0.  A decoder
    that predicts the value of a constant pixel exactly (MNIST's black border)
    can send that pixel's σ to zero and its log-density to +∞, so the "ELBO"
    grows without limit while the model learns nothing.  σ = floor + softplus
    keeps every density finite.
    """

    params_per_channel = 2

    def __init__(self, floor: float = SCALE_FLOOR):
        super().__init__()
        self.floor = _positive_floor(self, floor)

    def extra_config(self) -> dict:
        return {"floor": self.floor}

    def forward(self, params: torch.Tensor, event_dims: int) -> Distribution:
        channel_dim = params.dim() - event_dims
        loc, raw_scale = params.chunk(2, dim=channel_dim)  # each [*S, B, C, *spatial]
        scale = F.softplus(raw_scale) + self.floor
        return _independent(Normal(loc, scale, validate_args=False), event_dims)


@LIKELIHOODS.register("laplace")
class LaplaceLikelihood(_FixedScale):
    """Laplace with a fixed scale b: −log p = L1/b + n·log 2b (the L1 loss)."""

    family = Laplace
    family_name = "laplace"
    most_likely_scale = staticmethod(_mean_absolute)


@LIKELIHOODS.register("laplace-learned")
class LearnedLaplaceLikelihood(_LearnedScale):
    """Laplace with one learned scale for all pixels (log-parametrised, floored)."""

    family = Laplace
    family_name = "laplace"
    most_likely_scale = staticmethod(_mean_absolute)
