"""Richer posteriors: the diagonal Gaussian pushed through invertible steps (normalising flows).

q(z|x) is the distribution of z_K = f_K ∘ … ∘ f_1(z_0), z_0 ~ N(μ(x), σ²(x)),
with log q(z_K|x) = log N(z_0; μ, σ²) − Σ_k log |det ∂f_k/∂z_{k−1}|: exact
for every sample the posterior draws, so the ELBO's KL (by Monte Carlo, as
no closed form exists) and the importance-sampled log-likelihood use the
flow's true log-density.  Two kinds of step:

- ``iaf``, inverse autoregressive flow (Kingma et al. 2016): z_k = μ_k + σ_k ⊙ z_{k−1}
  with (μ_k, log σ_k) from a masked autoencoder (MADE) of z_{k−1}, output d
  seeing only z_{<d}, and of a context h(x) that the encoder outputs beside
  (μ, log σ²); the order of the dimensions is reversed between steps.  Its
  last layer starts at zero: a new IAF is the identity, and gives the plain
  VAE's numbers (``tests/test_flows.py``).  Its inverse exists (D passes).
- ``planar`` (Rezende & Mohamed 2015): z_k = z_{k−1} + û·tanh(wᵀz_{k−1} + b),
  with parameters shared by all examples and û constrained so that the step
  is invertible (their appendix); its inverse has no closed form.

A flow posterior's ``mean`` is the flow applied to the base's mean (E[z] has
no closed form): what reconstructions and codes use.  Its ``log_prob`` of a
value it did not draw itself inverts the flow where it can (IAF) and raises
otherwise (planar).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution, constraints
from torch.nn import functional as F

from aevb.errors import UserError
from aevb.model.posteriors import Posterior, diagonal_normal
from aevb.registry import POSTERIORS


class FlowDistribution(Distribution):
    """z = flow(z_0), z_0 ~ base (event [D]); ``log_prob`` exact for the samples it drew (kept from the draw)."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, base: Distribution, steps: list, context: torch.Tensor | None, inverse=None):
        self.base, self.steps, self.context, self.inverse = base, steps, context, inverse
        self._drawn: tuple[torch.Tensor, torch.Tensor] | None = None  # (z, log q(z|x)) of the last draw
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    def _forward(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_K [*S, B, D], Σ log|det|) for base draws z0 [*S, B, D]."""
        z, log_det = z0, z0.new_zeros(z0.shape[:-1])
        for step in self.steps:
            z, step_log_det = step(z, self.context)
            log_det = log_det + step_log_det
        return z, log_det

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        z0 = self.base.rsample(sample_shape)
        z, log_det = self._forward(z0)
        self._drawn = (z, self.base.log_prob(z0) - log_det)
        return z

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log q(value|x) [*S, B]: from the draw where value is (a view of) the last sample, else by the inverse."""
        if self._drawn is not None:
            z, log_q = self._drawn
            if value.data_ptr() == z.data_ptr() and value.numel() == z.numel() and value.stride()[-1] == z.stride()[-1]:
                return log_q.reshape(value.shape[:-1])
        if self.inverse is None:
            raise NotImplementedError("this flow has no inverse: its log-density is known only for its own samples")
        z0, log_det = self.inverse(value)
        return self.base.log_prob(z0) - log_det

    @property
    def mean(self) -> torch.Tensor:
        return self._forward(self.base.mean)[0]

    @property
    def stddev(self) -> torch.Tensor:
        return self.base.stddev  # of the base: the flow's has no closed form

    @property
    def variance(self) -> torch.Tensor:
        return self.base.variance


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask [out, in] (MADE's autoregressive wiring)."""

    def __init__(self, mask: torch.Tensor, zero: bool = False):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.clone(), persistent=False)  # the wiring, rebuilt with the layer: not a weight
        if zero:  # the flow starts as the identity
            nn.init.zeros_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class IAFStep(nn.Module):
    """z' = μ + σ ⊙ z with (μ, log σ) [*, D] from a MADE of z and the context h [B, D] (output d sees z_<d)."""

    def __init__(self, latent_dim: int, hidden: int, reverse: bool):
        super().__init__()
        self.reverse = reverse
        order = torch.arange(1, latent_dim + 1)  # the degree of each input
        degrees = torch.arange(hidden) % max(latent_dim - 1, 1) + 1  # of each hidden unit, 1 … D − 1
        self.input = MaskedLinear((degrees[:, None] >= order[None, :]).float())
        self.context = nn.Linear(latent_dim, hidden)
        output_mask = (order[:, None] > degrees[None, :]).float()
        self.shift = MaskedLinear(output_mask, zero=True)
        self.log_scale = MaskedLinear(output_mask, zero=True)

    def made(self, z: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ), each [*, D], of z [*S, B, D] in the step's order."""
        h = F.elu(self.input(z) + self.context(context))
        # log σ softly bounded to ±3: a step scales each dimension by at most e³, keeping the steps stable
        return self.shift(h), 3 * torch.tanh(self.log_scale(h) / 3)

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reverse:
            z = z.flip(-1)
        shift, log_scale = self.made(z, context)
        out = shift + log_scale.exp() * z
        return (out.flip(-1) if self.reverse else out), log_scale.sum(-1)

    def inverse(self, out: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, log|det| of the forward step) from its output: D passes, dimension d fixed by the d-th."""
        if self.reverse:
            out = out.flip(-1)
        z = torch.zeros_like(out)
        for _ in range(out.shape[-1]):
            shift, log_scale = self.made(z, context)
            z = (out - shift) * torch.exp(-log_scale)
        z_final = z.flip(-1) if self.reverse else z
        return z_final, log_scale.sum(-1)


class PlanarStep(nn.Module):
    """z' = z + û·tanh(wᵀz + b), û = u + (m(wᵀu) − wᵀu)·w/‖w‖², m(a) = −1 + softplus(a): invertible."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.u = nn.Parameter(torch.randn(latent_dim) * 0.01)
        self.w = nn.Parameter(torch.randn(latent_dim) * 0.01)
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, z: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        w, u = self.w, self.u
        wu = w @ u
        u_hat = u + (F.softplus(wu) - 1 - wu) * w / w.square().sum().clamp_min(1e-12)
        activation = torch.tanh(z @ w + self.b)  # [*S, B]
        psi = (1 - activation.square()).unsqueeze(-1) * w  # [*S, B, D]
        log_det = torch.log((1 + psi @ u_hat).abs().clamp_min(1e-12))
        return z + u_hat * activation.unsqueeze(-1), log_det


class _FlowPosterior(Posterior):
    """The diagonal Gaussian of the encoder's (μ, log σ²) through ``steps`` flow steps."""

    factorises = False  # no KL per latent dimension
    sized = True  # its steps are built for latent_dim, which the model passes

    def __init__(self, latent_dim: int, steps: int = 2, hidden: int | None = None,
                 scale_param: str = "log-variance"):
        super().__init__()
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise UserError(f"the flow needs a whole number of steps ≥ 1, got {steps!r}")
        self.latent_dim, self.n_steps, self.scale_param = latent_dim, int(steps), scale_param
        self.hidden = hidden

    def extra_config(self) -> dict:
        return {"scale_param": self.scale_param, "steps": self.n_steps, "hidden": self.hidden}


@POSTERIORS.register("iaf")
class IAFPosterior(_FlowPosterior):
    """Inverse autoregressive flow on the Gaussian posterior; the encoder also outputs the context h(x) [B, D]."""

    params_per_latent = 3

    def __init__(self, latent_dim: int, steps: int = 2, hidden: int | None = None, scale_param: str = "log-variance"):
        super().__init__(latent_dim, steps, hidden, scale_param)
        width = hidden or 4 * latent_dim
        self.flow = nn.ModuleList(IAFStep(latent_dim, width, reverse=bool(k % 2)) for k in range(self.n_steps))

    def forward(self, params: torch.Tensor) -> Distribution:
        gaussian, context = params[..., :2 * self.latent_dim], params[..., 2 * self.latent_dim:]
        base = diagonal_normal(gaussian, self.scale_param)

        def inverse(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            z, log_det = value, value.new_zeros(value.shape[:-1])
            for step in reversed(self.flow):
                z, step_log_det = step.inverse(z, context)
                log_det = log_det + step_log_det
            return z, log_det

        return FlowDistribution(base, list(self.flow), context, inverse)


@POSTERIORS.register("planar")
class PlanarPosterior(_FlowPosterior):
    """Planar flow steps on the Gaussian posterior, their parameters shared by all examples."""

    params_per_latent = 2

    def __init__(self, latent_dim: int, steps: int = 2, hidden: int | None = None, scale_param: str = "log-variance"):
        super().__init__(latent_dim, steps, hidden, scale_param)
        self.flow = nn.ModuleList(PlanarStep(latent_dim) for _ in range(self.n_steps))

    def forward(self, params: torch.Tensor) -> Distribution:
        return FlowDistribution(diagonal_normal(params, self.scale_param), list(self.flow), None)
