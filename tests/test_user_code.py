"""aevb inside a user's own code (issue 31): ``model(x)``, the constructors' real signatures, the package's metadata."""

from __future__ import annotations

import inspect
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
    model = aevb.build_model(name, data_shape=SHAPE, latent_dim=2, arch="mlp", hidden=[8])
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
