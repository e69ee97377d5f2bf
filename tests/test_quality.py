"""Sample quality (aevb.analysis.quality, aevb.analysis.features): the measures against closed forms and Monte
Carlo, their meaning on the digits (a floor, degradations, mode dropping, a trained model between the floor
and noise), the cached feature classifier, a user's feature network, and ``aevb eval`` / ``aevb report``."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import scipy.linalg
import torch

from aevb.analysis import features as feature_module
from aevb.analysis.features import ClassifierOptions, classifier_features, train_classifier, user_features
from aevb.analysis.quality import (compare, frechet_distance, frechet_distance_gaussians, kernel_distance,
                                   precision_recall, sample_quality)
from aevb.data.datasets import load_data
from aevb.errors import UserError
from conftest import aevb_cli

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ("--latent-dim", "8", "--hidden", "64", "--device", "cpu", "-q", "--val-split", "0")


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def digit_features(digits):
    """The default classifier's features on the digits (trained once a session, then read from the cache)."""
    return classifier_features(digits.train, digits.train_labels, digits.test, digits.test_labels)


def _random_covariance(dims: int, generator: torch.Generator) -> torch.Tensor:
    root = torch.randn(dims, dims, generator=generator, dtype=torch.float64)
    return root @ root.T / dims + 0.1 * torch.eye(dims, dtype=torch.float64)


# -- the measures against closed forms ---------------------------------------------------------------------------


def test_frechet_distance_of_gaussians_matches_scipy_sqrtm_and_the_diagonal_closed_form():
    generator = torch.Generator().manual_seed(0)
    cov_a, cov_b = _random_covariance(5, generator), _random_covariance(5, generator)  # not commuting
    mean_a, mean_b = torch.randn(5, generator=generator, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    cross = scipy.linalg.sqrtm(cov_a.numpy() @ cov_b.numpy()).real.trace()
    expected = float((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)
    assert frechet_distance_gaussians(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected, rel=1e-9)
    # diagonal covariances: ‖μa − μb‖² + Σ (σa − σb)²
    sd_a, sd_b = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    shift = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    assert frechet_distance_gaussians(shift, torch.diag(sd_a ** 2), torch.zeros(3, dtype=torch.float64),
                                      torch.diag(sd_b ** 2)) == pytest.approx(6 + 4 + 1, rel=1e-12)


def test_frechet_distance_of_samples_converges_to_the_closed_form_and_is_zero_for_identical_sets():
    generator = torch.Generator().manual_seed(1)
    cov_a, cov_b = _random_covariance(3, generator), _random_covariance(3, generator)
    mean_a = torch.tensor([0.5, 0.0, -0.5], dtype=torch.float64)
    mean_b = torch.zeros(3, dtype=torch.float64)
    n = 200_000
    a = mean_a + torch.randn(n, 3, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(cov_a).T
    b = mean_b + torch.randn(n, 3, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(cov_b).T
    exact = frechet_distance_gaussians(mean_a, cov_a, mean_b, cov_b)
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.02, abs=0.01)
    assert frechet_distance(a[:500], a[:500]) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a[:500], a[:500].flip(0)) == pytest.approx(0.0, abs=1e-9)  # the order is no matter


def test_kernel_distance_equals_the_u_statistic_computed_directly_whatever_the_block():
    generator = torch.Generator().manual_seed(2)
    a, b = torch.randn(30, 4, generator=generator), torch.randn(30, 4, generator=generator) + 0.5
    k = lambda x, y: (x.double() @ y.double().T / 4 + 1) ** 3  # noqa: E731
    h = k(a, a) + k(b, b) - k(a, b) - k(b, a)
    expected = float((h.sum() - h.diagonal().sum()) / (30 * 29))
    whole, error = kernel_distance(a, b)
    blocked, blocked_error = kernel_distance(a, b, block=7)
    assert whole == pytest.approx(expected, rel=1e-10) and blocked == pytest.approx(expected, rel=1e-10)
    assert blocked_error == pytest.approx(error, rel=1e-10) and error > 0


def test_kernel_distance_is_unbiased_and_its_standard_error_covers_it():
    """Two samples of one distribution: zero in expectation (negative values included); the standard error
    covers the estimate; samples of two distributions: several standard errors above zero."""
    generator = torch.Generator().manual_seed(3)
    estimates, errors = [], []
    for _ in range(60):
        estimate, error = kernel_distance(torch.randn(100, 6, generator=generator),
                                          torch.randn(100, 6, generator=generator))
        estimates.append(estimate)
        errors.append(error)
    estimates, errors = torch.tensor(estimates), torch.tensor(errors)
    assert (estimates < 0).any()  # an unbiased estimate of a zero MMD² falls on both sides
    assert abs(estimates.mean()) < 3 * estimates.std() / math.sqrt(len(estimates))
    assert ((estimates.abs() < 2 * errors).float().mean()) >= 0.9
    # the jackknife's error is that of the estimates (conservative when the two are alike)
    assert 0.8 * estimates.std() < errors.mean() < 2 * estimates.std()
    shifted, error = kernel_distance(torch.randn(100, 6, generator=generator),
                                     torch.randn(100, 6, generator=generator) * 1.5 + 0.3)
    assert shifted > 3 * error


def test_precision_and_recall_tell_fidelity_from_diversity_on_clusters():
    """Samples from 2 of 10 clusters: precise (they lie on the data) but low recall (8 modes dropped);
    samples spread over all of space: diverse-looking but imprecise."""
    generator = torch.Generator().manual_seed(4)
    centres = 6 * torch.randn(10, 5, generator=generator)
    labels = torch.arange(500) % 10
    real = centres[labels] + torch.randn(500, 5, generator=generator)
    full = compare(real, centres[labels] + torch.randn(500, 5, generator=generator))
    dropped = precision_recall(real, centres[labels % 2] + torch.randn(500, 5, generator=generator))
    assert full["precision"] > 0.9 and full["recall"] > 0.9
    assert dropped["precision"] > 0.9 and dropped["recall"] < 0.4
    assert dropped["coverage"] < 0.4 < full["coverage"]
    wide = precision_recall(real, 8 * torch.randn(500, 5, generator=generator))
    assert wide["precision"] < 0.5 < full["precision"]


# -- the classifier --------------------------------------------------------------------------------------------------


def test_the_classifier_is_deterministic_for_a_seed_and_the_seed_matters(digits):
    options = ClassifierOptions(steps=10)
    first, second = (train_classifier(digits.train, digits.train_labels, 10, options) for _ in range(2))
    other = train_classifier(digits.train, digits.train_labels, 10, ClassifierOptions(steps=10, seed=1))
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name])
    assert not torch.equal(first.head.weight, other.head.weight)


def test_the_classifier_is_trained_once_cached_under_the_cache_folder_and_accurate(digits, digit_features,
                                                                                   monkeypatch):
    assert digit_features.accuracy > 0.9  # on the digits' test split: its features separate the classes
    entries = list(feature_module.cache_folder().iterdir())
    assert entries and all((e / "weights.safetensors").is_file() and (e / "classifier.json").is_file()
                           for e in entries)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of read from the cache")

    monkeypatch.setattr(feature_module, "train_classifier", no_training)
    again = classifier_features(digits.train, digits.train_labels, digits.test, digits.test_labels)
    assert again.accuracy == digit_features.accuracy
    assert torch.equal(again(digits.test[:20]), digit_features(digits.test[:20]))
    # other labels are other data: no stale classifier for them
    with pytest.raises(AssertionError, match="trained again"):
        classifier_features(digits.train, (digits.train_labels + 1) % 10, digits.test, digits.test_labels)


def test_a_damaged_cache_entry_is_retrained(digits, tmp_path, monkeypatch):
    import aevb.data.sources

    monkeypatch.setattr(aevb.data.sources, "CACHE_DIR", tmp_path)
    options = ClassifierOptions(steps=5)
    first = classifier_features(digits.train, digits.train_labels, digits.test, digits.test_labels, options=options)
    (entry,) = (tmp_path / "classifiers").iterdir()
    (entry / "weights.safetensors").write_bytes(b"not safetensors")
    again = classifier_features(digits.train, digits.train_labels, digits.test, digits.test_labels, options=options)
    assert again.accuracy == first.accuracy
    assert torch.equal(again(digits.test[:5]), first(digits.test[:5]))


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_evaluation(digits, tmp_path, monkeypatch):
    import aevb.data.sources

    blocked = tmp_path / "a file, not a folder"
    blocked.write_text("")
    monkeypatch.setattr(aevb.data.sources, "CACHE_DIR", blocked)
    with pytest.warns(UserWarning, match="could not be cached"):
        features = classifier_features(digits.train, digits.train_labels, digits.test, digits.test_labels,
                                       options=ClassifierOptions(steps=5))
    assert features(digits.test[:3]).shape == (3, 64) and blocked.read_text() == ""


# -- what the numbers mean on the digits -------------------------------------------------------------------------


def _blur(x: torch.Tensor, times: int) -> torch.Tensor:
    """x [N, 1, H, W] through a 3×3 box filter ``times`` times."""
    for _ in range(times):
        x = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return x


def _noised(x: torch.Tensor, sd: float, seed: int = 0) -> torch.Tensor:
    return (x + sd * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)


def _copies_of_train(digits, change) -> callable:
    """A 'sampler' drawing training images changed by ``change``."""
    return lambda n, generator: change(digits.train[torch.randperm(len(digits.train), generator=generator)[:n]])


def test_the_floor_is_small_and_distances_grow_with_blur_and_noise(digits, digit_features):
    """The same training images (each draw's generator has the same seed), blurred or noised more and more."""
    levels = {"clean": _copies_of_train(digits, lambda x: x)}
    levels.update({f"blur {t}": _copies_of_train(digits, lambda x, t=t: _blur(x, t)) for t in (1, 2, 4)})
    levels.update({f"noise {sd}": _copies_of_train(digits, lambda x, sd=sd: _noised(x, sd)) for sd in (0.2, 0.4, 0.8)})
    levels["uniform noise"] = lambda n, generator: torch.rand(n, 1, 8, 8, generator=generator)
    result = sample_quality(digit_features, digits.test, digits.train, levels, n=180)
    floor, rows = result["floor"], result["samplers"]
    assert result["examples"] == 180 and result["classifier_accuracy"] == digit_features.accuracy
    noise = rows["uniform noise"]
    assert floor["frechet_distance"] < 0.3 * noise["frechet_distance"]
    assert floor["kid"] < noise["kid"] - 2 * noise["kid_standard_error"]
    assert floor["precision"] > 0.8 and floor["recall"] > 0.8 and noise["precision"] < 0.6
    for kind, names in (("blur", ["clean", "blur 1", "blur 2", "blur 4"]),
                        ("noise", ["clean", "noise 0.2", "noise 0.4", "noise 0.8"])):
        distances = [rows[n]["frechet_distance"] for n in names]
        kids = [rows[n]["kid"] for n in names]
        assert distances == sorted(distances) and distances[0] < 0.5 * distances[-1], (kind, distances)
        assert kids == sorted(kids), (kind, kids)
        assert rows[names[-1]]["kid"] > rows["clean"]["kid"] + 2 * rows[names[-1]]["kid_standard_error"]
    # noise moves images off the digits' manifold (fidelity falls); blur pulls them together (diversity falls)
    precisions = [rows[n]["precision"] for n in ("clean", "noise 0.2", "noise 0.4", "noise 0.8")]
    assert precisions == sorted(precisions, reverse=True) and precisions[-1] < precisions[0] - 0.1
    recalls = [rows[n]["recall"] for n in ("clean", "blur 1", "blur 2", "blur 4")]
    assert recalls == sorted(recalls, reverse=True) and recalls[-1] < 0.5 * recalls[0]


def test_dropping_classes_lowers_recall_and_coverage_not_precision(digits, digit_features):
    few = digits.train[digits.train_labels < 3]  # three of the ten digits: real images, most modes dropped
    draws = {"three classes": lambda n, generator: few[torch.randperm(len(few), generator=generator)[:n]]}
    result = sample_quality(digit_features, digits.test, digits.train, draws, n=180)
    floor, dropped = result["floor"], result["samplers"]["three classes"]
    assert dropped["recall"] < 0.6 * floor["recall"] and dropped["coverage"] < 0.6 * floor["coverage"]
    assert dropped["precision"] > floor["precision"] - 0.1
    assert dropped["frechet_distance"] > floor["frechet_distance"]


def test_the_samples_of_a_trained_vae_score_between_the_floor_and_noise(tmp_path, digits, digit_features):
    run = tmp_path / "vae"
    assert aevb_cli("train", "--out", run, *SMALL, "--epochs", 15) == 0
    assert aevb_cli("eval", run, "-k", 10) == 0
    quality = json.loads((run / "eval.json").read_text())["sample_quality"]
    assert quality["classifier_accuracy"] == digit_features.accuracy  # the same data: the cached classifier
    noise = sample_quality(digit_features, digits.test, None,
                           {"noise": lambda n, generator: torch.rand(n, 1, 8, 8, generator=generator)},
                           n=quality["examples"])["samplers"]["noise"]
    prior, floor = quality["samplers"]["prior"], quality["floor"]
    assert floor["frechet_distance"] < prior["frechet_distance"] < noise["frechet_distance"], (floor, prior, noise)
    assert floor["kid"] < prior["kid"] < noise["kid"], (floor, prior, noise)
    assert prior["precision"] > noise["precision"]


# -- aevb eval and aevb report -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quality") / "vae"
    assert aevb_cli("train", "--out", out, *SMALL, "--epochs", 1) == 0
    return out


def test_eval_prints_the_table_with_the_classifier_accuracy_and_writes_eval_json(small_run, capsys, digit_features):
    assert aevb_cli("eval", small_run, "-k", 2, "--quality-samples", 50) == 0
    out = capsys.readouterr().out
    assert "sample quality: 50 samples against 50 test examples" in out
    assert f"test accuracy {digit_features.accuracy:.3f}" in out
    assert "floor (training split)" in out and "\nprior " in out
    quality = json.loads((small_run / "eval.json").read_text())["sample_quality"]
    assert quality["examples"] == 50 and set(quality["samplers"]) == {"prior"}
    assert set(quality["floor"]) == {"frechet_distance", "kid", "kid_standard_error", "precision", "recall",
                                     "density", "coverage"}
    assert aevb_cli("eval", small_run, "-k", 3, "--no-quality") == 0
    assert "sample quality" not in capsys.readouterr().out
    assert "sample_quality" not in json.loads((small_run / "eval.json").read_text())


def test_report_shows_the_sample_quality_with_the_classifier_accuracy(small_run, tmp_path, digit_features):
    (small_run / "eval.json").unlink(missing_ok=True)
    out = tmp_path / "report.html"
    assert aevb_cli("report", small_run, "-k", 2, "-o", out) == 0
    page = out.read_text()
    assert "<h2>Sample quality</h2>" in page and "floor: the training split" in page and "sampler: prior" in page
    assert f"test accuracy is {digit_features.accuracy:.3f}" in page


def test_an_autoencoder_says_why_it_has_no_sample_quality_and_refuses_quality(tmp_path, capsys):
    run = tmp_path / "ae"
    assert aevb_cli("train", "--out", run, "--model", "ae", *SMALL, "--epochs", 1) == 0
    assert aevb_cli("eval", run) == 0
    out = capsys.readouterr().out
    assert "note: no sample quality: an autoencoder (ae) has no prior to sample from" in out
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["sample_quality"] is None and "autoencoder" in metrics["sample_quality_note"]
    before = (run / "eval.json").read_bytes()
    assert aevb_cli("eval", run, "--quality") == 2
    assert "no sample quality" in capsys.readouterr().err
    assert (run / "eval.json").read_bytes() == before  # the earlier results are kept
    # with a Gaussian mixture fitted to its codes, the autoencoder samples, and its samples are judged
    assert aevb_cli("fit-sampler", run, "--sampler", "gmm", "--max-components", "3") == 0
    assert aevb_cli("eval", run, "--quality") == 0
    quality = json.loads((run / "eval.json").read_text())["sample_quality"]
    assert list(quality["samplers"]) == ["gmm"]
    gmm, floor = quality["samplers"]["gmm"], quality["floor"]
    assert gmm["frechet_distance"] > floor["frechet_distance"] and 0 <= gmm["precision"] <= 1


def test_a_users_feature_network_by_import_path(small_run, tmp_path, monkeypatch, capsys):
    (tmp_path / "my_features.py").write_text(textwrap.dedent("""
        import torch

        def build(data_shape):
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Tanh())

        def not_a_module(data_shape):
            return "features"

        def wrong_shape(data_shape):
            return torch.nn.Conv2d(1, 1, 1)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    features = user_features("my_features:build", (1, 8, 8))
    assert features.accuracy is None and features(torch.rand(3, 1, 8, 8)).shape == (3, 16)
    assert aevb_cli("eval", small_run, "-k", 2, "--quality-samples", 40, "--features", "my_features:build") == 0
    quality = json.loads((small_run / "eval.json").read_text())["sample_quality"]
    assert quality["features"].startswith("my_features:build") and quality["classifier_accuracy"] is None
    capsys.readouterr()
    for bad, words in (("my_features:not_a_module", "returned str"),
                       ("my_features:wrong_shape", "returns [2, 1, 8, 8] for a batch of 2"),
                       ("no_such_module:build", "cannot import")):
        assert aevb_cli("eval", small_run, "-k", 2, "--features", bad) == 2
        assert words in capsys.readouterr().err


def test_too_small_a_test_split_is_a_user_error(digits, digit_features):
    with pytest.raises(UserError, match="at least 20 test examples"):
        sample_quality(digit_features, digits.test[:10], digits.train, {}, n=100)
    assert sample_quality(digit_features, digits.test[:20], None, {}, n=100)["examples"] == 20


def test_rows_of_a_table_get_an_mlp_classifier(tmp_path, monkeypatch):
    """Rows [N, D] of two classes apart: the MLP separates them, and its features put samples of one class
    far from a test set of both (recall halves) but close to the class itself (precision stays)."""
    import aevb.data.sources

    monkeypatch.setattr(aevb.data.sources, "CACHE_DIR", tmp_path)
    generator = torch.Generator().manual_seed(5)
    labels = torch.arange(600) % 2
    rows = torch.randn(600, 6, generator=generator) + 3 * labels[:, None].float()
    features = classifier_features(rows[:400], labels[:400], rows[400:], labels[400:],
                                   options=ClassifierOptions(steps=200))
    assert "MLP" in features.description and features.accuracy > 0.95
    assert features(rows[:7]).shape == (7, 64)
    one_class = rows[:400][labels[:400] == 0]
    result = sample_quality(features, rows[400:], rows[:400],
                            {"one class": lambda n, generator: one_class[:n]}, n=100)
    assert result["samplers"]["one class"]["recall"] < 0.7 * result["floor"]["recall"]
    assert result["samplers"]["one class"]["precision"] > 0.8
