"""Recipes that work on a user's first try (issue 30): likelihoods that cannot score the data say so before training.

Each check is made on the bundled 8×8 digits (17 grey levels, exact 0s and
1s among them) or on small arrays made here.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import aevb
from aevb.analysis.evaluation import evaluate
from aevb.config import make_config
from aevb.data.datasets import load_data
from aevb.errors import UserError
from aevb.run.data import check_likelihood_scores, load_dataset
from conftest import aevb_cli


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
