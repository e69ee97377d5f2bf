"""The run folder: its layout, making and clearing one, and reading its configuration back.

    RUN/config.json            resolved configuration (pass it back to reproduce)
    RUN/data.json              what the data were, for a run on data passed in memory (aevb.data.memory)
    RUN/metrics.jsonl          one record per logged step and per epoch
    RUN/checkpoints/last.safetensors   model + optimiser + RNG + position (atomic)
    RUN/model/                 the trained model (aevb.load)
    RUN/images/                reconstructions during training, samples at the end
    RUN/eval.json, RUN/report.html     written by ``aevb eval`` and ``aevb report``
    RUN/export/                the networks as torch.export and ONNX files (``aevb export``)

A new run's folder is chosen (:func:`new_run_dir`) before its data load and
made (:func:`make_run_dir`) after.  The data paths in ``config.json`` are
absolute (:func:`with_absolute_paths`), so the folder works from anywhere.
This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from aevb.config import RunConfig, make_config, read_config_file
from aevb.errors import UserError
from aevb.registry import DATASETS

CHECKPOINT = Path("checkpoints") / "last.safetensors"
BEST_CHECKPOINT = Path("checkpoints") / "best.safetensors"  # the epoch's end with the best validation ELBO so far
RUN_OUTPUTS = ("config.json", "data.json", "metrics.jsonl", "eval.json", "report.html", "checkpoints", "model", "images",
               "tensorboard", "export")
RUN_FILE_SUFFIXES = (".png", ".json", ".jsonl", ".safetensors", ".html", ".tmp", ".pt2", ".onnx")  # what a run writes in those folders
PATH_OPTIONS = ("data", "labels", "data_dir")


def _data_name(source: str) -> str:
    name = Path(source).name if ("/" in source or "." in source) else source
    name = re.sub(r"(\.gz|\.npy|\.npz|\.csv)$", "", name)
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "data"


def new_run_dir(config: RunConfig, force: bool = False) -> Path:
    """The run folder a new run will write: ``--out`` (refusing to overwrite without --force), or the base name
    ``runs/MODEL-DATA`` that :func:`make_run_dir` numbers.

    Nothing is created or cleared here: :func:`make_run_dir` does that once
    the data and the model have loaded, so a run that fails to start leaves
    no stub folder and ``--force`` deletes no earlier results for nothing.
    """
    if config.out:
        run_dir = Path(config.out)
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"--out {run_dir} is a file; pass a folder for the run")
        if run_dir.exists() and any(run_dir.iterdir()) and not force:
            raise UserError(f"run folder {run_dir} already exists; pass --force to overwrite it, "
                            f"--resume {run_dir} to continue it, or another --out")
        return run_dir
    return Path("runs") / f"{config.model}-{_data_name(config.data)}"  # numbered by make_run_dir


def make_run_dir(run_dir: Path, config: RunConfig, force: bool = False) -> Path:
    """Create the run folder and return it, first clearing what an earlier run wrote there under --force.

    A numbered folder (no --out) is claimed with an exclusive ``mkdir``, so
    runs started together get a folder each; an --out folder must still be
    empty (or --force given) when the run claims it.
    """
    if config.out is None:  # runs/MODEL-DATA, else the first free runs/MODEL-DATA-N
        base = run_dir
        base.parent.mkdir(parents=True, exist_ok=True)
        n = 1
        while True:
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                n += 1
                run_dir = base.with_name(f"{base.name}-{n}")
    elif run_dir.exists() and force:
        _clear_run_outputs(run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"run folder {run_dir} was filled while this run loaded its data; pass another --out")
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    return run_dir


def _clear_run_outputs(run_dir: Path) -> None:
    """Delete what an earlier run wrote in ``run_dir`` (for --force), and nothing else.

    The files of :data:`RUN_OUTPUTS`, and in its folders only the kinds of file
    a run writes there (pictures, JSON, weights, TensorBoard events, temporary
    files): a photo or notes the user keeps in ``images/`` or ``model/`` stay,
    and so do those folders then.
    """
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if not path.is_dir():
            path.unlink(missing_ok=True)
            continue
        for entry in sorted(path.rglob("*"), reverse=True):  # a folder's files before the folder
            if entry.is_dir() and not entry.is_symlink():
                if not any(entry.iterdir()):
                    entry.rmdir()
            elif entry.suffix in RUN_FILE_SUFFIXES or entry.name.startswith("events.out.tfevents."):
                entry.unlink()
        if not any(path.iterdir()):
            path.rmdir()


def resolved_path(value: Any) -> Any:
    """A data, labels or data-folder option as an absolute path where it names an existing file or folder."""
    if isinstance(value, str) and value and value not in DATASETS.names() and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """``config`` with its data, labels and data folder as absolute paths, so the run folder works from anywhere."""
    changes = {name: resolved_path(getattr(config, name)) for name in PATH_OPTIONS}
    changes = {name: value for name, value in changes.items() if value != getattr(config, name)}
    return dataclasses.replace(config, **changes) if changes else config


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The configuration of an existing run folder (UserError if it is not one)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}; pass a folder written by 'aevb train'")
    path = run_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not an aevb run folder (no config.json); pass the folder that 'aevb train' wrote")
    if (run_dir / "weights.safetensors").is_file():  # RUN/model, or any model that Model.save wrote
        raise UserError(f"{run_dir} is an exported model, not a run folder; pass the run folder it is in "
                        f"({run_dir.parent}), or load it with aevb.load('{run_dir}')")
    return make_config(read_config_file(path))
