"""Opening an existing run folder: the one way every command reads a run (``aevb eval``, ``sample``, ``report``…).

    run = open_run("runs/vae-digits", device="auto")
    run.config                  # RunConfig, read at once (a UserError unless this is a run folder)
    run.model                   # RUN/model, or the last checkpoint's of an unfinished run (warned)
    run.checkpoint_step         # the step of that checkpoint; None for a finished run
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
from aevb.model.base import Model, load
from aevb.run.checkpoints import checkpoint_model
from aevb.run.data import check_data_shape, held_out, load_dataset
from aevb.run.device import resolve_device
from aevb.run.folder import CHECKPOINT, read_run_config


class UnfinishedRunWarning(UserWarning):
    """A command used the last checkpoint of a run that has not finished training."""


@dataclass
class Run:
    """A run folder opened for reading: its configuration, and its model and data loaded on first use."""

    path: Path
    config: RunConfig
    device: torch.device | None = None  # where the model goes; None: where it was saved (the CPU)
    given: Dataset | None = None  # data passed in memory, used instead of those the configuration names

    @cached_property
    def _trained(self) -> tuple[Model, int | None]:
        """The model, and the step of the checkpoint it came from (None for RUN/model)."""
        if (self.path / "model" / "config.json").is_file():
            return load(self.path / "model", device=self.device), None
        checkpoint = self.path / CHECKPOINT
        if not checkpoint.is_file():
            raise UserError(f"{self.path} has neither a trained model nor a checkpoint; train it first")
        model, step = checkpoint_model(checkpoint, self.config.model)
        warnings.warn(f"{self.path} has not finished training: using its last checkpoint, at step {step}",
                      UnfinishedRunWarning, stacklevel=4)  # the line that asked for run.model
        return (model.to(self.device) if self.device is not None else model), step

    @property
    def model(self) -> Model:
        """The trained model: RUN/model, or the last checkpoint if the run did not finish (UnfinishedRunWarning)."""
        return self._trained[0]

    @property
    def checkpoint_step(self) -> int | None:
        """The step of the checkpoint :attr:`model` came from for a run still training; None once it finished."""
        return self._trained[1]

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


def open_run(path: str | Path, device: str | torch.device | None = None, data: Dataset | None = None) -> Run:
    """Open the run folder ``path``; ``device``: a ``--device`` name (``auto``, ``cpu``…), a torch device, or None;
    ``data``: a data set to read instead of the one the configuration names (a run on data passed in memory).

    The configuration is read at once (a UserError unless ``path`` is a run
    folder), then the device is resolved (a UserError if it is not there).
    """
    path = Path(path)
    config = read_run_config(path)
    if isinstance(device, str):
        device = resolve_device(device)
    return Run(path, config, device, data)
