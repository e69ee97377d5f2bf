"""The Python API under misuse and round trips (found in review): one clear error, nothing half-done."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import aevb
from aevb.model import objectives
from aevb.config import make_config
from aevb.errors import NoLikelihoodError, UserError
from aevb.registry import MODELS

SHAPE = (1, 4, 4)


def _vae(**kwargs):
    return aevb.build_model("vae", data_shape=SHAPE, latent_dim=2, arch="mlp", hidden=[8], **kwargs)


def test_numpy_arguments_are_stored_as_plain_numbers_and_save(tmp_path):
    model = aevb.build_model("vae", data_shape=np.array([1, 4, 4]), latent_dim=np.int64(2), arch="mlp",
                             hidden=np.array([16, 8]), likelihood="gaussian", likelihood_args={"scale": np.float32(0.5)},
                             prior="mog", prior_args={"components": np.int64(3)})
    assert model.config["hidden"] == [16, 8] and type(model.config["latent_dim"]) is int
    model.save(tmp_path / "m")
    loaded = aevb.load(tmp_path / "m")
    assert loaded.config == model.config


def test_unsaveable_arguments_write_nothing(tmp_path):
    model = _vae()
    model.config["note"] = object()  # what a subclass might add
    with pytest.raises(UserError, match="cannot save"):
        model.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        _vae().save(tmp_path / "file")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_loads_in_the_dtype_it_was_saved_in(tmp_path, dtype):
    model = _vae().to(dtype).eval()
    model.save(tmp_path / "m")
    loaded = aevb.load(tmp_path / "m")
    assert next(loaded.parameters()).dtype == dtype
    x = torch.rand(3, *SHAPE)
    assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
    assert next(aevb.load(tmp_path / "m", dtype=torch.float32).parameters()).dtype == torch.float32


def test_hierarchical_float64_reduces_in_float64():
    model = aevb.build_model("hvae", data_shape=SHAPE, latent_dim=2, arch="mlp", hidden=[8]).double()
    x = torch.rand(3, *SHAPE, dtype=torch.float64)
    assert model.log_likelihood(x, n_samples=4).dtype == torch.float64


def test_inputs_of_the_wrong_kind_are_named():
    model = _vae()
    with pytest.raises(UserError, match="floating-point"):
        model.encode((torch.rand(2, *SHAPE) * 255).to(torch.uint8))
    with pytest.raises(UserError, match=r"decodes \[\*samples, batch, 2\]"):
        model.decode(torch.zeros(6, 3))
    with pytest.raises(UserError, match="n is a number of samples"):
        model.sample(-1)
    for temperature in (float("nan"), -1.0):
        with pytest.raises(UserError, match="temperature"):
            model.sample(3, temperature=temperature)
    x = torch.rand(2, *SHAPE)
    with pytest.raises(UserError, match="n_samples"):
        model.elbo(x, n_samples=0)
    with pytest.raises(UserError, match="k must be"):
        objectives.iwae_bound(model, x, 0)
    with pytest.raises(UserError, match="chunk_size"):
        model.log_likelihood(x, n_samples=4, chunk_size=0)
    with pytest.raises(UserError, match="empty batch"):
        model.elbo(x[:0])


def test_constructor_errors_are_user_errors():
    with pytest.raises(UserError, match="whole number"):
        aevb.build_model("vae", data_shape=SHAPE, latent_dim=2.5)
    for likelihood in ("gaussian", "gaussian-learned", "laplace-learned"):
        with pytest.raises(UserError, match="bad likelihood_args"):
            _vae(likelihood=likelihood, likelihood_args={"scale": 0})
    with pytest.raises(UserError, match="unknown option latent_dims"):
        make_config(latent_dims=3)


def test_loading_a_run_folder_points_at_its_model(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    with pytest.raises(UserError, match="is a run folder; load its model"):
        aevb.load(run)


def test_models_without_a_density_say_so_through_the_functions_too():
    ae = aevb.build_model("ae", data_shape=SHAPE, latent_dim=2, arch="mlp", hidden=[8])
    x = torch.rand(2, *SHAPE)
    for call in (lambda: objectives.elbo(ae, x), lambda: objectives.log_likelihood(ae, x, 4),
                 lambda: objectives.iwae_bound(ae, x, 2), lambda: ae.elbo(x)):
        with pytest.raises(NoLikelihoodError):
            call()
    sigma_vae = _vae(likelihood="gaussian-optimal")
    with pytest.raises(NoLikelihoodError, match="not a normalised density"):
        sigma_vae.log_likelihood(x, n_samples=4)


def test_only_training_steps_move_the_sigma_vae_running_scale():
    model = _vae(likelihood="gaussian-optimal").train()
    x = torch.rand(4, *SHAPE)
    before = model.likelihood.running_scale.clone()
    with torch.no_grad():
        model.elbo(x)
    aevb.evaluate(model, x, iw_samples=2)
    assert torch.equal(model.likelihood.running_scale, before)
    model.loss(x).loss.backward()
    assert not torch.equal(model.likelihood.running_scale, before)


def test_evaluate_leaves_the_model_in_its_mode():
    model = _vae().train()
    aevb.evaluate(model, torch.rand(4, *SHAPE), iw_samples=2)
    assert model.training
    model.eval()
    aevb.evaluate(model, torch.rand(4, *SHAPE), iw_samples=2)
    assert not model.training


def test_numpy_counts_are_counts():
    model = _vae()
    x = torch.rand(2, *SHAPE)
    assert model.sample(np.int64(3)).shape == (3, *SHAPE)
    assert model.log_likelihood(x, n_samples=np.int64(4)).shape == (2,)
    assert model.elbo(x, n_samples=np.int32(2)).shape == (2,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", sorted(name for name, _ in MODELS.items()))
def test_every_model_runs_in_bf16_and_float64(name, dtype):
    sized = {"dataset_size": 100} if MODELS.get(name).needs_dataset_size else {}
    model = aevb.build_model(name, data_shape=SHAPE, latent_dim=2, arch="mlp", hidden=[8], **sized).to(dtype)
    x = torch.rand(3, *SHAPE)
    out = model.loss(x)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.reconstruct(x).shape == x.shape
    if model.has_kl:
        assert model.sample(2).shape == (2, *SHAPE)
        assert torch.isfinite(model.log_likelihood(x, n_samples=4)).all()
