"""β-TCVAE, FactorVAE and DIP-VAE: each loss equals its definition on a small case, and each trains."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import aevb
from aevb.errors import UserError
from aevb.model.base import build_model
from aevb.model.disentangling import shuffled_dimensions, total_correlation_terms
from conftest import aevb_cli

SHAPE = (1, 8, 8)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(0)).round()


def _same_draw(model, x, seed=5):
    """The loss, and the posterior and z it drew (the same noise drawn again)."""
    torch.manual_seed(seed)
    out = model.loss(x)
    torch.manual_seed(seed)
    posterior = model.encode(x)
    return out, posterior, posterior.rsample()


def _normal_log_density(z, mu, sigma):
    return -0.5 * ((z - mu) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)


def test_minibatch_weighted_terms_follow_chen_et_al_by_hand():
    """log q(z_i) ≈ log Σ_j q(z_i|x_j) − log(N·B) and the same per dimension, written out with loops."""
    torch.manual_seed(0)
    batch, dims, n = 4, 3, 50
    model = build_model("beta-tcvae", data_shape=SHAPE, latent_dim=dims, dataset_size=n)
    posterior = model.encode(torch.rand(batch, *SHAPE))
    z = posterior.sample()
    terms = total_correlation_terms(posterior, model.prior(), z, n)
    mu, sigma = posterior.mean.double().detach(), posterior.stddev.double().detach()
    zz = z.double()
    for i in range(batch):
        pair = [[_normal_log_density(zz[i, d].item(), mu[j, d].item(), sigma[j, d].item()) for d in range(dims)]
                for j in range(batch)]  # [B, D]
        log_qz = math.log(sum(math.exp(sum(row)) for row in pair)) - math.log(n * batch)
        log_qz_dims = sum(math.log(sum(math.exp(pair[j][d]) for j in range(batch))) - math.log(n * batch)
                          for d in range(dims))
        log_qzx = sum(pair[i])
        log_pz = sum(_normal_log_density(zz[i, d].item(), 0.0, 1.0) for d in range(dims))
        assert terms["mutual_information"][i].item() == pytest.approx(log_qzx - log_qz, abs=1e-4)
        assert terms["total_correlation"][i].item() == pytest.approx(log_qz - log_qz_dims, abs=1e-4)
        assert terms["dimension_kl"][i].item() == pytest.approx(log_qz_dims - log_pz, abs=1e-4)


def test_stratified_weights_make_identical_posteriors_independent_and_uninformative():
    """Every q(z|x_j) the same: the true q(z) is that one distribution, so MI = TC = 0.  Minibatch stratified
    sampling's weights sum to 1 over each row and get it exactly; minibatch-weighted sampling is off by
    log N in the MI and (D − 1)·log N in the TC (the bias for which Chen et al. offer MSS)."""
    from aevb.model.disentangling import log_importance_weights

    batch, dims, n = 8, 3, 1000
    for estimator in ("mss", "mws"):
        assert log_importance_weights(batch, n, estimator).shape == (batch, batch)
    assert torch.allclose(log_importance_weights(batch, n, "mss").exp().sum(1), torch.ones(batch))
    same = torch.distributions.Independent(torch.distributions.Normal(torch.full((batch, dims), 0.3),
                                                                      torch.full((batch, dims), 0.5)), 1)
    z = same.sample()
    prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(dims), torch.ones(dims)), 1)
    stratified = total_correlation_terms(same, prior, z, n, "mss")
    assert stratified["mutual_information"].abs().max() < 1e-5
    assert stratified["total_correlation"].abs().max() < 1e-5
    weighted = total_correlation_terms(same, prior, z, n, "mws")
    assert torch.allclose(weighted["mutual_information"], torch.full((batch,), math.log(n)), atol=1e-4)
    assert torch.allclose(weighted["total_correlation"], torch.full((batch,), (dims - 1) * math.log(n)), atol=1e-4)


def test_beta_tcvae_loss_is_its_definition(x):
    model = build_model("beta-tcvae", data_shape=SHAPE, latent_dim=3, dataset_size=200, tc_weight=4.0,
                        mi_weight=0.5, dimension_kl_weight=2.0)
    out, posterior, z = _same_draw(model, x)
    terms = total_correlation_terms(posterior, model.prior(), z, 200)
    reconstruction = -model.decode(z).log_prob(x)
    expected = (reconstruction + 0.5 * terms["mutual_information"] + 4.0 * terms["total_correlation"]
                + 2.0 * terms["dimension_kl"]).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.extras["total_correlation"].item() == pytest.approx(terms["total_correlation"].mean().item(), rel=1e-5)


def test_beta_tcvae_with_unit_weights_is_the_vae_with_a_sampled_kl(x):
    """MI + TC + dimension-wise KL = log q(z|x) − log p(z): the weights 1, 1, 1 give the VAE's loss."""
    model = build_model("beta-tcvae", data_shape=SHAPE, latent_dim=3, dataset_size=200, tc_weight=1.0)
    out, posterior, z = _same_draw(model, x)
    sampled_kl = posterior.log_prob(z) - model.prior().log_prob(z)
    expected = (-model.decode(z).log_prob(x) + sampled_kl).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_beta_tcvae_needs_the_data_set_size(x):
    model = build_model("beta-tcvae", data_shape=SHAPE, latent_dim=3)
    with pytest.raises(UserError, match="dataset_size"):
        model.loss(x)


def test_dip_vae_penalty_is_its_definition(x):
    for dip_type in ("i", "ii"):
        model = build_model("dip-vae", data_shape=SHAPE, latent_dim=3, dip_type=dip_type, lambda_offdiagonal=3.0)
        out, posterior, z = _same_draw(model, x)
        mu = posterior.mean.detach().double().numpy()
        covariance = np.cov(mu, rowvar=False, bias=True)
        if dip_type == "ii":
            covariance += np.diag(posterior.variance.detach().double().numpy().mean(0))
        off = covariance - np.diag(np.diag(covariance))
        lambda_d = 30.0 if dip_type == "i" else 3.0  # Kumar et al.'s defaults: 10·λ_od for i, λ_od for ii
        penalty = 3.0 * (off**2).sum() + lambda_d * ((np.diag(covariance) - 1) ** 2).sum()
        elbo_part = (-model.decode(z).log_prob(x) + torch.distributions.kl_divergence(posterior, model.prior())).mean()
        assert out.extras["dip_penalty"].item() == pytest.approx(penalty, rel=1e-4)
        assert out.loss.item() == pytest.approx(elbo_part.item() + penalty, rel=1e-4)


def test_factorvae_trains_its_discriminator_only_on_its_own_loss(x):
    """γ·TC reaches the encoder only; the discriminator's weights get exactly its cross-entropy's gradient."""
    model = build_model("factorvae", data_shape=SHAPE, latent_dim=3, gamma=7.0, discriminator_hidden=[16])
    out, posterior, z = _same_draw(model, x)
    out.loss.backward()
    got = [p.grad.clone() for p in model.discriminator.parameters()]
    model.zero_grad()
    torch.manual_seed(5)
    z = model.encode(x).rsample().detach()
    product = shuffled_dimensions(z)
    logits = model.discriminator(torch.cat([z, product])).squeeze(1)
    targets = torch.cat([torch.ones(len(z)), torch.zeros(len(z))])
    F.binary_cross_entropy_with_logits(logits, targets).backward()
    for a, b in zip(got, model.discriminator.parameters()):
        torch.testing.assert_close(a, b.grad)
    # and the loss: the VAE's + γ·(mean log-odds on z) + the discriminator's cross-entropy
    with torch.no_grad():
        tc = model.discriminator(z).mean()
    assert out.extras["total_correlation"].item() == pytest.approx(tc.item(), rel=1e-5)


def test_shuffled_dimensions_permute_each_column():
    z = torch.arange(24.0).reshape(8, 3)
    torch.manual_seed(0)
    shuffled = shuffled_dimensions(z)
    for d in range(3):
        assert sorted(shuffled[:, d].tolist()) == z[:, d].tolist()
    assert not torch.equal(shuffled, z)


@pytest.mark.parametrize("model", ["beta-tcvae", "factorvae", "dip-vae"])
def test_each_trains_evaluates_and_reloads_from_the_command_line(model, tmp_path, capsys, one_thread):
    run = tmp_path / model
    extra = ["--discriminator-hidden", "64"] if model == "factorvae" else []
    assert aevb_cli("train", "--model", model, "--epochs", "3", "--latent-dim", "4", "--hidden", "64",
                    "--batch-size", "64", "--val-split", "0", "--seed", "3", "--quiet", "--out", run, *extra) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m and "epoch_end" not in m]
    assert steps[-1]["reconstruction"] < steps[0]["reconstruction"]  # it learns
    assert aevb_cli("eval", run, "-k", "10") == 0
    evaluation = json.loads((run / "eval.json").read_text())
    assert math.isfinite(evaluation["nll"]) and evaluation["nll"] <= evaluation["neg_elbo"] + 1e-6
    loaded = aevb.load(run / "model")
    assert loaded.name == model
    if model == "beta-tcvae":
        assert loaded.dataset_size == 1617  # the digits' training split, recorded for the estimator
