"""A run folder's figures and its one-page report.

``explore_run(RUN)`` writes every figure of the registry
(:mod:`aevb.analysis.gallery`) that fits the run into ``RUN/images/``
(``aevb explore``); ``write_report(RUN)`` writes
``RUN/report.html`` (``aevb report``), evaluating the run and drawing its
figures first where they are missing or older than its weights; the page
itself is :mod:`aevb.analysis.page`'s.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from aevb.analysis.evaluation import evaluate_run, previous_evaluation, trained_at
from aevb.config import IW_SAMPLES
from aevb.analysis.gallery import ExploreOptions, FigureContext, NotDrawn, plan_figures
from aevb.analysis.page import render_report
from aevb.analysis.plots import read_metrics
from aevb.analysis.summary import run_facts, still_improving
from aevb.errors import UserError
from aevb.io import loads_json, write_text
from aevb.registry import FIGURES
from aevb.run.open import Run, open_run
from aevb.run.owner import own_run, owning_if_in_run


def explore_run(run_dir: str | Path, *, grid_range: float | None = None, directions: str = "auto",
                grid_size: int = 15, pairs: int = 4, steps: int = 10, top_dims: int = 10,
                device: str = "auto", seed: int = 0,
                echo: Callable[[str], None] | None = None) -> tuple[list[Path], dict[str, str]]:
    """Write every figure that fits the run into ``RUN/images/``.

    ``directions``: ``coords`` (z1, z2), ``pca`` (first two principal
    components of the test set's posterior means) or ``auto`` (coords for a
    2-dimensional latent space, pca otherwise).  Returns the paths written
    and {figure: reason} for the figures left out; ``echo`` is told which
    weights (and training step) the figures show.
    """
    run = open_run(run_dir, device)
    with own_run(run.path, "aevb explore"):
        (echo or (lambda message: None))(f"model: {run.provenance}")
        return _draw_figures(run, ExploreOptions(grid_range, directions, grid_size, pairs, steps, top_dims), seed)


def _draw_figures(run: Run, options: ExploreOptions, seed: int) -> tuple[list[Path], dict[str, str]]:
    run_dir, model = run.path, run.model
    model.eval()
    plan = plan_figures(model, run_dir)
    dataset = run.dataset
    x, y = run.held_out("test")
    if x is None or not len(x):
        raise UserError(f"{run_dir} has no test split to draw; train with --test-split")
    if options.directions == "auto":  # principal components of one posterior mean are none
        options = dataclasses.replace(options, directions="coords" if model.latent_dim == 2 or len(x) < 2 else "pca")
    context = FigureContext(model, x.to(model.device), y, dataset.classes, run_dir, options, seed)
    images_dir = run_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    written = []
    for name in plan.figures:
        path = images_dir / name
        try:
            FIGURES.get(name).draw(context, path)
        except NotDrawn as reason:
            plan.skipped[name] = str(reason)
            continue
        written.append(path)
    return written, plan.skipped


# ---------------------------------------------------------------------------
# the report


def _out_of_date(run_dir: Path, name: str, trained: float) -> bool:
    """Whether figure ``name`` is missing, or older than the weights or any other file it shows."""
    path = run_dir / "images" / name
    if not path.is_file():
        return True
    inputs = [run_dir / relative for relative in FIGURES.get(name).inputs]
    drawn = path.stat().st_mtime
    return drawn < trained or any(p.is_file() and drawn < p.stat().st_mtime for p in inputs)


def write_report(run_dir: str | Path, *, iw_samples: int = IW_SAMPLES, device: str = "auto",
                 out: str | Path | None = None, echo: Callable[[str], None] | None = None,
                 explore_args: dict | None = None) -> Path:
    """Write ``RUN/report.html`` (or ``out``) and return its path.

    Runs the evaluation with ``iw_samples`` importance samples if the run has
    no ``eval.json`` of its current weights (with as many as an older one had,
    if more), and :func:`explore_run` if any figure that fits the run
    is missing from ``RUN/images/`` or older than the run's weights.
    """

    run = open_run(run_dir, device="cpu")  # a UserError if this is not a run folder
    with own_run(run.path, "aevb report"):
        return _write_report(run, iw_samples=iw_samples, device=device, out=out, echo=echo, explore_args=explore_args)


def _write_report(run: Run, *, iw_samples: int, device: str, out: str | Path | None,
                  echo: Callable[[str], None] | None, explore_args: dict | None) -> Path:
    run_dir = run.path
    echo = echo or (lambda message: None)
    provenance = run.provenance
    echo(f"model: {provenance}")
    config = loads_json((run_dir / "config.json").read_bytes())  # read by open_run already: a table of options
    metrics, current = previous_evaluation(run_dir)
    trained = trained_at(run_dir)
    if metrics is not None and not current:
        # the weights changed since: evaluate them again, with as many samples as that evaluation had
        iw_samples = max(iw_samples, metrics.get("iw_samples") or 0)
        echo("eval.json is older than the model; evaluating again")
        metrics = None
    elif metrics is not None and "step" in metrics and metrics["step"] != provenance.step:
        iw_samples = max(iw_samples, metrics.get("iw_samples") or 0)
        echo("eval.json is of the weights at another training step; evaluating again")
        metrics = None
    elif metrics is None and (run_dir / "eval.json").is_file():
        echo(f"{run_dir / 'eval.json'} is unreadable; evaluating again")
    if metrics is None:
        echo(f"evaluating with k = {iw_samples} importance samples")
        try:
            metrics = evaluate_run(run_dir, iw_samples=iw_samples, device=device, echo=echo)
        except UserError as e:
            echo(f"no evaluation in the report: {e}")

    plan = plan_figures(run.model, run_dir)
    missing = [n for n in plan.figures if _out_of_date(run_dir, n, trained)]
    skipped = plan.skipped
    if missing:
        echo(f"drawing the figures ({', '.join(missing)} missing or older than the model)")
        _, skipped = explore_run(run_dir, device=device, **(explore_args or {}))
    path = Path(out) if out else run_dir / "report.html"
    with owning_if_in_run(path, "aevb report"):  # -o into another run's folder: that one's too
        records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
        write_text(path, render_report(run_dir, config, metrics, skipped, str(provenance), facts=run_facts(run),
                                       improvement=still_improving(records)))
    return path
