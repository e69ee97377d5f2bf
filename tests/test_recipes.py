"""Recipes that work on a user's first try (issue 30).

Likelihoods that cannot score the data say so before training; the defaults
train good models, checked by short trainings: all latent units active where
the data have that many factors, and a density on dequantised pixels below
the uniform density's bits per dimension (log2 of the levels: 8 for 8-bit
images).  On the bundled 8×8 digits (17 grey levels), the MNIST split of
``../shared/data/mnist`` and a folder of 32×32 pictures of shapes made here.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import aevb
from aevb.analysis.evaluation import evaluate, evaluate_run
from aevb.config import make_config
from aevb.data.datasets import load_data
from aevb.errors import UserError
from aevb.run.data import check_likelihood_scores, load_dataset
from aevb.model.likelihoods import SCALE_FLOOR
from aevb.registry import LIKELIHOODS
from conftest import MNIST_IMAGES, MNIST_LABELS, aevb_cli, requires_mnist


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def _scores(digits, **options) -> list[str]:
    """The warnings check_likelihood_scores gives for these options on digits (raising where it refuses)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_likelihood_scores(make_config(**options), digits)
    return [str(w.message) for w in caught]


def test_a_continuous_bernoulli_on_exact_zeros_and_ones_is_refused_unless_dequantised(digits):
    """Its density is unbounded at exactly 0 and 1: raw 8-bit MNIST reached an ELBO of +3,068 nats."""
    with pytest.raises(UserError, match=r"continuous-bernoulli has no bounded density at exactly 0 or 1.*add --dequantize"):
        _scores(digits, likelihood="continuous-bernoulli")
    with pytest.raises(UserError, match=r"\(binarised\).*use --likelihood bernoulli"):
        _scores(digits, likelihood="continuous-bernoulli", binarize="dynamic")
    assert _scores(digits, likelihood="continuous-bernoulli", dequantize=True) == []


def test_a_continuous_bernoulli_on_values_inside_the_interval_is_taken(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "inside.npy", rng.uniform(0.05, 0.95, size=(40, 1, 4, 4)).astype(np.float32))
    np.save(tmp_path / "edges.npy", rng.integers(0, 2, size=(40, 1, 4, 4)).astype(np.float32) * 0.5)  # 0 and ½
    config = make_config(likelihood="continuous-bernoulli", data=str(tmp_path / "inside.npy"))
    check_likelihood_scores(config, load_dataset(config))
    config = make_config(likelihood="continuous-bernoulli", data=str(tmp_path / "edges.npy"))
    with pytest.raises(UserError, match="rescale the values strictly inside"):
        check_likelihood_scores(config, load_dataset(config))


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian-learned", "gaussian-diag", "laplace-learned"])
def test_a_density_on_quantised_values_warns_and_names_dequantize(digits, likelihood):
    messages = _scores(digits, likelihood=likelihood)
    assert len(messages) == 1
    assert f"--likelihood {likelihood} is a density, and digits holds 17-level values" in messages[0]
    assert "add --dequantize" in messages[0]
    assert _scores(digits, likelihood=likelihood, dequantize=True) == []
    assert "2-level values" in _scores(digits, likelihood=likelihood, binarize="threshold")[0]


def test_the_profile_likelihood_and_the_bernoulli_train_without_a_warning(digits):
    assert _scores(digits, likelihood="gaussian-optimal") == []  # its evaluation says it has no log p(x)
    assert _scores(digits, likelihood="bernoulli") == []
    assert _scores(digits, likelihood="bernoulli", binarize="dynamic") == []


def test_a_bernoulli_on_grey_values_is_said_to_be_a_cross_entropy(digits):
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=digits.data_shape, latent_dim=2, arch="mlp", likelihood="bernoulli", hidden=[16])
    x = digits.test[:20]
    grey = evaluate(model, x, iw_samples=2, levels=digits.levels, precision="fp32")
    assert grey["bits_per_dim"] is None
    assert "cross-entropy of each grey level" in grey["likelihood_note"]
    assert "--binarize dynamic" in grey["likelihood_note"]
    binary = evaluate(model, torch.bernoulli(x, generator=torch.Generator().manual_seed(0)), iw_samples=2,
                      levels=digits.levels, precision="fp32")
    assert binary["bits_per_dim"] is not None and binary.get("likelihood_note") is None


def test_the_refusal_comes_before_a_run_folder_is_made(tmp_path, capsys):
    run = tmp_path / "run"
    assert aevb_cli("train", "--out", run, "--likelihood", "continuous-bernoulli", "--device", "cpu", "-q") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dequantize" in err
    assert not run.exists()


# --------------------------------------------------------------------------- defaults that do not collapse


@pytest.mark.parametrize("name,most_likely", [("gaussian-learned", lambda r: r.pow(2).mean().sqrt()),
                                              ("laplace-learned", lambda r: r.abs().mean()),
                                              ("gaussian", lambda r: r.pow(2).mean().sqrt()),
                                              ("laplace", lambda r: r.abs().mean())])
def test_a_scale_from_the_data_is_the_most_likely_one(name, most_likely):
    residuals = torch.randn(500, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.2
    head = LIKELIHOODS.get(name)
    assert head.data_scale(residuals) == pytest.approx(float(most_likely(residuals)), rel=1e-6)
    assert head.data_scale(torch.zeros(10, 3)) == pytest.approx(SCALE_FLOOR)  # constant data: the floor, never σ = 0
    assert LIKELIHOODS.get("bernoulli").data_scale(residuals) is None


def _trained(run: Path, *args) -> dict:
    """Train ``aevb train ARGS`` on the CPU into run and evaluate it (k = 20): eval.json's metrics."""
    assert aevb_cli("train", "--out", run, "--device", "cpu", "-q", *args) == 0
    return evaluate_run(run, iw_samples=20, device="cpu", write=False)


def _uniform_bits(levels: int) -> float:
    return math.log2(levels)


@pytest.mark.parametrize("likelihood", ["gaussian-learned", "laplace-learned", "gaussian", "laplace"])
def test_a_scale_from_the_data_on_dequantised_digits_keeps_every_unit_and_beats_the_uniform_density(tmp_path,
                                                                                                    likelihood):
    """At σ = 1 from the start the Gaussian ended at 0 of 20 active units and 4.96 bits/dim (uniform: 4.09).

    A fixed scale is set, and a learned one started, at the one that fits the training data around their
    mean; config.json records it, so the run is re-run and resumed with it.
    """
    metrics = _trained(tmp_path / "run", "--likelihood", likelihood, "--dequantize")  # the defaults: 10 epochs
    assert metrics["active_units"] == metrics["latent_dim"] == 20
    # a learned scale goes on shrinking as the reconstructions improve; a fixed one stays at the data's spread
    assert metrics["bits_per_dim"] < _uniform_bits(17) - (0.2 if likelihood.endswith("-learned") else 0)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["likelihood_scale"]
    assert 0.05 < recorded < 0.6  # the digits' spread around their mean image, not 1
    # the scale given on the command line is where it starts, as before
    given = tmp_path / "given"
    assert aevb_cli("train", "--out", given, "--device", "cpu", "-q", "--likelihood", likelihood, "--dequantize",
                    "--likelihood-scale", 0.7, "--steps", 1, "--lr", 1e-12) == 0
    assert float(torch.as_tensor(aevb.load(given / "model").likelihood.scale)) == pytest.approx(0.7, rel=1e-6)


MNIST_SPLIT = ("--data", MNIST_IMAGES, "--labels", MNIST_LABELS, "--test-split", 2000)


@requires_mnist
@pytest.mark.parametrize("likelihood", ["gaussian-learned", "laplace-learned", "gaussian", "laplace", "gaussian-diag",
                                        "continuous-bernoulli"])
def test_every_density_on_dequantised_mnist_beats_the_uniform_density_in_three_epochs(tmp_path, likelihood):
    """The README's MNIST recipe with a density: learned σ started at 1 gave 8.4–8.6 bits/dim after 3 epochs."""
    metrics = _trained(tmp_path / "run", *MNIST_SPLIT, "--hidden", 400, "--latent-dim", 20, "--epochs", 3,
                       "--likelihood", likelihood, "--dequantize")
    assert metrics["active_units"] >= 18
    assert metrics["bits_per_dim"] < _uniform_bits(256)


def _shapes(root: Path, n: int, size: int = 32, seed: int = 0) -> Path:
    """n colour PNGs [size, size]: a disc or a square of random colour, place and size on a random background."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        r = rng.uniform(4, 10)
        cx, cy = rng.uniform(r, size - r, 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        image.save(root / f"{i:05d}.png")
    return root


def test_the_folder_recipe_on_colour_shapes_keeps_its_units_and_beats_the_uniform_density(tmp_path):
    """The README's folder recipe (issue 30): at σ = 1 from the start, 6 of 16 units and 9.2 bits/dim.

    Ten factors (two colours of three channels, place, size, kind of shape):
    every one of 16 units stays active.
    """
    folder = _shapes(tmp_path / "shapes", 2000)
    metrics = _trained(tmp_path / "run", "--data", folder, "--arch", "conv", "--likelihood", "gaussian-learned",
                       "--dequantize", "--latent-dim", 16, "--epochs", 12)
    assert metrics["active_units"] == 16
    assert metrics["bits_per_dim"] < _uniform_bits(256)


def test_the_table_recipe_finds_the_factors_of_a_table(tmp_path):
    """The README's table recipe on 10 columns made from 3 factors: 3 active units, and a likelihood far above
    that of independent standardised columns (a unit normal each: 10·½·log(2πe) = 14.2 nats)."""
    rng = np.random.default_rng(0)
    factors = rng.normal(size=(2000, 3))
    columns = np.tanh(factors) @ rng.normal(size=(3, 10)) * 2 + 5 + 0.1 * rng.normal(size=(2000, 10))
    np.savetxt(tmp_path / "measurements.csv", columns, delimiter=",", fmt="%.5f")
    metrics = _trained(tmp_path / "run", "--data", tmp_path / "measurements.csv", "--arch", "mlp", "--hidden", "64,32",
                       "--latent-dim", 3, "--likelihood", "gaussian-diag", "--test-split", 0.2)
    assert metrics["active_units"] == 3
    assert metrics["nll"] < 10 * 0.5 * math.log(2 * math.pi * math.e) - 5


# --------------------------------------------------------------------------- held-out data: best checkpoint, early stopping

QUICK_RUN = ("--latent-dim", 2, "--hidden", 16, "--device", "cpu", "-q", "--batch-size", 512)


def test_the_best_validation_epoch_is_kept_beside_the_last(tmp_path):
    from aevb.run.checkpoints import read_checkpoint
    from aevb.run.folder import BEST_CHECKPOINT, CHECKPOINT

    run = tmp_path / "run"
    assert aevb_cli("train", "--out", run, *QUICK_RUN, "--val-split", 0.1, "--epochs", 3) == 0
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_elbo" in line]
    assert len(epochs) == 3
    best_epoch = max(range(3), key=lambda i: epochs[i]["val_elbo"]) + 1
    best_state, best_meta = read_checkpoint(run / BEST_CHECKPOINT)
    _, last_meta = read_checkpoint(run / CHECKPOINT)
    assert best_meta["epoch"] == best_epoch == last_meta["best_epoch"]
    assert best_meta["best"] == pytest.approx(-epochs[best_epoch - 1]["val_elbo"])
    # without a validation split the test set chooses nothing: no best checkpoint, no early stopping
    plain = tmp_path / "plain"
    assert aevb_cli("train", "--out", plain, *QUICK_RUN, "--val-split", 0, "--epochs", 1) == 0
    assert not (plain / BEST_CHECKPOINT).exists()


def test_early_stopping_needs_a_validation_split(tmp_path, capsys):
    assert aevb_cli("train", "--out", tmp_path / "run", *QUICK_RUN, "--val-split", 0, "--early-stopping", 2) == 2
    err = capsys.readouterr().err
    assert "--early-stopping 2 watches the validation ELBO" in err and "--val-split" in err


def test_early_stopping_stops_after_patience_epochs_without_a_better_validation_elbo(tmp_path, monkeypatch):
    import aevb.training.loop

    real = aevb.training.loop.mean_elbo_terms
    calls = {"n": 0}

    def worse_after_the_second(model, x, batch_size=1000, labels=None):
        terms = real(model, x, batch_size, labels)
        calls["n"] += 1
        terms["elbo"] = {1: -101.0, 2: -100.0}.get(calls["n"], -100.0 - calls["n"])  # best at epoch 2, then worse
        return terms

    monkeypatch.setattr(aevb.training.loop, "mean_elbo_terms", worse_after_the_second)
    run = tmp_path / "run"
    assert aevb_cli("train", "--out", run, *QUICK_RUN, "--val-split", 0.1, "--epochs", 20, "--early-stopping", 3) == 0
    assert calls["n"] == 5  # epochs 3, 4 and 5 not better than epoch 2
    assert (run / "model" / "weights.safetensors").is_file()


def test_a_resumed_run_keeps_the_same_best_checkpoint_as_a_straight_one(tmp_path):
    from aevb.run.checkpoints import read_checkpoint
    from aevb.run.folder import BEST_CHECKPOINT, CHECKPOINT

    args = (*QUICK_RUN, "--val-split", 0.1, "--early-stopping", 5)
    assert aevb_cli("train", "--out", tmp_path / "straight", *args, "--epochs", 4) == 0
    assert aevb_cli("train", "--out", tmp_path / "resumed", *args, "--epochs", 2) == 0
    assert aevb_cli("train", "--resume", tmp_path / "resumed", "--epochs", 4, "-q") == 0
    for path in (BEST_CHECKPOINT, CHECKPOINT):
        (straight, straight_meta), (resumed, resumed_meta) = (read_checkpoint(tmp_path / run / path)
                                                              for run in ("straight", "resumed"))
        assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
        assert (straight_meta["best"], straight_meta["best_epoch"]) == (resumed_meta["best"], resumed_meta["best_epoch"])


# --------------------------------------------------------------------------- optimisers and learning-rate schedules


@pytest.mark.parametrize("options", [
    ("--optimizer", "adamw", "--weight-decay", 0.01, "--lr-schedule", "cosine", "--lr-warmup", 5),
    ("--optimizer", "sgd", "--lr", 0.01, "--lr-schedule", "step"),
    ("--lr-schedule", "one-cycle", "--weight-decay", 1e-4),
    ("--lr-schedule", "plateau"),
], ids=["adamw-cosine-warmup", "sgd-step", "adam-one-cycle", "adam-plateau"])
def test_an_optimiser_and_schedule_resume_bit_for_bit(tmp_path, options, monkeypatch):
    """A run stopped by Ctrl-C at step 7 (mid-epoch, after a plateau epoch end) and resumed equals one run straight."""
    import aevb.training.loop
    from aevb.run.checkpoints import read_checkpoint
    from aevb.run.folder import CHECKPOINT

    args = (*QUICK_RUN, *options, "--epochs", 4)
    assert aevb_cli("train", "--out", tmp_path / "straight", *args) == 0
    after_step = aevb.training.loop.Trainer.after_step

    def ctrl_c_at_step_7(self, stop):
        after_step(self, stop=stop or self.position.step == 7)

    with monkeypatch.context() as patch:
        patch.setattr(aevb.training.loop.Trainer, "after_step", ctrl_c_at_step_7)
        assert aevb_cli("train", "--out", tmp_path / "resumed", *args) == 130
    assert aevb_cli("train", "--resume", tmp_path / "resumed", "-q") == 0
    (straight, straight_meta), (resumed, resumed_meta) = (read_checkpoint(tmp_path / run / CHECKPOINT)
                                                          for run in ("straight", "resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight) and straight.keys() == resumed.keys()
    assert straight_meta["lr_schedule"] == resumed_meta["lr_schedule"] is not None
    assert straight_meta["param_groups"] == resumed_meta["param_groups"]
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    given = dict(zip(options[::2], options[1::2]))
    assert config["lr_schedule"] == given["--lr-schedule"]
    assert config["optimizer"] == given.get("--optimizer", "adam")


def test_the_schedules_follow_their_shapes():
    from aevb.training.lr_schedules import _factor

    cosine = _factor("cosine", warmup=10, total_steps=110)
    assert [cosine(s) for s in (0, 9)] == [1 / 11, 10 / 11]
    assert cosine(10) == 1 and cosine(60) == pytest.approx(0.5) and cosine(110) == pytest.approx(0)
    step = _factor("step", warmup=0, total_steps=100)
    assert [step(s) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert _factor("constant", warmup=4, total_steps=10)(9) == 1


def test_the_default_keeps_the_fused_adam_and_another_choice_says_it_leaves_it(tmp_path, capsys):
    from aevb.acceleration.optim import Adam
    from aevb.training.accelerations import make_optimizer

    model = aevb.VAE(data_shape=(4,), latent_dim=2, arch="mlp", likelihood="gaussian", hidden=[8])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(make_optimizer(model, make_config(weight_decay=0.1), torch.device("cpu")), Adam)
    with pytest.warns(UserWarning, match="--optimizer adamw: torch's AdamW .* not the fused Adam"):
        assert isinstance(make_optimizer(model, make_config(optimizer="adamw"), torch.device("cpu")),
                          torch.optim.AdamW)
    assert aevb_cli("train", "--out", tmp_path / "run", *QUICK_RUN, "--val-split", 0, "--lr-schedule", "plateau") == 2
    assert "plateau watches the validation ELBO" in capsys.readouterr().err
