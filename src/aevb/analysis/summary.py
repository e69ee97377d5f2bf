"""What a first reader of a run wants first: the headline, the options that were chosen, and whether it was done.

The report (:mod:`aevb.analysis.report`) opens with these; each is a plain
function of what the run folder holds (``config.json``, ``metrics.jsonl``,
the checkpoint's header, ``eval.json``) so that tests can check what it says:

* :func:`run_facts`: what was trained on what, for how long, where, and with which versions;
* :func:`headline_number`: the one number that matters, the test NLL where it
  was estimated, else the negative ELBO (else an autoencoder's reconstruction
  term), with a sentence saying what it means;
* :func:`changed_options`: the options set away from their defaults;
* :func:`still_improving`: whether the validation −ELBO was still falling at
  the last epochs, the sign that a longer run would give a better model.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aevb.analysis.evaluation import trained_at
from aevb.config import run_options
from aevb.errors import UserError
from aevb.run.checkpoints import read_meta
from aevb.run.folder import CHECKPOINT
from aevb.run.open import Run

# options that say where a run went or how it was logged, never what was trained: left out of the differences
NOT_A_CHOICE = ("out",)

# still_improving: the validation loss must have fallen at each of the last STILL_FALLING epoch ends (fewer where
# the run had fewer), by more than IMPROVEMENT_TOLERANCE of its size in all, for the run to count as still improving
STILL_FALLING = 3
IMPROVEMENT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Headline:
    """The one number of a run's evaluation: ``label`` (``test NLL``), its value in nats per example, its meaning."""

    key: str  # of eval.json: nll, neg_elbo or reconstruction_nll
    label: str
    value: float
    meaning: str


def headline_number(metrics: dict) -> Headline | None:
    """The number that says how good the model is, from ``eval.json``'s metrics; None where none was computed.

    The importance-sampled negative log-likelihood where it exists (a
    likelihood that is a normalised density), else the negative ELBO, its
    upper bound; an autoencoder has neither, and its reconstruction term is
    all there is.
    """
    bits = metrics.get("bits_per_dim")
    in_bits = f" ({bits:.4g} bits per dimension)" if isinstance(bits, (int, float)) and math.isfinite(bits) else ""
    if _finite(metrics.get("nll")):
        k = metrics.get("iw_samples")
        return Headline("nll", "test negative log-likelihood", metrics["nll"],
                        f"−log p(x) of a held-out example, averaged over the test split{in_bits} and estimated by "
                        f"importance sampling with k = {k} samples: how improbable the model finds data it never "
                        f"saw. Lower is better; comparable between models of the same data")
    if _finite(metrics.get("neg_elbo")):
        return Headline("neg_elbo", "test negative ELBO", metrics["neg_elbo"],
                        "reconstruction term + KL, averaged over the test split: an upper bound on −log p(x) of a "
                        "held-out example (no likelihood was estimated: the likelihood is not a normalised density). "
                        "Lower is better")
    if _finite(metrics.get("reconstruction_nll")):
        return Headline("reconstruction_nll", "test reconstruction term", metrics["reconstruction_nll"],
                        "−log p(x | z) at the code of each held-out example, averaged over the test split: how well "
                        "the model reconstructs data it never saw (an autoencoder has no prior, so no likelihood of "
                        "x). Lower is better")
    return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def changed_options(config: dict) -> dict[str, Any]:
    """The options of ``config.json`` whose values differ from their defaults, in ``--help`` order.

    Options unknown to this version of aevb are kept (they were chosen by
    someone); where a run went (``out``) is not a choice of what was trained.
    """
    options = run_options()
    changed = {}
    for name, value in config.items():
        if name == "format" or name in NOT_A_CHOICE:
            continue
        option = options.get(name)
        if option is None or not _same(value, option.default):
            changed[name] = value
    order = {name: i for i, name in enumerate(options)}
    return dict(sorted(changed.items(), key=lambda item: order.get(item[0], len(order))))


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return list(value) == list(default)
    return value == default and isinstance(value, bool) == isinstance(default, bool)  # 1 is no True


@dataclass(frozen=True)
class Improvement:
    """The validation losses of the last epochs, falling: the run stopped while it was still improving."""

    split: str  # val, or test where the run had no validation split
    epochs: list[int]  # the epoch ends compared, oldest first
    losses: list[float]  # −ELBO (an autoencoder: the reconstruction term) at those epoch ends, nats per example
    measure: str = "−ELBO"  # what the losses are: −ELBO, or the reconstruction term

    @property
    def drop(self) -> float:
        return self.losses[0] - self.losses[-1]


def held_out_losses(records: list[dict]) -> tuple[str | None, list[tuple[int, float]]]:
    """(split, [(epoch, loss)]): the held-out loss at each epoch end of ``metrics.jsonl``'s records.

    The loss is −ELBO, or the reconstruction term for a model without an
    ELBO; the validation split where the run had one, else the test split.
    Where a resumed run logged an epoch twice, the later record counts.
    """
    for split in ("val", "test"):
        losses: dict[int, float] = {}
        for record in records:
            if f"{split}_elbo" in record:
                loss = -record[f"{split}_elbo"]
            elif f"{split}_reconstruction" in record:
                loss = record[f"{split}_reconstruction"]
            else:
                continue
            if isinstance(record.get("epoch"), (int, float)) and _finite(loss):
                losses[int(record["epoch"])] = float(loss)
        if losses:
            return split, sorted(losses.items())
    return None, []


def still_improving(records: list[dict], window: int = STILL_FALLING,
                    tolerance: float = IMPROVEMENT_TOLERANCE) -> Improvement | None:
    """Whether the run was still improving when it stopped; None where it was not (or it cannot be told).

    The rule: the held-out loss (:func:`held_out_losses`) fell at each of the
    last ``window`` epoch ends (at each of them where the run has fewer, at
    least two epochs), and by more than ``tolerance`` of its size over them, so
    that a flat curve's last wobble down does not count.  A run whose loss
    rose, or stayed flat, at any of those epochs had stopped improving.
    """
    split, losses = held_out_losses(records)
    measure = "−ELBO" if any(f"{split}_elbo" in record for record in records) else "reconstruction term"
    if len(losses) < 2:
        return None
    last = losses[-(min(window, len(losses) - 1) + 1):]
    values = [loss for _, loss in last]
    if not all(later < earlier for earlier, later in zip(values, values[1:])):
        return None
    if values[0] - values[-1] <= tolerance * max(1.0, abs(values[-1])):
        return None
    return Improvement(split, [epoch for epoch, _ in last], values, measure)


@dataclass(frozen=True)
class RunFacts:
    """What was trained on what, for how long and where: the report's first sentence."""

    model: str  # the registry's names
    likelihood: str
    arch: str
    latent_dim: int
    data: str  # the data set's name, or a path's file name
    data_shape: tuple[int, ...]
    parameters: int  # the model's parameters (its networks' weights and any learned scale)
    steps: int | None  # optimiser steps trained; None where the run has no checkpoint to say
    epochs: float | None  # passes over the training split
    examples: int | None  # in the training split
    device: str | None  # the kind of device it trained on (cpu, cuda, mps)
    multiplies: str | None  # of the training step: fp32 or bf16
    workers: int  # processes of one torchrun run
    finished: bool  # the model is the export of a finished run, not a checkpoint of one still training
    trained: datetime.datetime | None  # when its weights were written (UTC)
    versions: dict[str, str]  # aevb's and torch's, of the process that writes the report


def run_facts(run: Run) -> RunFacts:
    """The facts of an opened run: its configuration, model, checkpoint header and the time of its weights."""
    config, model = run.config, run.model
    try:
        meta = read_meta(run.path / CHECKPOINT) if (run.path / CHECKPOINT).is_file() else {}
    except UserError:  # a damaged checkpoint beside a good export: the facts it held are unknown
        meta = {}
    steps = meta.get("step")
    examples = meta.get("examples")
    epochs = None
    if isinstance(steps, int) and isinstance(examples, int) and examples:
        steps_per_epoch = math.ceil(examples / config.batch_size)
        epochs = meta.get("epoch", 0) + meta.get("batch", 0) / steps_per_epoch
    precision = meta.get("precision") or {}
    written = trained_at(run.path)
    data = str(config.data)
    return RunFacts(
        model=config.model, likelihood=config.likelihood, arch=config.arch, latent_dim=config.latent_dim,
        data=Path(data).name if ("/" in data or "\\" in data) else data, data_shape=tuple(model.data_shape),
        parameters=sum(p.numel() for p in model.parameters()),
        steps=steps, epochs=epochs, examples=examples, device=precision.get("device"),
        multiplies=precision.get("multiplies"), workers=int(meta.get("world_size") or 1),
        finished=run.provenance.finished,
        trained=datetime.datetime.fromtimestamp(written, datetime.timezone.utc) if written else None,
        versions={"aevb": _version("aevb"), "torch": torch.__version__})


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        return "unknown"
