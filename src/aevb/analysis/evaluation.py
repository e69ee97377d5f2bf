"""Test metrics of a trained model, in nats per example.

``evaluate(model, x)`` returns one flat dictionary: the negative ELBO and its
two terms, the importance-sampled negative log-likelihood with k samples
(Burda et al. 2016), their gap, bits per dimension where the numbers bound
those of binary or (dequantised) 8-bit data, the reconstruction error, and the
posterior diagnostics (KL per latent dimension, active units, a collapse
warning; for a model with several stochastic layers, the KL and active units
of each layer; for one with a prior, the mutual information I(x; z) and the
KL of the aggregate posterior to the prior, :mod:`aevb.analysis.aggregate`).  Given the labels of x it adds the same numbers per class, and
given a labelled training set the accuracy of a linear classifier and of
k-nearest neighbours trained on the posterior means (how useful the
representation is).  Data with known factors of variation (``shapes``) add
the disentanglement scores of :mod:`aevb.analysis.disentanglement`.  A
conditional model's numbers are of x given its label y: the ELBO bounds
log p(x|y), the importance sampler estimates it, and ``conditional_note``
says so.

``evaluate_run(run_dir)`` is the whole of ``aevb eval``: the run's model on
the run's test split, with its labels and training split where it has them.

Under ``torchrun … aevb eval RUN`` the test set is shared by the workers
(:class:`Shard`): the test set is cut into global batches of
``batch_size`` examples, and rank r of W computes the per-example columns
(reconstruction term, KL, importance-sampled log p(x), reconstruction
errors) of rows ``r·b//W : (r+1)·b//W`` of each; every rank gathers the
columns of all (an ``all_gather``, shares of any size), and rank 0 computes
the rest (posterior statistics, classifiers) and writes ``eval.json``.  The
numbers do not depend on the number of workers: each global batch's noise is
drawn for the whole batch from a generator seeded by (the evaluation's seed,
the batch's index), and each rank uses its rows of it (:mod:`aevb.model.noise`),
so an example gets the same z's on 1 worker as on N (measured on a digits
run, 1 worker against 2, in fp32: every number of eval.json the same bits;
asserted to 1e-6, ``tests/test_distributed.py``; with bf16 multiplies, which
round a row by how many rows its matrix has, the log-likelihood moved by
1.3e-4 relative).  The single-process evaluation draws the same way, from a
seed it takes from torch's global generator.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from aevb.analysis.disentanglement import disentanglement_metrics
from aevb.analysis.quality import run_sample_quality
from aevb.data.memory import examples, memory_dataset
from aevb.config import IW_SAMPLES
from aevb.errors import UserError
from aevb.io import loads_json, write_json
from aevb.analysis.aggregate import aggregate_posterior
from aevb.analysis.posteriors import (active_units, collapse_warning, collapsed, label_rows, layer_statistics,
                                      posterior_statistics, representation_accuracy)
from aevb.model.base import Model
from aevb.run.folder import CHECKPOINT
from aevb.run.open import open_run
from aevb.run.owner import own_run
from aevb.model import noise
from aevb.model.objectives import DEFAULT_ROWS, elbo_terms
from aevb.acceleration.bf16 import resolve_precision
from aevb.acceleration.runtime import denormals_flushed, keep_freed_memory
from aevb.model.precision import matmul_dtype

# the test examples whose aggregate posterior gives I(x; z) and KL(q(z) ‖ p(z)): their cost grows as N², and
# I is estimated at most log N (7.6 nats for 2,000)
AGGREGATE_EXAMPLES = 2000


def _binary(x: torch.Tensor) -> bool:
    """Whether every value of x is 0 or 1."""
    return bool(((x == 0) | (x == 1)).all())


def bits_per_dim(nll: float, model: Model, x: torch.Tensor, levels: int | None, dequantized: bool = False) -> float | None:
    """Bits per dimension, where the negative log-likelihood bounds that of discrete data.

    * Binary data under a Bernoulli likelihood: nll / (n·ln 2).
    * Quantised data with ``levels`` levels, dequantised to (k + u)/levels
      (:func:`aevb.data.transforms.dequantize`), under a density: each level's bin has
      width 1/levels, so (nll + n·ln levels) / (n·ln 2), an upper bound.
    * Otherwise None: a density at the quantised values themselves is no
      probability (it can exceed the inverse bin width, and the bits then go
      negative), grey values under a Bernoulli are no binary data, real-valued
      data have no levels, and a profile likelihood has no log p(x).
    """
    n = math.prod(model.data_shape)
    if not model.likelihood.normalized:
        return None
    if model.likelihood.discrete:
        return nll / (n * math.log(2)) if _binary(x) else None
    if levels and dequantized:
        return (nll + n * math.log(levels)) / (n * math.log(2))
    return None


def _alone(value: Any) -> list[Any]:
    return [value]


@dataclass(frozen=True)
class Shard:
    """This process's share of an evaluation spread over torchrun's workers, and how the shares meet again.

    One shard of one is the single-process evaluation.  ``gather(value)``
    returns every rank's ``value`` (picklable), rank 0's first: a collective
    every rank calls (the CLI makes it of :func:`aevb.training.distributed.gathered`).
    """

    rank: int = 0
    count: int = 1
    gather: Callable[[Any], list[Any]] = _alone

    def rows(self, total: int) -> tuple[int, int]:
        """This rank's rows ``start, stop`` of a global batch of ``total`` examples (as training takes them)."""
        return self.rank * total // self.count, (self.rank + 1) * total // self.count


def _batch_generator(device: torch.device, seed: int, index: int) -> torch.Generator:
    """The generator of the ``index``-th global batch's noise: the same on every rank and for any number of them."""
    digest = hashlib.blake2b(f"aevb-eval-noise:{seed}:{index}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & 0xFFFF_FFFF)


def _per_class(labels: torch.Tensor, columns: dict[str, torch.Tensor], classes: list[str] | None) -> list[dict]:
    """Mean of each per-example column [N] within each label: one row per class."""
    labels = labels.reshape(-1).cpu()
    rows = []
    for label in torch.unique(labels).tolist():
        mask = labels == label
        row = {"label": int(label), "examples": int(mask.sum())}
        if classes is not None and 0 <= label < len(classes):
            row["class"] = str(classes[label])
        row.update({name: values[mask].double().mean().item() for name, values in columns.items()})
        rows.append(row)
    return rows


@torch.no_grad()
def evaluate(model: Model, x: torch.Tensor | Any, *, iw_samples: int = 5000, batch_size: int = 500,
             levels: int | None = None, progress: bool = False, labels: torch.Tensor | None = None,
             train_x: torch.Tensor | None = None, train_labels: torch.Tensor | None = None,
             classes: list[str] | None = None, precision: str = "auto", dequantized: bool = False,
             shard: Shard = Shard()) -> dict | None:
    """Metrics of ``model`` on x [N, *data_shape] (already binarised or dequantised, as the model was trained).

    The Monte Carlo estimates draw each global batch of ``batch_size``
    examples' noise from a generator seeded by a seed taken from torch's
    global generator (``torch.manual_seed`` before the call makes them
    reproducible) and the batch's index.  ``shard``: this process's share
    under torchrun (every rank holds the whole x and computes its rows of each
    batch; the module's docstring); the metrics on rank 0, None on the others.

    ``dequantized`` says that x holds dequantised ``levels``-level pixels,
    which makes the bits per dimension of a density a bound (:func:`bits_per_dim`).
    A likelihood that is no normalised density (``gaussian-optimal``) gets no
    importance-sampled log-likelihood: ``nll``, ``elbo_gap`` and
    ``bits_per_dim`` are None and ``likelihood_note`` says why.

    ``precision`` is that of the importance sampler's multiplies, chosen as
    ``--precision`` of training (see :mod:`aevb.precision`): ``auto`` is bf16
    where it is faster than fp32 (bf16 matrix units), ``fp32`` turns it off.
    bf16 then decodes the k samples about twice as fast; against fp32 it moved
    each example's log p(x) by a few thousandths of a nat on the 8×8 digits
    (``tests/test_precision.py``), and on the MNIST benchmark split by 0.03
    nats on average, at most 0.16, the test mean by 0.004, less than drawing
    other samples moves it; ``iw_precision`` in the
    result says which ran.  Everything else, the ELBO included, is float32.

    x may also be a NumPy array, a pair (x, labels), a torch Dataset yielding x or (x, y), or a
    DataLoader (:mod:`aevb.data.memory`), read whole; its labels serve where ``labels`` is None.

    labels [N] (optional) add ``per_class``: one row per label with the mean
    reconstruction term, negative ELBO and negative log-likelihood of its
    examples.  ``train_x`` [M, *data_shape] with ``train_labels`` [M] (and
    labels) add ``representation_accuracy`` (logistic regression on posterior
    means), ``representation_knn_accuracy`` and ``chance_accuracy``.
    """
    if not isinstance(x, torch.Tensor):
        x, given_labels, _ = examples(x, "x")
        labels = given_labels if labels is None else labels
    was_training = model.training
    model.eval()
    # the importance sampler runs at its measured speed only with these (aevb.acceleration.runtime)
    keep_freed_memory()
    try:
        with denormals_flushed():
            return _evaluate(model, x, iw_samples=iw_samples, batch_size=batch_size, levels=levels,
                             progress=progress, labels=labels, train_x=train_x, train_labels=train_labels,
                             classes=classes, precision=precision, dequantized=dequantized, shard=shard)
    finally:
        model.train(was_training)


def _evaluate(model: Model, x: torch.Tensor, *, iw_samples: int, batch_size: int, levels: int | None,
              progress: bool, labels: torch.Tensor | None, train_x: torch.Tensor | None,
              train_labels: torch.Tensor | None, classes: list[str] | None, precision: str,
              dequantized: bool, shard: Shard) -> dict | None:
    device = model.device
    if model.conditional and labels is None:
        raise UserError(f"this {model.name} is conditional on class labels, and the data to evaluate have none: pass "
                        f"labels= (or data with labels, (x, labels))")
    given = labels if model.conditional else None  # what the networks see besides x
    # rank 0's choice for all: auto times a multiply, and the ranks must compute alike
    sampler_dtype = shard.gather(resolve_precision(precision, device))[0]  # None: float32
    seed = int(torch.randint(2**62, ()))  # the same on every rank: evaluate_run seeds torch on each alike
    n = x.shape[0]
    has_density = model.posterior.has_density
    normalized = model.likelihood.normalized
    batches = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm  # looks for Jupyter when imported: only evaluations that show a bar pay for it

        batches = tqdm(batches, desc=f"evaluating (k={iw_samples})", unit="batch", leave=False)
    # per-example columns of this rank's rows of each global batch: [b_r] a batch, kept on the device until the end
    names = ["reconstruction_nll", "squared", "absolute"] + (["kl"] if has_density else []) + (
        ["log_px"] if has_density and normalized else [])
    columns: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for index, begin in enumerate(batches):
        total = min(batch_size, n - begin)
        start, stop = shard.rows(total)
        if start == stop:  # a last batch smaller than the number of workers: none of it is this rank's
            for values in columns.values():
                values.append(torch.empty(0, dtype=torch.float64))
            continue
        # the samples' chunks of the global batch, not of this rank's rows: the draws must be the same
        chunk_size = max(1, DEFAULT_ROWS // total)
        with noise.batch_rows(_batch_generator(device, seed, index), start, stop, total):
            xb = x[begin + start:begin + stop].to(device)
            yb = label_rows(given, begin + start, begin + stop, device)
            recon = model.reconstruct(xb, yb)
            columns["squared"].append((recon - xb).pow(2).flatten(1).sum(1).double())
            columns["absolute"].append((recon - xb).abs().flatten(1).sum(1).double())
            if has_density:
                terms = elbo_terms(model, xb, label=yb)
                columns["reconstruction_nll"].append(terms.reconstruction.double())
                columns["kl"].append(terms.kl.double())
                if normalized:
                    with matmul_dtype(sampler_dtype):
                        columns["log_px"].append(
                            model.log_likelihood(xb, n_samples=iw_samples, chunk_size=chunk_size,
                                             label=yb).double())
            else:
                columns["reconstruction_nll"].append(-model.decode(model.encode(xb).mean).log_prob(xb).double())
    per_example = _gathered_columns(shard, {name: [v.cpu() for v in values] for name, values in columns.items()})
    if shard.rank:
        return None  # rank 0 has the metrics
    means = {name: values.mean().item() for name, values in per_example.items()}
    rec, squared, absolute = means["reconstruction_nll"], means["squared"], means["absolute"]
    dims = math.prod(model.data_shape)

    stats = posterior_statistics(model, x, labels=given)
    metrics: dict = {
        "examples": n,
        "model": model.name,
        "likelihood": model.config["likelihood"],
        "reconstruction_nll": rec,
        "mse_per_dim": squared / dims,
        "mae_per_dim": absolute / dims,
        "posterior_mu": stats["mean"].mean().item(),
        "posterior_sigma": stats["std"].mean().item(),
    }
    if model.conditional:  # only then, so evaluations of other models stay as they were
        metrics["n_classes"] = model.n_classes
        metrics["conditional_note"] = (
            "conditional on each example's label y: the ELBO bounds log p(x|y) and the log-likelihood, "
            "bits/dim and per-class rows are of log p(x|y), which is higher than log p(x) by the information "
            "the label gives; compare them with unconditional models' numbers only as such")
    active = active_units(stats["mean"])
    n_active = None if active is None else int(active.sum())
    if has_density:
        kl = means["kl"]
        likelihood = dict.fromkeys(("iw_samples", "iw_precision", "nll", "elbo_gap", "bits_per_dim"))
        if normalized:
            nll = -means["log_px"]
            likelihood = {"iw_samples": iw_samples, "iw_precision": "fp32" if sampler_dtype is None else "bf16",
                          "nll": nll, "elbo_gap": (rec + kl) - nll,
                          "bits_per_dim": bits_per_dim(nll, model, x, levels, dequantized)}
        metrics.update({
            "neg_elbo": rec + kl,
            "kl": kl,
            **likelihood,
            "dequantized": dequantized,
            "levels": levels,
            # a mixture prior does not factorise over dimensions: no per-dimension KL then
            "kl_per_dim": stats["kl"].mean(0).tolist() if stats["kl"] is not None else None,
            "prior": model.config.get("prior", "standard"),
        })
        metrics["active_units"] = n_active
        metrics["latent_dim"] = model.latent_dim
        # one example: no variance over x, so neither active units nor collapse can be told
        metrics["collapsed"] = None if active is None else collapsed(n_active, model.latent_dim)
        metrics["collapse_warning"] = None if active is None else collapse_warning(n_active, model.latent_dim)
        if not normalized:
            metrics["likelihood_note"] = (
                f"{model.config['likelihood']} fits σ to each example: a profile likelihood, not a normalised "
                f"density in x, so there is no log-likelihood or bits/dim; its negative ELBO is the training "
                f"objective, not a bound")
        elif model.likelihood.discrete and model.likelihood.unit_interval and not _binary(x):
            metrics["likelihood_note"] = (
                f"{model.config['likelihood']} on grey values: its log p(x) is the cross-entropy of each grey level "
                f"taken as the probability of a white pixel, not a likelihood of the grey images, and has no "
                f"bits/dim; train with --binarize dynamic for a likelihood of binary images")
        elif levels and not dequantized and not model.likelihood.discrete:
            metrics["likelihood_note"] = ("no bits per dimension: a density at the quantised pixel values "
                                          "themselves is no probability; train with --dequantize for them")
    else:
        metrics["active_units"] = n_active
        metrics["latent_dim"] = model.latent_dim
    metrics["posterior_mean_variance_per_dim"] = stats["mean"].var(0, unbiased=True).tolist() if n > 1 else None
    metrics.update(model.code_statistics(stats["mean"]))
    if model.stochastic_layers > 1:
        metrics.update(layer_statistics(model, x, labels=given))

    if labels is not None:
        per_class = {"reconstruction_nll": per_example["reconstruction_nll"],
                     "mse_per_dim": per_example["squared"] / dims}
        if has_density:
            per_class["neg_elbo"] = per_example["reconstruction_nll"] + per_example["kl"]
            if normalized:
                per_class["nll"] = -per_example["log_px"]
        metrics["per_class"] = _per_class(labels, per_class, classes)
        if train_x is not None and train_labels is not None:
            accuracy = representation_accuracy(model, train_x, train_labels, x, labels)
            metrics.update({
                "representation_accuracy": accuracy["logistic"],
                "representation_knn_accuracy": accuracy["knn"],
                "chance_accuracy": accuracy["chance"],
                "representation_train_examples": int(train_x.shape[0]),
            })
    # z_1's prior is no p(z) of a hierarchy; a flow posterior's density at every other example's z would need its
    # inverse (none for planar steps, D passes for IAF): the diagonal Gaussian posteriors only
    if has_density and model.has_kl and model.stochastic_layers == 1 and model.posterior.factorises:
        examples = x[:AGGREGATE_EXAMPLES]
        posteriors = [model.encode(examples[start:start + batch_size].to(device),
                                   label_rows(given, start, start + batch_size, device))
                      for start in range(0, len(examples), batch_size)]
        metrics.update(aggregate_posterior(posteriors, model.prior()))
    return metrics


@torch.no_grad()
def factor_scores(model: Model, x: torch.Tensor, factors: torch.Tensor, names: list[str], *, seed: int = 0,
                  examples: int = 10_000, labels: torch.Tensor | None = None) -> dict[str, Any]:
    """The disentanglement scores of the posterior means of x [N, ...] against their known factors [N, K].

    As Locatello et al.: the representation is the posterior mean; the
    scores that train a classifier use 2/3 of the examples to train it and
    the rest to test it.
    """
    model.eval()
    n = min(examples, x.shape[0])
    chosen = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    given = None if labels is None else labels[chosen]  # a conditional model's: q(z|x, y)
    codes = posterior_statistics(model, x[chosen], labels=given)["mean"].double().cpu().numpy()  # [n, D]
    scores = disentanglement_metrics(codes, factors[chosen].numpy(), seed=seed,
                                     n_points=(2 * n) // 3, n_test=n - (2 * n) // 3)
    return {**scores, "examples": n, "factors": list(names), "dci_predictor": "forest"}


def _gathered_columns(shard: Shard, columns: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-example columns [N] in the test set's order from every rank's ``columns`` (each a list over the
    global batches of that rank's rows [b_r])."""
    everyone = shard.gather(columns)
    return {name: torch.cat([rank_columns[name][batch] for batch in range(len(values)) for rank_columns in everyone])
            for name, values in columns.items()}


def evaluate_run(run_dir: str | Path, *, iw_samples: int = IW_SAMPLES, batch_size: int = 500, seed: int = 0,
                 device: str | torch.device = "auto", progress: bool = False, precision: str = "auto", write: bool = True,
                 test: Any = None, train: Any = None, shard: Shard = Shard(), factor_examples: int = 10_000,
                 quality: bool | None = None, quality_samples: int = 2000, features: str | None = None,
                 echo: Callable[[str], None] | None = None) -> dict | None:
    """Evaluate a run folder's model on its test split and write ``RUN/eval.json`` (unless ``write`` is False).

    ``shard``: this process's share under torchrun (every rank reads the run and its test split, and
    computes its rows; rank 0 gets the metrics and writes them, the others None).

    An ``eval.json`` of the same weights with more importance samples is kept
    (:func:`save_evaluation`); the metrics returned are this evaluation's.

    The test split is binarised as in training; where the data have labels
    the per-class rows and the representation accuracy (classifiers trained
    on the posterior means of the training split) are included.

    Where the data set knows the factors that made each example (``shapes``),
    ``disentanglement`` holds :func:`factor_scores` on up to
    ``factor_examples`` test examples.

    ``test`` (and ``train``, for the representation accuracy): data in memory, in any form
    :func:`aevb.train` takes, instead of those the run's configuration names (a run trained on data
    in memory has no others).

    ``quality``: the sample quality of the model's samplers (``sample_quality``,
    :func:`aevb.analysis.quality.run_sample_quality`) with ``quality_samples``
    samples and test examples, in the space of ``features`` (an import path)
    or of a classifier trained on the labelled training split; None measures
    it where it can be and says why not in ``sample_quality_note`` elsewhere,
    True makes a run where it cannot be a UserError, False leaves it out.
    ``echo`` is told when the classifier is trained.
    """
    data = None
    if test is not None:
        data = memory_dataset(test if train is None else train, test, read_by_batch=False)
        if train is None:  # classifiers trained and tested on the same examples would say nothing
            data.train_labels = None
    elif train is not None:
        raise UserError("train= only adds the representation accuracy to test=; pass test= too")
    run = open_run(run_dir, device, data)
    run_dir, config, model, dataset = run.path, run.config, run.model, run.dataset
    x, y = run.held_out("test")
    if x is None or not len(x):
        raise UserError(f"{run_dir} has no test split to evaluate; train with --test-split")
    run.check_data_shape(x)
    train_x, train_y = run.held_out("train") if y is not None else (None, None)
    torch.manual_seed(seed)
    metrics = evaluate(model, x, iw_samples=iw_samples, batch_size=batch_size, levels=dataset.levels,
                       progress=progress, labels=y, train_x=train_x, train_labels=train_y,
                       classes=dataset.classes, precision=precision, dequantized=config.dequantize, shard=shard)
    if metrics is None:
        return None  # a rank other than 0: its rows are in rank 0's metrics
    if dataset.test_factors is not None and test is None and model.latent_dim > 1:
        metrics["disentanglement"] = factor_scores(model, x, dataset.test_factors, dataset.factor_names,
                                                   seed=seed, examples=factor_examples,
                                                   labels=y if model.conditional else None)
    if quality is not False:
        if test is not None and train is None:  # the training split is the test split: no classifier, no floor
            if quality:
                raise UserError("sample quality needs a training split beside test=; pass train= too, or drop quality")
            measured, reason = None, "test= without train=: no training split for the feature classifier and the floor"
        else:
            measured, reason = run_sample_quality(run, n=quality_samples, features_path=features, seed=seed,
                                                  required=bool(quality), echo=echo)
        metrics["sample_quality"] = measured
        if reason is not None:
            metrics["sample_quality_note"] = f"no sample quality: {reason}"
    metrics["data"] = config.data
    metrics["checkpoint_step"] = run.checkpoint_step  # set for a run still training
    # which weights the numbers are of: the export or the last checkpoint, at which training step
    metrics["weights"] = "model" if run.provenance.finished else "checkpoint"
    metrics["step"] = run.provenance.step
    if write:
        save_evaluation(run_dir, metrics)
    return metrics


def trained_at(run_dir: Path) -> float:
    """When the run's weights were last written (0 if unknown): older evaluations and figures are redone."""
    times = [p.stat().st_mtime for p in (run_dir / "model" / "weights.safetensors", run_dir / CHECKPOINT)
             if p.is_file()]
    return max(times, default=0.0)


def previous_evaluation(run_dir: Path) -> tuple[dict | None, bool]:
    """(RUN/eval.json's metrics or None where absent or unreadable, whether they are of the current weights)."""
    path = run_dir / "eval.json"
    if not path.is_file():
        return None, False
    try:
        metrics = loads_json(path.read_bytes())
    except (ValueError, OSError):  # bad JSON, not UTF-8, nested too deep, unreadable
        return None, False
    if not isinstance(metrics, dict):
        return None, False
    return metrics, path.stat().st_mtime >= trained_at(run_dir)


def save_evaluation(run_dir: Path, metrics: dict) -> dict | None:
    """Write metrics to RUN/eval.json, unless it holds an evaluation of the same weights with more samples.

    Returns that more precise evaluation where it is kept, else None.  A
    report after ``aevb eval -k 5000`` must not replace the user's k = 5,000
    log-likelihood with a k = 1,000 one.
    """
    previous, current = previous_evaluation(Path(run_dir))
    if previous is not None and current and (previous.get("iw_samples") or 0) > (metrics.get("iw_samples") or 0):
        return previous
    with own_run(run_dir, "aevb eval", brief=True):  # the evaluation only read; writing needs the folder
        write_json(Path(run_dir) / "eval.json", metrics)
    return None
