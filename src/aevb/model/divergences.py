"""Autoencoders regularised by a divergence other than KL: WAE-MMD and InfoVAE.

Both match the aggregate posterior q(z) = E_x q(z|x) to the prior p(z) with
the maximum mean discrepancy between the batch's codes and as many draws of
the prior (:func:`mmd_squared`, the unbiased estimate of Gretton et al.
2012), in the kernel ``--kernel`` with scale ``--kernel-bandwidth``:

- WAE-MMD (Tolstikhin et al. 2018): a deterministic encoder, loss =
  −log p(x|z) + λ·MMD²(q(z), p(z)).  No posterior density: no ELBO, but
  samples from the prior, which training pulled q(z) to.
- InfoVAE (Zhao et al. 2019): the VAE with −E log p(x|z) + (1 − α)·KL(q(z|x) ‖ p(z))
  + (α + λ − 1)·MMD²(q(z), p(z)); α = 1 drops the KL that pushes every
  posterior to the prior (and its information about x) and keeps only the
  match of the aggregate.

The MMD couples a batch's examples, so these train on one process
(``batch_coupled``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from aevb.errors import UserError
from aevb.model.base import LossOutput, _posterior_stats
from aevb.model.disentangling import _BatchPenalisedVAE
from aevb.model.precision import at_least_float32
from aevb.model.vae import LatentVariableModel
from aevb.options import Option, as_argument
from aevb.registry import MODELS


def _inverse_multiquadratic(squared_distance: torch.Tensor, scale: float) -> torch.Tensor:
    return scale / (scale + squared_distance)


def _gaussian(squared_distance: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.exp(-squared_distance / scale)


# k(a, b) from ‖a − b‖² and the scale C: C/(C + d²) (Tolstikhin et al.'s choice) or exp(−d²/C)
KERNELS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "imq": _inverse_multiquadratic,
    "rbf": _gaussian,
}


def mmd_squared(a: torch.Tensor, b: torch.Tensor, kernel: str = "imq", scale: float = 1.0) -> torch.Tensor:
    """The unbiased estimate of MMD²(P, Q) from a [n, D] ~ P and b [m, D] ~ Q (n, m ≥ 2), a scalar.

    Mean of k over distinct pairs within a, within b, minus twice the mean over
    all pairs across (Gretton et al. 2012, the U-statistic); it can be
    slightly negative when P = Q.
    """
    a, b = at_least_float32(a), at_least_float32(b).to(at_least_float32(a).dtype)
    k = KERNELS[kernel]
    n, m = a.shape[0], b.shape[0]
    within_a = k(torch.cdist(a, a).square(), scale)
    within_b = k(torch.cdist(b, b).square(), scale)
    across = k(torch.cdist(a, b).square(), scale)
    off_diagonal_a = (within_a.sum() - within_a.diagonal().sum()) / (n * (n - 1))
    off_diagonal_b = (within_b.sum() - within_b.diagonal().sum()) / (m * (m - 1))
    return off_diagonal_a + off_diagonal_b - 2 * across.mean()


KERNEL = Option("kernel", "imq", "wae, infovae: kernel of the MMD between q(z) and p(z): imq, C/(C + ‖a − b‖²), or "
                "rbf, exp(−‖a − b‖²/C)", choices=("imq", "rbf"))
KERNEL_BANDWIDTH = Option("kernel_bandwidth", None, "wae, infovae: the kernel's scale C (default 2·latent_dim, "
                          "Tolstikhin et al.'s for a standard normal prior)", kind="float", above=0, metavar="C")


@dataclass(frozen=True)
class PriorMMD:
    """The MMD² between a batch's codes and as many draws of the prior, in one kernel and scale: the penalty of
    both models, held by each (composition: a model has one)."""

    kernel: str
    scale: float

    @classmethod
    def of(cls, latent_dim: int, kernel: str, kernel_bandwidth: float | None) -> PriorMMD:
        """The kernel with its scale C (default 2·latent_dim, Tolstikhin et al.'s for a standard normal prior)."""
        return cls(kernel, 2.0 * latent_dim if kernel_bandwidth is None else float(kernel_bandwidth))

    def __call__(self, prior, z: torch.Tensor) -> torch.Tensor:
        """MMD² between codes z [B, D] and B draws of ``prior`` (B ≥ 2)."""
        if z.shape[0] < 2:
            raise UserError("the MMD between q(z) and p(z) needs at least 2 examples a batch; use a larger --batch-size")
        return mmd_squared(z, prior.sample((z.shape[0],)), self.kernel, self.scale)

    def config(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "kernel_bandwidth": self.scale}


MMD_WEIGHT = Option("mmd_weight", 10.0, "wae: weight λ of the MMD between q(z) and p(z)", low=0)


@MODELS.register("wae")
class WAE(LatentVariableModel):
    """Wasserstein autoencoder with the MMD penalty (Tolstikhin et al. 2018): −log p(x|z) + λ·MMD², z = f(x)."""

    name = "wae"
    posterior_family = "point-mass"
    has_kl = False
    batch_coupled: ClassVar[bool] = True
    options = (*LatentVariableModel.options, MMD_WEIGHT, KERNEL, KERNEL_BANDWIDTH)

    def __init__(self, *args, mmd_weight: float = MMD_WEIGHT.default, kernel: str = KERNEL.default,
                 kernel_bandwidth: float | None = KERNEL_BANDWIDTH.default, **kwargs):
        super().__init__(*args, **kwargs)
        options = self.check_options({"mmd_weight": mmd_weight, "kernel": kernel,
                                      "kernel_bandwidth": kernel_bandwidth})
        self.mmd_weight = options["mmd_weight"]
        self.mmd = PriorMMD.of(self.latent_dim, options["kernel"], options["kernel_bandwidth"])
        self.config.update(mmd_weight=self.mmd_weight, **self.mmd.config())

    def loss(self, x: torch.Tensor, beta: float | None = None, label: Any = None) -> LossOutput:
        posterior = self.encode(x, label)  # a point mass at f(x) (f(x, y) for a conditional model)
        z = posterior.mean  # [B, D]
        reconstruction = -at_least_float32(self.decode(z, label).log_prob(x.to(z.dtype))).mean()
        mmd = self.mmd(self.prior(), z)
        mu, sigma = _posterior_stats(posterior)
        return LossOutput(reconstruction + self.mmd_weight * mmd, reconstruction.detach(),
                          torch.zeros_like(reconstruction.detach()), mu, sigma, {"mmd": mmd.detach()})


INFO_ALPHA = Option("info_alpha", 0.0, "infovae: α; the KL term weighs 1 − α (α = 1: none)", high=1)
INFO_LAMBDA = Option("info_lambda", 10.0, "infovae: λ; the MMD term weighs α + λ − 1", above=0)


@MODELS.register("infovae")
class InfoVAE(_BatchPenalisedVAE):
    """InfoVAE with the MMD (Zhao et al. 2019): −E log p(x|z) + (1 − α)·KL + (α + λ − 1)·MMD²(q(z), p(z))."""

    name = "infovae"
    options = (*LatentVariableModel.options, INFO_ALPHA, INFO_LAMBDA, KERNEL, KERNEL_BANDWIDTH)

    def __init__(self, *args, info_alpha: float = INFO_ALPHA.default, info_lambda: float = INFO_LAMBDA.default,
                 kernel: str = KERNEL.default, kernel_bandwidth: float | None = KERNEL_BANDWIDTH.default, **kwargs):
        super().__init__(*args, **kwargs)
        options = self.check_options({"info_alpha": info_alpha, "info_lambda": info_lambda, "kernel": kernel,
                                      "kernel_bandwidth": kernel_bandwidth})
        self.info_alpha, self.info_lambda = options["info_alpha"], options["info_lambda"]
        self.mmd = PriorMMD.of(self.latent_dim, options["kernel"], options["kernel_bandwidth"])
        self.config.update(info_alpha=self.info_alpha, info_lambda=self.info_lambda, **self.mmd.config())

    @classmethod
    def check_options(cls, values: dict[str, Any], spelled: Callable[[str], str] = as_argument) -> dict[str, Any]:
        """The MMD's weight α + λ − 1 may not be negative (that would push q(z) away from the prior)."""
        values = super().check_options(values, spelled)
        alpha, lam = values.get("info_alpha", INFO_ALPHA.default), values.get("info_lambda", INFO_LAMBDA.default)
        if alpha + lam - 1 < 0:
            raise UserError(f"{spelled('info_alpha')} + {spelled('info_lambda')} − 1 weighs the MMD and is "
                            f"{alpha + lam - 1:g} here; choose them so that it is ≥ 0")
        return values

    def penalised(self, posterior, prior, z, reconstruction, kl):
        mmd = self.mmd(prior, z)
        objective = (reconstruction + (1 - self.info_alpha) * kl).mean() + (self.info_alpha + self.info_lambda - 1) * mmd
        return objective, {"mmd": mmd.detach()}
