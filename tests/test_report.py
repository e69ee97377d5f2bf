"""Diagnostics and the run report: active units and KL per dimension on a model
whose collapsed dimensions are known by construction, the representation
classifier, per-class rows, and `aevb explore / interpolate / report / eval`
end to end on a tiny digits run (the report embeds every PNG of the run and
fetches nothing); the page in headless Chromium at a desktop's and a phone's width."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import aevb
import aevb.config
from aevb.cli import main
from aevb.data.datasets import load_data
from aevb.analysis.evaluation import evaluate
from aevb.analysis.posteriors import classifier_accuracy, collapse_warning
from aevb.registry import FIGURES

IMG = '<img src="data:image/png;base64,'


def run_cli(*args: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 0, f"aevb {' '.join(map(str, args))} exited with {exit_info.value.code}"


# -- diagnostics on a model built by hand -------------------------------------------


def _linear_vae(latent_dim: int, inactive: set[int], seed: int = 0):
    """A linear VAE on 8×8 images whose posterior means are constant in the ``inactive`` dimensions.

    The encoder's last layer maps x to (μ [D], log σ² [D]): rows of inactive
    dimensions have zero weights and a bias c_d, and every σ is a constant
    s_d, so KL per dimension has a closed form.
    """
    torch.manual_seed(seed)
    model = aevb.VAE(data_shape=(1, 8, 8), latent_dim=latent_dim, arch="linear", likelihood="gaussian")
    layer = model.encoder[-1]  # Linear(64 → 2D)
    c = torch.linspace(-0.5, 0.8, latent_dim)
    s = torch.linspace(0.3, 0.9, latent_dim)
    with torch.no_grad():
        layer.weight.normal_(0, 0.5)
        layer.bias.zero_()
        for d in inactive:
            layer.weight[d].zero_()
            layer.bias[d] = c[d]
        layer.weight[latent_dim:].zero_()
        layer.bias[latent_dim:] = 2 * s.log()
    return model.eval(), c, s


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def test_active_units_and_kl_per_dimension_match_the_construction(digits):
    inactive = {1, 3, 4}
    model, c, s = _linear_vae(6, inactive)
    x = digits.test
    metrics = evaluate(model, x, iw_samples=8)
    assert metrics["active_units"] == 3 and metrics["latent_dim"] == 6
    variance = metrics["posterior_mean_variance_per_dim"]
    assert all(variance[d] == pytest.approx(0, abs=1e-10) for d in inactive)
    assert all(variance[d] > 0.01 for d in set(range(6)) - inactive)
    with torch.no_grad():
        mu = model.encode(x).mean  # [N, D]
    for d in range(6):
        # KL(N(μ, s²) ‖ N(0, 1)) = ½(μ² + s² − 1) − log s, averaged over x
        expected = (0.5 * (mu[:, d] ** 2 + s[d] ** 2 - 1) - torch.log(s[d])).mean()
        assert metrics["kl_per_dim"][d] == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
        if d in inactive:
            closed = 0.5 * (c[d] ** 2 + s[d] ** 2 - 1) - math.log(s[d])
            assert metrics["kl_per_dim"][d] == pytest.approx(float(closed), rel=1e-4)
    assert metrics["kl"] == pytest.approx(sum(metrics["kl_per_dim"]), rel=1e-4)
    assert metrics["collapse_warning"] is None and not metrics["collapsed"]


def test_collapse_is_warned_about(digits):
    model, _, _ = _linear_vae(4, {0, 1, 2, 3})
    metrics = evaluate(model, digits.test, iw_samples=4)
    assert metrics["active_units"] == 0 and metrics["collapsed"]
    assert "posterior collapse" in metrics["collapse_warning"] and "none of the 4" in metrics["collapse_warning"]
    assert "only 1 of 20" in collapse_warning(1, 20) and "only 2 of 20" in collapse_warning(2, 20)
    assert collapse_warning(3, 20) is None and collapse_warning(5, 20) is None
    # a small latent space fully or half used is no collapse
    assert collapse_warning(1, 1) is None and collapse_warning(1, 2) is None and collapse_warning(9, 9) is None
    assert "none of the 2" in collapse_warning(0, 2)


def test_one_example_has_no_active_units_and_its_metrics_are_strict_json(digits):
    """The variance of posterior means over one example is undefined: no count, no collapse, no NaN."""
    model, _, _ = _linear_vae(4, set())
    metrics = evaluate(model, digits.test[:1], iw_samples=4)
    assert metrics["examples"] == 1 and math.isfinite(metrics["nll"])
    assert metrics["active_units"] is None and metrics["collapsed"] is None and metrics["collapse_warning"] is None
    assert metrics["posterior_mean_variance_per_dim"] is None
    json.dumps(metrics, allow_nan=False)


def test_classifier_accuracy_is_high_for_codes_of_the_label_and_chance_for_noise():
    generator = torch.Generator().manual_seed(0)
    y_train = torch.randint(0, 10, (2000,), generator=generator)
    y_test = torch.randint(0, 10, (1000,), generator=generator)

    def codes(y):  # the label written into the code, plus noise
        return 3 * torch.nn.functional.one_hot(y, 10).float() + 0.3 * torch.randn(len(y), 10, generator=generator)

    good = classifier_accuracy(codes(y_train), y_train, codes(y_test), y_test)
    assert good["logistic"] > 0.97 and good["knn"] > 0.97
    noise = classifier_accuracy(torch.randn(2000, 10, generator=generator), y_train,
                                torch.randn(1000, 10, generator=generator), y_test)
    assert abs(noise["logistic"] - 0.1) < 0.05 and abs(noise["knn"] - 0.1) < 0.05
    assert 0.05 < noise["chance"] < 0.15


def test_evaluate_with_labels_gives_per_class_rows_and_representation_accuracy(digits):
    model, _, _ = _linear_vae(4, set())
    x, y = digits.test, digits.test_labels
    metrics = evaluate(model, x, iw_samples=4, labels=y, train_x=digits.train, train_labels=digits.train_labels,
                       classes=digits.classes)
    rows = metrics["per_class"]
    assert [r["label"] for r in rows] == list(range(10))
    assert sum(r["examples"] for r in rows) == len(x)
    for key in ("reconstruction_nll", "neg_elbo", "nll"):
        overall = metrics[key] if key != "neg_elbo" else metrics["neg_elbo"]
        weighted = sum(r[key] * r["examples"] for r in rows) / len(x)
        assert weighted == pytest.approx(overall, rel=1e-9)
    # random linear codes of digits still carry the class well above chance
    assert metrics["representation_accuracy"] > metrics["chance_accuracy"] + 0.2
    assert metrics["representation_train_examples"] == len(digits.train)


# -- the commands, end to end ---------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    run_cli("train", "--epochs", "1", "--latent-dim", "2", "--hidden", "32", "-q", "--out", out)
    return out


def _embedded_pngs(text: str) -> list[bytes]:
    found = re.findall(r'<img[^>]* src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    return [base64.b64decode(b, validate=True) for b in found]


def test_report_explore_interpolate_and_eval_end_to_end(run, capsys):
    # a fresh run: the report evaluates it and draws the missing figures itself
    assert not (run / "eval.json").exists()
    run_cli("report", run, "-k", "20")
    report = run / "report.html"
    assert report.is_file() and (run / "eval.json").is_file()
    for name in ("training-curves.png", "reconstructions.png", "prior-samples.png", "interpolations.png",
                 "latent-scatter.png", "latent-grid.png", "latent-traversal.png"):
        assert (run / "images" / name).is_file(), name
    assert not (run / "images" / "likelihood-choice.png").exists()  # Bernoulli: not drawn

    capsys.readouterr()
    run_cli("explore", run, "--directions", "pca", "--grid-range", "3", "-n", "6", "--pairs", "2", "--top-dims", "2")
    printed = capsys.readouterr().out
    assert "skipped likelihood-choice.png" in printed
    assert printed.count("written: ") == 7
    run_cli("interpolate", run, "--pairs", "3", "--steps", "5", "-o", run / "images" / "interp-extra.png")
    assert (run / "images" / "interp-extra.png").is_file()
    run_cli("report", run)

    text = report.read_text(encoding="utf-8")
    # every picture of the run but samples.png, whose draws the prior samples figure shows again (the class samples
    # are drawn for conditional runs, the samples of fitted samplers only for a run that fitted them)
    every = sorted((run / "images").glob("*.png"))
    pngs = [p for p in every if p.name != "samples.png"]
    never_drawn = [name for name in FIGURES.names() if name.startswith("samples-") or name == "class-samples.png"]
    assert text.count(IMG) == len(pngs) == len(every) - 1 and len(every) > len(FIGURES.names()) - 1 - len(never_drawn)
    assert "not shown: images/samples.png</td><td class=\"val\">the same as images/prior-samples.png" in text
    for data, path in zip(sorted(_embedded_pngs(text)), sorted(p.read_bytes() for p in pngs)):
        assert data == path
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    # pictures captioned by what they are, not by file name; the one of no known kind by its name
    assert "<figcaption>After epoch 1</figcaption>" in text and "reconstructions-epoch" not in text
    assert "<figcaption>images/interp-extra.png</figcaption>" in text
    assert not re.search(r"https?://", text) and "<script" not in text.lower() and "<link" not in text.lower()
    assert '<meta name="viewport"' in text and "@media print" in text and "max-width" in text
    metrics = json.loads((run / "eval.json").read_text())
    assert f"{metrics['neg_elbo']:.4g}" in text and "Per class (nats" in text and "<code>latent_dim</code>" in text
    _check_headline(text, run, metrics)

    capsys.readouterr()
    run_cli("eval", run, "-k", "30")
    printed = capsys.readouterr().out
    assert "classifier accuracy on posterior means" in printed and "per class (nats)" in printed
    metrics = json.loads((run / "eval.json").read_text())
    assert len(metrics["per_class"]) == 10 and 0 <= metrics["representation_accuracy"] <= 1
    assert metrics["iw_samples"] == 30
    # issue 30: a less precise evaluation of the same weights (the report's k = 20 above, or k = 10) is shown,
    # and eval.json keeps the more precise one
    run_cli("eval", run, "-k", "10")
    printed = capsys.readouterr().out
    assert "k=10" in printed and "more precise than k = 10" in printed
    assert json.loads((run / "eval.json").read_text()) == metrics
    run_cli("report", run, "-k", "5")
    assert json.loads((run / "eval.json").read_text()) == metrics
    # weights newer than eval.json (a resumed run): the report evaluates them again with the k it had
    os.utime(run / "eval.json", (0, 0))
    run_cli("report", run, "-k", "5")
    assert json.loads((run / "eval.json").read_text())["iw_samples"] == 30


def _check_headline(text: str, run: Path, metrics: dict) -> None:
    """The report's first lines: what was trained on what, for how long, where; the number that matters."""
    model = aevb.load(run / "model")
    header = text[text.index("<header>"):text.index("</header>")]
    parameters = sum(p.numel() for p in model.parameters())
    assert (f">VAE (likelihood bernoulli, network mlp, 2 latent dimensions, {parameters:,} parameters) trained on "
            f"digits (1,437 training examples of 1×8×8) for 1 epoch (12 steps) on cpu.") in header
    assert f'<span class="number">{metrics["nll"]:,.4g}</span>' in header and "test negative log-likelihood" in header
    assert f"k = {metrics['iw_samples']} samples" in header and "Lower is better" in header
    assert f"torch {torch.__version__}" in header and re.search(r"trained 20\d\d-\d\d-\d\d \d\d:\d\d UTC", header)
    # the options chosen, the full list folded away; the multiplies' precision among the technical details
    config = text[text.index('id="config"'):]
    chosen = config[:config.index("<details>")]
    assert all(f"<code>{k}</code>" in chosen for k in ("latent_dim", "hidden", "epochs"))
    assert "<code>lr</code>" not in chosen and "<code>out</code>" not in chosen
    assert "<summary>All " in config and "<code>lr</code>" in config
    details = text[text.index('id="details"'):]
    assert "importance sampler's multiplies" in details and "multiplies" not in text[:text.index('id="details"')]
    assert 'id="still-improving"' not in text  # one epoch: nothing to compare


def test_still_improving_is_a_validation_loss_falling_at_each_of_the_last_epochs():
    from aevb.analysis.summary import still_improving

    def records(losses, split="val", key="elbo"):
        return [{"step": 10 * (e + 1), "epoch": e + 1, f"{split}_{key}": -v if key == "elbo" else v}
                for e, v in enumerate(losses)] + [{"step": 5, "epoch": 0.5, "loss": 1.0}]

    falling = still_improving(records([90.0, 80.0, 75.0, 72.0, 71.0]))
    assert falling.split == "val" and falling.epochs == [2, 3, 4, 5] and falling.losses == [80.0, 75.0, 72.0, 71.0]
    assert falling.drop == pytest.approx(9.0) and falling.measure == "−ELBO"
    assert still_improving(records([90.0, 80.0])).epochs == [1, 2]  # two epochs: the one fall there is
    assert still_improving(records([90.0, 80.0, 70.0, 71.0])) is None  # rose at the end: it had stopped
    assert still_improving(records([90.0, 70.0, 72.0, 71.0, 70.5])) is None  # a rise among the last three
    assert still_improving(records([50.0, 49.999, 49.998, 49.997])) is None  # falling by less than 0.1%: flat
    assert still_improving(records([90.0])) is None and still_improving([]) is None
    # no validation split: the test split's; an autoencoder: its reconstruction term
    assert still_improving(records([5.0, 4.0, 3.0], split="test")).split == "test"
    assert still_improving(records([5.0, 4.0], key="reconstruction")).measure == "reconstruction term"
    # a resumed run that logged an epoch again: the later record counts
    again = records([90.0, 80.0, 75.0]) + [{"step": 30, "epoch": 3, "val_elbo": -85.0}]
    assert still_improving(again) is None


def test_the_report_says_when_the_run_was_still_improving(tmp_path):
    from aevb.analysis.page import render_report
    from aevb.analysis.summary import Improvement

    config = aevb.config.make_config(latent_dim=3).to_dict()
    note = Improvement("val", [2, 3, 4], [80.0, 75.0, 72.0])
    text = render_report(tmp_path, config, None, {}, improvement=note)
    assert ('<strong>Still improving when it stopped.</strong> The validation −ELBO fell at every epoch end from '
            'epoch 2 to 4 (80 → 75 → 72 nats, 8 nats in all)') in text
    assert 'id="still-improving"' not in render_report(tmp_path, config, None, {})


def test_headline_number_is_the_nll_else_the_elbo_else_the_reconstruction():
    from aevb.analysis.summary import headline_number

    assert headline_number({"nll": 80.0, "neg_elbo": 85.0, "iw_samples": 50}).key == "nll"
    assert "k = 50" in headline_number({"nll": 80.0, "neg_elbo": 85.0, "iw_samples": 50}).meaning
    assert headline_number({"nll": None, "neg_elbo": 85.0}).key == "neg_elbo"
    assert "upper bound" in headline_number({"nll": None, "neg_elbo": 85.0}).meaning
    assert headline_number({"reconstruction_nll": 12.0}).label == "test reconstruction term"
    assert headline_number({"nll": float("nan"), "neg_elbo": float("inf")}) is None


def test_changed_options_are_those_away_from_their_defaults():
    from aevb.analysis.summary import changed_options

    assert changed_options(aevb.config.make_config().to_dict()) == {}
    config = aevb.config.make_config(latent_dim=3, hidden="64,32", adam_betas="0.9,0.999", seed=1, out="x").to_dict()
    assert list(changed_options(config).items()) == [("latent_dim", 3), ("hidden", [64, 32]), ("seed", 1)]
    assert changed_options({**config, "from_a_newer_aevb": 1})["from_a_newer_aevb"] == 1


def test_explore_skips_image_figures_for_tabular_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(200, 2)) @ rng.normal(size=(2, 5))  # rank-2 rows of 5 numbers
    np.savetxt(tmp_path / "table.csv", table, delimiter=",")
    out = tmp_path / "run"
    run_cli("train", "--data", tmp_path / "table.csv", "--likelihood", "gaussian", "--latent-dim", "2",
            "--hidden", "16", "--epochs", "1", "-q", "--out", out)
    capsys.readouterr()
    run_cli("explore", out)
    printed = capsys.readouterr().out
    assert "skipped latent-grid.png: the data are rows of 5 numbers, not images" in printed
    written = sorted(p.name for p in (out / "images").glob("*.png"))
    assert written == ["latent-scatter.png", "likelihood-choice.png", "training-curves.png"]
    run_cli("report", out, "-k", "5")
    assert (out / "report.html").read_text().count(IMG) == 3


def test_a_figure_registered_at_run_time_is_drawn_and_reported(tmp_path, request):
    from aevb.analysis.grids import save_grid
    from aevb.analysis.gallery import IMAGES, Need, figure
    from aevb.analysis.report import explore_run, write_report

    for name in ("mean-image.png", "never.png"):  # this test's entries go with it
        request.addfinalizer(lambda name=name: FIGURES.unregister(name))
    drawn = []

    @FIGURES.register("mean-image.png")
    @figure("Mean test image", "The average of the held-out images.", needs=(IMAGES,))
    def _mean_image(context, path):
        drawn.append(tuple(context.x.shape))
        save_grid(context.x.mean(0, keepdim=True), path)

    @FIGURES.register("never.png")
    @figure("Never drawn", "Needs what no run has.", needs=(Need(lambda model, run_dir: "no run has it"),))
    def _never(context, path):
        raise AssertionError("a figure whose need is missing is not drawn")

    run = tmp_path / "run"
    run_cli("train", "--epochs", "1", "--latent-dim", "2", "--hidden", "16", "-q", "--out", run)
    written, skipped = explore_run(run, device="cpu")
    assert written[-1] == run / "images" / "mean-image.png" and drawn == [(180, 1, 8, 8)]
    assert skipped["never.png"] == "no run has it"
    text = write_report(run, iw_samples=5, device="cpu").read_text(encoding="utf-8")
    # among the figures (not the training's other pictures), after the built-in ones, with its caption
    assert "<strong>Mean test image.</strong> The average of the held-out images." in text
    assert text.index("Latent traversals") < text.index("Mean test image") < text.index('id="training-pictures"')
    assert "never drawn: no run has it" in text  # the missing one says why
    assert text.count(IMG) == len([p for p in (run / "images").glob("*.png") if p.name != "samples.png"])


@pytest.mark.parametrize("width", [1280, 390])  # a desktop, and a phone in portrait
def test_report_renders_in_headless_chromium(run, tmp_path, chromium, width):
    """Every picture loads, nothing is wider than the window, and the folded sections unfold."""
    if not (run / "report.html").exists():
        run_cli("report", run, "-k", "5")
    page = chromium.new_page(viewport={"width": width, "height": 900})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    try:
        page.goto((run / "report.html").resolve().as_uri())
        page.wait_for_load_state("load")
        for summary in page.locator("summary").all():  # the folded sections count too
            summary.click()
        images = page.evaluate("""[...document.images].map(i => ({alt: i.alt, complete: i.complete,
                                                                  natural: i.naturalWidth, shown: i.clientWidth}))""")
        assert len(images) == page.content().count(IMG) > 5
        assert all(i["complete"] and i["natural"] > 0 and i["shown"] > 0 for i in images), images
        widths = page.evaluate("[document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth]")
        assert max(widths[:2]) <= widths[2] == width, f"horizontal overflow at {width} px: {widths}"
        assert page.locator("#headline").is_visible() and page.locator("#config details table").first.is_visible()
        page.screenshot(path=str(tmp_path / f"report-{width}.png"), full_page=True)
    finally:
        page.close()
    with Image.open(tmp_path / f"report-{width}.png") as image:
        assert image.size[0] == width
        assert np.unique(np.asarray(image.convert("L").resize((64, 64)))).size > 8  # a page drawn, not blank
    assert not errors and all(url.startswith(("file:", "data:")) for url in requests), (errors, requests)
