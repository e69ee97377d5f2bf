"""Disentanglement scores against known factors, and the ``shapes`` data set that has them.

The scores are checked by what they must say: the true factors score at the
top, pure noise at the bottom (chance for the two classifier scores), a
random rotation of the factors low on MIG, DCI and SAP; permuting and
rescaling the dimensions changes nothing; a factor copied into two
dimensions has no gap.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aevb.analysis import disentanglement as dis
from aevb.data import shapes
from conftest import aevb_cli

SIZES = (3, 6, 10, 8, 8)  # a small product of factors, like dSprites' (3, 6, 40, 32, 32)
POINTS, HELD_OUT = 900, 450


@pytest.fixture(scope="module")
def grid() -> np.ndarray:
    """Every combination of the factors [11520, 5]."""
    return np.stack(np.meshgrid(*[np.arange(s) for s in SIZES], indexing="ij"), -1).reshape(-1, len(SIZES))


@pytest.fixture(scope="module")
def true_codes(grid) -> np.ndarray:
    """The factors themselves, scaled to [0, 1], with a little noise [N, 5]."""
    rng = np.random.default_rng(0)
    return grid / (np.array(SIZES) - 1) + 0.01 * rng.standard_normal(grid.shape)


def scores(codes, factors, seed=1):
    return dis.disentanglement_metrics(codes, factors, seed=seed, n_points=POINTS, n_test=HELD_OUT)


@pytest.fixture(scope="module")
def true_scores(true_codes, grid):
    return scores(true_codes, grid)


def test_true_factors_score_at_the_top(true_scores):
    assert true_scores["beta_vae_score"] >= 0.99
    assert true_scores["factor_vae_score"] >= 0.99
    assert true_scores["mig"] >= 0.9
    assert true_scores["dci_disentanglement"] >= 0.9
    assert true_scores["dci_completeness"] >= 0.9
    assert true_scores["dci_informativeness"] >= 0.95
    # SAP's single-dimension linear classifiers cannot cut 8 positions into 8 classes: its top is lower
    assert true_scores["sap"] >= 0.15


def test_noise_scores_at_the_bottom(grid, true_scores):
    noise = scores(np.random.default_rng(2).standard_normal((grid.shape[0], 5)), grid)
    chance = 1 / len(SIZES)
    assert abs(noise["beta_vae_score"] - chance) < 0.08
    assert abs(noise["factor_vae_score"] - chance) < 0.08
    for key in ("mig", "dci_disentanglement", "dci_completeness", "sap"):
        assert noise[key] < 0.05, key


@pytest.mark.parametrize("seed", range(3))
def test_a_random_projection_of_the_factors_scores_low_where_the_metric_asks_for_axes(true_codes, grid,
                                                                                      true_scores, seed):
    """Ten dimensions, each a random mixture of all five factors (three draws, none chosen)."""
    projected = true_codes @ np.random.default_rng(seed).standard_normal((5, 10))
    mixed = scores(projected, grid)
    assert mixed["mig"] < 0.3
    assert mixed["dci_disentanglement"] < 0.5
    assert mixed["sap"] < true_scores["sap"] / 2
    for key in ("factor_vae_score", "mig", "dci_disentanglement", "dci_completeness", "sap"):
        assert mixed[key] < true_scores[key], key
    # the β-VAE score is lenient to mixing (Kim & Mnih's point): its linear classifier finds the direction
    # along which a fixed factor shrinks the differences, in a mixture as well as on an axis
    assert mixed["beta_vae_score"] <= true_scores["beta_vae_score"]
    assert mixed["dci_informativeness"] > 0.5  # the information is all there, only mixed


def test_permuting_and_rescaling_the_dimensions_keeps_every_score(true_codes, grid, true_scores):
    permuted = true_codes[:, [3, 0, 4, 1, 2]] * np.array([5.0, 0.5, 2.0, 10.0, 1.0]) + 7.0
    moved = scores(permuted, grid)
    for key, value in true_scores.items():
        assert moved[key] == pytest.approx(value, abs=0.02), key


def test_a_factor_in_two_dimensions_has_no_gap(true_codes, grid):
    """MIG and SAP measure the gap to the second-best dimension: a copy of the best closes it."""
    copied = np.concatenate([true_codes, true_codes[:, :1]], axis=1)  # factor 0 twice
    rng = np.random.default_rng(0)
    information = np.sort(dis.mutual_information_matrix(copied, grid), axis=0)[::-1]
    assert information[0, 0] == pytest.approx(information[1, 0])
    assert dis.mig(copied, grid, rng) < dis.mig(true_codes, grid, rng) - 0.15  # one factor of five lost its gap


def test_collapsed_dimensions_do_not_vote(true_codes, grid):
    """A dimension that never varies would win every FactorVAE vote with variance 0; it is left out."""
    with_dead = np.concatenate([true_codes, np.zeros((grid.shape[0], 3))], axis=1)
    rng = np.random.default_rng(0)
    assert dis.factor_vae_score(with_dead, grid, rng, n_train=POINTS, n_eval=HELD_OUT) >= 0.99
    assert dis.factor_vae_score(np.zeros((grid.shape[0], 4)), grid, rng, n_train=10, n_eval=10) == 0.0


def test_partners_share_the_factor_value(grid):
    index = dis.FactorIndex(grid)
    rng = np.random.default_rng(0)
    examples = rng.integers(grid.shape[0], size=500)
    for k in range(grid.shape[1]):
        partners = index.partners(k, examples, rng)
        assert np.array_equal(grid[partners, k], grid[examples, k])
        assert (partners != examples).mean() > 0.9  # drawn among many, not the example itself
        same = index.same_value(k, 64, rng)
        assert len(np.unique(grid[same, k])) == 1


def test_bad_input_is_refused(grid):
    with pytest.raises(ValueError, match="discrete"):
        dis.mig(np.zeros((10, 2)), np.zeros((10, 2)), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        dis.sap(np.zeros((10, 2)), grid[:9], np.random.default_rng(0))


# --- the shapes data set -----------------------------------------------------------------------


def test_shapes_draws_each_factor_as_dsprites_defines_it():
    base = torch.tensor([[0, 5, 0, 16, 16]])

    def with_factor(k, values):
        factors = base.repeat(len(values), 1)
        factors[:, k] = torch.tensor(values)
        return shapes.render(factors)[:, 0]  # [n, 64, 64]

    area = with_factor(1, range(6)).sum((1, 2))  # scale: the area grows with it
    assert torch.all(area[1:] > area[:-1])
    assert area[-1] / area[0] == pytest.approx(4, rel=0.15)  # 0.5 → 1: four times the area
    columns = torch.arange(64, dtype=torch.float32)
    images = with_factor(3, range(32))  # x: the centre of mass moves right
    centre = (images.sum(1) * columns).sum(1) / images.sum((1, 2))
    assert torch.all(centre[1:] >= centre[:-1]) and centre[-1] - centre[0] > 30
    images = with_factor(4, range(32))  # y: down
    centre = (images.sum(2) * columns).sum(1) / images.sum((1, 2))
    assert torch.all(centre[1:] >= centre[:-1]) and centre[-1] - centre[0] > 30
    turned = with_factor(2, [0, 39, 10])  # rotation: 0 and 2π are one picture (dSprites has both)
    assert torch.equal(turned[0], turned[1]) and not torch.equal(turned[0], turned[2])
    kinds = with_factor(0, [0, 1, 2])  # the three shapes differ
    assert not torch.equal(kinds[0], kinds[1]) and not torch.equal(kinds[1], kinds[2])
    corners = shapes.render(torch.tensor([[s, 5, r, x, y] for s in range(3) for r in (0, 5, 15)
                                          for x in (0, 31) for y in (0, 31)]))
    assert corners[..., [0, -1], :].sum() == 0 and corners[..., :, [0, -1]].sum() == 0  # inside the frame


def test_shapes_is_a_registered_data_set_with_its_factors(tmp_path, monkeypatch):
    from aevb.data.datasets import load_data

    monkeypatch.setattr(shapes, "SHAPES_EXAMPLES", 3000)
    data = load_data("shapes", data_dir=str(tmp_path))
    assert data.train.shape[1:] == (1, 64, 64) and set(data.train.unique().tolist()) <= {0.0, 1.0}
    assert data.factor_names == ["shape", "scale", "rotation", "x", "y"]
    assert data.test_factors.shape == (data.test.shape[0], 5)
    assert torch.equal(data.test_labels, data.test_factors[:, 0])
    assert torch.equal(data.test, shapes.render(data.test_factors))  # each example is its factors' picture
    cached = list(tmp_path.glob("shapes-*.safetensors"))
    assert len(cached) == 1
    again = load_data("shapes", data_dir=str(tmp_path))  # from the cache: the same examples
    assert torch.equal(again.train, data.train) and torch.equal(again.train_factors, data.train_factors)


def test_eval_scores_a_shapes_run(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(shapes, "SHAPES_EXAMPLES", 2000)
    run = tmp_path / "run"
    assert aevb_cli("train", "--data", "shapes", "--data-dir", tmp_path / "data", "--latent-dim", "6",
                    "--hidden", "64", "--steps", "30", "--batch-size", "64", "--val-split", "0", "--quiet",
                    "--out", run) == 0
    capsys.readouterr()
    assert aevb_cli("eval", run, "-k", "2", "--factor-examples", "200", "--no-quality") == 0
    assert "disentanglement against the factors shape, scale, rotation, x, y" in capsys.readouterr().out
    scores = json.loads((run / "eval.json").read_text())["disentanglement"]
    assert scores["examples"] == 200 and scores["factors"] == ["shape", "scale", "rotation", "x", "y"]
    for key in ("beta_vae_score", "factor_vae_score", "mig", "dci_disentanglement", "dci_completeness",
                "dci_informativeness", "sap"):
        assert 0 <= scores[key] <= 1, key
