"""The metrics log: ``RUN/metrics.jsonl`` (one JSON object per logged step and per epoch) and its mirrors.

The steps' loss terms stay on the device (:class:`StepTerms`) and are read
back in one transfer every ``log_every`` steps.  ``--tensorboard`` and
``--wandb`` mirror every number to those tools; their packages are checked
(:func:`check_loggers`) before a run folder is made.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from aevb.config import RunConfig
from aevb.errors import UserError
from aevb.io import check_write, write_text
from aevb.model.base import LossOutput
from aevb.run.folder import metrics_record
from aevb.run.owner import OwnedRun


def check_loggers(config: RunConfig) -> None:
    """The packages of --tensorboard and --wandb must be installed (checked before a run folder is made)."""

    for wanted, module, package in ((config.tensorboard, "tensorboard", "tensorboard"), (config.wandb, "wandb", "wandb")):
        if wanted and importlib.util.find_spec(module) is None:
            raise UserError(f"--{module} needs the {package} package: pip install {package}")


class MetricsLog:
    """``metrics.jsonl`` plus the optional TensorBoard / W&B mirrors."""

    def __init__(self, folder: OwnedRun, config: RunConfig, resume_step: int | None):
        run_dir = folder.path
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # drop records written after the checkpoint we resume from, and a line a kill cut short
            kept = [line for line in self.path.read_text(errors="replace").splitlines()
                    if (record := metrics_record(line)) is not None and record["step"] <= resume_step]
            write_text(self.path, "".join(line + "\n" for line in kept))
        check_write(self.path)  # appended to, not written through aevb.io: checked and listed here
        self.file = open(self.path, "a", encoding="utf-8")
        self.mirrors = []  # their packages were checked by train() before the run folder was made
        # the folders the mirrors write files into themselves, with the files there before: the new ones are
        # listed as the run's when the log closes
        self.folder, self.watched = folder, []
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional package, only with --tensorboard

            logs = run_dir / "tensorboard"
            folder.check_folder(logs)
            self.watched.append((logs, folder.files_in(logs)))
            self.mirrors.append(("tb", SummaryWriter(str(logs))))
        if config.wandb:
            import wandb  # optional package, only with --wandb

            folder.check_folder(run_dir / "wandb")
            self.watched.append((run_dir / "wandb", folder.files_in(run_dir / "wandb")))
            self.mirrors.append(("wandb", wandb.init(project="aevb", config=config.to_dict(), dir=str(run_dir))))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for kind, writer in self.mirrors:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            if kind == "tb":
                for k, v in numbers.items():
                    writer.add_scalar(k, v, record["step"])
            else:
                writer.log(numbers, step=record["step"])

    def close(self) -> None:
        self.file.close()
        for kind, writer in self.mirrors:
            writer.close() if kind == "tb" else writer.finish()
        for logs, before in self.watched:
            self.folder.record_new_files(logs, before)


class NoLog:
    """The metrics log of a worker other than rank 0, which writes nothing (rank 0 writes the reduced numbers)."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class StepTerms:
    """The loss terms of the steps since the last record, on the device: [log_every, terms], one row a step."""

    def __init__(self, log_every: int):
        self.log_every = log_every
        self.rows: torch.Tensor | None = None  # made at the first step, when the number of terms is known
        self.names: tuple[str, ...] = ()
        self.filled = 0

    def add(self, out: LossOutput, weight: float = 1) -> None:
        """The step's terms; ``weight``: this worker's share of the global batch (its rows are summed over workers)."""
        row = out.as_tensor()
        if weight != 1:
            row = row * weight
        if self.rows is None:
            self.rows, self.names = row.new_zeros(self.log_every, row.numel()), out.names()
        self.rows[self.filled] = row
        self.filled += 1

    @property
    def full(self) -> bool:
        return self.filled == self.log_every

    def take(self, reduce=None) -> torch.Tensor | None:
        """The rows filled since the last take, [filled, terms] on the CPU (one transfer); None if none.
        ``reduce``: applied to them on the device first (the sum over the workers)."""
        if self.filled == 0:
            return None
        rows = self.rows[:self.filled]
        values = (rows if reduce is None else reduce(rows.clone())).cpu()
        self.filled = 0
        return values
