"""aevb in its users' code (issue 31, item 5): the README's "Your data, your networks" blocks, run as written.

(a) a plain user loop over a Dataset the example defines, with networks of the user's own, and aevb's own
loop on the same Dataset; (b) PyTorch Lightning's Trainer through a LightningModule that calls
``model(x)`` (skipped where Lightning is not installed: it is in the test extra).  (c) and (d), the
command line with a network by import path and the export round trips, are in ``test_user_code.py``
and ``test_outputs.py``.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

import aevb

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks() -> list[str]:
    """The Python blocks of the README's section "Your data, your networks", in order."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Your data, your networks", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture
def in_folder(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_the_three_blocks():
    assert len(readme_blocks()) == 3


def _mean_loss(model, dataset) -> float:
    """The loss of ``model`` over every example of ``dataset``, with the same draws of z whatever the model."""
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    torch.manual_seed(1)
    with torch.no_grad():
        return float(model(x).loss)


def _run(code: str, namespace: dict) -> dict:
    torch.manual_seed(0)  # the networks' initialisation
    exec(code, namespace)
    return namespace


@pytest.mark.slow
def test_a_users_loop_over_their_dataset_with_their_networks(in_folder):
    """(a) the first block: model(x) in a plain loop; saved, and loaded into the user's networks again."""
    block = readme_blocks()[0]
    trained = _run(block, {})
    assert "range(3)" in block
    untrained = _run(block.replace("range(3)", "range(0)"), {})
    model, data = trained["model"], trained["Noisy"]()
    assert model.encoder is trained["encoder"] and not model.training  # loaded (eval mode) into the same networks
    assert _mean_loss(model, data) < _mean_loss(untrained["model"], data)
    with pytest.raises(aevb.UserError, match="networks of your own"):
        aevb.load("my-vae")


@pytest.mark.slow
def test_aevbs_loop_on_the_users_dataset_records_where_the_data_came_from(in_folder):
    """(a) the second block: aevb.train on a Dataset, evaluated on data given again."""
    blocks = readme_blocks()
    namespace = _run(blocks[1], _run(blocks[0].replace("range(3)", "range(0)"), {}))
    run = namespace["run"]
    assert json.loads((run / "data.json").read_text())["train"]["examples"] == 256
    assert namespace["metrics"]["examples"] == 64 and namespace["metrics"]["neg_elbo"] > 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                    reason="PyTorch Lightning is not installed (pip install -e '.[test]' installs it)")
def test_lightnings_trainer_trains_the_model_through_forward(in_folder):
    """(b) the third block: Lightning's Trainer, whose LightningModule calls model(x)."""
    blocks = readme_blocks()
    namespace = _run(blocks[2], _run(blocks[0].replace("range(3)", "range(0)"), {}))
    trainer, model, data = namespace["trainer"], namespace["model"], namespace["Noisy"]()
    assert trainer.global_step == 3 * 4  # 3 epochs of 256 / 64 batches
    torch.manual_seed(0)
    untrained = aevb.VAE(data_shape=(1, 8, 8), latent_dim=4, hidden=[32])
    assert _mean_loss(model, data) < _mean_loss(untrained, data)
