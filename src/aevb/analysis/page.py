"""The report's HTML: one self-contained page of a run's result, evaluation, figures and configuration.

The page opens with the headline a first reader needs (what was trained on
what, for how long, where, and the one number that matters, with its
meaning; :mod:`aevb.analysis.summary`), a note where the run was still
improving when it stopped, then the evaluation, the figures, the pictures
taken during training (labelled with their epoch), the options set away
from their defaults (all of them folded away) and, folded away too, the
technical details (the multiplies' precision); the weights' training step stays in view.

:func:`render_report` writes the text that :func:`aevb.analysis.report.write_report`
saves as ``RUN/report.html``: every PNG embedded as a data URI, no script,
no stylesheet or image fetched from anywhere, readable on a phone and
printable.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
import math
from dataclasses import dataclass
from pathlib import Path

from aevb.analysis.gallery import TRAINING_SERIES, describe_picture
from aevb.analysis.summary import Headline, Improvement, RunFacts, changed_options, headline_number
from aevb.registry import FIGURES


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
    ("elbo_gap", "ELBO gap", "nats", "negative ELBO − negative log-likelihood"),
    ("bits_per_dim", "bits per dimension", "bits", "for discrete (8-bit or binary) data"),
    ("mse_per_dim", "reconstruction MSE per dimension", "", "at the posterior mean"),
    ("mae_per_dim", "reconstruction MAE per dimension", "", "at the posterior mean"),
    ("posterior_mu", "mean posterior μ", "", "over examples and dimensions"),
    ("posterior_sigma", "mean posterior σ", "", "over examples and dimensions"),
    ("active_units", "active units", "", "dimensions whose posterior mean varies with x (variance > 0.01)"),
    ("mutual_information", "mutual information I(x; z)", "nats",
     "under the aggregate posterior (He et al. 2019): at most log N for N examples"),
    ("aggregate_kl", "KL(q(z) ‖ p(z)), aggregate posterior", "nats",
     "how far the codes the decoder was trained on are from the prior it samples"),
    ("total_correlation", "total correlation of q(z)", "nats",
     "KL(q(z) ‖ Π_d q(z_d)): how far the codes' dimensions are from independent (β-TCVAE and FactorVAE lower it)"),
    ("aggregate_posterior_examples", "examples of the aggregate posterior", "", "the first N test examples"),
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
.lead{font-size:1.05rem;margin:.2em 0 .6em;overflow-wrap:anywhere}
.headline{display:flex;flex-wrap:wrap;align-items:baseline;gap:4px 14px;background:#fff;border:1px solid #dfe3e8;
 border-left:5px solid #3d72c4;border-radius:8px;padding:12px 16px;margin:12px 0}
.headline .number{font-size:2rem;font-weight:650;font-variant-numeric:tabular-nums}
.headline .label{font-weight:600}
.headline p{flex-basis:100%;margin:0;color:#4a5365;font-size:.92rem}
.improving{background:#e8f4ea;border-left:4px solid #2f8a46;padding:8px 12px;margin:8px 0 12px}
details{margin:.6em 0}
summary{cursor:pointer;color:#3d5f99;font-weight:600}
.series{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,420px),1fr));gap:12px}
.series figure{margin:0}
@media (max-width:600px){
 body{font-size:15px}
 main{padding:8px}
 section{padding:12px 10px;border-radius:6px}
 h1{font-size:1.3rem}
 th,td{padding:3px 5px}
 .note,.wide{display:none}
 .headline .number{font-size:1.6rem}
}
@media print{
 body{background:#fff;font-size:11pt}
 details{display:block}
 details>*{display:block}
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


def _options_table(items: list[tuple[str, object]]) -> str:
    return _table([[f"<code>{_e(k)}</code>", _e(_format(v))] for k, v in items], classes={1: "val"})


def _config_section(config: dict) -> str:
    """The options set away from their defaults, then all of them folded away."""
    changed = changed_options(config)
    items = [(k, v) for k, v in config.items() if k != "format"]
    half = math.ceil(len(items) / 2)
    every = "".join(_options_table(part) for part in (items[:half], items[half:]))
    if changed:
        chosen = (f'<p class="meta">The options set away from their defaults ({len(changed)} of {len(items)}):</p>'
                  + _options_table(list(changed.items())))
    else:
        chosen = '<p class="meta">Every option at its default.</p>'
    return ('<section id="config"><h2>Configuration</h2>' + chosen
            + f'<details><summary>All {len(items)} options</summary><p class="meta">From <code>config.json</code>; '
            '<code>aevb train --config RUN/config.json</code> reproduces the run.</p>'
            f'<div class="columns">{every}</div></details></section>')


def _eval_section(metrics: dict) -> str:
    parts = ['<section id="evaluation"><h2>Evaluation on the test split</h2>']
    warning = metrics.get("collapse_warning")
    if warning:
        parts.append(f'<div class="warning"><strong>Warning:</strong> {_e(warning)}</div>')
    if metrics.get("likelihood_note"):
        parts.append(f'<p class="meta">{_e(metrics["likelihood_note"])}.</p>')
    if metrics.get("conditional_note"):  # a conditional model's numbers are of x given its label
        parts.append(f'<p class="meta"><strong>Conditional model</strong> ({_e(str(metrics.get("n_classes")))} classes): '
                     f'{_e(metrics["conditional_note"])}.</p>')
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


def _figure_html(path: Path, title: str, caption: str, pixel: bool = False) -> str:
    cls = ' class="pixel"' if pixel else ""
    text = f"<strong>{_e(title)}.</strong> {_e(caption)}" if caption else _e(title)
    return (f'<figure><img src="{_data_uri(path)}"{cls} alt="{_e(title)}">'
            f"<figcaption>{text}</figcaption></figure>")


@dataclass
class Pictures:
    """The PNGs of ``RUN/images/`` as the report shows them."""

    figures: list[Path]  # the registry's figures, in its order
    series: list[tuple[Path, str]]  # the reconstructions during training, in order, with their captions
    others: list[tuple[Path, str]]  # any other picture, with a caption (its file name where it is of no known kind)
    repeated: dict[str, str]  # left out: file name → the picture on the page that shows the same


def report_images(run_dir: str | Path) -> Pictures:
    """The PNGs of ``RUN/images/`` the report embeds, and those it leaves out as repeats of one it shows.

    A picture repeats another where a known kind says so (``samples.png``: the
    prior samples figure shows the same draws) or where its bytes are another's.
    """
    images = Path(run_dir) / "images"
    present = {p.name: p for p in sorted(images.glob("*.png"))} if images.is_dir() else {}
    figures = [present[n] for n in FIGURES.names() if n in present]
    shown = {hashlib.sha256(p.read_bytes()).hexdigest(): p.name for p in figures}
    series, others, repeated = [], [], {}
    ordered = []
    for name, path in present.items():
        if name in FIGURES:
            continue
        kind = describe_picture(name)
        if kind is not None and kind[0].shown_by in present:
            repeated[name] = kind[0].shown_by
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in shown:
            repeated[name] = shown[digest]
            continue
        shown[digest] = name
        ordered.append((path, kind))
    for path, kind in ordered:
        if kind is None:
            others.append((path, f"images/{path.name}"))
        elif kind[0].series == TRAINING_SERIES:
            series.append((kind[0].order(kind[1]), path, kind[0].caption(kind[1])))
        else:
            others.append((path, kind[0].caption(kind[1])))
    series.sort(key=lambda entry: entry[0])
    return Pictures(figures, [(path, caption) for _, path, caption in series], others, repeated)


def _number(value: float) -> str:
    return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def _facts_sentence(facts: RunFacts) -> str:
    """What was trained on what, for how long and where, in one sentence of plain text."""
    shape = "×".join(map(str, facts.data_shape))
    data = f"{facts.data} ({f'{facts.examples:,} training examples of ' if facts.examples else ''}{shape})"
    length = ""
    if facts.epochs is not None and facts.steps is not None:
        epochs = f"{facts.epochs:.3g}" if facts.epochs != int(facts.epochs) else f"{int(facts.epochs)}"
        length = f" for {epochs} epoch{'' if facts.epochs == 1 else 's'} ({facts.steps:,} steps)"
    where = ""
    if facts.device:
        where = f" on {facts.device}" + (f" ({facts.workers} processes)" if facts.workers > 1 else "")
    state = "" if facts.finished else " It has not finished training: these are its last checkpoint's weights."
    return (f"{facts.model.upper()} (likelihood {facts.likelihood}, network {facts.arch}, {facts.latent_dim} latent "
            f"dimension{'' if facts.latent_dim == 1 else 's'}, {facts.parameters:,} parameters) trained on "
            f"{data}{length}{where}.{state}")


def _headline_html(headline: Headline | None) -> str:
    if headline is None:
        return ('<div class="headline" id="headline"><span class="label">No evaluation</span><p>The run could not be '
                'evaluated (aevb report said why; a run without a test split has nothing to evaluate on: train '
                'with --test-split).</p></div>')
    return (f'<div class="headline" id="headline"><span class="number">{_e(_number(headline.value))}</span>'
            f'<span>nats per example</span><span class="label">{_e(headline.label)}</span>'
            f"<p>{_e(headline.meaning)}.</p></div>")


SPLIT_NAMES = {"val": "validation", "test": "test"}


def _improving_html(improvement: Improvement, run_dir: Path) -> str:
    losses = " → ".join(f"{loss:.4g}" for loss in improvement.losses)
    epochs = f"{improvement.epochs[0]} to {improvement.epochs[-1]}"
    return (f'<div class="improving" id="still-improving"><strong>Still improving when it stopped.</strong> '
            f"The {SPLIT_NAMES.get(improvement.split, improvement.split)} {improvement.measure} fell at every epoch end from epoch {epochs} ({_e(losses)} nats, "
            f"{improvement.drop:.3g} nats in all): a longer run would likely fit better, "
            f"<code>aevb train --resume {_e(str(run_dir))} --epochs N</code> continues it.</div>")


def _details_section(facts: RunFacts | None, metrics: dict | None, repeated: dict[str, str]) -> str:
    """What an expert may want and a first reader need not: the precision of the multiplies, versions, repeats."""
    rows = []
    if facts is not None:
        if facts.multiplies:
            rows.append(["training step's multiplies", _e(_multiplies(facts.multiplies))])
        if facts.workers > 1:
            rows.append(["processes (torchrun)", str(facts.workers)])
    if metrics is not None and metrics.get("iw_precision"):
        rows.append(["importance sampler's multiplies", _e(_multiplies(metrics["iw_precision"]))])
    for name, shown_by in repeated.items():
        rows.append([f"not shown: images/{_e(name)}", f"the same as images/{_e(shown_by)}"])
    if not rows:
        return ""
    return ('<section id="details"><details><summary>Technical details</summary>'
            + _table(rows, classes={1: "val"}) + "</details></section>")


def _multiplies(value: str) -> str:
    return {"bf16": "bf16: bfloat16 matrix multiplies (8 bits of mantissa), everything else float32",
            "fp32": "fp32: float32 throughout"}.get(value, value)


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


def render_report(run_dir: str | Path, config: dict, metrics: dict | None, skipped: dict[str, str],
                  provenance: str | None = None, facts: RunFacts | None = None,
                  improvement: Improvement | None = None) -> str:
    """The HTML text of the report (one page, no script, no external resource).

    ``provenance`` says which weights (and training step) its numbers and
    figures are of; ``facts`` are the headline's (:func:`aevb.analysis.summary.run_facts`);
    ``improvement``: the run was still improving when it stopped
    (:func:`aevb.analysis.summary.still_improving`).
    """
    run_dir = Path(run_dir)
    pictures = report_images(run_dir)
    entries = dict(FIGURES.items())
    title = f"aevb run {run_dir.resolve().name}"
    if facts is not None:
        lead = _facts_sentence(facts)
    else:
        lead = (f"{config.get('model', '?')} · {config.get('likelihood', '?')} likelihood · {config.get('arch', '?')} "
                f"network · {config.get('latent_dim', '?')} latent dimensions · data {config.get('data', '?')}")
    now = datetime.datetime.now(datetime.timezone.utc)
    versions = f" with {' and '.join(f'{k} {v}' for k, v in facts.versions.items())}" if facts else ""
    when = [f"trained {facts.trained:%Y-%m-%d %H:%M} UTC" if facts and facts.trained else None,
            f"report written {now:%Y-%m-%d %H:%M} UTC{versions}"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>",
        f'<header><h1>{_e(title)}</h1><p class="lead">{_e(lead)}</p>',
        _headline_html(headline_number(metrics) if metrics is not None else None),
        f'<p class="meta">{_e(" · ".join(w for w in when if w))}</p>'
        + (f'<p class="meta">Model: {_e(provenance)}.</p>' if provenance else "") + "</header>",
    ]
    if improvement is not None:
        parts.append(_improving_html(improvement, run_dir))
    if metrics is not None:
        parts.append(_eval_section(metrics))
        parts.append(_quality_section(metrics))
    parts.append('<section id="figures"><h2>Figures</h2>')
    for path in pictures.figures:
        entry = entries[path.name]
        parts.append(_figure_html(path, entry.title, entry.caption, pixel=entry.pixelated))
    if skipped:
        notes = "; ".join(f"{entries[n].title.lower()}: {reason}" for n, reason in skipped.items() if n in entries)
        parts.append(f'<p class="meta">Not drawn for this run — {_e(notes)}.</p>')
    parts.append("</section>")
    if pictures.series:
        parts.append(f'<section id="training-pictures"><h2>{_e(TRAINING_SERIES)}</h2>'
                     '<p class="meta">Held-out images of the validation split (top rows) above their reconstructions '
                     '(bottom rows), as training went on.</p><div class="series">')
        parts.extend(_figure_html(path, caption, "", pixel=True) for path, caption in pictures.series)
        parts.append("</div></section>")
    if pictures.others:
        parts.append('<section id="more"><h2>More pictures from the run</h2><div class="gallery">')
        parts.extend(_figure_html(path, caption, "", pixel=True) for path, caption in pictures.others)
        parts.append("</div></section>")
    parts.append(_config_section(config))
    parts.append(_details_section(facts, metrics, pictures.repeated))
    parts.append('<p class="meta">Written by <code>aevb report</code>.</p></main></body></html>')
    return "\n".join(parts) + "\n"
