"""An autoregressive prior over a discrete code, fitted after training: how a VQ-VAE samples.

A VQ-VAE's code is G indices c = (c_1 … c_G), each into a codebook of K
vectors (:meth:`aevb.model.base.Model.codebook`), and it was trained with a
uniform prior over them, whose draws decode to noise.  As van den Oord et
al. (2017) do with a PixelCNN, a second model learns the distribution of the
training set's codes,

    p(c) = Π_g p(c_g | c_<g),   each factor a softmax over the K entries,

here a small causal transformer (decoder-only: the code's indices as tokens
after a start token, learned position embeddings, pre-norm blocks of
``torch.nn.TransformerEncoderLayer`` under a causal mask): the code of an
MLP or of a convolutional encoder is a flat sequence of G places, which a
transformer reads in any length, where a PixelCNN would ask for a grid.  It
is trained by maximum likelihood with Adam, stopped on held-out codes
(:func:`aevb.sampling.samplers.fit_by_gradient`), and draws codes
ancestrally, one place at a time; the temperature T divides the logits
(T = 0: the most probable index at each place in turn).  ``log_prob`` is the
log-probability of the code whose entries are nearest to z (a distribution
over K^G codes, not a density).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from aevb.errors import UserError
from aevb.model.vq import nearest_entry
from aevb.options import Option
from aevb.registry import SAMPLERS
from aevb.sampling.samplers import (FIT_EPOCHS, HELD_OUT, PATIENCE, Sampler, fit_by_gradient, noise_device,
                                    split_held_out)


class CodeTransformer(nn.Module):
    """p(c_g | c_<g) for codes of G places over K entries: logits [B, t + 1, K] of the places 1 … t + 1 from a
    prefix [B, t] (t < G) of indices."""

    def __init__(self, codebook_size: int, code_length: int, width: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.codebook_size, self.code_length = codebook_size, code_length
        self.token = nn.Embedding(codebook_size + 1, width)  # index K: the start token before place 1
        self.position = nn.Embedding(code_length, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, codebook_size)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        start = torch.full((prefix.shape[0], 1), self.codebook_size, dtype=torch.long, device=prefix.device)
        tokens = torch.cat([start, prefix], dim=1)  # [B, t + 1]
        length = tokens.shape[1]
        h = self.token(tokens) + self.position.weight[:length]  # [B, t + 1, width]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=prefix.device)
        return self.head(self.norm(self.blocks(h, mask=causal, is_causal=True)))  # [B, t + 1, K]

    def log_prob(self, index: torch.Tensor) -> torch.Tensor:
        """log p(c) [B] of codes index [B, G]."""
        logits = self(index[:, :-1]).float()  # [B, G, K]: place g from the places before it
        return logits.log_softmax(-1).gather(-1, index.unsqueeze(-1)).squeeze(-1).sum(-1)


def code_indices(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The indices [N, G] of the codebook's entries [K, C] nearest to each of the G parts of codes z [N, G·C]."""
    return nearest_entry(z.reshape(-1, codebook.shape[1]), codebook).reshape(z.shape[0], -1)


@SAMPLERS.register("autoregressive")
class AutoregressiveCodeSampler(Sampler):
    """A causal transformer over the indices of a discrete code (vq-vae); T divides its logits."""

    options = (
        Option("layers", 2, "autoregressive: transformer blocks", low=1, high=64, metavar="N"),
        Option("width", 128, "autoregressive: the width of the transformer (embeddings, attention)", low=8,
               high=4096, metavar="N"),
        Option("heads", 4, "autoregressive: attention heads (dividing --width)", low=1, high=64, metavar="N"),
        Option("dropout", 0.1, "autoregressive: dropout in the transformer's blocks while it trains", low=0, below=1),
        FIT_EPOCHS,
        HELD_OUT,
        PATIENCE,
    )

    def __init__(self, net: CodeTransformer, codebook: torch.Tensor, description: dict):
        self.net = net.eval()
        self.codebook = codebook  # [K, C]: index → the vector the decoder reads
        self.description = description  # the options and what the training found

    @torch.no_grad()
    def sample_indices(self, n: int, generator: torch.Generator | None = None,
                       temperature: float = 1.0) -> torch.Tensor:
        """Codes [n, G] drawn place by place from p(c_g | c_<g)^(1/T), renormalised."""
        device = noise_device(generator)
        net = self.net.to(device)
        index = torch.empty(n, 0, dtype=torch.long, device=device)
        for _ in range(net.code_length):
            logits = net(index)[:, -1].float()  # [n, K]: the next place
            if temperature == 0:
                following = logits.argmax(-1, keepdim=True)
            else:
                probs = (logits / temperature).softmax(-1)
                following = torch.multinomial(probs, 1, generator=generator)  # [n, 1]
            index = torch.cat([index, following], dim=1)
        return index

    def sample(self, n, generator=None, temperature=1.0):
        index = self.sample_indices(n, generator, temperature)  # [n, G]
        return self.codebook.to(index.device)[index].reshape(n, -1)  # [n, G·C]

    def log_prob(self, z):
        with torch.no_grad():
            return self.net.cpu().log_prob(code_indices(z.cpu(), self.codebook))

    @classmethod
    def fit_to(cls, model, codes, seed=0, **options):
        codebook = model.codebook()
        if codebook is None:
            raise UserError(f"the autoregressive sampler models a discrete code (vq-vae), and the {model.name} "
                            f"model's code is continuous; fit --sampler gmm or --sampler flow")
        return cls.fit(codes, seed, codebook=codebook.detach().float().cpu(), **options)

    @classmethod
    def fit(cls, codes, seed=0, *, codebook, layers=2, width=128, heads=4, dropout=0.1, epochs=200,
            validation=0.1, patience=20):
        """Fitted to codes [N, G·C] made of entries of ``codebook`` [K, C] (each part is mapped to its nearest)."""
        if width % heads:
            raise UserError(f"--width {width} is not divisible by --heads {heads}; choose a width that is")
        if codes.shape[1] % codebook.shape[1]:
            raise UserError(f"codes of {codes.shape[1]} numbers are not made of entries of {codebook.shape[1]}")
        index = code_indices(codes.cpu(), codebook)  # [N, G]
        codebook_size, code_length = codebook.shape[0], index.shape[1]
        # the initial weights and the dropout from the seed, torch's global stream untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            train, held_out = split_held_out(index, validation, generator, "the autoregressive sampler")
            net = CodeTransformer(codebook_size, code_length, width, layers, heads, dropout)
            found = fit_by_gradient(net, lambda batch: -net.log_prob(batch).mean(), train, held_out, generator,
                                    epochs=epochs, patience=patience)
        used = torch.bincount(train.reshape(-1), minlength=codebook_size).float()
        frequency = used / used.sum()
        # a code model without order: each place's entry drawn independently, as often as the training codes use
        # that entry at any place
        by_frequency = -frequency[held_out].clamp_min(1e-12).log().sum(1).mean().item()
        description = {"layers": layers, "width": width, "heads": heads, "dropout": dropout, "epochs": epochs,
                       "validation": validation, "patience": patience, "codebook_size": int(codebook_size),
                       "code_length": int(code_length), "code_dim": int(codebook.shape[1]),
                       "epochs_run": found["epochs_run"], "best_epoch": found["best_epoch"],
                       "held_out_codes": len(held_out),
                       # nats per code: what the prior learnt, against the uniform training prior G·log K
                       "held_out_log_likelihood": -found["held_out_nll"],
                       "uniform_log_likelihood": -code_length * math.log(codebook_size),
                       "frequency_log_likelihood": -by_frequency}
        return cls(net, codebook.float().cpu(), description)

    def state(self):
        tensors = {f"net.{name}": value for name, value in self.net.state_dict().items()}
        return {**tensors, "codebook": self.codebook}, self.description

    @classmethod
    def restore(cls, tensors, description):
        codebook = tensors["codebook"].float()
        size, length, dim = (int(description[key]) for key in ("codebook_size", "code_length", "code_dim"))
        if codebook.shape != (size, dim):
            raise ValueError(f"a codebook {tuple(codebook.shape)} is not {size} entries of {dim}")
        net = CodeTransformer(size, length, int(description["width"]), int(description["layers"]),
                              int(description["heads"]), float(description["dropout"]))
        net.load_state_dict({name[len("net."):]: value for name, value in tensors.items()
                             if name.startswith("net.")})  # strict: a missing or foreign tensor is a RuntimeError
        return cls(net, codebook, description)
