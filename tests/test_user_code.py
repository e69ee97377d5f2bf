"""aevb inside a user's own code (issue 31): ``model(x)``, the constructors' real signatures, the package's metadata."""

from __future__ import annotations

import inspect
import json
import os
import pydoc
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import aevb
from aevb.registry import MODELS

SHAPE = (1, 4, 4)
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", MODELS.names())
def test_calling_a_model_returns_the_loss_training_minimises(name):
    # a model whose loss needs the training set's size (β-TCVAE) declares it; a loop of one's own passes it
    sized = {"dataset_size": 100} if MODELS.get(name).needs_dataset_size else {}
    model = aevb.build_model(name, data_shape=SHAPE, latent_dim=2, arch="mlp", hidden=[8], **sized)
    x = torch.rand(5, *SHAPE)
    torch.manual_seed(0)
    expected = model.loss(x)
    seen = []
    handle = model.register_forward_hook(lambda module, args, output: seen.append(output))
    torch.manual_seed(0)
    out = model(x)
    handle.remove()
    assert isinstance(out, aevb.LossOutput) and seen == [out]
    assert torch.allclose(out.loss, expected.loss) and out.names() == expected.names()
    out.loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters())


def test_distributed_data_parallel_wraps_a_model(tmp_path):
    """DDP calls forward and finds the loss's tensors in the LossOutput (one process, gloo)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = aevb.build_model("vae", data_shape=SHAPE, latent_dim=2, arch="mlp", hidden=[8])
        out = torch.nn.parallel.DistributedDataParallel(model)(torch.rand(5, *SHAPE))
        out.loss.backward()
    finally:
        dist.destroy_process_group()
    assert isinstance(out, aevb.LossOutput) and all(p.grad is not None for p in model.parameters())


def test_forward_takes_the_batch_only():
    """The trainer's β schedule goes to ``loss(x, beta)``; ``model(x)`` takes no state of a trainer."""
    assert list(inspect.signature(aevb.VAE.forward).parameters) == ["self", "x"]


@pytest.mark.parametrize("name", MODELS.names())
def test_a_constructor_shows_every_argument_it_takes(name):
    cls = MODELS.get(name)
    parameters = inspect.signature(cls).parameters
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters.values())
    assert {"data_shape", "latent_dim", "arch", "likelihood", "hidden"} <= set(parameters)
    assert {option.name for option in cls.options} - {"prior_components"} <= set(parameters)
    defaults = {n: p.default for n, p in parameters.items() if p.default is not p.empty}
    model = cls(**{**defaults, "data_shape": SHAPE, "hidden": [8], "latent_dim": 2})  # the shown defaults are taken
    assert model.data_shape == SHAPE


def test_help_shows_the_signature_and_the_docstring_not_torchs():
    text = pydoc.render_doc(aevb.VAE, renderer=pydoc.plaintext)
    assert "Initialize internal Module state" not in text
    signatures = [line for line in text.splitlines() if line.lstrip(" |").startswith(("VAE(", "__init__("))]
    assert len(signatures) == 2 and not any("*args" in line or "**kwargs" in line for line in signatures)
    assert "beta: 'float' = 1.0" in text and "mc_samples" in text and aevb.VAE.__doc__.splitlines()[0] in text


@pytest.mark.slow
def test_the_wheel_ships_py_typed_and_the_license(tmp_path):
    source = tmp_path / "src"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "src", source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(tmp_path), "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("aevb-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "aevb/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata


# -- the user's own networks --------------------------------------------------

NETS = '''
"""A user's networks for 8x8 images, as a package of theirs would hold them."""
from torch import nn


def build(data_shape, latent_dim, encoder_outputs, decoder_channels, hidden=None):
    width = (hidden or [24])[0]
    c, h, w = data_shape
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, width), nn.Tanh(), nn.Linear(width, encoder_outputs))
    decoder = nn.Sequential(nn.Linear(latent_dim, width), nn.Tanh(), nn.Linear(width, decoder_channels * h * w),
                            nn.Unflatten(1, (decoder_channels, h, w)))
    return encoder, decoder


def wrong(data_shape, latent_dim, encoder_outputs, decoder_channels, hidden=None):
    encoder, decoder = build(data_shape, latent_dim, encoder_outputs + 1, decoder_channels, hidden)
    return encoder, decoder
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A package ``my_nets`` of the user's, importable here (and, with PYTHONPATH, in a new process)."""
    (tmp_path / "my_nets").mkdir()
    (tmp_path / "my_nets" / "__init__.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_nets", None)


def _networks(latent_dim=2, encoder_outputs=4, data_values=16):
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(data_values, encoder_outputs))
    decoder = torch.nn.Sequential(torch.nn.Linear(latent_dim, data_values), torch.nn.Unflatten(1, SHAPE))
    return encoder, decoder


def test_a_vae_of_the_users_networks_trains_saves_and_loads_into_them(tmp_path):
    encoder, decoder = _networks()
    model = aevb.VAE(SHAPE, latent_dim=2, encoder=encoder, decoder=decoder)
    assert model.encoder is encoder and model.config["arch"] is None
    x = torch.rand(6, *SHAPE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(x).loss.backward()
    optimizer.step()
    model.save(tmp_path / "m")
    with pytest.raises(aevb.UserError, match=r"networks of your own; load it with aevb.load\(.*encoder=..., decoder="):
        aevb.load(tmp_path / "m")
    loaded = aevb.load(tmp_path / "m", encoder=_networks()[0], decoder=_networks()[1])
    assert torch.equal(loaded.reconstruct(x), model.eval().reconstruct(x))


@pytest.mark.parametrize("outputs, message", [
    (dict(encoder_outputs=3), r"your encoder returns \[2, 3\] for a batch of 2; it must return \[B, 4\], 2 parameter"),
    (dict(latent_dim=3), r"your decoder fails on a batch \[2, 2\] .*it must map \[B, 2\] to \[B, 1, 4, 4\]"),
])
def test_networks_of_the_wrong_output_size_are_refused_naming_the_shape(outputs, message):
    encoder, decoder = _networks(**outputs)
    with pytest.raises(aevb.UserError, match=message):
        aevb.VAE(SHAPE, latent_dim=2, encoder=encoder, decoder=decoder)


def test_the_networks_check_changes_no_statistics():
    encoder, decoder = _networks()
    encoder = torch.nn.Sequential(torch.nn.BatchNorm2d(1), *encoder)
    aevb.VAE(SHAPE, latent_dim=2, encoder=encoder, decoder=decoder)
    assert encoder.training and encoder[0].num_batches_tracked == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(encoder=_networks()[0]), "pass both encoder= and decoder="),
    (dict(encoder=_networks()[0], decoder=_networks()[1], arch="conv"), "replace arch= and hidden="),
])
def test_networks_given_half_or_beside_an_arch_are_refused(kwargs, message):
    with pytest.raises(aevb.UserError, match=message):
        aevb.VAE(SHAPE, latent_dim=2, **kwargs)


def test_an_import_path_builds_checks_and_records_the_network(user_package):
    from aevb.config import make_config

    model = aevb.build_model("vae", data_shape=(1, 8, 8), latent_dim=2, arch="my_nets:build")
    assert model.config["arch"] == "my_nets:build" and isinstance(model.encoder[2], torch.nn.Tanh)
    assert make_config(arch="my_nets:build").arch == "my_nets:build"
    with pytest.raises(aevb.UserError, match=r"the encoder of my_nets:wrong returns \[2, 5\] .* \[B, 4\]"):
        aevb.build_model("vae", data_shape=(1, 8, 8), latent_dim=2, arch="my_nets:wrong")
    with pytest.raises(aevb.UserError, match="cannot import the network 'not_there.nets:build'.*PYTHONPATH"):
        make_config(arch="not_there.nets:build")
    with pytest.raises(aevb.UserError, match="module my_nets has no missing"):
        make_config(arch="my_nets:missing")


def test_a_network_registered_before_make_config_is_accepted():
    from aevb.config import make_config
    from aevb.registry import NETWORKS

    NETWORKS.register("test-user-net")(lambda *args: _networks())
    try:
        assert make_config(arch="test-user-net").arch == "test-user-net"
    finally:
        NETWORKS.unregister("test-user-net")


def _fresh_process(code: str, package: Path) -> str:
    """Run ``code`` in a new Python process that sees this aevb and the user's package; its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(package)])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_a_network_by_import_path_from_the_cli_is_evaluated_and_loaded_in_a_new_process(user_package, tmp_path):
    """Issue 31, 5(c): train from the command line with --arch my_nets:build; eval and load in fresh processes."""
    from conftest import aevb_cli

    run = tmp_path / "run"
    assert aevb_cli("train", "--arch", "my_nets:build", "--latent-dim", "2", "--steps", "20", "--device", "cpu",
                    "-q", "--out", run) == 0
    assert json.loads((run / "config.json").read_text())["arch"] == "my_nets:build"
    sys.modules.pop("my_nets")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(user_package)])}
    proc = subprocess.run([sys.executable, "-m", "aevb.cli", "eval", str(run), "--iw-samples", "4"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "eval.json").read_text())["neg_elbo"] > 0
    out = _fresh_process(f"import aevb; m = aevb.load({str(run / 'model')!r}); "
                         f"print(m.config['arch'], type(m.encoder[2]).__name__)", user_package)
    assert out.split() == ["my_nets:build", "Tanh"]
    assert sorted(p.name for p in (run / "model").iterdir()) == ["config.json", "weights.safetensors"]  # no pickle
