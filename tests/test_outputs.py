"""Results out of the CLI as data files (issue 31, item 4): codes, samples, a table's units, torch.export and ONNX."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import aevb
from aevb.run.open import open_run
from conftest import aevb_cli

ONNX_INSTALLED = all(importlib.util.find_spec(name) is not None for name in ("onnxscript", "onnxruntime"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("outputs") / "digits"
    assert aevb_cli("train", "--latent-dim", 3, "--hidden", 32, "--steps", 40, "--device", "cpu", "-q", "--out", out) == 0
    return out


@pytest.fixture(scope="module")
def table_run(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("outputs-table")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 2)) @ rng.normal(size=(2, 4)) * 10 + 100
    np.savetxt(folder / "rows.csv", x, delimiter=",", header="w,x,y,z", comments="")
    out = folder / "run"
    assert aevb_cli("train", "--data", folder / "rows.csv", "--likelihood", "gaussian-learned", "--latent-dim", 2,
                    "--hidden", 16, "--steps", 40, "--device", "cpu", "-q", "--out", out) == 0
    return out, folder / "rows.csv"


def test_encode_writes_the_posterior_mean_sigma_and_label_of_each_example(run, tmp_path):
    assert aevb_cli("encode", run, "-o", tmp_path / "codes.npy") == 0
    codes = np.load(tmp_path / "codes.npy")
    assert codes.dtype.names == ("mean", "sigma", "label") and codes["mean"].shape == (180, 3)
    opened = open_run(run, "cpu")
    x, y = opened.held_out("test")
    with torch.no_grad():
        posterior = opened.model.encode(x)
    np.testing.assert_allclose(codes["mean"], posterior.mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(codes["sigma"], posterior.stddev.numpy(), rtol=1e-5, atol=1e-6)
    assert (codes["label"] == y.numpy()).all()
    assert aevb_cli("encode", run, "--split", "train", "-o", tmp_path / "train.csv") == 0
    lines = (tmp_path / "train.csv").read_text().splitlines()
    n_train = len(opened.held_out("train")[0])  # 1,797 digits less the test and validation splits
    assert lines[0] == "mu1,mu2,mu3,sigma1,sigma2,sigma3,label" and len(lines) == 1 + n_train


def test_encode_reads_new_rows_as_the_run_read_its_own(table_run, tmp_path):
    """A table given with --data is standardised with the run's training statistics: its last rows, the run's
    test split, get the codes the run's own test split gets."""
    run, rows = table_run
    assert aevb_cli("encode", run, "--data", rows, "-o", tmp_path / "all.csv") == 0
    assert aevb_cli("encode", run, "-o", tmp_path / "test.csv") == 0
    every = np.loadtxt(tmp_path / "all.csv", delimiter=",", skiprows=1)
    test = np.loadtxt(tmp_path / "test.csv", delimiter=",", skiprows=1)
    assert every.shape == (200, 4) and test.shape == (20, 4)
    np.testing.assert_allclose(every[-20:], test, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow is installed: parquet is written")
def test_parquet_without_pyarrow_says_what_to_install(run, tmp_path, capsys):
    assert aevb_cli("encode", run, "-o", tmp_path / "codes.parquet") == 2
    assert "needs the pyarrow package" in capsys.readouterr().err


def test_samples_as_an_array_are_the_models_samples(run, tmp_path):
    assert aevb_cli("sample", run, "-n", 6, "--seed", 3, "--format", "npy", "-o", tmp_path / "s.npy") == 0
    expected = aevb.load(run / "model").sample(6, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), expected.numpy())


def test_samples_of_images_are_no_table(run, tmp_path, capsys):
    assert aevb_cli("sample", run, "--format", "csv", "-o", tmp_path / "s.csv") == 2
    assert "write them with --format png or npy" in capsys.readouterr().err


@pytest.mark.slow
def test_export_writes_torch_export_programs_that_compute_what_the_model_does(run, tmp_path, capsys):
    """Issue 31, 5(d): the torch.export round trip, and ONNX where its extra is installed."""
    assert aevb_cli("export", run, "-o", tmp_path / "export") == 0
    printed = capsys.readouterr().out
    model = aevb.load(run / "model")
    x = torch.rand(3, *model.data_shape)
    z = torch.randn(11, model.latent_dim)
    with torch.no_grad():
        encoder = torch.export.load(tmp_path / "export" / "encoder.pt2").module()
        decoder = torch.export.load(tmp_path / "export" / "decoder.pt2").module()
        torch.testing.assert_close(encoder(x), model.encoder(x))
        torch.testing.assert_close(decoder(z), model.decoder(z))
    record = json.loads((tmp_path / "export" / "export.json").read_text())
    assert record["encoder"]["torch_export"]["max_abs_difference"] <= 1e-5
    if not ONNX_INSTALLED:
        assert "ONNX needs the onnx extra (pip install 'aevb[onnx]'" in printed
        assert not list((tmp_path / "export").glob("*.onnx"))
        return
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "export" / "decoder.onnx"))
    (params,) = session.run(None, {session.get_inputs()[0].name: z.numpy()})
    np.testing.assert_allclose(params, model.decoder(z).detach().numpy(), rtol=1e-4, atol=1e-4)
