"""WAE-MMD and InfoVAE: the MMD against its closed form, each loss equal to its definition, each trains."""

from __future__ import annotations

import json
import math

import pytest
import torch

import aevb
from aevb.errors import NoLikelihoodError, UserError
from aevb.model.base import build_model
from aevb.model.divergences import mmd_squared
from conftest import aevb_cli

SHAPE = (1, 8, 8)


def _gaussian_kernel_mean(mean_gap: float, variance: float, scale: float, dims: int) -> float:
    """E exp(−‖a − b‖²/C) for a − b ~ N(mean_gap·1, variance·I) in ``dims`` dimensions, in closed form."""
    per_dim = (1 + 2 * variance / scale) ** -0.5 * math.exp(-mean_gap**2 / (scale + 2 * variance))
    return per_dim**dims


@pytest.mark.parametrize("shift", [0.0, 0.5, 1.5])
def test_the_unbiased_mmd_matches_its_closed_form_for_gaussians(shift):
    """P = N(0, I), Q = N(shift, I) in 2-D with the Gaussian kernel: MMD² = E k(p,p') + E k(q,q') − 2 E k(p,q)."""
    torch.manual_seed(0)
    dims, scale, n = 2, 2.0, 64
    exact = (2 * _gaussian_kernel_mean(0.0, 2.0, scale, dims)
             - 2 * _gaussian_kernel_mean(shift, 2.0, scale, dims))
    estimates = torch.stack([mmd_squared(torch.randn(n, dims), torch.randn(n, dims) + shift, "rbf", scale)
                             for _ in range(400)])
    standard_error = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean().item() - exact) < 4 * standard_error.item() + 1e-4  # unbiased, even at P = Q


def test_the_mmd_grows_with_the_distance_between_the_distributions():
    torch.manual_seed(0)
    a = torch.randn(256, 3)
    values = [mmd_squared(a, torch.randn(256, 3) + shift, "imq", 6.0).item() for shift in (0.0, 0.3, 1.0, 3.0)]
    assert values == sorted(values) and abs(values[0]) < 0.01


def test_wae_loss_is_reconstruction_plus_weighted_mmd():
    torch.manual_seed(0)
    model = build_model("wae", data_shape=SHAPE, latent_dim=3, mmd_weight=4.0, kernel="rbf", kernel_bandwidth=1.5)
    x = torch.rand(8, *SHAPE).round()
    torch.manual_seed(3)
    out = model.loss(x)
    torch.manual_seed(3)
    z = model.encode(x).mean
    draws = model.prior().sample((8,))
    expected = -model.decode(z).log_prob(x).mean() + 4.0 * mmd_squared(z, draws, "rbf", 1.5)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.kl == 0 and out.sigma == 0  # a deterministic encoder
    with pytest.raises(NoLikelihoodError):
        model.elbo(x)
    assert model.sample(4).shape == (4, *SHAPE)  # from the prior that training matched q(z) to


def test_infovae_loss_is_its_definition():
    torch.manual_seed(0)
    model = build_model("infovae", data_shape=SHAPE, latent_dim=3, info_alpha=0.5, info_lambda=3.0)
    assert model.mmd.scale == 6.0  # 2·latent_dim by default
    x = torch.rand(8, *SHAPE).round()
    torch.manual_seed(3)
    out = model.loss(x)
    torch.manual_seed(3)
    posterior = model.encode(x)
    z = posterior.rsample()
    draws = model.prior().sample((8,))
    kl = torch.distributions.kl_divergence(posterior, model.prior())
    expected = (-model.decode(z).log_prob(x) + 0.5 * kl).mean() + 2.5 * mmd_squared(z, draws, "imq", 6.0)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_bad_weights_are_refused():
    with pytest.raises(UserError, match="weighs the MMD"):
        build_model("infovae", data_shape=SHAPE, latent_dim=3, info_alpha=-2.0, info_lambda=1.0)
    with pytest.raises(UserError, match="at least 2 examples"):
        build_model("wae", data_shape=SHAPE, latent_dim=3).loss(torch.rand(1, *SHAPE))


@pytest.mark.parametrize("model", ["wae", "infovae"])
def test_each_trains_and_reloads_from_the_command_line(model, tmp_path, one_thread):
    run = tmp_path / model
    assert aevb_cli("train", "--model", model, "--epochs", "3", "--latent-dim", "4", "--hidden", "64",
                    "--batch-size", "64", "--val-split", "0", "--seed", "3", "--quiet", "--out", run) == 0
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "loss" in m]
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["reconstruction"] < steps[0]["reconstruction"]
    assert aevb_cli("eval", run, "-k", "10") == 0
    evaluation = json.loads((run / "eval.json").read_text())
    assert ("nll" in evaluation) == (model == "infovae")  # only the InfoVAE has a density of x
    assert aevb.load(run / "model").name == model
