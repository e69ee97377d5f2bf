"""VAEs that ask for a factorised aggregate posterior: β-TCVAE, FactorVAE and DIP-VAE.

Each keeps the VAE's data path (encode → q(z|x) → z → decode → p(x|z)) and
adds to its loss a penalty on the aggregate posterior q(z) = E_x q(z|x),
estimated from the batch:

- β-TCVAE (Chen et al. 2018) splits E KL(q(z|x) ‖ p(z)) into the index-code
  mutual information, the total correlation TC = KL(q(z) ‖ Π_d q(z_d)) and
  the dimension-wise KL, and weighs them α, β, γ; log q(z) by the
  minibatch-weighted estimator, which needs the training set's size.
- FactorVAE (Kim & Mnih 2018) adds γ·TC, TC estimated by a discriminator
  between samples of q(z) and of Π_d q(z_d) (each dimension's values
  shuffled over the batch) trained alongside.
- DIP-VAE (Kumar et al. 2018) pulls a covariance of the posterior means
  (type i: Cov[μ(x)]; type ii: Cov of q(z) itself, E[diag σ²(x)] + Cov[μ(x)])
  towards the identity: λ_od on the off-diagonal, λ_d on the diagonal.

Their penalties couple the examples of a batch, so a batch split over
processes would not give the same loss: they train on one process
(``batch_coupled``).  Their ELBO, importance-sampled log-likelihood and
every figure are the VAE's: the penalties change training only.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from aevb.errors import UserError
from aevb.model import noise, objectives
from aevb.model.base import LossOutput, _posterior_stats
from aevb.model.precision import at_least_float32
from aevb.model.vae import LatentVariableModel
from aevb.options import COUNTS, Option
from aevb.registry import MODELS


def pairwise_log_density(posterior, z: torch.Tensor) -> torch.Tensor:
    """log q(z_i,d | x_j) for every pair of examples i, j of a batch and dimension d, [B, B, D].

    posterior: q(z|x) of the batch (``Independent`` over [D], batch [B]); z: [B, D] drawn from it.
    """
    base = posterior.base_dist  # batch [B, D]
    return at_least_float32(base.log_prob(z.unsqueeze(1)))  # z_i against q(·|x_j): [B, 1, D] → [B, B, D]


@functools.lru_cache(maxsize=8)  # built once per batch size, not at every step: callers must not change it in place
def log_importance_weights(batch: int, dataset_size: int, estimator: str) -> torch.Tensor:
    """log r_ij [B, B]: the weight of q(z_i|x_j) in the estimate log q(z_i) ≈ logsumexp_j (log r_ij + log q(z_i|x_j)).

    ``mws``, minibatch-weighted sampling: every r_ij = 1/(N·B).  ``mss``,
    minibatch stratified sampling (both Chen et al. 2018, appendix C): the
    batch read as the example itself (weight 1/N), B − 2 others drawn from
    the rest (1/M each, M = B − 1) and one standing for the stratum it was
    drawn from ((N − M)/(N·M)); unbiased, where MWS overweights the example
    itself, so that its TC estimate grows with how well the posteriors are
    separated and pulls them together.
    """
    if estimator == "mws":
        return torch.full((batch, batch), -math.log(dataset_size * batch))
    others = batch - 1
    weights = torch.full((batch, batch), 1.0 / others)
    weights.fill_diagonal_(1.0 / dataset_size)
    stratum = torch.arange(batch)
    weights[stratum, (stratum + 1) % batch] = (dataset_size - others) / (dataset_size * others)
    return weights.log()


def total_correlation_terms(posterior, prior, z: torch.Tensor, dataset_size: int,
                            estimator: str = "mws") -> dict[str, torch.Tensor]:
    """The ELBO's KL split as Chen et al. (2018), per example [B], log q(z) estimated from the batch.

    log q(z_i) ≈ logsumexp_j (log r_ij + log q(z_i|x_j)), and log q(z_i,d)
    the same per dimension (:func:`log_importance_weights`: N the data set's
    size, B the batch's):

    - ``mutual_information``: log q(z|x) − log q(z)
    - ``total_correlation``: log q(z) − Σ_d log q(z_d)
    - ``dimension_kl``: Σ_d log q(z_d) − log p(z)

    They sum to log q(z|x) − log p(z), the single-sample KL estimate, exactly.
    """
    batch = z.shape[0]
    if estimator == "mss" and batch < 3:
        raise UserError("minibatch stratified sampling needs batches of 3 or more examples; use a larger --batch-size")
    log_qz_pairs = pairwise_log_density(posterior, z)  # [B, B, D]
    log_r = log_importance_weights(batch, dataset_size, estimator).to(log_qz_pairs)  # [B, B]
    log_qz = torch.logsumexp(log_r + log_qz_pairs.sum(2), dim=1)  # [B]
    log_qz_dims = torch.logsumexp(log_r.unsqueeze(2) + log_qz_pairs, dim=1).sum(1)  # [B]
    log_qz_x = at_least_float32(posterior.log_prob(z))  # [B]
    log_pz = at_least_float32(prior.log_prob(z))  # [B]
    return {
        "mutual_information": log_qz_x - log_qz,
        "total_correlation": log_qz - log_qz_dims,
        "dimension_kl": log_qz_dims - log_pz,
    }


class _BatchPenalisedVAE(LatentVariableModel):
    """The VAE's reconstruction and KL with one sample of z, and a penalty on the batch's aggregate posterior."""

    batch_coupled: ClassVar[bool] = True

    def loss(self, x: torch.Tensor, beta: float | None = None, label: Any = None) -> LossOutput:
        terms = objectives.sgvb_terms(self, x, 1, label)  # the VAE's data path, one draw z [B, D]
        reconstruction, kl = at_least_float32(terms.reconstruction), terms.kl  # [B] each
        objective, extras = self.penalised(terms.posterior, self.prior(), terms.z, reconstruction, kl)
        mu, sigma = _posterior_stats(terms.posterior)
        return LossOutput(objective, reconstruction.mean().detach(), kl.mean().detach(), mu, sigma, extras)

    def penalised(self, posterior, prior, z, reconstruction, kl) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss (a scalar) from the batch's terms [B], and its detached diagnostics."""
        raise NotImplementedError


MI_WEIGHT = Option("mi_weight", 1.0, "β-TCVAE: weight α of the index-code mutual information", low=0)
TC_WEIGHT = Option("tc_weight", 6.0, "β-TCVAE: weight β of the total correlation of q(z)", low=0)
DIMENSION_KL_WEIGHT = Option("dimension_kl_weight", 1.0, "β-TCVAE: weight γ of the dimension-wise KL of q(z)", low=0)
TC_ESTIMATOR = Option("tc_estimator", "mws", "β-TCVAE: the estimate of log q(z) from a batch: minibatch-weighted (mws) "
                      "or minibatch stratified sampling (mss, unbiased)", choices=("mws", "mss"))


@MODELS.register("beta-tcvae")
class BetaTCVAE(_BatchPenalisedVAE):
    """β-TCVAE (Chen et al. 2018): −E log p(x|z) + α·MI + β·TC + γ·dimension-wise KL.

    With α = β = γ = 1 the loss is the VAE's, with the KL estimated from the
    sample.  ``dataset_size``: N of the minibatch-weighted estimator, the
    number of training examples (the trainer sets it; a loop of your own
    passes it).
    """

    name = "beta-tcvae"
    needs_dataset_size: ClassVar[bool] = True
    options = (*LatentVariableModel.options, MI_WEIGHT, TC_WEIGHT, DIMENSION_KL_WEIGHT, TC_ESTIMATOR)

    def __init__(self, *args, mi_weight: float = MI_WEIGHT.default, tc_weight: float = TC_WEIGHT.default,
                 dimension_kl_weight: float = DIMENSION_KL_WEIGHT.default, tc_estimator: str = TC_ESTIMATOR.default,
                 dataset_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        options = self.check_options({"mi_weight": mi_weight, "tc_weight": tc_weight,
                                      "dimension_kl_weight": dimension_kl_weight, "tc_estimator": tc_estimator})
        if dataset_size is not None and (isinstance(dataset_size, bool) or int(dataset_size) != dataset_size
                                         or dataset_size < 1):
            raise UserError(f"dataset_size must be the number of training examples (≥ 1), got {dataset_size!r}")
        self.mi_weight, self.tc_weight = options["mi_weight"], options["tc_weight"]
        self.dimension_kl_weight, self.tc_estimator = options["dimension_kl_weight"], options["tc_estimator"]
        self.dataset_size = None if dataset_size is None else int(dataset_size)
        self.config.update(**options, dataset_size=self.dataset_size)

    def penalised(self, posterior, prior, z, reconstruction, kl):
        if self.dataset_size is None:
            raise UserError("β-TCVAE estimates log q(z) with the training set's size: pass dataset_size=N "
                            "(the number of training examples) to the model")
        terms = total_correlation_terms(posterior, prior, z, self.dataset_size, self.tc_estimator)
        objective = (reconstruction + self.mi_weight * terms["mutual_information"]
                     + self.tc_weight * terms["total_correlation"]
                     + self.dimension_kl_weight * terms["dimension_kl"]).mean()
        return objective, {name: value.mean().detach() for name, value in terms.items()}


def shuffled_dimensions(z: torch.Tensor) -> torch.Tensor:
    """z [B, D] with each dimension's values permuted over the batch independently: a sample of Π_d q(z_d)."""
    order = noise.rand(z.shape, 0, device=z.device).argsort(dim=0)  # [B, D], a permutation per column
    return torch.gather(z, 0, order)


GAMMA = Option("gamma", 10.0, "FactorVAE: weight γ of the total correlation its discriminator estimates", low=0)
DISCRIMINATOR_HIDDEN = Option("discriminator_hidden", None, "FactorVAE: hidden sizes of the discriminator between "
                              "q(z) and the product of its marginals (default 1000,1000)", kind="list[int]", low=1,
                              below=COUNTS, metavar="N[,N…]", memory=True)


@MODELS.register("factorvae")
class FactorVAE(_BatchPenalisedVAE):
    """FactorVAE (Kim & Mnih 2018): the VAE's loss + γ·TC, the TC estimated by a discriminator.

    The discriminator D(z) gives the log-odds that z came from q(z) rather
    than from Π_d q(z_d); TC ≈ E_q(z)[log-odds] (the density-ratio trick).
    It is trained in the same step, on the same batch, by the same
    optimiser: its loss (binary cross-entropy on z and on z with each
    dimension shuffled over the batch) reaches only its weights, and γ·TC
    only the encoder's.
    """

    name = "factorvae"
    options = (*LatentVariableModel.options, GAMMA, DISCRIMINATOR_HIDDEN)

    def __init__(self, *args, gamma: float = GAMMA.default, discriminator_hidden: list[int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        options = self.check_options({"gamma": gamma, "discriminator_hidden": discriminator_hidden})
        self.gamma = options["gamma"]
        hidden = [1000, 1000] if options["discriminator_hidden"] is None else list(options["discriminator_hidden"])
        layers: list[nn.Module] = []
        width = self.latent_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.LeakyReLU(0.2)]
            width = size
        self.discriminator = nn.Sequential(*layers, nn.Linear(width, 1))
        self.config.update(gamma=self.gamma, discriminator_hidden=list(hidden))

    def penalised(self, posterior, prior, z, reconstruction, kl):
        # γ·TC moves the encoder, not the discriminator: its weights enter as constants here
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        z = z.to(frozen["0.weight"].dtype)  # the posterior's samples are float32 at least; a bf16 model's weights not
        total_correlation = at_least_float32(functional_call(self.discriminator, frozen, (z,))).mean()
        real, product = z.detach(), shuffled_dimensions(z.detach())
        logits = at_least_float32(self.discriminator(torch.cat([real, product])).squeeze(1))  # [2B]
        targets = torch.cat([torch.ones(len(real)), torch.zeros(len(product))]).to(logits)
        discriminator_loss = F.binary_cross_entropy_with_logits(logits, targets)
        objective = (reconstruction + kl).mean() + self.gamma * total_correlation + discriminator_loss
        accuracy = ((logits > 0) == (targets > 0.5)).float().mean()
        return objective, {"total_correlation": total_correlation.detach(),
                           "discriminator_loss": discriminator_loss.detach(),
                           "discriminator_accuracy": accuracy.detach()}


DIP_TYPE = Option("dip_type", "ii", "DIP-VAE: which covariance is pulled towards the identity: i, the posterior "
                  "means' Cov[μ(x)]; ii, the aggregate posterior's, E[diag σ²(x)] + Cov[μ(x)]", choices=("i", "ii"))
LAMBDA_OFFDIAGONAL = Option("lambda_offdiagonal", 10.0, "DIP-VAE: weight λ_od of the squared off-diagonal covariances",
                            low=0)
LAMBDA_DIAGONAL = Option("lambda_diagonal", None, "DIP-VAE: weight λ_d of the squared distance of the variances from "
                         "1 (default: 10·λ_od for type i, λ_od for ii, as Kumar et al.)", kind="float", low=0)


@MODELS.register("dip-vae")
class DIPVAE(_BatchPenalisedVAE):
    """DIP-VAE (Kumar et al. 2018): the VAE's loss + λ_od Σ_{i≠j} C_ij² + λ_d Σ_i (C_ii − 1)².

    C is the batch's covariance of the posterior means (type i) or of the
    aggregate posterior, E[diag σ²] + Cov[μ] (type ii).
    """

    name = "dip-vae"
    options = (*LatentVariableModel.options, DIP_TYPE, LAMBDA_OFFDIAGONAL, LAMBDA_DIAGONAL)

    def __init__(self, *args, dip_type: str = DIP_TYPE.default, lambda_offdiagonal: float = LAMBDA_OFFDIAGONAL.default,
                 lambda_diagonal: float | None = LAMBDA_DIAGONAL.default, **kwargs):
        super().__init__(*args, **kwargs)
        options = self.check_options({"dip_type": dip_type, "lambda_offdiagonal": lambda_offdiagonal,
                                      "lambda_diagonal": lambda_diagonal})
        self.dip_type, self.lambda_offdiagonal = options["dip_type"], options["lambda_offdiagonal"]
        if options["lambda_diagonal"] is None:
            options["lambda_diagonal"] = self.lambda_offdiagonal * (10.0 if self.dip_type == "i" else 1.0)
        self.lambda_diagonal = options["lambda_diagonal"]
        self.config.update(**options)

    def covariance(self, posterior) -> torch.Tensor:
        """The covariance [D, D] that the penalty pulls towards the identity, from the batch's q(z|x)."""
        mean = at_least_float32(posterior.mean)  # [B, D]
        centred = mean - mean.mean(0)
        covariance = centred.T @ centred / mean.shape[0]  # Cov[μ(x)], as Kumar et al. (biased)
        if self.dip_type == "ii":
            covariance = covariance + torch.diag(at_least_float32(posterior.variance).mean(0))
        return covariance

    def penalised(self, posterior, prior, z, reconstruction, kl):
        covariance = self.covariance(posterior)
        diagonal = torch.diagonal(covariance)
        off_diagonal = (covariance.square().sum() - diagonal.square().sum())
        penalty = self.lambda_offdiagonal * off_diagonal + self.lambda_diagonal * (diagonal - 1).square().sum()
        objective = (reconstruction + kl).mean() + penalty
        return objective, {"dip_penalty": penalty.detach()}
