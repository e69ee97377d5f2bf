"""The aggregate posterior's mutual information I(x; z) and KL(q(z) ‖ p(z)) (issue 33, item 4), against cases
with known answers: a posterior that ignores x, a posterior equal to the prior, and a linear-Gaussian
encoder whose aggregate posterior is Gaussian in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, Normal

import aevb
from aevb.analysis.aggregate import aggregate_posterior


def _gaussian(loc: torch.Tensor, scale: float | torch.Tensor) -> Independent:
    """q(z|x_n) = N(loc_n, scale²): batch [N], event [D]."""
    return Independent(Normal(loc, torch.as_tensor(scale).expand_as(loc)), 1)


def _batches(q: Independent, size: int) -> list[Independent]:
    """The same posteriors as the evaluation hands them over: a batch at a time."""
    loc, scale = q.base_dist.loc, q.base_dist.scale
    return [_gaussian(loc[i:i + size], scale[i:i + size]) for i in range(0, len(loc), size)]


def test_a_posterior_that_ignores_x_carries_no_information():
    torch.manual_seed(0)
    n, d, m, s = 1000, 3, 0.7, 0.5
    q = _gaussian(torch.full((n, d), m), s)  # the same q(z|x) for every x
    out = aggregate_posterior(_batches(q, 300), _gaussian(torch.zeros(d), 1.0))
    assert out["mutual_information"] == pytest.approx(0.0, abs=1e-5) and out["aggregate_posterior_examples"] == n
    # q(z) = N(m, s²) then: its KL to N(0, I) in closed form, within Monte Carlo error
    exact = d * (math.log(1 / s) + (s ** 2 + m ** 2) / 2 - 0.5)
    assert out["aggregate_kl"] == pytest.approx(exact, abs=4 * 0.05)


def test_a_posterior_equal_to_the_prior_has_no_kl_to_it():
    torch.manual_seed(0)
    prior = _gaussian(torch.zeros(4), 1.0)
    out = aggregate_posterior([_gaussian(torch.zeros(500, 4), 1.0)], prior)
    assert out["aggregate_kl"] == pytest.approx(0.0, abs=1e-5)
    assert out["mutual_information"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("a,s", [(1.0, 1.0), (2.0, 0.5), (0.5, 1.5)])
def test_a_linear_gaussian_encoder_matches_its_closed_form(a, s):
    """x ~ N(0, I), q(z|x) = N(a·x, s²): q(z) = N(0, a² + s²), so I = D/2·log((a² + s²)/s²) and
    KL(q(z) ‖ N(0, I)) = D/2·(a² + s² − 1 − log(a² + s²))."""
    torch.manual_seed(0)
    n, d = 4000, 2
    x = torch.randn(n, d)
    out = aggregate_posterior(_batches(_gaussian(a * x, s), 500), _gaussian(torch.zeros(d), 1.0))
    variance = a ** 2 + s ** 2
    information = d / 2 * math.log(variance / s ** 2)
    kl = d / 2 * (variance - 1 - math.log(variance))
    assert information < math.log(n)  # below the estimator's ceiling
    # within 5 % (Monte Carlo error over 4,000 examples; seeds 0-2 gave at most 3.5 %), or 0.03 nats near zero
    assert out["mutual_information"] == pytest.approx(information, rel=0.05, abs=0.03)
    assert out["aggregate_kl"] == pytest.approx(kl, rel=0.05, abs=0.03)
    # together they are the ELBO's KL term E_x KL(q(z|x) ‖ p(z)) (Hoffman & Johnson 2016), draw by draw
    expected_kl = d / 2 * (a ** 2 * x.pow(2).mean().item() + s ** 2 - 1 - math.log(s ** 2))
    assert out["mutual_information"] + out["aggregate_kl"] == pytest.approx(expected_kl, rel=0.05, abs=0.03)


def test_information_grows_with_how_much_the_code_depends_on_x():
    torch.manual_seed(0)
    x = torch.randn(1000, 2)
    prior = _gaussian(torch.zeros(2), 1.0)
    information = [aggregate_posterior([_gaussian(a * x, 0.5)], prior)["mutual_information"] for a in (0.1, 0.5, 2.0)]
    assert information == sorted(information) and information[0] < 0.1


def test_evaluate_reports_them_for_models_with_a_prior_only():
    from aevb.analysis.evaluation import evaluate

    torch.manual_seed(0)
    x = torch.rand(40, 1, 8, 8).round()
    vae = aevb.VAE(data_shape=(1, 8, 8), latent_dim=3, hidden=[16])
    metrics = evaluate(vae, x, iw_samples=2, batch_size=16)  # several batches of posteriors
    assert metrics["aggregate_posterior_examples"] == 40
    assert 0 <= metrics["mutual_information"] <= math.log(40) and metrics["aggregate_kl"] >= -0.1
    ae = evaluate(aevb.AE(data_shape=(1, 8, 8), latent_dim=3, hidden=[16]), x, iw_samples=2)
    assert "mutual_information" not in ae and "aggregate_kl" not in ae


def test_eval_json_the_table_and_the_report_state_them_with_their_examples(tmp_path, capsys):
    import json

    from conftest import aevb_cli

    run = tmp_path / "vae"
    assert aevb_cli("train", "--latent-dim", 3, "--hidden", 32, "--device", "cpu", "-q", "--epochs", 1,
                    "--out", run) == 0
    assert aevb_cli("eval", run, "-k", 2) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["aggregate_posterior_examples"] == metrics["examples"]  # the digits' test split, under 2,000
    assert f"≤ log {metrics['examples']}" in printed and "KL(q(z) ‖ p(z)), aggregate posterior" in printed
    assert aevb_cli("report", run, "-k", 2) == 0
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "mutual information I(x; z)" in html and "examples of the aggregate posterior" in html


@pytest.mark.parametrize("rho", [0.0, 0.6, 0.9])
def test_the_total_correlation_of_a_linear_gaussian_encoder_matches_its_closed_form(rho):
    """x ~ N(0, Σ) with correlation ρ between its two coordinates, q(z|x) = N(x, s²): q(z) = N(0, Σ + s² I), whose
    total correlation KL(q(z) ‖ q(z_1) q(z_2)) is −½ log(1 − r²), r = ρ / (1 + s²) its correlation."""
    torch.manual_seed(0)
    n, s = 4000, 0.5
    covariance = torch.tensor([[1.0, rho], [rho, 1.0]])
    x = torch.randn(n, 2) @ torch.linalg.cholesky(covariance).T
    out = aggregate_posterior(_batches(_gaussian(x, s), 500), _gaussian(torch.zeros(2), 1.0))
    r = rho / (1 + s ** 2)
    exact = -0.5 * math.log(1 - r ** 2)
    assert out["total_correlation"] == pytest.approx(exact, abs=0.03)


def test_no_total_correlation_without_a_product_posterior():
    """A posterior that is no product over the dimensions (a full-covariance Gaussian here) has no marginals to
    compare with: the total correlation is left out."""
    from torch.distributions import MultivariateNormal

    torch.manual_seed(0)
    q = MultivariateNormal(torch.randn(300, 2), covariance_matrix=torch.eye(2).expand(300, 2, 2))
    out = aggregate_posterior([q], _gaussian(torch.zeros(2), 1.0))
    assert "total_correlation" not in out and "mutual_information" in out
