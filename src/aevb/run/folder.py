"""The run folder: its layout, claiming a new one (and replacing an old one), and reading its configuration back.

    RUN/config.json            resolved configuration (pass it back to reproduce)
    RUN/data.json              what the data were, for a run on data passed in memory (aevb.data.memory)
    RUN/metrics.jsonl          one record per logged step and per epoch
    RUN/checkpoints/last.safetensors   model + optimiser + RNG + position (atomic)
    RUN/model/                 the trained model (aevb.load), with the step it was exported at
    RUN/images/                reconstructions during training, samples at the end
    RUN/eval.json, RUN/report.html     written by ``aevb eval`` and ``aevb report``
    RUN/export/                the networks as torch.export and ONNX files (``aevb export``)
    RUN/samplers/NAME.*        samplers fitted to the codes (``aevb fit-sampler``, :mod:`aevb.sampling.fitted`)
    RUN/.aevb-run.jsonl        the list of the files the run wrote (:mod:`aevb.run.manifest`)
    RUN/.aevb-lock             held by the one process writing the folder (:mod:`aevb.run.owner`)

A new run's folder is chosen (:func:`new_run_dir`) and, for ``--out``,
claimed (:class:`NewRun`: owned, checked empty, or a run of aevb's under
``--force``) before its data load, and made (:func:`make_run_dir`) after;
under ``--force`` the earlier run's files are set aside until the new run
has its first checkpoint.  The data paths in ``config.json`` are absolute
(:func:`with_absolute_paths`), so the folder works from anywhere.
This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from aevb.config import RunConfig, make_config, read_config_file
from aevb.errors import UserError
from aevb.io import loads_json
from aevb.registry import DATASETS
from aevb.run.manifest import CHECKPOINT_FILE, MANIFEST, PREVIOUS, Manifest
from aevb.run.owner import LOCK_FILE, OWN_FILES, OwnedRun, own_run

CHECKPOINT = Path(CHECKPOINT_FILE)
# where a run writes: none of these may lead out of the folder through a link (checked before training starts)
BEST_CHECKPOINT = Path("checkpoints") / "best.safetensors"  # the epoch's end with the best validation ELBO so far
RUN_PATHS = ("config.json", "metrics.jsonl", CHECKPOINT_FILE, str(BEST_CHECKPOINT), "model/config.json",
             "model/weights.safetensors", "images/samples.png", "eval.json", "report.html", "data.json")
PATH_OPTIONS = ("data", "labels", "data_dir")


def _data_name(source: str) -> str:
    name = Path(source).name if ("/" in source or "." in source) else source
    name = re.sub(r"(\.gz|\.npy|\.npz|\.csv)$", "", name)
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "data"


def new_run_dir(config: RunConfig, force: bool = False) -> Path:
    """The run folder a new run will write: ``--out`` (refusing to overwrite without --force, and under --force
    a folder that is no run of aevb's), or the base name ``runs/MODEL-DATA`` that :func:`make_run_dir` numbers.

    Nothing is created or cleared here: :class:`NewRun` claims the folder,
    and sets an earlier run aside only once the data and the model have
    loaded, so a run that fails to start leaves no stub folder and
    ``--force`` loses no earlier results for nothing.
    """
    if config.out:
        run_dir = Path(config.out)
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"--out {run_dir} is a file; pass a folder for the run")
        if run_dir.is_dir() and _entries(run_dir):
            if not force:
                raise UserError(f"run folder {run_dir} already exists; pass --force to overwrite it, "
                                f"--resume {run_dir} to continue it, or another --out")
            check_replaceable(run_dir)
        return run_dir
    return Path("runs") / f"{config.model}-{_data_name(config.data)}"  # numbered by make_run_dir


def _entries(run_dir: Path) -> set[str]:
    """The names in a folder but aevb's bookkeeping (a lock file alone is an empty folder)."""
    return set(os.listdir(run_dir)) - set(OWN_FILES)


def check_replaceable(run_dir: Path) -> None:
    """A UserError unless ``run_dir`` is a run folder aevb wrote (it has the list of its files), which --force
    replaces; nothing else is."""
    if Manifest.read(run_dir) is None:
        raise UserError(f"--force replaces only a run folder that aevb wrote, and {run_dir} is not one (it has no "
                        f"{MANIFEST}, the list of the files a run wrote, which earlier versions of aevb did not keep): "
                        f"nothing was changed; choose another --out, or move its files away yourself")


def make_run_dir(run_dir: Path, config: RunConfig, force: bool = False) -> Path:
    """Create the run folder and return it.

    A numbered folder (no --out) is claimed with an exclusive ``mkdir``, so
    runs started together get a folder each; an --out folder is made where
    it is missing (:class:`NewRun` has claimed it, and decides what --force does).
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
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class NewRun:
    """A new run's folder, from its claim before the data load to the run's first checkpoint.

        with NewRun(config, force) as new:   # --out owned at once (RunInUseError if another writer has it)
            ...                              # load the data, build the model
            folder = new.start()             # made (or numbered) and owned; under --force the earlier run set aside
            ...                              # folder.checkpointed() after each checkpoint: the earlier run goes

    Leaving with an error before the first checkpoint puts the earlier run
    back; leaving before :meth:`start` removes what the claim made.
    """

    def __init__(self, config: RunConfig, force: bool = False):
        self.config, self.force = config, force
        self.path = new_run_dir(config, force)
        self.folder: OwnedRun | None = None
        self.started = False
        self._stack = ExitStack()
        self._made: list[Path] = []  # folders and the lock file the claim created, removed if the run never starts

    def __enter__(self) -> NewRun:
        if self.config.out:
            try:
                # only what this process itself created, and only once it owns the folder, is removed again: a
                # second run started together must not remove the first one's folder or lock file
                self._made = _make_folders(self.path)
                lock_made = not os.path.lexists(self.path / LOCK_FILE)
                self.folder = self._stack.enter_context(own_run(self.path, "aevb train"))
                if lock_made:
                    self._made.append(self.path / LOCK_FILE)
                self._check_claimable()
                self.folder.check_paths(RUN_PATHS)
            except BaseException:
                self._release()
                raise
        return self

    def _check_claimable(self) -> None:
        """Under the lock, where no other aevb can fill or replace the folder: empty, or a run of aevb's for --force."""
        if _entries(self.path):
            if not self.force:
                raise UserError(f"run folder {self.path} already exists; pass --force to overwrite it, "
                                f"--resume {self.path} to continue it, or another --out")
            check_replaceable(self.path)

    def start(self) -> OwnedRun:
        """Make and own the run folder, setting an earlier run aside under --force; the folder to write."""
        if self.config.out is None:
            self.path = make_run_dir(self.path, self.config)
            self.folder = self._stack.enter_context(own_run(self.path, "aevb train"))
        elif _entries(self.path):  # under --force, checked by the claim
            self.folder.begin_new_run()
        self.started = True
        (self.path / "images").mkdir(exist_ok=True)
        return self.folder

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.started and (self.path / PREVIOUS).is_dir():
            try:
                self.folder.restore_previous()
                warnings.warn(f"the earlier run in {self.path} is kept: the new run stopped before its first "
                              f"checkpoint, and what it wrote is removed", RestoredRunWarning, stacklevel=2)
            finally:
                self._release()
            return
        self._release()

    def _release(self) -> None:
        """Let the folder go; one the claim made and no run started in is removed again."""
        try:
            if not self.started and self.folder is not None:  # another process's folder is never ours to remove
                for path in reversed(self._made):
                    try:
                        path.unlink() if path.name == LOCK_FILE else path.rmdir()
                    except OSError:  # not empty after all: left as it is
                        break
        finally:
            self._stack.close()


class RestoredRunWarning(UserWarning):
    """A --force run stopped before its first checkpoint: the run it was to replace is back."""


def _make_folders(path: Path) -> list[Path]:
    """Make the folders of ``path`` (itself included) that do not exist yet, outermost first; the ones this call
    made (one that another process makes meanwhile is not among them)."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    made = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
            made.append(folder)
        except FileExistsError:
            pass
    return made


def metrics_record(line: str) -> dict | None:
    """One line of ``metrics.jsonl`` as training writes it: a table of numbers (or nulls) whose ``step`` is a count
    ≥ 0; None for a blank, cut-off, foreign or edited line (which every reader skips)."""
    try:
        record = loads_json(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None
    if not all(value is None or isinstance(value, (int, float)) and not isinstance(value, bool)
               for value in record.values()):
        return None
    return record


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
