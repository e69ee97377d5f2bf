"""Conditional models (issue 33, item 2): the label enters encoder and decoder, the prior stays p(z).

The loss is its definition on a small case; a conditional VAE explains the digits better than the
unconditional one at the same settings (it is given the class) and its samples of a class are that
class; a saved model comes back equal; the command line end to end; and bad input is refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

import aevb
from aevb.data.datasets import load_data
from aevb.errors import UserError
from aevb.model.base import build_model
from conftest import aevb_cli

pytestmark = pytest.mark.usefixtures("one_thread")

# 10 epochs of the digits (120 steps, seconds): at 3 the ELBO is already better, the samples still near the mean image
SMALL = ("--latent-dim", "2", "--hidden", "64", "--device", "cpu", "-q", "--epochs", "10", "--seed", "0")


def _one_hot(y: torch.Tensor, k: int) -> torch.Tensor:
    return torch.eye(k, dtype=torch.float64)[y]  # [B, K]


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_the_loss_is_minus_log_p_x_given_z_y_plus_the_kl_of_q_z_given_x_y_to_p_z(arch):
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(1, 8, 8), latent_dim=3, arch=arch, n_classes=4).double()
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64).bernoulli()
    y = torch.tensor([0, 3, 1, 2, 3])
    torch.manual_seed(1)
    out = model.loss(x, label=y)

    # the definition, written out: the encoder sees x with K constant label channels (of unit norm: 1/8 on an 8×8
    # plane), the decoder [z, one-hot y]
    channels = _one_hot(y, 4)[:, :, None, None].expand(5, 4, 8, 8) / 8
    params = model.encoder(torch.cat([x, channels], dim=1))  # [B, 2D]: μ, log σ²
    mu, log_var = params[:, :3], params[:, 3:]
    posterior = Independent(Normal(mu, (0.5 * log_var).exp()), 1)
    torch.manual_seed(1)
    z = posterior.rsample()  # the same noise as the model drew
    logits = model.decoder(torch.cat([z, _one_hot(y, 4)], dim=1))
    log_px = Independent(Bernoulli(logits=logits), 3).log_prob(x)  # [B]
    prior = Independent(Normal(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)), 1)
    kl = kl_divergence(posterior, prior)  # [B]
    torch.testing.assert_close(out.reconstruction, -log_px.mean())
    torch.testing.assert_close(out.kl, kl.mean())
    torch.testing.assert_close(out.loss, (-log_px + kl).mean())
    # and the analytic KL is the closed form of a diagonal Gaussian against N(0, I)
    closed = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(1)
    torch.testing.assert_close(kl, closed)


def test_the_label_changes_what_the_model_encodes_and_decodes_and_nothing_else_does():
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(6,), latent_dim=2, likelihood="gaussian", n_classes=3).eval()
    x, z = torch.randn(4, 6), torch.randn(4, 2)
    same = torch.tensor([1, 1, 1, 1])
    assert not torch.allclose(model.decode(z, same).mean, model.decode(z, same + 1).mean)
    assert not torch.allclose(model.encode(x, same).mean, model.encode(x, same + 1).mean)
    # one int is that label for every example; [S, B, D] codes take each example's label for every sample
    torch.testing.assert_close(model.decode(z, 1).mean, model.decode(z, same).mean)
    stacked = model.decode(torch.stack([z, z]), torch.tensor([0, 1, 2, 0])).mean  # [2, 4, 6]
    torch.testing.assert_close(stacked[1], model.decode(z, torch.tensor([0, 1, 2, 0])).mean)
    # sample(label=k) decodes p(x|z, y = k) at the prior draws sample() makes
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    z_drawn = model.sample_layers(4, g())[0]
    torch.testing.assert_close(model.sample(4, g(), label=2), model.decode(z_drawn, 2).mean)


@pytest.mark.parametrize("name, extra", [("iwae", {"k": 3}), ("hvae", {"stochastic_layers": 2})])
def test_the_importance_sampled_log_p_x_given_y_bounds_the_elbo_from_above_on_average(name, extra):
    """IWAE and the hierarchical VAE compose too: the label enters the encoder's bottom-up pass and the decoder."""
    torch.manual_seed(0)
    model = build_model(name, data_shape=(5,), latent_dim=2, likelihood="gaussian", n_classes=2, **extra).double()
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.arange(64) % 2
    elbo = model.elbo(x, n_samples=200, label=y).mean()
    log_px = model.log_likelihood(x, n_samples=200, label=y).mean()
    assert log_px > elbo
    assert torch.isfinite(model.loss(x, label=y).loss)
    # and the label is what they are conditioned on: another label gives another bound
    assert not torch.allclose(model.elbo(x, n_samples=200, label=1 - y).mean(), elbo, atol=1e-3)


@pytest.mark.parametrize("name, extra", [("vae", {}), ("iwae", {"k": 2}), ("hvae", {"stochastic_layers": 2})])
def test_a_saved_conditional_model_loads_equal_and_knows_its_classes(tmp_path, name, extra):
    torch.manual_seed(0)
    model = build_model(name, data_shape=(1, 8, 8), latent_dim=3, hidden=[16], n_classes=10, **extra).eval()
    model.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["args"]["n_classes"] == 10
    loaded = aevb.load(tmp_path / "m")
    assert loaded.n_classes == 10 and loaded.conditional
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    torch.testing.assert_close(loaded.reconstruct(x, y), model.reconstruct(x, y))
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_an_unconditional_models_config_and_weights_are_as_before(tmp_path):
    model = aevb.VAE(data_shape=(1, 8, 8), latent_dim=3)
    assert "n_classes" not in model.config and not model.conditional
    assert model.encoder[1].in_features == 64 and model.decoder[0].in_features == 3


@pytest.mark.parametrize("call, message", [
    (lambda m, x: m.loss(x), "pass label="),
    (lambda m, x: m.encode(x, torch.tensor([0, 4])), "out of range"),
    (lambda m, x: m.encode(x, torch.tensor([-1, 0])), "out of range"),
    (lambda m, x: m.encode(x, torch.tensor([0.0, 1.0])), "class indices"),
    (lambda m, x: m.encode(x, torch.tensor([0, 1, 2])), "does not fit a batch of 2"),
    (lambda m, x: m.sample(2, label=7), "out of range"),
])
def test_bad_labels_are_refused_with_one_message(call, message):
    model = aevb.VAE(data_shape=(1, 8, 8), latent_dim=2, n_classes=4)
    with pytest.raises(UserError, match=message):
        call(model, torch.rand(2, 1, 8, 8))


@pytest.mark.parametrize("build, message", [
    (lambda: aevb.AE(data_shape=(4,), n_classes=3), "cannot be conditional"),
    (lambda: aevb.VAE(data_shape=(4,), n_classes=1), "n_classes must be"),
    (lambda: aevb.VAE(data_shape=(4,), n_classes=True), "n_classes must be"),
    (lambda: aevb.VAE(data_shape=(4,), n_classes=3, prior="vamp"), "cannot be the prior"),
    (lambda: aevb.VAE(data_shape=(4,)).encode(torch.rand(2, 4), 1), "not conditional"),
])
def test_a_model_that_cannot_take_labels_says_so(build, message):
    with pytest.raises(UserError, match=message):
        build()


def test_a_users_networks_are_built_for_the_augmented_shapes(tmp_path):
    """Any network composes: the user's modules take x with K channels more and z with K dimensions more."""
    from torch import nn

    encoder = nn.Sequential(nn.Flatten(), nn.Linear((1 + 3) * 8 * 8, 4))
    decoder = nn.Sequential(nn.Linear(2 + 3, 64), nn.Unflatten(1, (1, 8, 8)))
    model = aevb.VAE(data_shape=(1, 8, 8), latent_dim=2, encoder=encoder, decoder=decoder, n_classes=3)
    assert model.sample(2, label=1).shape == (2, 1, 8, 8)
    with pytest.raises(UserError, match=r"your encoder fails on a batch \[2, 4, 8, 8\]"):
        aevb.VAE(data_shape=(1, 8, 8), latent_dim=2, n_classes=3,
                 encoder=nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), decoder=decoder)


# -- trained on the digits, through the command line -------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_runs(tmp_path_factory):
    """A conditional and an unconditional VAE on the digits, the same settings, each evaluated."""
    root = tmp_path_factory.mktemp("conditional")
    runs = {}
    for name, flags in (("conditional", ("--conditional",)), ("plain", ())):
        run = root / name
        assert aevb_cli("train", *flags, *SMALL, "--out", run) == 0
        assert aevb_cli("eval", run, "-k", 20) == 0
        runs[name] = run
    return runs


def _eval(run) -> dict:
    return json.loads((run / "eval.json").read_text())


def test_a_conditional_vae_has_a_better_test_elbo_than_the_unconditional_one(digit_runs):
    conditional, plain = _eval(digit_runs["conditional"]), _eval(digit_runs["plain"])
    assert conditional["neg_elbo"] < plain["neg_elbo"]
    assert conditional["nll"] < plain["nll"]
    assert conditional["n_classes"] == 10 and "log p(x|y)" in conditional["conditional_note"]
    assert "n_classes" not in plain and "conditional_note" not in plain


def test_samples_of_label_k_are_classified_as_k_by_a_nearest_class_mean_classifier(digit_runs, tmp_path):
    data = load_data("digits")
    means = torch.stack([data.train[data.train_labels == k].mean(0) for k in range(10)]).flatten(1)  # [10, 64]
    correct = 0
    for k in range(10):
        out = tmp_path / f"label{k}.npy"
        assert aevb_cli("sample", digit_runs["conditional"], "--label", k, "-n", 20, "--format", "npy", "-o", out) == 0
        samples = torch.from_numpy(np.load(out)).flatten(1)  # [20, 64]
        correct += int((torch.cdist(samples, means).argmin(1) == k).sum())
    assert correct / 200 > 0.5  # chance is 0.1


def test_the_conditional_run_end_to_end(digit_runs, capsys):
    run = digit_runs["conditional"]
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["args"]["n_classes"] == 10
    assert json.loads((run / "config.json").read_text())["conditional"] is True
    assert aevb_cli("sample", run, "--label", 3) == 0
    assert (run / "images" / "samples-T1-label3.png").is_file()
    assert aevb_cli("sample", run, "-n", 4, "--format", "npy") == 0  # classes drawn uniformly
    assert aevb_cli("encode", run, "-o", run / "codes.npy") == 0
    assert np.load(run / "codes.npy")["mean"].shape[1] == 2
    assert aevb_cli("reconstruct", run) == 0
    capsys.readouterr()
    assert aevb_cli("explore", run) == 0
    out = capsys.readouterr().out
    assert f"written: {run / 'images' / 'class-samples.png'}" in out
    assert "skipped interpolations.png: drawn for unconditional models" in out
    assert aevb_cli("report", run, "-k", 2) == 0
    report = (run / "report.html").read_text()
    assert "Samples of each class" in report and "Conditional model" in report
    assert aevb_cli("eval", run, "-k", 2) == 0
    assert "conditional model (10 classes)" in capsys.readouterr().out


def test_the_class_grid_holds_one_class_per_row_and_one_code_per_column(digit_runs, tmp_path):
    from aevb.analysis.grids import class_grid

    model = aevb.load(digit_runs["conditional"] / "model")
    images = class_grid(model, tmp_path / "grid.png", columns=4, seed=3)  # [10, 4, 1, 8, 8]
    z = model.sample_layers(4, torch.Generator().manual_seed(3))[0]  # the columns' codes
    for k in (0, 7):
        torch.testing.assert_close(images[k], model.decode(z, k).mean)


@pytest.mark.parametrize("args, message", [
    (("sample", "{plain}", "--label", "3"), "--label draws samples of one class from a conditional model"),
    (("sample", "{conditional}", "--label", "10"), "--label 10 is out of range"),
    (("interpolate", "{conditional}"), "this model is conditional"),
    (("export", "{conditional}"), "this model is conditional"),
])
def test_commands_refuse_labels_where_they_mean_nothing(digit_runs, capsys, args, message):
    args = [a.format(**digit_runs) for a in args]
    assert aevb_cli(*args) != 0
    assert message in capsys.readouterr().err


def test_conditional_training_refuses_data_without_labels_and_models_without_labels(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((30, 8, 8)).astype(np.float32))
    assert aevb_cli("train", "--data", tmp_path / "x.npy", "--conditional", *SMALL, "--out", tmp_path / "a") != 0
    assert "--conditional conditions the model on class labels" in capsys.readouterr().err
    assert not (tmp_path / "a" / "model").exists()
    assert aevb_cli("train", "--model", "ae", "--conditional", *SMALL, "--out", tmp_path / "b") != 0
    assert "--conditional does not apply to --model ae" in capsys.readouterr().err


def test_labels_are_the_rows_of_the_global_batch_each_worker_takes():
    """World-size independence: a worker's labels are those of its share of the batch, as its examples are."""
    from aevb.config import make_config
    from aevb.training.data import TrainingData
    from aevb.training.distributed import Workers

    data = TrainingData.load(make_config(conditional=True), torch.device("cpu"))
    assert data.n_classes == 10
    order = torch.randperm(data.examples, generator=torch.Generator().manual_seed(0))
    (size, share), = list(data.batches(order[:7], 0, 7))  # one worker: the whole batch of 7
    whole = data.labels(share)
    torch.testing.assert_close(whole, data.dataset.train_labels[order[:7]])
    halves = []
    for rank in range(2):  # two workers: each its rows of the same batch
        worker = TrainingData.load(make_config(conditional=True), torch.device("cpu"), workers=Workers(rank, 2))
        (_, mine), = list(worker.batches(order[:7], 0, 7))
        halves.append(worker.labels(mine))
    torch.testing.assert_close(torch.cat(halves), whole)
    assert TrainingData.load(make_config(), torch.device("cpu")).labels(share) is None
