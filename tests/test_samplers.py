"""Samplers fitted after training (issue 33, item 1): a Gaussian mixture and a normalising flow fitted to a
run's codes, kept in the run folder, used by ``aevb sample --sampler`` and the report.

The fits are checked against densities known in closed form (a mixture they must recover, a 2-D density
whose log-likelihood the flow must reach); saved and loaded samplers draw the same samples for one seed;
a plain autoencoder samples from the command line; T = 0 gives the modes; misuse is one clear message.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from conftest import aevb_cli

from aevb.errors import UserError
from aevb.sampling.flow import FlowSampler
from aevb.sampling.samplers import GaussianMixtureSampler, PriorSampler

SMALL = ("--latent-dim", "3", "--hidden", "32", "--device", "cpu", "-q", "--val-split", "0")
FAST_FLOW = {"transforms": 2, "hidden_units": [16], "epochs": 3, "validation": 0.2, "patience": 5}


def _known_mixture() -> MixtureSameFamily:
    """Three well separated 2-D Gaussians of unequal weights and scales."""
    loc = torch.tensor([[-4.0, 0.0], [0.0, 4.0], [4.0, -1.0]])
    scale = torch.tensor([[0.5, 1.0], [1.0, 0.3], [0.7, 0.7]])
    return MixtureSameFamily(Categorical(torch.tensor([0.5, 0.3, 0.2])), Independent(Normal(loc, scale), 1))


def test_a_mixture_fitted_to_draws_of_a_known_mixture_recovers_it():
    torch.manual_seed(0)
    truth = _known_mixture()
    codes = truth.sample((3000,))
    fitted = GaussianMixtureSampler.fit(codes, seed=0, max_components=6)
    assert fitted.description["chosen_components"] == 3  # BIC finds the number of components
    order = fitted.means[:, 0].argsort()  # components in the order of their first coordinate, as the truth's
    assert torch.allclose(fitted.means[order], truth.component_distribution.base_dist.loc, atol=0.1)
    assert torch.allclose(fitted.weights[order], truth.mixture_distribution.probs, atol=0.03)
    variances = torch.diagonal(fitted.covariances[order], dim1=1, dim2=2)
    assert torch.allclose(variances.sqrt(), truth.component_distribution.base_dist.scale, rtol=0.1)
    test = truth.sample((2000,))  # held-out log-likelihood: the truth's within Monte Carlo error
    assert fitted.log_prob(test).mean().item() == pytest.approx(truth.log_prob(test).mean().item(), abs=0.05)
    set_components = GaussianMixtureSampler.fit(codes, seed=0, components=5)
    assert set_components.description["chosen_components"] == 5 and set_components.means.shape == (5, 2)


def _banana(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """z1 ~ N(0, 1), z2 | z1 ~ N(z1²/2, 0.5²): draws [n, 2] and their exact log-density [n]."""
    z1 = torch.randn(n, generator=generator)
    z2 = 0.5 * z1 ** 2 + 0.5 * torch.randn(n, generator=generator)
    log_density = Normal(0.0, 1.0).log_prob(z1) + Normal(0.5 * z1 ** 2, 0.5).log_prob(z2)
    return torch.stack([z1, z2], 1), log_density


def test_a_flow_fitted_to_a_known_2d_density_reaches_its_log_likelihood():
    generator = torch.Generator().manual_seed(0)
    train, _ = _banana(2000, generator)
    test, true_log_density = _banana(2000, generator)
    flow = FlowSampler.fit(train, seed=0, transforms=2, hidden_units=[32, 32], epochs=40, patience=8)
    fitted = flow.log_prob(test).mean().item()
    gaussian = torch.distributions.MultivariateNormal(train.mean(0), torch.cov(train.T)).log_prob(test).mean().item()
    truth = true_log_density.mean().item()
    assert fitted == pytest.approx(truth, abs=0.15)  # close to the truth …
    assert fitted > gaussian + 0.2  # … and far better than the best Gaussian, which a banana is not
    assert flow.description["best_epoch"] <= flow.description["epochs_run"] <= 40
    # its samples follow the density: z2 - z1²/2 has the conditional's mean 0 and standard deviation 0.5
    z = flow.sample(4000, torch.Generator().manual_seed(1))
    residual = z[:, 1] - 0.5 * z[:, 0] ** 2
    assert abs(residual.mean().item()) < 0.1 and residual.std().item() == pytest.approx(0.5, rel=0.2)


def test_a_flow_fits_where_it_is_fitted_on_first_use_inside_no_grad():
    # aevb sample --sampler flow fits inside the sampling's torch.no_grad: the fit turns gradients back on
    codes = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fitted = FlowSampler.fit(codes, seed=0, **FAST_FLOW)
    assert fitted.description["epochs_run"] >= 1 and math.isfinite(fitted.description["held_out_log_likelihood"])


def test_temperature_zero_gives_the_modes():
    torch.manual_seed(0)
    codes = _known_mixture().sample((600,))
    mixture = GaussianMixtureSampler.fit(codes, seed=0, components=3)
    z = mixture.sample(50, torch.Generator().manual_seed(0), temperature=0.0)
    distance = torch.cdist(z, mixture.means).min(1).values  # each draw is one component's mean
    assert distance.max().item() < 1e-6
    cooler = mixture.sample(2000, torch.Generator().manual_seed(0), temperature=0.5)
    warmer = mixture.sample(2000, torch.Generator().manual_seed(0), temperature=1.0)
    spread = lambda z: torch.cdist(z, mixture.means).min(1).values.mean()  # noqa: E731
    assert spread(cooler).item() == pytest.approx(0.5 * spread(warmer).item(), rel=0.02)  # same draws, scaled
    flow = FlowSampler.fit(codes, seed=0, **FAST_FLOW)
    at_zero = flow.sample(5, torch.Generator().manual_seed(0), temperature=0.0)
    assert torch.allclose(at_zero, at_zero[:1].expand(5, -1))  # the one image of the base's mode
    vae = _vae()
    assert torch.equal(PriorSampler(vae).sample(4, torch.Generator().manual_seed(0), 0.0), torch.zeros(4, 3))


def _vae():
    import aevb

    return aevb.VAE(data_shape=(1, 8, 8), latent_dim=3, hidden=[16])


def test_the_prior_sampler_refuses_a_model_without_a_prior():
    import aevb

    with pytest.raises(UserError, match="no prior to sample .*--sampler gmm or --sampler flow"):
        PriorSampler(aevb.AE(data_shape=(1, 8, 8), latent_dim=3, hidden=[16]))


# ---------------------------------------------------------------------------
# in a run folder


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory, one_thread):
    run = tmp_path_factory.mktemp("samplers") / "ae"
    assert aevb_cli("train", "--model", "ae", *SMALL, "--epochs", "2", "--out", run) == 0
    return run


def test_samplers_saved_and_loaded_draw_the_same_samples_for_one_seed(ae_run):
    from aevb.run.open import open_run
    from aevb.sampling.fitted import decode_samples, draw, fit_sampler, saved_sampler

    run = open_run(ae_run, "cpu")
    for name, options in (("gmm", {"max_components": 3}), ("flow", FAST_FLOW)):
        fitted, record_path = fit_sampler(run, name, options, seed=3)
        record = json.loads(record_path.read_text())
        assert record["options"] == {**record["options"], **options} and record["seed"] == 3
        assert record["codes"] == len(run.held_out("train")[0])  # the training split's codes
        assert (ae_run / "samplers" / f"{name}.safetensors").is_file()
        loaded, _, reason = saved_sampler(ae_run, name, run.model)
        assert reason == "" and loaded is not fitted
        before = decode_samples(run.model, fitted, 16, torch.Generator().manual_seed(7))
        after = decode_samples(run.model, loaded, 16, torch.Generator().manual_seed(7))
        assert torch.equal(before, after)
        assert torch.equal(draw(run, name, 16, torch.Generator().manual_seed(7)), after)  # the saved fit, reused
        z = torch.randn(5, 3)
        assert torch.allclose(fitted.log_prob(z), loaded.log_prob(z))
    manifest = (ae_run / ".aevb-run.jsonl").read_text()
    assert "samplers/gmm.json" in manifest and "samplers/flow.safetensors" in manifest  # --force knows them


def test_a_fit_of_other_weights_or_a_damaged_one_is_not_used(ae_run, tmp_path):
    import shutil

    from aevb.run.open import open_run
    from aevb.sampling.fitted import fit_sampler, saved_sampler, sampler_for

    copy = tmp_path / "ae"
    shutil.copytree(ae_run, copy)
    run = open_run(copy, "cpu")
    fit_sampler(run, "gmm", {"components": 2}, seed=5)
    other = _other_weights(run.model)
    sampler, record, reason = saved_sampler(copy, "gmm", other)
    assert sampler is None and "fitted to other weights" in reason and record["options"]["components"] == 2
    tensors = copy / "samplers" / "gmm.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"\0" * 8)
    assert "damaged" in saved_sampler(copy, "gmm", run.model)[2]
    refitted = sampler_for(run, "gmm")  # fitted again, with the options of the earlier fit
    assert refitted.means.shape[0] == 2 and saved_sampler(copy, "gmm", run.model)[2] == ""
    assert json.loads((copy / "samplers" / "gmm.json").read_text())["seed"] == 5  # and with its seed


def _other_weights(model):
    """A copy of the model with one weight moved: what a resumed or retrained run has."""
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    return other


def test_an_autoencoder_samples_from_the_command_line(ae_run, tmp_path, capsys):
    out = tmp_path / "samples.npy"
    assert aevb_cli("sample", ae_run, "--sampler", "gmm", "-n", 6, "-o", out) == 0
    first = np.load(out)
    assert first.shape == (6, 1, 8, 8) and np.isfinite(first).all() and first.std() > 0
    assert aevb_cli("sample", ae_run, "--sampler", "gmm", "-n", 6, "-o", out) == 0
    assert np.array_equal(np.load(out), first)  # one seed, one fit: the same samples
    assert "gmm sampler: fitted to" in capsys.readouterr().out
    assert aevb_cli("sample", ae_run, "--sampler", "gmm", "--temperature", 0, "-n", 4) == 0
    assert (ae_run / "images" / "samples-gmm-T0.png").is_file()
    # fit-sampler replaces the fit with other options, never reusing the old one
    assert aevb_cli("fit-sampler", ae_run, "--sampler", "gmm", "--components", 2, "--covariance", "diag") == 0
    record = json.loads((ae_run / "samplers" / "gmm.json").read_text())
    assert record["options"] == {"components": 2, "max_components": 10, "covariance": "diag"}
    assert "chosen components: 2" in capsys.readouterr().out
    assert aevb_cli("sample", ae_run, "--sampler", "gmm", "-n", 6, "-o", out) == 0
    assert not np.array_equal(np.load(out), first)


def test_misuse_gets_one_clear_message(ae_run, capsys):
    assert aevb_cli("sample", ae_run) == 2  # the default sampler is the prior, which an autoencoder lacks
    assert "no prior to sample" in (err := capsys.readouterr().err) and "--sampler gmm" in err
    assert aevb_cli("sample", ae_run, "--sampler", "made-up") == 2
    assert "'made-up' is not one of 'prior', 'gmm', 'flow', 'autoregressive'" in capsys.readouterr().err
    assert aevb_cli("fit-sampler", ae_run, "--sampler", "prior") == 2
    assert "is the model's own and is not fitted" in capsys.readouterr().err
    assert aevb_cli("fit-sampler", ae_run, "--sampler", "gmm", "--transforms", 2) == 2
    assert "--transforms is not an option of the gmm sampler" in capsys.readouterr().err
    assert aevb_cli("fit-sampler", ae_run, "--sampler", "flow", "--validation", 1.5) == 2
    assert "--validation must be in (0, 1)" in capsys.readouterr().err


def test_the_report_shows_the_samples_of_each_fitted_sampler(tmp_path):
    from aevb.analysis.gallery import plan_figures
    from aevb.run.open import open_run

    run = tmp_path / "vae"
    assert aevb_cli("train", *SMALL, "--epochs", "1", "--out", run) == 0
    model = open_run(run).model
    plan = plan_figures(model, run)
    assert "samples-gmm.png" not in plan.figures and "samples-gmm.png" not in plan.skipped  # never fitted: silent
    assert aevb_cli("fit-sampler", run, "--sampler", "gmm", "--components", 1) == 0
    assert aevb_cli("report", run, "-k", 2) == 0
    html = (run / "report.html").read_text()
    assert "Samples from a Gaussian mixture fitted to the codes" in html and (run / "images" / "samples-gmm.png").is_file()
    drawn = (run / "images" / "samples-gmm.png").stat().st_mtime_ns
    assert aevb_cli("fit-sampler", run, "--sampler", "gmm", "--components", 2) == 0
    assert aevb_cli("report", run, "-k", 2) == 0
    assert (run / "images" / "samples-gmm.png").stat().st_mtime_ns > drawn  # a new fit: the figure is redrawn
    other = _other_weights(model)
    assert "fitted to other weights" in plan_figures(other, run).skipped["samples-gmm.png"]


def test_train_force_sets_the_samplers_aside_with_the_run(tmp_path):
    run = tmp_path / "vae"
    assert aevb_cli("train", *SMALL, "--epochs", "1", "--out", run) == 0
    assert aevb_cli("fit-sampler", run, "--sampler", "gmm", "--components", 1) == 0
    assert aevb_cli("train", *SMALL, "--epochs", "1", "--out", run, "--force") == 0
    assert not (run / "samplers" / "gmm.json").exists()


def test_log_probs_are_densities():
    """The mixture's log_prob integrates to one over a grid (1-D): a density, not an unnormalised score."""
    torch.manual_seed(0)
    codes = torch.cat([torch.randn(300, 1) - 2, 0.5 * torch.randn(300, 1) + 2])
    mixture = GaussianMixtureSampler.fit(codes, seed=0, components=2)
    grid = torch.linspace(-10, 10, 4001)[:, None]
    mass = mixture.log_prob(grid).exp().sum().item() * (20 / 4000)
    assert mass == pytest.approx(1.0, abs=1e-3)
    assert math.isfinite(mixture.log_prob(codes).mean().item())
