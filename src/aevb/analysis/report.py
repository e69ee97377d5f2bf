"""A run folder's figures and its one-page report.

``explore_run(RUN)`` writes every figure of the registry
(:mod:`aevb.analysis.gallery`) that fits the run into ``RUN/images/``
(``aevb explore``); ``write_report(RUN)`` writes
``RUN/report.html`` (``aevb report``): one self-contained file with the
configuration, the evaluation, the training curves and every PNG of
``RUN/images/`` embedded as a data URI — no script, no stylesheet or image
fetched from anywhere, readable on a phone and printable.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
from pathlib import Path
from typing import Callable

import torch

from aevb.analysis.evaluation import evaluate_run, previous_evaluation, trained_at
from aevb.config import IW_SAMPLES
from aevb.analysis.gallery import ExploreOptions, FigureContext, NotDrawn, plan_figures
from aevb.errors import UserError
from aevb.io import loads_json, write_text
from aevb.registry import FIGURES
from aevb.run.folder import CHECKPOINT
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


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _format(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value)
    return str(value)


_e = html.escape

# (key of eval.json, label, unit, what it means)
EVAL_ROWS = [
    ("examples", "test examples", "", ""),
    ("neg_elbo", "negative ELBO", "nats", "−E_q[log p(x|z)] + KL, β = 1, one sample per example"),
    ("reconstruction_nll", "reconstruction term", "nats", "−E_q[log p(x|z)]"),
    ("kl", "KL(q(z|x) ‖ p(z))", "nats", "analytic"),
    ("nll", "negative log-likelihood", "nats", "importance-sampled, k samples per example"),
    ("iw_samples", "importance samples k", "", ""),
    ("iw_precision", "importance sampler's multiplies", "", "bf16: bfloat16 matrix multiplies, all else float32"),
    ("elbo_gap", "ELBO gap", "nats", "negative ELBO − negative log-likelihood"),
    ("bits_per_dim", "bits per dimension", "bits", "for discrete (8-bit or binary) data"),
    ("mse_per_dim", "reconstruction MSE per dimension", "", "at the posterior mean"),
    ("mae_per_dim", "reconstruction MAE per dimension", "", "at the posterior mean"),
    ("posterior_mu", "mean posterior μ", "", "over examples and dimensions"),
    ("posterior_sigma", "mean posterior σ", "", "over examples and dimensions"),
    ("active_units", "active units", "", "dimensions whose posterior mean varies with x (variance > 0.01)"),
    ("representation_accuracy", "classifier accuracy on posterior means", "",
     "logistic regression trained on the training split's posterior means"),
    ("representation_knn_accuracy", "5-nearest-neighbour accuracy", "", "same codes"),
    ("chance_accuracy", "chance accuracy", "", "always the most common training label"),
]

CSS = """
*{box-sizing:border-box}
html{background:#f4f5f7}
body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2430;background:#f4f5f7}
main{max-width:1000px;margin:0 auto;padding:16px}
header{padding:8px 0 4px}
h1{font-size:1.6rem;margin:0 0 .2em;overflow-wrap:anywhere}
h2{font-size:1.2rem;margin:0 0 .6em}
h3{font-size:1rem;margin:1.2em 0 .4em}
p{margin:.3em 0 .8em}
.meta{color:#566074;font-size:.95rem}
section{background:#fff;border:1px solid #dfe3e8;border-radius:8px;padding:16px 18px;margin:16px 0}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;width:100%;font-size:.92rem}
th,td{padding:4px 8px;border-bottom:1px solid #eceef1;text-align:left;vertical-align:top}
th{font-weight:600;background:#f7f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.val{text-align:right;overflow-wrap:anywhere}
td.barcell{width:30%}
.note{color:#566074;font-size:.85rem}
.columns{columns:2 300px;column-gap:24px}
.columns table{break-inside:avoid}
.warning{background:#fff4e0;border-left:4px solid #d98200;padding:8px 12px;margin:8px 0 12px}
.bar{display:inline-block;height:.7em;background:#3d72c4;vertical-align:middle;min-width:1px}
.bar.inactive{background:#b8bfca}
figure{margin:0 0 28px;break-inside:avoid}
figure:last-child{margin-bottom:0}
figure img{display:block;width:100%;height:auto;border:1px solid #eceef1;background:#fff}
img.pixel{image-rendering:pixelated}
figcaption{font-size:.9rem;color:#4a5365;margin-top:6px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:16px}
.gallery figure{margin:0}
code{font-size:.9em;background:#f0f2f5;padding:0 3px;border-radius:3px}
@media (max-width:600px){
 body{font-size:15px}
 main{padding:8px}
 section{padding:12px 10px;border-radius:6px}
 h1{font-size:1.3rem}
 th,td{padding:3px 5px}
 .note,.wide{display:none}
}
@media print{
 body{background:#fff;font-size:11pt}
 main{max-width:none;padding:0}
 section{border:none;border-radius:0;padding:0;margin:0 0 12pt}
 .scroll{overflow:visible}
 figure{page-break-inside:avoid}
 h2{page-break-after:avoid}
 img.pixel{image-rendering:auto}
}
"""


def _table(rows: list[list[str]], header: list[str] | None = None, classes: dict[int, str] | None = None) -> str:
    """An HTML table of already-escaped cells; ``classes[i]`` is the CSS class of column i.

    Classes: ``num`` (right-aligned figures), ``val`` (right-aligned text that
    may wrap), ``note`` (an explanation, hidden on a phone), ``wide`` (a
    column hidden on a phone).
    """
    classes = classes or {}

    def cls(i: int, header_cell: bool = False) -> str:
        names = classes.get(i, "").split()
        if header_cell:  # headers are styled alike, but hide with their column
            names = [n for n in names if n in ("note", "wide")]
        return f' class="{" ".join(names)}"' if names else ""

    out = ['<div class="scroll"><table>']
    if header:
        out.append("<thead><tr>" + "".join(f"<th{cls(i, True)}>{h}</th>" for i, h in enumerate(header))
                   + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td{cls(i)}>{cell}</td>" for i, cell in enumerate(row)) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _config_section(config: dict) -> str:
    items = [(k, v) for k, v in config.items() if k != "format"]
    half = math.ceil(len(items) / 2)
    tables = [_table([[f"<code>{_e(k)}</code>", _e(_format(v))] for k, v in part], classes={1: "val"})
              for part in (items[:half], items[half:])]
    return ('<section id="config"><h2>Configuration</h2>'
            '<p class="meta">From <code>config.json</code>; <code>aevb train --config RUN/config.json</code> '
            'reproduces the run.</p><div class="columns">' + "".join(tables) + "</div></section>")


def _eval_section(metrics: dict) -> str:
    parts = ['<section id="evaluation"><h2>Evaluation on the test split</h2>']
    warning = metrics.get("collapse_warning")
    if warning:
        parts.append(f'<div class="warning"><strong>Warning:</strong> {_e(warning)}</div>')
    if metrics.get("likelihood_note"):
        parts.append(f'<p class="meta">{_e(metrics["likelihood_note"])}.</p>')
    rows = []
    for key, label, unit, note in EVAL_ROWS:
        if metrics.get(key) is None:
            continue
        value = _format(metrics[key])
        if key == "active_units" and metrics.get("latent_dim") is not None:
            value += f" of {metrics['latent_dim']}"
        if key == "nll":
            label += f" (k = {metrics.get('iw_samples')})"
        rows.append([_e(label), _e(value), _e(unit), _e(note)])
    parts.append(_table(rows, ["", "value", "unit", "meaning"], classes={1: "num", 3: "note"}))
    parts.append('<p class="meta">Nats per example; the likelihood is '
                 f'<code>{_e(str(metrics.get("likelihood")))}</code>.</p>')

    kl = metrics.get("kl_per_dim")
    variance = metrics.get("posterior_mean_variance_per_dim")
    if kl:
        top = max(max(kl), 1e-12)
        rows = []
        for d, value in enumerate(kl):
            var = variance[d] if variance and d < len(variance) else None
            active = var is None or var > 0.01  # no variance (one example): not shown as inactive
            bar = (f'<span class="bar{"" if active else " inactive"}" '
                   f'style="width:{max(0.5, 100 * value / top):.1f}%"></span>')
            rows.append([f"z{d + 1}", _e(_format(value)), _e(_format(var)),
                         "—" if var is None else "yes" if active else "no", bar])
        parts.append("<h3>KL and activity per latent dimension</h3>")
        parts.append(_table(rows, ["dimension", "KL (nats)", "Var<sub>x</sub> E[z|x]", "active", "KL"],
                            classes={1: "num", 2: "num", 4: "barcell"}))

    per_class = metrics.get("per_class")
    if per_class:
        keys = [k for k in ("reconstruction_nll", "neg_elbo", "nll", "mse_per_dim") if k in per_class[0]]
        names = {"reconstruction_nll": "recon&shy;struction", "neg_elbo": "−ELBO", "nll": "NLL",
                 "mse_per_dim": "MSE per dim"}
        rows = [[_e(str(row.get("class", row["label"]))), str(row["examples"]), *(_e(_format(row[k])) for k in keys)]
                for row in per_class]
        parts.append("<h3>Per class (nats per example)</h3>")
        columns = {i: "num" for i in range(1, 2 + len(keys))}
        if "mse_per_dim" in keys:
            columns[1 + len(keys)] = "num wide"  # hidden on a phone
        parts.append(_table(rows, ["class", "examples", *(names[k] for k in keys)], classes=columns))
    parts.append("</section>")
    return "".join(parts)


QUALITY_COLUMNS = [("frechet_distance", "Fréchet distance"), ("kid", "KID"), ("precision", "precision"),
                   ("recall", "recall"), ("density", "density"), ("coverage", "coverage")]


def _quality_section(metrics: dict) -> str:
    """The sample quality of each sampler beside the floor (:mod:`aevb.analysis.quality`), or why it is absent."""
    quality = metrics.get("sample_quality")
    if not quality:
        note = metrics.get("sample_quality_note")
        return (f'<section id="quality"><h2>Sample quality</h2><p class="meta">{_e(note)}.</p></section>'
                if note else "")
    rows = ([("floor: the training split", quality["floor"])] if quality.get("floor") else []) + \
        [(f"sampler: {name}", row) for name, row in quality["samplers"].items()]
    cells = [[_e(name), *(_e(_format(row[key])) + (f" ± {_e(_format(row['kid_standard_error']))}"
                                                    if key == "kid" else "") for key, _ in QUALITY_COLUMNS)]
             for name, row in rows]
    accuracy = quality.get("classifier_accuracy")
    features = f"features of the {quality['features']}" + (
        f", whose test accuracy is {accuracy:.3f}: the features are only as good as it is" if accuracy is not None
        else "")
    return ('<section id="quality"><h2>Sample quality</h2>'
            f'<p class="meta">{quality["examples"]} samples of each sampler against {quality["examples"]} test '
            f'examples, in the {_e(features)}. Lower Fréchet distance and KID (± its standard error) are better; '
            f'precision (fidelity), recall (diversity), density and coverage ({quality["nearest_k"]}-nearest-'
            f'neighbour balls) are better higher. The floor is what a perfect model reaches with this many '
            f'samples: the training split against the test split.</p>'
            + _table(cells, ["", *(label for _, label in QUALITY_COLUMNS)],
                     classes={i: "num" for i in range(1, 1 + len(QUALITY_COLUMNS))}) + "</section>")


def _figure_html(path: Path, title: str, caption: str, pixel: bool = False) -> str:
    cls = ' class="pixel"' if pixel else ""
    text = f"<strong>{_e(title)}.</strong> {_e(caption)}" if caption else _e(title)
    return (f'<figure><img src="{_data_uri(path)}"{cls} alt="{_e(title)}" loading="lazy">'
            f"<figcaption>{text}</figcaption></figure>")


def report_images(run_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """The PNGs of ``RUN/images/`` the report embeds: (explore's figures in order, all the others)."""
    images = Path(run_dir) / "images"
    present = {p.name: p for p in sorted(images.glob("*.png"))} if images.is_dir() else {}
    known = [present[n] for n in FIGURES.names() if n in present]
    others = [p for n, p in present.items() if n not in FIGURES]
    return known, others


def render_report(run_dir: str | Path, config: dict, metrics: dict | None, skipped: dict[str, str],
                  provenance: str | None = None) -> str:
    """The HTML text of the report (one page, no script, no external resource); ``provenance`` says which weights
    (and training step) its numbers and figures are of."""
    run_dir = Path(run_dir)
    known, others = report_images(run_dir)
    entries = dict(FIGURES.items())
    title = f"aevb run {run_dir.resolve().name}"
    summary = (f"{config.get('model', '?')} · {config.get('likelihood', '?')} likelihood · {config.get('arch', '?')} "
               f"network · {config.get('latent_dim', '?')} latent dimensions · data {config.get('data', '?')}")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>",
        f'<header><h1>{_e(title)}</h1><p class="meta">{_e(summary)}</p>'
        + (f'<p class="meta">Model: {_e(provenance)}.</p>' if provenance else "") + "</header>",
    ]
    if metrics is not None:
        parts.append(_eval_section(metrics))
        parts.append(_quality_section(metrics))
    parts.append(_config_section(config))
    parts.append('<section id="figures"><h2>Figures</h2>')
    for path in known:
        entry = entries[path.name]
        parts.append(_figure_html(path, entry.title, entry.caption, pixel=entry.pixelated))
    if skipped:
        notes = "; ".join(f"{entries[n].title.lower()}: {reason}" for n, reason in skipped.items() if n in entries)
        parts.append(f'<p class="meta">Not drawn for this run — {_e(notes)}.</p>')
    parts.append("</section>")
    if others:
        parts.append('<section id="more"><h2>More pictures from the run</h2><div class="gallery">')
        for path in others:
            parts.append(_figure_html(path, f"images/{path.name}", "", pixel=True))
        parts.append("</div></section>")
    parts.append('<p class="meta">Written by <code>aevb report</code>.</p></main></body></html>')
    return "\n".join(parts) + "\n"


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
    missing = [n for n in plan.figures
               if not (run_dir / "images" / n).is_file() or (run_dir / "images" / n).stat().st_mtime < trained]
    skipped = plan.skipped
    if missing:
        echo(f"drawing the figures ({', '.join(missing)} missing or older than the model)")
        _, skipped = explore_run(run_dir, device=device, **(explore_args or {}))
    path = Path(out) if out else run_dir / "report.html"
    with owning_if_in_run(path, "aevb report"):  # -o into another run's folder: that one's too
        write_text(path, render_report(run_dir, config, metrics, skipped, str(provenance)))
    return path
