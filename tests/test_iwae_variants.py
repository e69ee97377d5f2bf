"""The IWAE's variants of Rainforth et al. (2018): MIWAE, CIWAE, PIWAE, each its definition."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aevb.errors import UserError
from aevb.model.base import build_model
from aevb.model import objectives
from conftest import aevb_cli

SHAPE = (1, 8, 8)


def iwae(variant="iwae", **options):
    torch.manual_seed(0)
    return build_model("iwae", data_shape=SHAPE, latent_dim=3, k=4, iwae_variant=variant, **options)


def log_mean_exp(t, dim):
    return torch.logsumexp(t, dim) - math.log(t.shape[dim])


def test_each_bound_is_its_definition_and_they_are_ordered():
    log_w = torch.randn(12, 5) * 3  # [m·k, B]: m = 3 groups of k = 4
    elbo, whole = log_w.mean(0), log_mean_exp(log_w, 0)
    miwae = iwae("miwae", iwae_m=3).bound(log_w)
    torch.testing.assert_close(miwae, log_mean_exp(log_w.reshape(3, 4, 5), 1).mean(0))
    ciwae = iwae("ciwae", ciwae_beta=0.3).bound(log_w)
    torch.testing.assert_close(ciwae, 0.3 * elbo + 0.7 * whole)
    torch.testing.assert_close(iwae("iwae").bound(log_w), whole)
    # Jensen: the ELBO ≤ the mean of bounds over groups ≤ the bound of all weights; CIWAE between its two ends
    assert torch.all(elbo <= miwae + 1e-6) and torch.all(miwae <= whole + 1e-6)
    assert torch.all(elbo <= ciwae + 1e-6) and torch.all(ciwae <= whole + 1e-6)
    # the ends: one group is the IWAE bound; β = 1 the ELBO, β = 0 the IWAE bound
    torch.testing.assert_close(iwae("miwae", iwae_m=1).bound(log_w), whole)
    torch.testing.assert_close(iwae("ciwae", ciwae_beta=1.0).bound(log_w), elbo)
    torch.testing.assert_close(iwae("ciwae", ciwae_beta=0.0).bound(log_w), whole)


def test_miwae_draws_m_times_k_weights_per_example():
    model = iwae("miwae", iwae_m=3)
    x = torch.rand(5, *SHAPE).round()
    torch.manual_seed(4)
    out = model.loss(x)
    torch.manual_seed(4)
    log_w = objectives.log_weights(model, x, 12, model.encode(x))
    assert out.loss.item() == pytest.approx(-log_mean_exp(log_w.reshape(3, 4, 5), 1).mean().item(), rel=1e-6)


def test_piwae_trains_the_decoder_on_iwae_and_the_encoder_on_miwae():
    model = iwae("piwae", iwae_m=3)
    x = torch.rand(5, *SHAPE).round()
    torch.manual_seed(4)
    out = model.loss(x)
    out.loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}

    def gradients(bound):
        model.zero_grad()
        torch.manual_seed(4)
        posterior = model.encode(x)
        log_w = objectives.log_weights(model, x, 12, posterior)
        (-bound(log_w).mean()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    whole = gradients(lambda log_w: log_mean_exp(log_w, 0))
    groups = gradients(lambda log_w: log_mean_exp(log_w.reshape(3, 4, 5), 1).mean(0))
    for name, grad in got.items():
        expected = groups[name] if name.startswith("encoder") else whole[name]
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.allclose(whole[n], groups[n]) for n in got if n.startswith("encoder"))
    torch.manual_seed(4)
    log_w = objectives.log_weights(model, x, 12, model.encode(x))
    assert out.loss.item() == pytest.approx(-log_mean_exp(log_w, 0).mean().item(), rel=1e-6)  # the IWAE bound's value


def test_piwae_needs_the_standard_prior():
    with pytest.raises(UserError, match="--prior standard"):
        iwae("piwae", prior="vamp")


@pytest.mark.parametrize("variant", ["miwae", "piwae"])
def test_the_variants_train_from_the_command_line(variant, tmp_path, one_thread):
    run = tmp_path / variant
    assert aevb_cli("train", "--model", "iwae", "--iwae-variant", variant, "--iwae-m", "2", "--k", "3",
                    "--epochs", "2", "--latent-dim", "4", "--hidden", "64", "--val-split", "0", "--quiet",
                    "--out", run) == 0
    config = json.loads((run / "model" / "config.json").read_text())["args"]
    assert (config["iwae_variant"], config["iwae_m"]) == (variant, 2)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in steps if "loss" in m]
    assert losses[-1] < losses[0]


# --- the regularised deterministic autoencoder (Ghosh et al. 2020), item 5's other half -------------


@pytest.mark.parametrize("decoder", ["l2", "gradient"])
def test_rae_loss_is_its_definition(decoder):
    torch.manual_seed(0)
    model = build_model("rae", data_shape=SHAPE, latent_dim=3, arch="mlp", hidden=[16], rae_code_weight=0.3,
                        rae_decoder=decoder, rae_decoder_weight=0.01)
    x = torch.rand(6, *SHAPE).round()
    torch.manual_seed(2)
    out = model.loss(x)
    code = model.encode(x).mean
    reconstruction = -model.decode(code).log_prob(x).mean()
    if decoder == "l2":
        penalty = sum(p.square().sum() for n, p in model.decoder.named_parameters() if not n.endswith("bias"))
    else:  # the exact ‖J‖²_F, whose one-projection estimate the loss holds: compare the estimator's mean below
        penalty = out.extras["decoder_penalty"]
    expected = reconstruction + 0.3 * 0.5 * code.square().sum(-1).mean() + 0.01 * penalty
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_rae_gradient_penalty_estimates_the_jacobians_frobenius_norm():
    torch.manual_seed(0)
    model = build_model("rae", data_shape=SHAPE, latent_dim=3, arch="mlp", hidden=[16], rae_decoder="gradient")
    code = torch.randn(4, 3, requires_grad=True)
    jacobians = [torch.autograd.functional.jacobian(lambda z: model._run(model.decoder, z.unsqueeze(0)).reshape(-1),
                                                    code[i].detach()) for i in range(4)]  # [64, 3] each
    exact = torch.stack([j.square().sum() for j in jacobians]).mean()
    estimates = torch.stack([model.decoder_penalty(code).detach() for _ in range(2000)])
    assert estimates.mean().item() == pytest.approx(exact.item(), rel=0.05)  # unbiased (Hutchinson)


def test_rae_samples_through_its_ex_post_density_by_default(tmp_path, capsys):
    run = tmp_path / "rae"
    assert aevb_cli("train", "--model", "rae", "--latent-dim", "3", "--hidden", "32", "--epochs", "1",
                    "--val-split", "0", "-q", "--out", run) == 0
    capsys.readouterr()
    assert aevb_cli("sample", run, "-n", 4) == 0  # no --sampler: the Gaussian mixture, fitted now
    said = capsys.readouterr().out
    assert "fitting the gmm sampler" in said and (run / "images" / "samples-gmm-T1.png").is_file()
