"""The vector-quantised autoencoder VQ-VAE (van den Oord et al. 2017).

The encoder's output z_e [B, D] is read as a sequence of G = D / C vectors
of C numbers (``--code-dim C``); each is replaced by its nearest entry of a
codebook of K vectors (``--codebook-size K``), and the decoder sees the
quantised z_q [B, D]:

    z_e = f(x)                       [B, G, C]
    index = argmin_k ‖z_e,g − e_k‖   [B, G]: the code, K^G possible ones
    z_q = e[index]                   [B, G, C], gradients passed straight through to z_e
    loss = −log p(x|z_q) + β·‖z_e − sg(z_q)‖²   (β: ``--commitment-weight``)

The codebook is not trained by gradient: each entry follows, by
exponential moving averages (``--ema-decay``), the mean of the encoder
outputs assigned to it (the paper's appendix), and an entry that has gone
unused (its average count below ``--dead-code-threshold``) restarts at an
encoder output of the batch.  The posterior is a point mass at z_q: there is
no density of x, and the training prior over codes is uniform (what
:meth:`VQVAE.sample` draws); samples worth looking at come from an
autoregressive prior over the G indices fitted after training, the
``autoregressive`` sampler of :mod:`aevb.sampling.autoregressive` (what
``aevb sample`` draws from by default).  The codebook's
averages couple a batch's examples, so it trains on one process.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from aevb.errors import UserError
from aevb.model import noise
from aevb.model.base import LossOutput, Model, _posterior_stats, _sample_count
from aevb.model.posteriors import PointMass
from aevb.model.precision import at_least_float32
from aevb.options import COUNTS, Option
from aevb.registry import MODELS


def nearest_entry(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The index [N] of the entry of codebook [K, C] nearest to each of vectors [N, C] (Euclidean distance)."""
    vectors = at_least_float32(vectors)
    return torch.cdist(vectors, codebook.to(vectors.device, vectors.dtype)).argmin(dim=1)


class VectorQuantizer(nn.Module):
    """A codebook e [K, C] updated by exponential moving averages, with restarts of unused entries."""

    def __init__(self, codebook_size: int, code_dim: int, decay: float, dead_threshold: float, epsilon: float = 1e-5):
        super().__init__()
        self.decay, self.dead_threshold, self.epsilon = decay, dead_threshold, epsilon
        codebook = torch.randn(codebook_size, code_dim) / math.sqrt(code_dim)
        self.register_buffer("codebook", codebook)  # [K, C]
        self.register_buffer("ema_count", torch.ones(codebook_size))  # [K]: examples assigned, averaged
        self.register_buffer("ema_sum", codebook.clone())  # [K, C]: their sum, averaged

    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """The index [N] of the entry nearest to each of vectors [N, C] (Euclidean distance)."""
        return nearest_entry(vectors, self.codebook)

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        """The entries [..., C] of indices [...]."""
        return self.codebook[index]

    @torch.no_grad()
    def update(self, vectors: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """One moving-average step towards the means of a batch's vectors [B, G, C] by their entries index
        [B, G]; returns how many entries were restarted (a scalar)."""
        # the batch's vectors in a random order (the step's noise, drawn per example): candidates for restarts
        order = noise.rand(index.shape, 0, device=vectors.device).reshape(-1).argsort()
        vectors, index = vectors.reshape(-1, vectors.shape[-1]).to(self.ema_sum.dtype), index.reshape(-1)
        assigned = torch.zeros_like(self.ema_count).index_add_(0, index, torch.ones_like(index, dtype=self.ema_count.dtype))
        sums = torch.zeros_like(self.ema_sum).index_add_(0, index, vectors)
        self.ema_count.mul_(self.decay).add_(assigned, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        # Laplace smoothing, so that an entry with a vanishing count does not divide by zero
        count = (self.ema_count + self.epsilon) / (total + len(self.ema_count) * self.epsilon) * total
        self.codebook.copy_(self.ema_sum / count.unsqueeze(1))
        # every entry gets a candidate, and only the dead ones take theirs: no count read back from the device
        dead = (self.ema_count < self.dead_threshold).unsqueeze(1)  # [K, 1]
        slots = torch.arange(len(self.ema_count), device=vectors.device) % vectors.shape[0]
        candidate = vectors[order[slots]]  # [K, C]
        self.codebook.copy_(torch.where(dead, candidate, self.codebook))
        self.ema_sum.copy_(torch.where(dead, candidate, self.ema_sum))
        self.ema_count.copy_(torch.where(dead.squeeze(1), torch.ones_like(self.ema_count), self.ema_count))
        return dead.sum().float()


def perplexity(index: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """exp of the entropy of the codes' frequencies in index [...]: the number of entries in effective use."""
    counts = torch.bincount(index.reshape(-1), minlength=codebook_size).float()
    p = counts / counts.sum()
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


CODEBOOK_SIZE = Option("codebook_size", 64, "vq-vae: K, the entries of the codebook", low=2, below=COUNTS, metavar="K",
                       memory=True)
CODE_DIM = Option("code_dim", 1, "vq-vae: C, the numbers of one quantised vector; --latent-dim / C vectors a code "
                  "(1: each number on its own)", low=1, below=COUNTS, metavar="C")
COMMITMENT_WEIGHT = Option("commitment_weight", 0.25, "vq-vae: weight β of ‖z_e − sg(z_q)‖², which keeps the "
                           "encoder's outputs near their entries", low=0)
EMA_DECAY = Option("ema_decay", 0.99, "vq-vae: decay of the moving averages that update the codebook", low=0,
                   below=1)
DEAD_CODE_THRESHOLD = Option("dead_code_threshold", 0.01, "vq-vae: an entry whose averaged count of assigned "
                             "vectors falls below this restarts at an encoder output of the batch (0: never)", low=0)


@MODELS.register("vq-vae")
class VQVAE(Model):
    """VQ-VAE (van den Oord et al. 2017): −log p(x | z_q) + β·‖z_e − sg(z_q)‖², the codebook by moving averages."""

    name = "vq-vae"
    posterior_family = "point-mass"
    has_kl = False
    default_sampler = "autoregressive"  # the uniform training prior's samples are noise
    batch_coupled: ClassVar[bool] = True
    options = (CODEBOOK_SIZE, CODE_DIM, COMMITMENT_WEIGHT, EMA_DECAY, DEAD_CODE_THRESHOLD)

    def __init__(self, *args, codebook_size: int = CODEBOOK_SIZE.default, code_dim: int = CODE_DIM.default,
                 commitment_weight: float = COMMITMENT_WEIGHT.default, ema_decay: float = EMA_DECAY.default,
                 dead_code_threshold: float = DEAD_CODE_THRESHOLD.default, **kwargs):
        super().__init__(*args, **kwargs)
        options = self.check_options({"codebook_size": codebook_size, "code_dim": code_dim,
                                      "commitment_weight": commitment_weight, "ema_decay": ema_decay,
                                      "dead_code_threshold": dead_code_threshold})
        if self.latent_dim % options["code_dim"]:
            raise UserError(f"--latent-dim {self.latent_dim} is not a whole number of vectors of --code-dim "
                            f"{options['code_dim']}; choose a latent dimension divisible by it")
        self.codebook_size, self.code_dim = options["codebook_size"], options["code_dim"]
        self.commitment_weight = options["commitment_weight"]
        self.quantizer = VectorQuantizer(self.codebook_size, self.code_dim, options["ema_decay"],
                                         options["dead_code_threshold"])
        self.config.update(options)

    @property
    def code_length(self) -> int:
        """G, the quantised vectors of one example's code."""
        return self.latent_dim // self.code_dim

    def quantize(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the indices [B, G], the quantised z_q [B, D]) of encoder outputs z_e [B, D]."""
        vectors = z_e.reshape(-1, self.code_dim)  # [B·G, C]
        index = self.quantizer.nearest(vectors)
        return index.reshape(z_e.shape[0], -1), self.quantizer.lookup(index).reshape(z_e.shape).to(z_e.dtype)

    def encode_continuous(self, x: torch.Tensor, label: Any = None) -> torch.Tensor:
        """The encoder's output z_e [B, D] before quantisation (``label``: refused, the VQ-VAE is unconditional)."""
        return self._run(self.encoder, self._encoder_inputs(x, label))

    def encode(self, x: torch.Tensor, label: Any = None):
        """A point mass at the quantised code z_q [B, D]."""
        return PointMass(self.quantize(self.encode_continuous(x, label))[1], event_dims=1)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The code of each example as indices into the codebook [B, G]."""
        return self.quantize(self.encode_continuous(x))[0]

    def decode_codes(self, index: torch.Tensor):
        """p(x|z_q) for codes of indices [B, G]."""
        return self.decode(self.quantizer.lookup(index).reshape(index.shape[0], self.latent_dim))

    def loss(self, x: torch.Tensor, beta: float | None = None, label: Any = None) -> LossOutput:
        z_e = self.encode_continuous(x, label)  # [B, D]
        index, z_q = self.quantize(z_e)
        straight_through = z_e + (z_q - z_e).detach()  # the decoder's gradient passed to the encoder as it is
        reconstruction = -at_least_float32(self.decode(straight_through).log_prob(x.to(z_e.dtype))).mean()
        commitment = (z_e - z_q.detach()).square().sum(-1).mean()
        restarted = z_e.new_zeros(())
        if self.training and torch.is_grad_enabled():
            restarted = self.quantizer.update(z_e.detach().reshape(*index.shape, self.code_dim), index)
        used = (torch.bincount(index.reshape(-1), minlength=self.codebook_size) > 0).float().mean()
        mu, sigma = _posterior_stats(PointMass(z_q, event_dims=1))
        return LossOutput(reconstruction + self.commitment_weight * commitment, reconstruction.detach(),
                          torch.zeros_like(reconstruction.detach()), mu, sigma,
                          {"commitment": commitment.detach(), "perplexity": perplexity(index, self.codebook_size),
                           "codebook_usage": used, "restarted_codes": restarted})

    @torch.no_grad()
    def sample_layers(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0,
                      fixed: dict[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Codes drawn from the training prior, uniform over the codebook at each of the G places, as z_q [n, D]
        (``temperature`` does not apply to a uniform prior)."""
        n = _sample_count(n, temperature)
        if fixed and 1 in fixed:
            return [fixed[1]]
        index = torch.randint(self.codebook_size, (n, self.code_length), generator=generator)
        return [self.quantizer.lookup(index.to(self.quantizer.codebook.device)).reshape(n, self.latent_dim)]

    def codebook(self) -> torch.Tensor:
        """The codebook e [K, C]."""
        return self.quantizer.codebook

    def code_statistics(self, codes: torch.Tensor) -> dict[str, Any]:
        """Codebook usage over a test set's codes z_q [N, D]: the share of entries used and the perplexity."""
        index = self.quantizer.nearest(codes.reshape(-1, self.code_dim).to(self.quantizer.codebook.device))
        return {"codebook_usage": torch.unique(index).numel() / self.codebook_size,
                "codebook_perplexity": perplexity(index, self.codebook_size).item(),
                "codebook_size": self.codebook_size}
