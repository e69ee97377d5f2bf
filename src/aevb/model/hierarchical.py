"""A hierarchical VAE with L stochastic layers, top-down inference sharing the generative path.

In the spirit of the ladder VAE (Sønderby et al. 2016) and NVAE (Vahdat &
Kautz 2020):

    generative   p(z_L) p(z_{L-1} | z_L) … p(z_1 | z_2) p(x | z_1),  p(z_L) = N(0, I)
    inference    bottom-up   d_1 = encoder(x),  d_{l+1} = up_l(d_l)          (deterministic)
                 top-down    q(z_L | x) = N(d_L)
                             q(z_l | z_{l+1}, x) = N(μ_p + Δμ_l, σ_p · exp Δlog σ_l),
                             (μ_p, log σ_p) = down_l(z_{l+1}) the prior's own parameters,
                             (Δμ_l, Δlog σ_l) = d_l

so the posterior of each layer is a correction of that layer's prior, and
the top-down networks serve both.  All layers have ``latent_dim`` dimensions;
the decoder (the model's network body) sees z_1.

The ELBO has one KL term per layer, KL(q(z_l|·) ‖ p(z_l|z_{l+1})), each in
closed form given the sampled z_{l+1}; ``log_likelihood`` importance-samples
all layers at once (weights p(x|z_1) Π p(z_l|z_{l+1}) / Π q(z_l|·)).
``encode(x)`` returns q(z_1 | x) along the posterior-mean path (z_{l>1} at
their means): what embeddings, reconstructions and figures use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from aevb.errors import UserError
from aevb.model.base import LossOutput, _posterior_stats, _sample_count
from aevb.model.posteriors import diagonal_normal
from aevb.model.vae import BETA, LatentVariableModel
from aevb.model.networks import _mlp
from aevb.model.objectives import ElboTerms
from aevb.model.precision import at_least_float32
from aevb.options import Option
from aevb.registry import MODELS

# each layer is a network of its own, built before any weight is trained: more than this is a typing slip
STOCHASTIC_LAYERS = Option("stochastic_layers", 2, "hvae: stochastic layers, each of --latent-dim dimensions", low=2,
                           high=64, metavar="L", memory=True)


@MODELS.register("hvae")
class HVAE(LatentVariableModel):
    """Hierarchical VAE; loss = −E_q[log p(x|z_1)] + β · Σ_l KL_l.

    Args (besides :class:`aevb.models.Model`'s):
        stochastic_layers: L ≥ 2 layers of ``latent_dim`` dimensions each.
        beta: weight of the KL terms in the training loss only.
        ladder_hidden: width of the small MLPs between layers (default 2·latent_dim, at least 64).
    """

    name = "hvae"
    options = (BETA, STOCHASTIC_LAYERS)  # not the prior: the top layer's is the standard normal

    def __init__(self, *args, stochastic_layers: int = STOCHASTIC_LAYERS.default, beta: float = BETA.default,
                 ladder_hidden: int | None = None, prior: str = "standard", **kwargs):
        if prior != "standard":
            raise UserError("the hierarchical VAE's top layer has the standard normal prior; drop --prior")
        super().__init__(*args, **kwargs)
        options = self.check_options({"stochastic_layers": stochastic_layers, "beta": beta})
        self.layers, self.beta = options["stochastic_layers"], options["beta"]
        width = int(ladder_hidden or max(64, 2 * self.latent_dim))
        two_d = 2 * self.latent_dim
        # up[l]: d_{l+1} from d_l; down[l]: p(z_{l+1} | z_{l+2}) parameters … indexed by the lower layer
        self.up = nn.ModuleList(nn.Sequential(nn.ReLU(), *_mlp([two_d, width, two_d]))
                                for _ in range(self.layers - 1))
        self.down = nn.ModuleList(nn.Sequential(*_mlp([self.latent_dim, width, two_d]))
                                  for _ in range(self.layers - 1))
        self.config.update(stochastic_layers=self.layers, beta=self.beta, ladder_hidden=width)
        del self.config["prior"], self.config["prior_args"]

    @property
    def stochastic_layers(self) -> int:
        return self.layers

    # -- the two passes ----------------------------------------------------------

    def _bottom_up(self, x: torch.Tensor, label: Any = None) -> list[torch.Tensor]:
        """[d_1, …, d_L], each [B, 2D] (the encoder sees the label of a conditional model; the ladder does not)."""
        d = [self._run(self.encoder, self._encoder_inputs(x, label))]
        for up in self.up:
            d.append(self._run(up, d[-1]))
        return d

    def _top_down(self, d: list[torch.Tensor], n_samples: int | None):
        """Sample (or take means of) every layer from the top down.

        Returns, from the top layer L down to 1, lists of z [S, B, D] (or [B, D]
        with ``n_samples=None``: the means), q(z_l|·) and p(z_l|z_{l+1}).
        """
        q = self._normal(d[-1])
        p = Independent(Normal(torch.zeros_like(q.mean), torch.ones_like(q.mean), validate_args=False), 1)
        zs, qs, ps = [], [], []
        for level in range(self.layers - 1, -1, -1):  # L-1 … 0 (0-based)
            if level < self.layers - 1:
                prior_params = self._run(self.down[level], zs[-1])  # [S, B, 2D]
                p = self._normal(prior_params)
                q = self._normal(prior_params + d[level])
            z = q.mean if n_samples is None else (q.rsample((n_samples,)) if not zs else q.rsample())
            zs.append(z), qs.append(q), ps.append(p)
        return zs, qs, ps

    # -- the model contract --------------------------------------------------------

    def encode(self, x: torch.Tensor, label: Any = None) -> Distribution:
        """q(z_1 | x, z_{>1} at their posterior means): batch [B], event [D]."""
        _, qs, _ = self._top_down(self._bottom_up(x, label), None)
        return qs[-1]

    def _normal(self, params: torch.Tensor) -> Distribution:
        """A layer's Gaussian from params [*, 2·D], parametrised as the model's posterior is."""
        return diagonal_normal(params, self.posterior.scale_param)

    def layer_posteriors(self, x: torch.Tensor, label: Any = None) -> list[Distribution]:
        """q(z_l | ·) along the posterior-mean path, for l = 1 … L (bottom first)."""
        _, qs, _ = self._top_down(self._bottom_up(x, label), None)
        return qs[::-1]

    def elbo_terms(self, x: torch.Tensor, n_samples: int = 1, label: Any = None) -> ElboTerms:
        zs, qs, ps = self._top_down(self._bottom_up(x, label), n_samples)
        reconstruction = -self.decode(zs[-1], label).log_prob(x.to(zs[-1].dtype)).mean(0)  # [B]
        # the top layer's KL is over a [B] posterior; the others average over the S samples they depend on
        kls = [kl_divergence(q, p) for q, p in zip(qs, ps)]  # top first: [B], then [S, B]
        kls = [kl if kl.dim() == 1 else kl.mean(0) for kl in kls][::-1]  # bottom first, each [B]
        return ElboTerms(reconstruction, torch.stack(kls).sum(0), qs[-1], tuple(kls))

    def log_weights(self, x: torch.Tensor, n_samples: int, posterior: Distribution | None = None,
                    label: Any = None) -> torch.Tensor:
        """log p(x|z_1) + Σ_l log p(z_l|z_{l+1}) − Σ_l log q(z_l|·) over all layers, [S, B] (``posterior`` unused: every layer is drawn anew)."""
        zs, qs, ps = self._top_down(self._bottom_up(x, label), n_samples)
        log_w = at_least_float32(self.decode(zs[-1], label).log_prob(x.to(zs[-1].dtype)))
        for z, q, p in zip(zs, qs, ps):
            log_w = log_w + at_least_float32(p.log_prob(z)) - at_least_float32(q.log_prob(z))
        return log_w

    def loss(self, x: torch.Tensor, beta: float | None = None, label: Any = None) -> LossOutput:
        beta = self.beta if beta is None else beta
        terms = self.elbo_terms(x, label=label)
        reconstruction, kl = terms.reconstruction.mean(), terms.kl.mean()
        mu, sigma = _posterior_stats(terms.posterior)
        extras = {f"kl_layer{l + 1}": k.mean().detach() for l, k in enumerate(terms.kl_layers)}
        return LossOutput(reconstruction + beta * kl, reconstruction.detach(), kl.detach(), mu, sigma, extras)

    @torch.no_grad()
    def sample_layers(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0,
                      fixed: dict[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Ancestral samples [z_1, …, z_L], each [n, D]; ``fixed`` {layer (1-based): z [n, D]} holds layers."""
        n = _sample_count(n, temperature)
        device = self.device
        fixed = fixed or {}
        # a fixed layer draws nothing: the generator's state then depends only on the layers drawn
        z = (fixed[self.layers] if self.layers in fixed
             else torch.randn(n, self.latent_dim, generator=generator, device=device) * temperature)
        zs = [z]
        for level in range(self.layers - 2, -1, -1):
            if level + 1 in fixed:
                z = fixed[level + 1]
            else:
                p = self._normal(self._run(self.down[level], z))
                eps = torch.randn(p.mean.shape, generator=generator, device=device)
                z = p.mean + temperature * p.stddev * eps
            zs.append(z)
        return zs[::-1]
