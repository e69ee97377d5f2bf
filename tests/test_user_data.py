"""Training and evaluation on data a Python caller holds (issue 31, item 1): tensors, arrays, Datasets, DataLoaders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import aevb
from aevb.config import make_config, read_config_file
from aevb.data.memory import IN_MEMORY, memory_dataset

SMALL = dict(latent_dim=2, hidden=[16], steps=12, batch_size=32, log_every=1, device="cpu")


@pytest.fixture(scope="module")
def digits():
    """200 training and 40 test images [N, 1, 8, 8] in [0, 1], with labels."""
    x = torch.rand(240, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(240) % 10
    return x, y


class Rows(torch.utils.data.Dataset):
    """A user's Dataset: each item computed when asked for, as ``(x, y)``."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i].clone(), int(self.y[i])


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_tensor_trains_as_the_same_data_from_a_file(tmp_path, digits, one_thread):
    x, _ = digits
    np.save(tmp_path / "x.npy", x.numpy())
    _, from_file = aevb.train(make_config(data=str(tmp_path / "x.npy"), test_split=40, out=str(tmp_path / "f"),
                                          **SMALL), progress=False)
    _, in_memory = aevb.train(make_config(out=str(tmp_path / "m"), **SMALL), train=x[:200], test=x[200:],
                              progress=False)
    assert _losses(in_memory) == _losses(from_file)
    assert json.loads((in_memory / "config.json").read_text())["data"] == IN_MEMORY
    recorded = json.loads((in_memory / "data.json").read_text())
    assert recorded["train"]["shape"] == [200, 1, 8, 8] and recorded["reproducible_from_config"] is False


@pytest.mark.parametrize("wrap", [lambda x, y: Rows(x, y), lambda x, y: DataLoader(Rows(x, y), num_workers=0)],
                         ids=["Dataset", "DataLoader"])
def test_a_dataset_read_by_batch_trains_as_the_tensors(tmp_path, digits, one_thread, wrap):
    """A user's Dataset goes through a DataLoader (workers for a Dataset) in the run's seeded order: the same batches."""
    x, y = digits
    _, tensors = aevb.train(make_config(out=str(tmp_path / "t"), **SMALL), train=x[:200], test=x[200:],
                            progress=False)
    _, dataset = aevb.train(make_config(out=str(tmp_path / "d"), **SMALL), train=wrap(x[:200], y[:200]),
                            test=Rows(x[200:], y[200:]), progress=False)
    assert _losses(dataset) == _losses(tensors)
    assert json.loads((dataset / "data.json").read_text())["train"]["examples"] == 200


def test_a_run_on_data_in_memory_says_how_to_rerun_it_and_evaluates_on_data_given_again(tmp_path, digits, one_thread):
    x, y = digits
    _, run = aevb.train(make_config(out=str(tmp_path / "m"), **SMALL), train=(x[:200], y[:200]),
                        test=(x[200:], y[200:]), progress=False)
    again = make_config(read_config_file(run / "config.json", template=True), out=str(tmp_path / "again"))
    with pytest.raises(aevb.UserError, match=r"passed in memory.*numpy.save\('train.npy', x\).*--data train.npy"):
        aevb.train(again, progress=False)
    with pytest.raises(aevb.UserError, match="passed in memory"):
        aevb.evaluate_run(run, iw_samples=2)
    metrics = aevb.evaluate_run(run, iw_samples=2, test=(x[200:], y[200:]), train=(x[:200], y[:200]))
    assert metrics["examples"] == 40 and "representation_accuracy" in metrics and len(metrics["per_class"]) == 10


def test_8_bit_arrays_are_pixels_of_256_levels():
    dataset = memory_dataset(np.full((4, 8, 8), 255, dtype=np.uint8))
    assert dataset.levels == 256 and dataset.data_shape == (1, 8, 8) and dataset.kind == "image"
    assert torch.equal(dataset.train, torch.ones(4, 1, 8, 8))
    assert memory_dataset(np.zeros((5, 3))).kind == "tabular"


@pytest.mark.parametrize("train, test, message", [
    (torch.rand(4, 2, 3, 4, 5), None, r"has shape \[4, 2, 3, 4, 5\]; pass rows \[N, D\] or images"),
    (torch.arange(8).reshape(4, 2), None, "dtype torch.int64; pass floating-point"),
    (torch.rand(4, 3), torch.rand(4, 2), r"test= holds examples of shape \[2\] and train= of shape \[3\]"),
    ((torch.rand(4, 3), torch.rand(4)), None, "labels of train= .* one whole number per example"),
    ("x.npy", None, "train= is a str; pass a tensor"),
])
def test_data_that_cannot_be_trained_on_are_named(train, test, message):
    with pytest.raises(aevb.UserError, match=message):
        memory_dataset(train, test)


def test_an_iterable_dataset_and_a_test_split_alone_are_refused(tmp_path):
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.rand(3)

    with pytest.raises(aevb.UserError, match="IterableDataset, which has no length"):
        memory_dataset(Stream())
    with pytest.raises(aevb.UserError, match="empty Dataset"):
        memory_dataset(Rows(torch.empty(0, 3), torch.empty(0)))
    with pytest.raises(aevb.UserError, match="test= and val= are splits of data given as train="):
        aevb.train(make_config(out=str(tmp_path / "r"), **SMALL), test=torch.rand(4, 1, 8, 8))


def test_a_tensor_dataset_is_held_as_its_tensors():
    x, y = torch.rand(6, 3), torch.arange(6)
    dataset = memory_dataset(TensorDataset(x, y), DataLoader(TensorDataset(x, y)))
    assert torch.equal(dataset.train, x) and torch.equal(dataset.test_labels, y)


def test_evaluate_takes_a_dataset_and_its_labels():
    model = aevb.VAE((1, 8, 8), latent_dim=2, hidden=[16])
    x, y = torch.rand(30, 1, 8, 8), torch.arange(30) % 3
    torch.manual_seed(0)
    from_dataset = aevb.evaluate(model, Rows(x, y), iw_samples=2)
    torch.manual_seed(0)
    from_tensors = aevb.evaluate(model, x, labels=y, iw_samples=2)
    assert from_dataset == from_tensors and len(from_dataset["per_class"]) == 3
