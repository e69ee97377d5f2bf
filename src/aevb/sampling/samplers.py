"""Samplers of the latent space: the model's prior, and a Gaussian mixture fitted to a trained model's codes.

Each is one entry of :data:`aevb.registry.SAMPLERS`, a :class:`Sampler`
subclass that declares its options beside it (``options = (Option(...), ...)``,
the flags of ``aevb fit-sampler``).  A fitted sampler (``fitted = True``) is
made by ``fit(codes, seed, **options)`` from codes [N, D], and written and
read back as tensors (safetensors) and a JSON-able description
(:meth:`Sampler.state`, :meth:`Sampler.restore`); the prior sampler reads the
model itself.  Every sampler draws codes with a ``torch.Generator``, so that
one seed gives the same samples before and after a save, and takes a
temperature T that scales its spread: T = 0 gives the modes (the prior's
mean, the mixture's component means, the flow's image of the base mean).

The normalising flow is in :mod:`aevb.sampling.flow`.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, ClassVar

import torch
from torch.distributions import Categorical, Distribution, MixtureSameFamily, MultivariateNormal

from aevb.errors import UserError
from aevb.model.base import Model
from aevb.options import Option
from aevb.registry import SAMPLERS


class Sampler:
    """Codes z [n, D] for a decoder: ``sample(n, generator, temperature)``; ``log_prob(z)`` [n] where it has one."""

    fitted: ClassVar[bool] = True  # made from a model's codes and kept in the run folder (else built from the model)
    options: ClassVar[tuple[Option, ...]] = ()

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """[n, D] codes on the generator's device (the CPU without one); T scales the spread, T = 0 the modes."""
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log density of codes z [n, D], [n] (nats)."""
        raise NotImplementedError

    def decoded(self, model: Model, n: int, generator: torch.Generator | None = None,
                temperature: float = 1.0) -> torch.Tensor:
        """[n, *data_shape]: the means of p(x|z) for n codes z drawn from this sampler."""
        z = self.sample(n, generator, temperature)  # [n, D]
        return model.decode(z.to(model.device)).mean

    @classmethod
    def fit(cls, codes: torch.Tensor, seed: int = 0, **options: Any) -> Sampler:
        """The sampler fitted to codes [N, D] with its checked ``options``; deterministic for one seed."""
        raise NotImplementedError

    @classmethod
    def fit_to(cls, model: Model, codes: torch.Tensor, seed: int = 0, **options: Any) -> Sampler:
        """The sampler fitted to ``model``'s codes [N, D] (what a run's fit calls): :meth:`fit` on the codes alone,
        unless the sampler needs more of the model (the autoregressive one: its codebook)."""
        return cls.fit(codes, seed, **options)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors to save, a JSON-able description: the options and what the fit found)."""
        raise NotImplementedError

    @classmethod
    def restore(cls, tensors: dict[str, torch.Tensor], description: dict[str, Any]) -> Sampler:
        """The sampler :meth:`state` described; KeyError, ValueError or RuntimeError where they do not fit."""
        raise NotImplementedError


# the options of a sampler that learns its density by gradient (flow, autoregressive), one flag each
FIT_EPOCHS = Option("epochs", 200, "flow, autoregressive: the most passes over the codes", low=1, high=100000,
                    metavar="N")
HELD_OUT = Option("validation", 0.1, "flow, autoregressive: the fraction of the codes held out to stop the training",
                  above=0, below=1, metavar="FRACTION")
PATIENCE = Option("patience", 20, "flow, autoregressive: epochs without a better held-out log-likelihood before the "
                  "training stops", low=1, high=100000, metavar="N")
BATCH = 256  # codes per step
LEARNING_RATE = 1e-3


def split_held_out(codes: torch.Tensor, validation: float, generator: torch.Generator,
                   sampler: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes to train on, codes held out): the fraction ``validation`` of codes [N, ...] held out, in an order
    drawn by ``generator``; a UserError naming ``sampler`` where either part would be too small."""
    held = int(round(validation * len(codes)))
    if held < 1 or len(codes) - held < 2:
        raise UserError(f"{sampler} needs codes to train on and some held out: {len(codes)} codes with --validation "
                        f"{validation} leave {len(codes) - held} and {held}; use more training data or another "
                        f"--validation")
    order = torch.randperm(len(codes), generator=generator)
    return codes[order[held:]], codes[order[:held]]


def fit_by_gradient(net: torch.nn.Module, nll: Callable[[torch.Tensor], torch.Tensor], train: torch.Tensor,
                    held_out: torch.Tensor, generator: torch.Generator, *, epochs: int, patience: int,
                    ) -> dict[str, Any]:
    """Train ``net`` by Adam on ``nll(codes)``, the mean negative log-likelihood of a batch of codes, over
    ``train`` [N, ...] in batches drawn by ``generator``; stop once the nll of ``held_out`` has not improved for
    ``patience`` epochs and keep the best epoch's weights.  Returns what the training found: the epochs run,
    the best epoch and its held-out nll."""
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    best, best_state, best_epoch, epochs_run = math.inf, copy.deepcopy(net.state_dict()), 0, 0
    for epoch in range(1, epochs + 1):
        net.train()
        for batch in torch.randperm(len(train), generator=generator).split(BATCH):
            with torch.enable_grad():  # also where a fit on first use runs inside sampling's no_grad
                loss = nll(train[batch])
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            score = nll(held_out).item()
        epochs_run = epoch
        if score < best:
            best, best_state, best_epoch = score, copy.deepcopy(net.state_dict()), epoch
        elif epoch - best_epoch >= patience:
            break
    net.load_state_dict(best_state)
    net.eval()
    return {"epochs_run": epochs_run, "best_epoch": best_epoch, "held_out_nll": best}


def noise_device(generator: torch.Generator | None) -> torch.device:
    """Where a sampler draws: the generator's device, else the CPU."""
    return generator.device if generator is not None else torch.device("cpu")


@SAMPLERS.register("prior")
class PriorSampler(Sampler):
    """z ~ p(z), the prior the model was trained with (N(0, T² I) for the standard normal; for a mixture prior
    T scales each component's noise), as ``model.sample`` draws it."""

    fitted = False

    def __init__(self, model: Model):
        if not model.has_kl:
            fitted = ("--sampler autoregressive" if model.codebook() is not None else
                      "--sampler gmm or --sampler flow")
            raise UserError(f"the {model.name} model has no prior to sample (its codes were never fitted to one); "
                            f"sample it with a sampler fitted to its codes: {fitted}")
        self.model = model

    def sample(self, n, generator=None, temperature=1.0):
        return self.model.sample_layers(n, generator, temperature)[0]  # z_1 [n, D], on the model's device

    def log_prob(self, z):
        return self.model.prior().log_prob(z)

    def decoded(self, model, n, generator=None, temperature=1.0):
        return model.sample(n, generator, temperature)  # the model's own: what aevb sample always drew


@SAMPLERS.register("gmm")
class GaussianMixtureSampler(Sampler):
    """Σ_k π_k N(μ_k, Σ_k) fitted by scikit-learn's ``GaussianMixture`` (EM), K given or chosen by the Bayesian
    information criterion over 1 … ``max_components``; T scales each component's standard deviation (Σ_k → T² Σ_k)."""

    options = (
        Option("components", None, "gmm: mixture components; default: chosen by BIC from 1 to --max-components",
               kind="int", low=1, high=1024, metavar="K"),
        Option("max_components", 10, "gmm: the most components BIC chooses from", low=1, high=1024, metavar="K"),
        Option("covariance", "full", "gmm: each component's covariance matrix", choices=("full", "diag")),
    )

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor,
                 description: dict[str, Any] | None = None):
        self.description = description or {}  # the options and what the fit found (BIC per K)
        self.weights = weights  # [K], sum 1
        self.means = means  # [K, D]
        self.covariances = covariances  # [K, D, D]
        self.scale_tril = torch.linalg.cholesky(covariances.double()).float()  # [K, D, D]

    def distribution(self) -> Distribution:
        """The mixture as a torch distribution: batch [], event [D]."""
        return MixtureSameFamily(Categorical(probs=self.weights),
                                 MultivariateNormal(self.means, scale_tril=self.scale_tril))

    def sample(self, n, generator=None, temperature=1.0):
        device = noise_device(generator)
        weights, means, scale_tril = (t.to(device) for t in (self.weights, self.means, self.scale_tril))
        component = torch.multinomial(weights, n, replacement=True, generator=generator)  # [n]
        eps = torch.randn(n, means.shape[1], 1, generator=generator, device=device)  # [n, D, 1]
        return means[component] + temperature * (scale_tril[component] @ eps).squeeze(-1)  # [n, D]

    def log_prob(self, z):
        return self.distribution().log_prob(z.cpu().float())

    @classmethod
    def fit(cls, codes, seed=0, *, components=None, max_components=10, covariance="full"):
        # scikit-learn is imported by the fit alone: loading a saved mixture needs none of it
        from sklearn.mixture import GaussianMixture

        data = codes.double().cpu().numpy()  # [N, D]
        candidates = [components] if components is not None else list(range(1, min(max_components, len(data)) + 1))
        if candidates[0] > len(data):
            raise UserError(f"--components {components} is more than the {len(data)} codes it would be fitted to; "
                            f"choose fewer")
        fits, bic = [], {}
        for k in candidates:
            mixture = GaussianMixture(k, covariance_type=covariance, random_state=seed, reg_covar=1e-6, max_iter=500)
            mixture.fit(data)
            fits.append(mixture)
            bic[k] = float(mixture.bic(data))
        best = fits[min(range(len(fits)), key=lambda i: bic[candidates[i]])]
        covariances = torch.as_tensor(best.covariances_)
        if covariance == "diag":  # [K, D] variances → [K, D, D]
            covariances = torch.diag_embed(covariances)
        description = {"components": components, "max_components": max_components, "covariance": covariance,
                       "chosen_components": int(best.n_components), "converged": bool(best.converged_),
                       "bic": {str(k): value for k, value in bic.items()}}
        return cls(torch.as_tensor(best.weights_).float(), torch.as_tensor(best.means_).float(), covariances.float(),
                   description)

    def state(self):
        return ({"weights": self.weights, "means": self.means, "covariances": self.covariances},
                self.description)

    @classmethod
    def restore(cls, tensors, description):
        weights, means, covariances = tensors["weights"], tensors["means"], tensors["covariances"]
        k, d = means.shape
        if weights.shape != (k,) or covariances.shape != (k, d, d):
            raise ValueError(f"weights {tuple(weights.shape)}, means {tuple(means.shape)} and covariances "
                             f"{tuple(covariances.shape)} are no mixture of {k} components in {d} dimensions")
        if not (torch.isfinite(weights).all() and (weights >= 0).all() and abs(float(weights.sum()) - 1) < 1e-3):
            raise ValueError("the mixture's weights are no probabilities")
        return cls(weights.float(), means.float(), covariances.float(), description)  # not positive definite: RuntimeError
