"""Dequantisation: continuous likelihoods on 8-bit data, and honest bits per dimension."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aevb.data import transforms
from aevb.analysis.evaluation import bits_per_dim
from aevb.model.base import build_model
from conftest import aevb_cli

SMALL = ("--latent-dim", "4", "--hidden", "32", "--device", "cpu", "-q")


def test_dequantized_pixels_fill_their_own_bins():
    levels = 256
    k = torch.arange(levels, dtype=torch.float32).repeat(200)  # every level, 200 times
    x = k / (levels - 1)
    y = transforms.dequantize(x, levels, torch.Generator().manual_seed(0))
    assert torch.equal(torch.floor(y * levels), k)  # (k + u)/levels lies in [k, k + 1)/levels
    assert ((y >= 0) & (y < 1)).all()
    u = y * levels - k
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005  # U[0, 1)
    again = transforms.dequantize(x, levels, torch.Generator().manual_seed(0))
    assert torch.equal(y, again)


def test_dequantized_density_bounds_each_level_probability():
    """E_u[−log p((k + u)/L)] + log L ≥ −log P_k, P_k the density's mass over level k's bin (Jensen)."""
    levels = 17
    density = torch.distributions.Normal(torch.tensor(0.4, dtype=torch.float64), torch.tensor(0.02, dtype=torch.float64))
    k = torch.arange(levels, dtype=torch.float64)
    x = (k / (levels - 1)).repeat(20000, 1)  # [20000, 17]
    y = transforms.dequantize(x, levels, torch.Generator().manual_seed(1))
    bound = -density.log_prob(y).mean(0) + math.log(levels)  # [17], nats
    mass = density.cdf((k + 1) / levels) - density.cdf(k / levels)
    exact = -mass.log()
    held = torch.isfinite(exact)  # bins far in the tails hold no mass in float64
    assert held.sum() >= 5 and (bound[held] >= exact[held]).all()
    # the mode's bin holds most of the mass: there the bound is within a few tenths of a nat
    assert 0 <= (bound - exact)[6] < 0.5


def _tiny_vae(likelihood: str):
    return build_model("vae", data_shape=(1, 4, 4), latent_dim=2, likelihood=likelihood, arch="mlp", hidden=[8])


def test_bits_per_dim_only_where_they_bound_a_probability():
    x_binary = torch.randint(0, 2, (5, 1, 4, 4)).float()
    x_grey = torch.randint(0, 256, (5, 1, 4, 4)).float() / 255
    n = 16
    bernoulli, gaussian = _tiny_vae("bernoulli"), _tiny_vae("gaussian-learned")
    assert bits_per_dim(10.0, bernoulli, x_binary, 256) == pytest.approx(10 / (n * math.log(2)))
    assert bits_per_dim(10.0, bernoulli, x_grey, 256) is None  # grey values are no Bernoulli data
    assert bits_per_dim(-30.0, gaussian, x_grey, 256) is None  # a density at the 8-bit values
    assert bits_per_dim(-30.0, gaussian, x_grey, 256, dequantized=True) == pytest.approx(
        (-30 + n * math.log(256)) / (n * math.log(2)))
    assert bits_per_dim(-30.0, gaussian, x_grey, None, dequantized=True) is None  # no levels
    assert bits_per_dim(-30.0, _tiny_vae("gaussian-optimal"), x_grey, 256, dequantized=True) is None


def test_train_and_eval_with_dequantize_report_bits_per_dim(tmp_path, capsys):
    plain, dequantized = tmp_path / "plain", tmp_path / "dequantized"
    for run, extra in ((plain, ()), (dequantized, ("--dequantize",))):
        assert aevb_cli("train", "--likelihood", "gaussian-learned", "--epochs", "3", *SMALL, *extra,
                        "--out", run) == 0
        assert aevb_cli("eval", run, "-k", "20") == 0
    out = capsys.readouterr().out
    assert "train with --dequantize" in out  # said once, for the plain run
    plain_metrics = json.loads((plain / "eval.json").read_text())
    metrics = json.loads((dequantized / "eval.json").read_text())
    assert plain_metrics["bits_per_dim"] is None and plain_metrics["dequantized"] is False
    assert metrics["dequantized"] is True and metrics["levels"] == 17  # digits: 4-bit pixels
    n = 64
    assert metrics["bits_per_dim"] == pytest.approx((metrics["nll"] + n * math.log(17)) / (n * math.log(2)))
    assert metrics["bits_per_dim"] > 0
    assert json.loads((dequantized / "config.json").read_text())["dequantize"] is True
    # the test set is dequantised once, with a fixed seed: evaluating again gives the same ELBO
    assert aevb_cli("eval", dequantized, "-k", "20") == 0
    assert json.loads((dequantized / "eval.json").read_text())["neg_elbo"] == pytest.approx(metrics["neg_elbo"], abs=1e-9)


def test_profile_likelihood_gets_no_log_likelihood(tmp_path, capsys):
    run = tmp_path / "sigma-vae"
    assert aevb_cli("train", "--likelihood", "gaussian-optimal", "--epochs", "1", *SMALL, "--out", run) == 0
    assert aevb_cli("eval", run, "-k", "5") == 0
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["nll"] is None and metrics["bits_per_dim"] is None and metrics["elbo_gap"] is None
    assert math.isfinite(metrics["neg_elbo"])
    assert "profile likelihood" in metrics["likelihood_note"]
    assert "profile likelihood" in capsys.readouterr().out


@pytest.mark.parametrize("options", [("--likelihood", "bernoulli"),
                                     ("--likelihood", "gaussian", "--binarize", "threshold")])
def test_dequantize_with_a_discrete_model_is_refused(tmp_path, capsys, options):
    run = tmp_path / "run"
    assert aevb_cli("train", "--dequantize", *options, "--epochs", "1", *SMALL, "--out", run) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --dequantize") and "Traceback" not in err
    assert not run.exists()


def test_dequantize_of_real_valued_data_is_refused(tmp_path, capsys):
    table = tmp_path / "table.csv"
    table.write_text("\n".join(",".join(f"{(i * j) % 7 - 3.5:.2f}" for j in range(5)) for i in range(40)))
    assert aevb_cli("train", "--data", table, "--likelihood", "gaussian", "--dequantize", "--epochs", "1", *SMALL,
                    "--out", tmp_path / "run") == 2
    assert "real values" in capsys.readouterr().err


def test_streamed_labelled_images_evaluate_dequantised(tmp_path):
    import numpy as np

    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (120, 8, 8), dtype=np.uint8))
    np.save(tmp_path / "y.npy", np.arange(120) % 3)
    run = tmp_path / "run"
    assert aevb_cli("train", "--data", tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--stream", "yes",
                    "--dequantize", "--likelihood", "gaussian-learned", "--epochs", "1", *SMALL, "--out", run) == 0
    assert aevb_cli("eval", run, "-k", "4") == 0  # the training split, streamed, is dequantised as it is read
    assert json.loads((run / "eval.json").read_text())["bits_per_dim"] > 0
