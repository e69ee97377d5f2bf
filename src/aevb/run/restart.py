"""``--resume auto``: one command that starts a run, or continues it where a checkpoint says it got to.

    aevb train --out runs/x --epochs 50 --checkpoint-every 200 --resume auto   # run it again after any crash

The same command, run again (by hand, or by ``torchrun --max-restarts K`` in
every worker after one of them died), must do the right thing whatever the
folder holds (:func:`continue_or_start`):

- nothing (or only aevb's lock): a new run;
- a checkpoint: the run continues from it, with the command's configuration
  if that is the run's own (but for what ``--resume`` may change,
  :data:`~aevb.run.checkpoints.RESUMABLE`), and refused in one message naming
  the options that differ otherwise: the command is not the one that started
  the run;
- a run that stopped before its first checkpoint (its config.json, its
  first records): a new run in its place, set aside until the new run's
  first checkpoint as ``--force`` does;
- a run that finished: nothing left to train (the trainer exits at once).

``--force`` would replace the run the restarted command is to continue, so
the two are refused together (:func:`continue_or_start`).  This module reads
the folder only; the trainer owns it (:mod:`aevb.run.owner`, whose lock a
killed process leaves free).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from aevb.config import RunConfig, make_config
from aevb.errors import UserError
from aevb.run.checkpoints import RESUMABLE
from aevb.run.folder import CHECKPOINT, PATH_OPTIONS, read_run_config, resolved_path
from aevb.run.owner import OWN_FILES

AUTO = "auto"  # the value of resume (train's argument, --resume) that continues --out where it has a checkpoint


@dataclass(frozen=True)
class Restart:
    """What ``--resume auto`` does with the folder ``--out``."""

    resume: Path | None  # the run folder to continue, None for a new run
    config: RunConfig  # the configuration to train with: the run's own (with the command's RESUMABLE) or the command's
    replace: bool = False  # a new run in place of one that stopped before its first checkpoint


def continue_or_start(config: RunConfig, force: bool = False) -> Restart:
    """Whether the command of ``config`` (with ``--resume auto``) continues the run in ``config.out`` or starts one."""
    if force:
        raise UserError("--force replaces the run in --out and --resume auto continues it: run again after a "
                        "crash, the command would replace the run it is to continue; drop --force (and move an "
                        "earlier run away yourself, or choose another --out)")
    if not config.out:
        raise UserError("--resume auto continues the run in --out where it has a checkpoint, and no --out was "
                        "given; pass --out RUN (a folder that every worker sees)")
    run_dir = Path(config.out)
    if not run_dir.is_dir() or not set(p.name for p in run_dir.iterdir()) - set(OWN_FILES):
        return Restart(None, config)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"--resume auto: {run_dir} holds files but no run of aevb's (no config.json), so there is "
                        f"nothing to continue; pass another --out, or move its files away")
    run = read_run_config(run_dir)
    differing = differing_options(config, run)
    if differing:
        detail = ", ".join(f"--{k.replace('_', '-')} {_shown(getattr(run, k))} → {_shown(getattr(config, k))}"
                           for k in differing)
        raise UserError(f"--resume auto: {run_dir} holds a run started with other options ({detail}), so this "
                        f"command does not continue it: run the command that started it, pass another --out, or "
                        f"--resume {run_dir} to continue it as it was (only "
                        f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} may change)")
    if (run_dir / CHECKPOINT).is_file():
        return Restart(run_dir, make_config(run.values(), **{k: getattr(config, k) for k in RESUMABLE}))
    if (run_dir / "model").exists():
        raise UserError(f"--resume auto: {run_dir} holds a trained model but no checkpoint ({CHECKPOINT}) to "
                        f"continue from; pass another --out, or move the run away yourself")
    return Restart(None, config, replace=True)  # stopped before its first checkpoint: nothing of it to keep


def differing_options(command: RunConfig, run: RunConfig) -> list[str]:
    """The options, but :data:`RESUMABLE` and ``out``, whose value in ``command`` is not the one ``run`` (a run's
    config.json) was started with.

    A run records two values it derived: its data paths made absolute (compared
    resolved) and ``likelihood_scale``, which the command leaves unset for the
    run to fit to its data.
    """
    ours, theirs = _plain(command.values()), _plain(run.values())
    differing = []
    for name, value in ours.items():
        if name in RESUMABLE or name == "out" or (name == "likelihood_scale" and value is None):
            continue
        saved = theirs.get(name)
        if name in PATH_OPTIONS:
            value, saved = resolved_path(value), resolved_path(saved)
        if value != saved:
            differing.append(name)
    return differing


def _plain(values: dict) -> dict:
    """Values as config.json stores them (tuples as lists)."""
    return json.loads(json.dumps(values))


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
