"""Figures mean what they say: each figure function returns what it drew, and
these tests check it against the model (the latent grid decodes exactly the
points it claims, interpolation ends are the reconstructions, the
likelihood-choice curve has its minimum at σ = √MSE, …)."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

import aevb
from aevb.analysis import figures, plots
from aevb.data.datasets import load_data
from aevb.analysis.posteriors import posterior_statistics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits():
    dataset = load_data("digits")
    return dataset.test, dataset.test_labels  # [180, 1, 8, 8], [180]


def _model(latent_dim: int = 3, likelihood: str = "bernoulli", seed: int = 0):
    torch.manual_seed(seed)
    model = aevb.VAE(data_shape=(1, 8, 8), latent_dim=latent_dim, hidden=[32], likelihood=likelihood)
    return model.eval()


def _assert_png(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


# -- the latent grid and the scatter plot --------------------------------------


@pytest.mark.parametrize("directions", ["coords", "pca"])
def test_latent_grid_decodes_exactly_the_points_it_claims(tmp_path, digits, directions):
    x, _ = digits
    model = _model()
    out = figures.latent_grid(model, x, tmp_path / "grid.png", n=5, directions=directions)
    _assert_png(tmp_path / "grid.png")
    z, u, v, origin, axes = out["z"], out["u"], out["v"], out["origin"], out["axes"]
    assert z.shape == (5, 5, 3) and out["images"].shape == (5, 5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(out["images"], model.decode(z).mean, atol=1e-6)
    # row i, column j is origin + u[j]·axes[0] + v[i]·axes[1]; v runs from the top down
    expected = origin + u[None, :, None] * axes[0] + v[:, None, None] * axes[1]
    assert torch.allclose(z, expected, atol=1e-6)
    assert v[0] > v[-1] and u[0] < u[-1]
    means = posterior_statistics(model, x)["mean"]
    if directions == "coords":
        # z1, z2 themselves, ±2 by default; the other coordinate at the mean of the posterior means
        assert torch.allclose(z[0, :, 0], torch.linspace(-2, 2, 5)) and torch.allclose(z[:, 0, 1], torch.linspace(2, -2, 5))
        assert torch.allclose(z[..., 2], means[:, 2].mean().expand(5, 5), atol=1e-6)
    else:
        # orthonormal axes, the first along the largest variance of the posterior means
        assert torch.allclose(axes @ axes.T, torch.eye(2), atol=1e-5)
        centred = means - means.mean(0)
        top = torch.linalg.eigh(centred.T @ centred).eigenvectors[:, -1]
        assert abs(float(axes[0] @ top)) == pytest.approx(1, abs=1e-4)
        assert torch.allclose(origin, means.mean(0), atol=1e-6)
        scores = centred @ axes.T
        assert out["extent"][0] == pytest.approx(2 * float(scores[:, 0].std()), rel=1e-4)
        assert out["extent"][1] == pytest.approx(2 * float(scores[:, 1].std()), rel=1e-4)


def test_latent_grid_range_is_the_users(tmp_path, digits):
    x, _ = digits
    out = figures.latent_grid(_model(), x, tmp_path / "grid.png", n=4, grid_range=3.0, directions="pca")
    assert out["u"].tolist() == pytest.approx([-3, -1, 1, 3]) and out["v"].tolist() == pytest.approx([3, 1, -1, -3])


def test_latent_plane_needs_two_dimensions(digits):
    with pytest.raises(ValueError, match="at least 2"):
        figures.latent_directions(torch.zeros(10, 1))


def test_latent_scatter_places_posterior_means(tmp_path, digits):
    x, y = digits
    model = _model()
    means = posterior_statistics(model, x)["mean"]
    out = figures.latent_scatter(model, x, tmp_path / "coords.png", labels=y, directions="coords", n_images=8)
    assert torch.allclose(out["points"], means[:, :2], atol=1e-6)
    assert 1 <= len(out["image_indices"]) <= 8
    assert out["panels"] == 2  # the points alone, and beside them the images that would hide them
    assert figures.latent_scatter(model, x, tmp_path / "none.png", n_images=0)["panels"] == 1
    out = figures.latent_scatter(model, x, tmp_path / "pca.png", directions="pca")
    assert torch.allclose(out["points"], (means - means.mean(0)) @ out["axes"].T, atol=1e-5)
    for name in ("coords.png", "pca.png"):
        _assert_png(tmp_path / name)


# -- interpolation ---------------------------------------------------------------


def test_slerp_of_orthogonal_unit_vectors_keeps_unit_norm():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    mid = figures.slerp(a, b, torch.tensor([0.5]))[0]
    assert float(mid.norm()) == pytest.approx(1, abs=1e-6)
    assert torch.allclose(mid, torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2), atol=1e-6)
    path = figures.slerp(2 * a, 2 * b, torch.linspace(0, 1, 7))  # equal norms stay equal along the path
    assert torch.allclose(path.norm(dim=-1), torch.full((7,), 2.0), atol=1e-6)
    assert torch.allclose(figures.lerp(a, b, torch.tensor([0.5]))[0], torch.tensor([0.5, 0.5, 0.0]))
    same = figures.slerp(a, a, torch.linspace(0, 1, 5))  # parallel: no NaN
    assert torch.isfinite(same).all() and torch.allclose(same, a.expand(5, 3))


def test_interpolation_endpoints_are_the_reconstructions(tmp_path, digits):
    x, _ = digits
    model = _model()
    a, b = x[:3], x[3:6]
    out = figures.interpolation(model, a, b, tmp_path / "interp.png", steps=6)
    _assert_png(tmp_path / "interp.png")
    with torch.no_grad():
        za, zb = model.encode(a).mean, model.encode(b).mean
    for kind in ("linear", "slerp"):
        z, images = out[f"z_{kind}"], out[kind]
        assert z.shape == (3, 6, 3) and images.shape == (3, 6, 1, 8, 8)
        assert torch.equal(z[:, 0], za) and torch.equal(z[:, -1], zb)
        assert torch.allclose(images[:, 0], model.reconstruct(a), atol=1e-6)
        assert torch.allclose(images[:, -1], model.reconstruct(b), atol=1e-6)
        with torch.no_grad():
            assert torch.allclose(images, model.decode(z).mean, atol=1e-6)
    assert not torch.allclose(out["z_linear"][:, 2], out["z_slerp"][:, 2])


# -- samples and traversals ---------------------------------------------------------


def test_prior_samples_scale_the_same_draws(tmp_path):
    model = _model()
    out = figures.prior_samples(model, tmp_path / "prior.png", n=16, temperatures=(1.0, 0.5), seed=3)
    _assert_png(tmp_path / "prior.png")
    assert torch.allclose(out["z"][1], 0.5 * out["z"][0])
    with torch.no_grad():
        assert torch.allclose(out["images"], model.decode(out["z"]).mean, atol=1e-6)
    again = figures.prior_samples(model, tmp_path / "again.png", n=16, seed=3)
    assert torch.equal(again["z"], out["z"])


def test_traversal_orders_dimensions_by_kl_and_changes_one_at_a_time(tmp_path, digits):
    x, _ = digits
    model = _model(latent_dim=4)
    out = figures.latent_traversal(model, x, tmp_path / "trav.png", top=3)
    _assert_png(tmp_path / "trav.png")
    kl = posterior_statistics(model, x)["kl"].mean(0)
    assert out["dims"] == torch.argsort(kl, descending=True)[:3].tolist()
    assert out["score"] == pytest.approx(sorted(kl.tolist(), reverse=True)[:3], rel=1e-5)
    values, base, z = out["values"], out["base"], out["z"]
    assert values[0] == -3 and values[-1] == 3
    for r, d in enumerate(out["dims"]):
        assert torch.equal(z[r, :, d], values)
        others = [k for k in range(4) if k != d]
        assert torch.equal(z[r][:, others], base[others].expand(len(values), 3))
    with torch.no_grad():
        assert torch.allclose(out["images"], model.decode(z).mean, atol=1e-6)


# -- curves and the likelihood plots --------------------------------------------------


def test_training_curves_read_metrics(tmp_path):
    records = [
        {"step": 10, "epoch": 0.5, "loss": 50.0, "reconstruction": 45.0, "kl": 4.0, "mu": 0.1, "sigma": 0.9, "beta": 1.0},
        {"step": 20, "epoch": 1.0, "loss": 40.0, "reconstruction": 36.0, "kl": 5.0, "mu": 0.2, "sigma": 0.8, "beta": 1.0},
        {"step": 20, "epoch": 1, "test_elbo": -42.0, "test_reconstruction": 37.0, "test_kl": 5.0},
        {"step": 40, "epoch": 2.0, "loss": 35.0, "reconstruction": 30.0, "kl": 5.5, "mu": 0.2, "sigma": 0.7, "beta": 1.0},
    ]
    out = plots.training_curves(records, tmp_path / "curves.png")
    _assert_png(tmp_path / "curves.png")
    assert out["step"] == [10, 20, 40] and out["neg_elbo"] == [49.0, 41.0, 35.5]
    assert out["eval_split"] == "test" and out["eval_step"] == [20] and out["eval_neg_elbo"] == [42.0]
    # a run of two epochs is drawn by epoch, the held-out dots at whole epochs; one under an epoch by step
    assert out["x_label"] == "epoch" and out["x"] == [0.5, 1.0, 2.0] and out["eval_x"] == [1]
    short = plots.training_curves([{**r, "epoch": r["epoch"] / 4} for r in records], tmp_path / "short.png")
    assert short["x_label"] == "step" and short["x"] == [10, 20, 40] and short["eval_x"] == [20]


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian-learned", "laplace"])
def test_likelihood_choice_nll_is_lowest_at_root_mse(tmp_path, digits, likelihood):
    x, _ = digits
    model = _model(likelihood=likelihood)
    out = plots.likelihood_choice(model, x[:10], tmp_path / "lik.png")
    _assert_png(tmp_path / "lik.png")
    residual = model.reconstruct(x[:10]).double() - x[:10].double()
    mse = float(residual.pow(2).mean())
    assert out["sigma_star"] == pytest.approx(math.sqrt(mse), rel=1e-9)
    sigma, nll = out["sigma"], out["gaussian_nll"]
    best = int(nll.argmin())
    assert float(sigma[best]) == pytest.approx(math.sqrt(mse), rel=1e-9)
    assert 0 < best < len(sigma) - 1  # an interior minimum
    # the σ-VAE likelihood is the curve's minimum; the closed form ½ log(2π MSE) + ½ per dimension
    assert out["optimal_nll"] == pytest.approx(float(nll[best]), rel=1e-5)
    assert float(nll[best]) == pytest.approx(0.5 * math.log(2 * math.pi * mse) + 0.5, rel=1e-9)
    assert float(out["scale"][int(out["laplace_nll"].argmin())]) == pytest.approx(float(residual.abs().mean()), rel=1e-9)
    # gradients: MSE → r, L1 → sign(r) = 1, log-MSE → r / MSE of the example
    r = out["residual"]
    assert torch.allclose(out["grad_mse"], r) and torch.allclose(out["grad_l1"], torch.ones_like(r))
    example = residual[0].flatten()
    mse_with_r = (example[1:].pow(2).sum() + r.pow(2)) / example.numel()
    assert torch.allclose(out["grad_log_mse"], r / mse_with_r, rtol=1e-6)
    if likelihood != "gaussian-learned":
        assert out["model_scale"] == (likelihood, 1.0)


@pytest.mark.parametrize("name", ["bernoulli", "continuous-bernoulli", "gaussian", "gaussian-learned",
                                  "gaussian-optimal", "gaussian-diag", "laplace", "laplace-learned"])
def test_a_likelihood_declares_its_one_scale_or_none(name):
    from aevb.registry import LIKELIHOODS

    summaries = {"gaussian": ("gaussian", 1.0), "gaussian-learned": ("gaussian", 1.0), "laplace": ("laplace", 1.0),
                 "laplace-learned": ("laplace", 1.0)}
    assert LIKELIHOODS.get(name)().scale_summary() == summaries.get(name)
    if name in ("gaussian", "laplace"):
        assert LIKELIHOODS.get(name)(scale=0.25).scale_summary() == (name, 0.25)


# -- which figures a run gets ----------------------------------------------------------


def _plan(tmp_path, name: str, data_shape=(1, 8, 8), **kwargs):
    from aevb.analysis.gallery import plan_figures

    model = aevb.build_model(name, data_shape=data_shape, latent_dim=2, hidden=[16], **kwargs)
    return plan_figures(model, tmp_path)  # a folder without metrics.jsonl


def test_plan_draws_each_models_own_figures_and_says_why_not_the_others(tmp_path):
    vae = _plan(tmp_path, "vae")
    assert vae.figures == ["reconstructions.png", "prior-samples.png", "interpolations.png", "latent-scatter.png",
                           "latent-grid.png", "latent-traversal.png"]
    # the figures of other kinds of model (denoising, layers) are left out without a word
    assert vae.skipped == {"training-curves.png": "the run has no metrics.jsonl",
                           "likelihood-choice.png": "drawn for densities of real values such as the Gaussian and "
                                                    "Laplace likelihoods, not bernoulli"}
    assert "layer-variation.png" in _plan(tmp_path, "hvae").figures
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    dae = _plan(tmp_path, "dae", likelihood="gaussian")
    assert {"denoising.png", "training-curves.png", "likelihood-choice.png"} <= set(dae.figures)
    assert "prior-samples.png" not in dae.figures and "no prior" in dae.skipped["prior-samples.png"]
    rows = _plan(tmp_path, "dae", data_shape=(6,), likelihood="gaussian")
    assert rows.skipped["denoising.png"] == "the data are rows of 6 numbers, not images"
    assert rows.figures == ["training-curves.png", "latent-scatter.png", "likelihood-choice.png"]
