"""Opening an existing run folder: the one way every command reads a run (``aevb eval``, ``sample``, ``report``…).

    run = open_run("runs/vae-digits", device="auto")
    run.config                  # RunConfig, read at once (a UserError unless this is a run folder)
    run.model                   # RUN/model, or the last checkpoint's of an unfinished run (warned)
    run.checkpoint_step         # the step of that checkpoint; None for a finished run
    run.provenance              # where the model comes from and its training step (say it with the numbers)
    x, y = run.held_out("test") # [N, *data_shape], labels or None: binarised/dequantised as in training

The model and the data load when first asked for, so a command pays only
for what it uses, and in the order it asks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from aevb.config import RunConfig
from aevb.data.datasets import Dataset
from aevb.errors import UserError
from aevb.model.base import Model
from aevb.model.saved import exported_step, load
from aevb.run.checkpoints import checkpoint_model, checkpoint_step
from aevb.run.data import check_data_shape, held_out, load_dataset
from aevb.run.device import resolve_device
from aevb.run.folder import CHECKPOINT, read_run_config
from aevb.run.manifest import PREVIOUS
from aevb.run.owner import own_run


class UnfinishedRunWarning(UserWarning):
    """A command used the last checkpoint of a run that has not finished training."""


class StaleModelWarning(UserWarning):
    """A run's last checkpoint is newer than its exported model (a resumed run stopped before its export)."""


@dataclass(frozen=True)
class Provenance:
    """Where a run's model comes from: the export (RUN/model) or the last checkpoint, and its training step."""

    source: Path  # RUN/model, or RUN/checkpoints/last.safetensors for a run still training
    step: int | None  # None: exported by an aevb that did not record the step
    finished: bool  # the export of a run that finished training

    def __str__(self) -> str:
        if not self.finished:
            return f"{self.source}, step {self.step} (the run has not finished training)"
        return f"{self.source}, exported at step {self.step}" if self.step is not None else \
            f"{self.source} (exported by an earlier aevb, which did not record its step)"


@dataclass
class Run:
    """A run folder opened for reading: its configuration, and its model and data loaded on first use."""

    path: Path
    config: RunConfig
    device: torch.device | None = None  # where the model goes; None: where it was saved (the CPU)
    given: Dataset | None = None  # data passed in memory, used instead of those the configuration names

    @cached_property
    def _trained(self) -> tuple[Model, Provenance]:
        """The model, and where it came from."""
        export, checkpoint = self.path / "model", self.path / CHECKPOINT
        if (export / "config.json").is_file():
            model = load(export, device=self.device)
            provenance = Provenance(export, exported_step(export), finished=True)
            _warn_if_checkpoint_is_newer(self.path, provenance, checkpoint)
            return model, provenance
        if not checkpoint.is_file() and (self.path / PREVIOUS).is_dir():  # a --force run before its checkpoint
            raise UserError(f"{self.path} is being replaced by a run started with --force, which has no checkpoint "
                            f"yet (the earlier run is kept aside until it has); wait for its first checkpoint, or "
                            f"stop it to have the earlier run back")
        if not checkpoint.is_file():
            raise UserError(f"{self.path} has neither a trained model nor a checkpoint; train it first")
        model, step = checkpoint_model(checkpoint, self.config.model)
        warnings.warn(f"{self.path} has not finished training: using its last checkpoint, at step {step}",
                      UnfinishedRunWarning, stacklevel=4)  # the line that asked for run.model
        return (model.to(self.device) if self.device is not None else model), Provenance(checkpoint, step, False)

    @property
    def provenance(self) -> Provenance:
        """Where :attr:`model` comes from and the training step of its weights (loads the model)."""
        return self._trained[1]

    @property
    def model(self) -> Model:
        """The trained model: RUN/model, or the last checkpoint if the run did not finish (UnfinishedRunWarning)."""
        return self._trained[0]

    @property
    def checkpoint_step(self) -> int | None:
        """The step of the checkpoint :attr:`model` came from for a run still training; None once it finished."""
        provenance = self._trained[1]
        return None if provenance.finished else provenance.step

    @cached_property
    def dataset(self) -> Dataset:
        """The run's data set, as its configuration names and splits it (or as given to :func:`open_run`)."""
        return self.given if self.given is not None else load_dataset(self.config)

    def held_out(self, split: str = "test") -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A split [N, *data_shape] and its labels [N] (or None), binarised or dequantised as in training."""
        return held_out(self.dataset, self.config, split)

    def check_data_shape(self, x: torch.Tensor) -> None:
        """A UserError unless x [N, ...] has the shape the run's model was trained on."""
        check_data_shape(self.model, x, self.path, self.config.data)


def _warn_if_checkpoint_is_newer(run_dir: Path, export: Provenance, checkpoint: Path) -> None:
    """Warn where the run trained on after its export: a resumed run stopped before it exported again."""
    try:
        step = checkpoint_step(checkpoint) if checkpoint.is_file() else None
    except UserError:  # a damaged checkpoint does not stop a command that reads the export
        return
    if step is None:
        return
    if export.step is not None:
        newer = step > export.step
    else:  # an export of an earlier aevb: when the files were written tells
        newer = checkpoint.stat().st_mtime > (export.source / "weights.safetensors").stat().st_mtime
    if newer:
        warnings.warn(f"{run_dir}'s last checkpoint (step {step}) is newer than its exported model "
                      f"(step {export.step if export.step is not None else 'unknown'}): the run went on training "
                      f"after its export and stopped before exporting again; these numbers are the exported "
                      f"model's; finish the run with 'aevb train --resume {run_dir}' to use the newer weights",
                      StaleModelWarning, stacklevel=5)


def finish_interrupted_force(path: Path) -> None:
    """Settle a folder where a killed ``--force`` left the earlier run aside (:func:`aevb.run.manifest.recover`),
    where no other process owns it now and it may be written; a reader otherwise reads it as it is."""
    try:
        with own_run(path, "aevb (settling an interrupted --force)"):
            pass
    except UserError:  # owned by the --force run itself, still running; or read-only
        pass


def open_run(path: str | Path, device: str | torch.device | None = None, data: Dataset | None = None) -> Run:
    """Open the run folder ``path``; ``device``: a ``--device`` name (``auto``, ``cpu``…), a torch device, or None;
    ``data``: a data set to read instead of the one the configuration names (a run on data passed in memory).

    The configuration is read at once (a UserError unless ``path`` is a run
    folder), then the device is resolved (a UserError if it is not there).
    """
    if isinstance(path, str) and not path.strip():  # Path("") is the current folder: never what was meant
        raise UserError("the run folder to open is empty; pass the folder 'aevb train' wrote")
    path = Path(path)
    if (path / PREVIOUS).is_dir():
        finish_interrupted_force(path)
    config = read_run_config(path)
    if isinstance(device, str):
        device = resolve_device(device)
    return Run(path, config, device, data)
