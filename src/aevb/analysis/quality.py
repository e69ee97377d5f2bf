"""Sample quality: how close a model's samples are to the test set, in a feature space.

Each measure compares two sets of features [N, F] (:mod:`aevb.analysis.features`):

* Fréchet distance (Heusel et al. 2017, "GANs trained by a two time-scale
  update rule…", the FID without Inception): between Gaussians fitted to the
  two sets, ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁^½ Σ₂ Σ₁^½)^½).  Biased upwards
  for small N, so it is compared only between sets of the same size.
* Kernel distance, KID (Bińkowski et al. 2018, "Demystifying MMD GANs"): the
  unbiased estimate of MMD² with the cubic kernel k(x, y) = (x·y/F + 1)³, one
  U-statistic over all n examples with its jackknife standard error (rather
  than the mean over small subsets, which on a test split of a few hundred
  examples is mostly noise).  Zero in expectation for two samples of one
  distribution; it may come out negative.
* Precision, recall (Kynkäänniemi et al. 2019, "Improved precision and
  recall metric…"), density and coverage (Naeem et al. 2020, "Reliable
  fidelity and diversity metrics…"), from k-nearest-neighbour balls: the
  fraction of samples inside the test set's manifold (fidelity), of test
  examples inside the samples' manifold (diversity: dropped modes lower it),
  and the two measures Naeem et al. made robust to outliers.

``sample_quality`` measures every sampler of a model (a dict name →
``draw(n, generator)`` returning samples [n, *data_shape]) against n test
examples, and n training examples against the same test examples: the floor
a perfect model would reach with n samples.  The features are scaled so that
the test examples' have mean square 1: the distances do not depend on the
arbitrary scale of a network's features.
"""

from __future__ import annotations

import contextlib
import io
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from aevb.analysis.features import FeatureNetwork
from aevb.sampling.fitted import decode_samples, fitted_samplers, saved_sampler
from aevb.errors import UserError

Draw = Callable[[int, torch.Generator], torch.Tensor]  # (n, generator) → samples [n, *data_shape]

NEAREST_K = 5  # the k of the k-NN balls: Kynkäänniemi et al.'s and Naeem et al.'s choice
MIN_EXAMPLES = 20  # fewer examples than this make every measure noise

METRICS = ("frechet_distance", "kid", "kid_standard_error", "precision", "recall", "density", "coverage")


def _matrix_sqrt(symmetric: torch.Tensor) -> torch.Tensor:
    """The square root [F, F] of a symmetric positive semi-definite matrix [F, F] (rounding's negative
    eigenvalues taken as zero)."""
    values, vectors = torch.linalg.eigh(symmetric)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance_gaussians(mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor,
                               cov_b: torch.Tensor) -> float:
    """The Fréchet (2-Wasserstein²) distance between N(mean_a, cov_a) and N(mean_b, cov_b), means [F], covariances
    [F, F]: ‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½."""
    root_a = _matrix_sqrt(cov_a.double())
    middle = root_a @ cov_b.double() @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()  # tr (Σa^½ Σb Σa^½)^½
    distance = (mean_a - mean_b).double().square().sum() + cov_a.double().trace() + cov_b.double().trace() - 2 * cross
    return max(float(distance), 0.0)  # rounding can take it just below zero for identical sets


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """:func:`frechet_distance_gaussians` between Gaussians fitted to features a [N, F] and b [M, F]."""
    a, b = a.double(), b.double()
    return frechet_distance_gaussians(a.mean(0), torch.cov(a.T).reshape(a.shape[1], -1),
                                      b.mean(0), torch.cov(b.T).reshape(b.shape[1], -1))


def _cubic_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """k(a_i, b_j) = (a_i·b_j/F + 1)³ for a [m, F] and b [n, F]: [m, n]."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def kernel_distance(a: torch.Tensor, b: torch.Tensor, block: int = 1024) -> tuple[float, float]:
    """KID between features a [n, F] and b [n, F]: the unbiased estimate of MMD² with the cubic kernel, and its
    jackknife standard error.

    The estimate is the U-statistic over the pairs z_i = (a_i, b_i),
    U = Σ_{i≠j} h(z_i, z_j) / (n(n − 1)) with h = k(a_i, a_j) + k(b_i, b_j) − k(a_i, b_j) − k(a_j, b_i),
    unbiased for MMD² (zero in expectation when a and b are drawn from one
    distribution).  Leaving out pair i gives U₋ᵢ = (Σ h − 2 rᵢ) / ((n − 1)(n − 2))
    with rᵢ = Σ_j h(z_i, z_j), whose spread is the jackknife variance
    (n − 1)/n · Σ (U₋ᵢ − mean)².  Rows of h are computed ``block`` at a time:
    memory O(block · n), not O(n²).
    """
    n = min(a.shape[0], b.shape[0])
    if n < 4:
        raise UserError(f"the kernel distance needs at least 4 examples of each set, got {n}")
    a, b = a[:n].double(), b[:n].double()
    row_sums = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, block):
        rows = slice(start, min(start + block, n))
        h = (_cubic_kernel(a[rows], a) + _cubic_kernel(b[rows], b)
             - _cubic_kernel(a[rows], b) - _cubic_kernel(b[rows], a))  # [block, n]
        diagonal = torch.arange(rows.start, rows.stop)
        h[diagonal - rows.start, diagonal] = 0  # i = j: a pair is not compared with itself
        row_sums[rows] = h.sum(1)
    total = row_sums.sum()
    estimate = total / (n * (n - 1))
    left_out = (total - 2 * row_sums) / ((n - 1) * (n - 2))  # [n]
    variance = (n - 1) / n * (left_out - left_out.mean()).square().sum()
    return float(estimate), float(variance.sqrt())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, nearest_k: int = NEAREST_K) -> dict[str, float]:
    """Precision, recall, density and coverage of features fake [M, F] against real [N, F], with k-NN balls of
    ``nearest_k`` neighbours; by ``prdc``, the implementation of Naeem et al. (the authors of density and coverage)."""
    from prdc import compute_prdc  # numpy and scikit-learn, imported by the evaluations that ask

    with contextlib.redirect_stdout(io.StringIO()):  # it prints the two set sizes
        values = compute_prdc(real_features=real.double().numpy().astype(np.float32),
                              fake_features=fake.double().numpy().astype(np.float32), nearest_k=nearest_k)
    return {name: float(values[name]) for name in ("precision", "recall", "density", "coverage")}


def compare(real: torch.Tensor, fake: torch.Tensor, *, nearest_k: int = NEAREST_K) -> dict[str, float]:
    """Every measure of ``fake`` [M, F] against ``real`` [N, F]: :data:`METRICS`."""
    kid, kid_error = kernel_distance(real, fake)
    return {"frechet_distance": frechet_distance(real, fake), "kid": kid, "kid_standard_error": kid_error,
            **precision_recall(real, fake, nearest_k)}


def sample_quality(features: FeatureNetwork, test_x: torch.Tensor, train_x: torch.Tensor | None,
                   draws: dict[str, Draw], *, n: int = 2000, seed: int = 0,
                   device: torch.device | str = "cpu") -> dict:
    """Each sampler's samples, and the training split (the floor), against the test split, in ``features``' space.

    test_x [N_test, *data_shape] and train_x [N_train, *data_shape] are the
    data as the model's samples are (means of p(x|z): grey images, not
    binarised ones); n is taken down to the smaller split, and every set
    compared has n examples, so the numbers are comparable with one another
    and with the floor.  ``draws[name](n, generator)`` returns n samples
    [n, *data_shape]; its generator lives on ``device`` and is seeded with
    ``seed``, the same for every sampler.

    Returns {examples, features, classifier_accuracy, nearest_k,
    floor: {metric: value} or None without train_x, samplers: {name: {metric: value}}}.
    """
    n = min(n, test_x.shape[0], *(() if train_x is None else (train_x.shape[0],)))
    if n < MIN_EXAMPLES:
        raise UserError(f"sample quality needs at least {MIN_EXAMPLES} test examples, and the test split has "
                        f"{test_x.shape[0]}; use a larger --test-split, or turn it off with --no-quality")
    generator = torch.Generator().manual_seed(seed)
    real = features(test_x[torch.randperm(test_x.shape[0], generator=generator)[:n]])  # [n, F]
    # a network's features have no natural scale, and the cubic kernel is not scale-free: every set is scaled
    # alike, so that the test examples' features have mean square 1 (neighbours and rankings do not change)
    scale = real.square().mean().clamp(min=1e-12).rsqrt()
    real = real * scale
    floor = None
    if train_x is not None:
        train_rows = torch.randperm(train_x.shape[0], generator=generator)[:n]
        floor = compare(real, features(train_x[train_rows]) * scale)
    samplers = {}
    for name, draw in draws.items():
        with torch.no_grad():
            samples = draw(n, torch.Generator(device=device).manual_seed(seed))  # [n, *data_shape]
        samplers[name] = compare(real, features(samples) * scale)
    return {"examples": n, **features.summary(), "nearest_k": NEAREST_K, "floor": floor, "samplers": samplers}


# ---------------------------------------------------------------------------
# a run's samplers, and the whole of the sample-quality part of ``aevb eval``


def model_draws(model, run_dir: str | Path | None = None) -> dict[str, Draw]:
    """The samplers of a trained model, by name: ``prior`` (z ~ p(z), the means of p(x|z)) for a model with a prior,
    then each sampler fitted to the codes of ``run_dir`` for these weights (:mod:`aevb.sampling.fitted`; never
    fitted here): a plain autoencoder samples only through those."""
    draws: dict[str, Draw] = {}
    if model.has_kl:
        draws["prior"] = lambda n, generator: model.sample(n, generator=generator)
    if run_dir is not None and not model.conditional:  # a conditional model's codes depend on its label
        for name in fitted_samplers():
            sampler = saved_sampler(run_dir, name, model)[0]
            if sampler is not None:
                draws[name] = partial(decode_samples, model, sampler)
    return draws


def quality_unavailable(model, dataset, features_path: str | None, run_dir: str | Path | None = None) -> str | None:
    """Why the sample quality of this run cannot be measured (None where it can)."""
    if not model_draws(model, run_dir):
        fit = "autoregressive" if model.codebook() is not None else "gmm"
        return (f"an autoencoder ({model.name}) has no prior to sample from; fit a sampler to its codes "
                f"(aevb fit-sampler RUN --sampler {fit}) and evaluate again")
    if not isinstance(dataset.train, torch.Tensor) or not isinstance(dataset.test, torch.Tensor):
        return "the training images are streamed from disk, and the floor needs them in memory"
    if features_path is None and (dataset.train_labels is None or dataset.test_labels is None):
        return ("the data have no labels to train the feature classifier on; name a feature network with "
                "--features package.module:build")
    return None


def run_sample_quality(run, *, n: int = 2000, features_path: str | None = None, seed: int = 0,
                       required: bool = False, echo: Callable[[str], None] | None = None) -> tuple[dict | None, str | None]:
    """(:func:`sample_quality` of an opened run's samplers, None) or (None, why it was not measured).

    The data are the data set's splits as they are (grey images: the
    samplers draw means of p(x|z), which binarised images are not); the
    features are ``features_path``'s network, else the classifier trained
    on the labelled training split (:func:`~aevb.analysis.features.classifier_features`).
    ``required``: a UserError instead of the reason (``--quality`` asked for).
    """
    from aevb.analysis.features import classifier_features, user_features

    model, dataset = run.model, run.dataset
    reason = quality_unavailable(model, dataset, features_path, run.path)
    if reason is not None:
        if required:
            raise UserError(f"no sample quality for {run.path}: {reason}; drop --quality")
        return None, reason
    if features_path is not None:
        features = user_features(features_path, model.data_shape, model.device)
    else:
        features = classifier_features(dataset.train, dataset.train_labels, dataset.test, dataset.test_labels,
                                       device=model.device, echo=echo)
    model.eval()
    return sample_quality(features, dataset.test, dataset.train, model_draws(model, run.path), n=n, seed=seed,
                          device=model.device), None
