"""Flow posteriors: the log-determinants against autograd's Jacobian, the kept log-density against the
inverse, an identity IAF against the plain VAE, and a run from the command line."""

from __future__ import annotations

import json

import pytest
import torch

from aevb.errors import UserError
from aevb.model.base import build_model
from aevb.model.flows import IAFStep, PlanarStep
from conftest import aevb_cli

SHAPE = (1, 8, 8)


def _randomised(step: torch.nn.Module) -> torch.nn.Module:
    """The step with every weight drawn at random (a new IAF is the identity, which would test little)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in step.parameters():
            p.normal_(0, 0.5)
    return step


@pytest.mark.parametrize("make", [lambda: IAFStep(4, 12, reverse=False), lambda: IAFStep(4, 12, reverse=True),
                                  lambda: PlanarStep(4)], ids=["iaf", "iaf-reversed", "planar"])
def test_each_steps_log_determinant_is_that_of_its_jacobian(make):
    step = _randomised(make()).double()
    context = torch.randn(3, 4, dtype=torch.float64)
    z = torch.randn(3, 4, dtype=torch.float64)
    _, log_det = step(z, context)
    for i in range(3):
        jacobian = torch.autograd.functional.jacobian(lambda v: step(v.unsqueeze(0), context[i:i + 1])[0][0], z[i])
        assert log_det[i].item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item(), abs=1e-9)
        if isinstance(step, IAFStep):  # autoregressive: the Jacobian is triangular in the step's order
            ordered = jacobian.flip(0).flip(1) if step.reverse else jacobian
            assert torch.allclose(ordered.triu(1), torch.zeros(4, 4, dtype=torch.float64))


def test_iaf_inverse_recovers_the_input():
    step = _randomised(IAFStep(5, 16, reverse=True))
    context, z = torch.randn(4, 5), torch.randn(4, 5)
    out, log_det = step(z, context)
    back, log_det_back = step.inverse(out, context)
    torch.testing.assert_close(back, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_det_back, log_det, atol=1e-5, rtol=1e-5)


def test_the_kept_log_density_of_a_draw_is_the_flows_exact_one():
    torch.manual_seed(0)
    model = build_model("vae", data_shape=SHAPE, latent_dim=4, posterior_flow="iaf", flow_steps=3)
    for step in model.posterior.flow:
        _randomised(step)
    posterior = model.encode(torch.rand(6, *SHAPE))
    z = posterior.rsample((2,))  # [2, 6, 4]
    kept = posterior.log_prob(z)
    by_inverse = posterior.log_prob(z.clone())  # not the draw: the flow is inverted
    torch.testing.assert_close(kept, by_inverse, atol=1e-4, rtol=1e-4)
    planar = build_model("vae", data_shape=SHAPE, latent_dim=4, posterior_flow="planar").encode(torch.rand(6, *SHAPE))
    draw = planar.rsample()
    assert planar.log_prob(draw).shape == (6,)
    with pytest.raises(NotImplementedError, match="no inverse"):
        planar.log_prob(draw.clone())


def test_an_identity_iaf_gives_the_plain_vaes_numbers():
    """A new IAF is the identity: with the plain VAE's encoder and decoder, the same log-likelihood estimate."""
    torch.manual_seed(0)
    plain = build_model("vae", data_shape=SHAPE, latent_dim=3, hidden=[16])
    iaf = build_model("vae", data_shape=SHAPE, latent_dim=3, hidden=[16], posterior_flow="iaf")
    with torch.no_grad():
        iaf.decoder.load_state_dict(plain.decoder.state_dict())
        for mine, theirs in zip(iaf.encoder.parameters(), plain.encoder.parameters()):
            if mine.shape == theirs.shape:
                mine.copy_(theirs)
            else:  # the last layer also outputs the context h(x): its first 2·D rows are (μ, log σ²)
                mine[:theirs.shape[0]].copy_(theirs)
    x = torch.rand(5, *SHAPE).round()
    torch.manual_seed(3)
    expected = plain.log_likelihood(x, n_samples=64)
    torch.manual_seed(3)
    got = iaf.log_likelihood(x, n_samples=64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(iaf.reconstruct(x), plain.reconstruct(x))


def test_free_bits_with_a_flow_are_refused():
    with pytest.raises(UserError, match="flow posterior"):
        build_model("vae", data_shape=SHAPE, latent_dim=3, posterior_flow="iaf", free_bits=0.5)


@pytest.mark.parametrize("flow", ["iaf", "planar"])
def test_a_flow_vae_trains_evaluates_and_reloads(flow, tmp_path, one_thread):
    import aevb

    run = tmp_path / flow
    assert aevb_cli("train", "--posterior-flow", flow, "--flow-steps", "2", "--latent-dim", "4", "--hidden", "64",
                    "--epochs", "2", "--val-split", "0", "--quiet", "--out", run) == 0
    assert aevb_cli("eval", run, "-k", "20") == 0
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["nll"] <= evaluation["neg_elbo"] + 0.05  # the bound, up to the estimates' noise
    model = aevb.load(run / "model")
    assert model.config["posterior_flow"] == flow and type(model.posterior).__name__.lower().startswith(flow)
    x = torch.rand(3, *SHAPE).round()
    again = aevb.load(run / "model")  # (building a model draws its initial weights: before the seed)
    torch.manual_seed(0)
    first = model.log_likelihood(x, n_samples=10)
    torch.manual_seed(0)
    assert torch.equal(first, again.log_likelihood(x, n_samples=10))
