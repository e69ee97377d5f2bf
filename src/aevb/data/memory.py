"""Data a Python caller already holds: tensors, NumPy arrays, a torch ``Dataset`` or a ``DataLoader``.

:func:`memory_dataset` makes them the :class:`~aevb.data.datasets.Dataset`
that training and evaluation read, from any of

* a tensor or NumPy array [N, *shape] (or a pair ``(x, labels)``): float
  values as they are, 8-bit ones (``uint8``) divided by 255; [N, H, W] images
  get their one channel.  Held in memory: the training loop's fast path;
* a ``TensorDataset`` (its first tensor, and its second as labels): the same;
* any other map-style ``Dataset`` whose items are ``x`` or ``(x, y, …)``: the
  training split stays that Dataset (:class:`DatasetRows`), read a batch at a
  time through a ``DataLoader`` with worker processes and, on a GPU, pinned
  memory, so that a data set that decodes, augments or does not fit in memory
  trains as it is; the test and validation splits are read whole, since
  evaluation and the pictures use them whole;
* a ``DataLoader``: its Dataset, read with the loader's workers, pinning and
  collate function.  The run's seeded order of examples replaces the loader's
  sampler (so that a run is reproducible and resumable), and the run's batch
  size is ``config.batch_size``.

Such a run records ``data: "in-memory"`` in ``config.json`` and what the data
were in ``RUN/data.json``: it cannot be re-run from ``config.json`` alone
(save the array with ``numpy.save`` and train with ``--data FILE.npy``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Subset, TensorDataset
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data._utils.collate import default_collate

from aevb.data.datasets import Dataset, split_count
from aevb.errors import UserError

IN_MEMORY = "in-memory"  # config.data of a run trained on data passed in memory
RERUN_ADVICE = ("save the array (numpy.save('train.npy', x)) and train with --data train.npy, or pass the data again "
                "from Python (aevb.train(config, train=x), aevb.evaluate_run(RUN, test=x))")
# worker processes reading a Dataset given without a DataLoader (a DataLoader brings its own number)
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def memory_dataset(train: Any, test: Any = None, val: Any = None, *, read_by_batch: bool = True,
                   val_split: float = 0) -> Dataset:
    """The :class:`Dataset` of data given in memory: ``train`` (required), ``test`` and ``val`` (optional).

    ``read_by_batch``: a training Dataset of another kind than tensors stays one (:class:`DatasetRows`);
    False reads it whole (evaluation, which classifies the codes of every training example).
    ``val_split`` (a count, or a fraction of all the examples given, as ``--val-split`` is of a file's):
    without ``val``, the validation examples taken from the end of ``train``, as a file's are from the end
    of its training part.
    """
    x_train, y_train, levels = _training_examples(train) if read_by_batch else examples(train, "train")
    splits = {}
    for name, data in (("test", test), ("val", val)):
        x, y, split_levels = (None, None, levels) if data is None else examples(data, name)
        if x is not None and tuple(x.shape[1:]) != tuple(x_train.shape[1:]):
            raise UserError(f"{name}= holds examples of shape {list(x.shape[1:])} and train= of shape "
                            f"{list(x_train.shape[1:])}; pass splits of one data set")
        if split_levels != levels:
            raise UserError(f"{name}= holds {_described(split_levels)} values and train= {_described(levels)} ones; "
                            f"pass splits of one data set")
        splits[name] = (x, y)
    if val is None and val_split:
        given = len(x_train) + (0 if splits["test"][0] is None else len(splits["test"][0]))
        x_train, y_train, splits["val"] = _split_off(x_train, y_train, split_count(val_split, given, "val_split"))
    x_test, y_test = splits["test"]
    if x_test is None:
        x_test = torch.empty(0, *x_train.shape[1:])
    return Dataset(IN_MEMORY, x_train, x_test, splits["val"][0], y_train, y_test, splits["val"][1],
                   kind="image" if len(x_train.shape) == 4 else "tabular", levels=levels)


def _split_off(x: torch.Tensor | DatasetRows, y: torch.Tensor | None, count: int):
    """(x, y) of ``train=`` less its last ``count`` examples, and those as the validation split (x, y)."""
    n = len(x)
    if count >= n:
        raise UserError(f"--val-split takes {count} of the {n} examples of train=, leaving none to train on; pass "
                        f"a smaller --val-split, or val= yourself")
    if isinstance(x, DatasetRows):
        rest = Subset(x.dataset, range(n - count))
        val = examples(Subset(x.dataset, range(n - count, n)), "val")[:2]
        return DatasetRows(rest, workers=x.workers, collate_fn=x.collate_fn, device=x.device), None, val
    held = (x[n - count:], None if y is None else y[n - count:])
    return x[:n - count], None if y is None else y[:n - count], held


def origin(train: Any, test: Any = None, val: Any = None) -> dict[str, Any]:
    """What ``RUN/data.json`` records of data given in memory: each split's type and shape, and how to re-run."""
    described = {}
    for name, data in (("train", train), ("test", test), ("val", val)):
        if data is None:
            continue
        x = data[0] if isinstance(data, (tuple, list)) else data
        dataset = data.dataset if isinstance(data, DataLoader) else data
        described[name] = {"type": f"{type(data).__module__}.{type(data).__qualname__}"}
        if isinstance(x, (torch.Tensor, np.ndarray)):
            described[name].update(shape=list(x.shape), dtype=str(x.dtype))
        elif isinstance(dataset, TorchDataset) and not isinstance(dataset, IterableDataset):
            described[name].update(examples=len(dataset), dataset=type(dataset).__qualname__)
    return {"source": IN_MEMORY, **described, "reproducible_from_config": False,
            "note": f"trained on data passed to aevb.train in memory: config.json alone cannot re-run it; "
                    f"{RERUN_ADVICE}"}


class DatasetRows:
    """The training split as a user's map-style Dataset: [N, *shape] float32, read a batch at a time.

    Supports what the training loop and :func:`~aevb.data.streaming.mean_example` ask of a training set
    (``len``, ``shape``, rows by index tensor or slice, ``to(device)``) and :meth:`batches`, an epoch's
    batches in a given order through a ``DataLoader`` (workers, pinned memory on a GPU).
    """

    def __init__(self, dataset: TorchDataset, *, workers: int = DEFAULT_WORKERS, collate_fn=default_collate,
                 device: torch.device | str = "cpu", transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.dataset, self.workers, self.collate_fn, self.transform = dataset, workers, collate_fn, transform
        self.device = torch.device(device)
        if not len(dataset):
            raise UserError("train= is an empty Dataset; pass one with examples")
        first = _first(collate_fn([dataset[0]]))
        self.example_shape = tuple(first.shape[1:])
        self.levels = _as_float(first, "train=")[1]
        self._loader: DataLoader | None = None
        self._order = _Order()

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.example_shape)

    def to(self, device: torch.device | str) -> DatasetRows:
        return DatasetRows(self.dataset, workers=self.workers, collate_fn=self.collate_fn, device=device,
                           transform=self.transform)

    def transformed(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> DatasetRows:
        """These rows with ``transform`` applied to each float32 batch as it is read (binarisation)."""
        return DatasetRows(self.dataset, workers=self.workers, collate_fn=self.collate_fn, device=self.device,
                           transform=transform)

    def __getitem__(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Rows at ``index`` [b] (or a slice), read in this process: [b, *shape] float32 on the device."""
        rows = range(len(self))[index] if isinstance(index, slice) else index.tolist()
        return self._x(self.collate_fn([self.dataset[i] for i in rows])).to(self.device)

    def batches(self, order: torch.Tensor, start: int, batch_size: int,
                share: Callable[[int], tuple[int, int]] | None = None) -> Iterator[torch.Tensor]:
        """Batches [b, *shape] float32 on the device of ``order``'s examples from the ``start``-th batch on;
        ``share(b)``: the rows ``start, stop`` of a batch of b examples that this process reads (torchrun's
        worker's share: its Dataset's ``__getitem__`` is called for those alone), None: all of them."""
        if self._loader is None:  # one loader, whose workers persist over the epochs
            # the workers' seeds from a generator of the loader's own: drawn from torch's global one, they
            # would move every later draw of the run (z's noise), and a Dataset would not train as its tensors
            self._loader = DataLoader(self.dataset, batch_sampler=self._order, num_workers=self.workers,
                                      collate_fn=self.collate_fn, pin_memory=self.device.type == "cuda",
                                      persistent_workers=self.workers > 0, generator=torch.Generator().manual_seed(0))
        order = order.cpu()
        batches = (order[i:i + batch_size] for i in range(start * batch_size, len(order), batch_size))
        if share is None:
            self._order.batches = [batch.tolist() for batch in batches]
        else:
            self._order.batches = [batch[slice(*share(len(batch)))].tolist() for batch in batches]
        for batch in self._loader:
            yield self._x(batch).to(self.device, non_blocking=True)

    def _x(self, batch: Any) -> torch.Tensor:
        """The examples of a collated batch in float32, transformed."""
        x = _as_float(_first(batch), "train=")[0]
        return x if self.transform is None else self.transform(x)


def _first(batch: Any) -> torch.Tensor:
    """The examples of a collated batch: itself, or the first of (x, y, …)."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor):
        raise UserError(f"the training Dataset's items collate to {type(x).__name__}; items must be x or (x, y) "
                        f"with x a tensor or array")
    return x


class _Order:
    """A DataLoader's batch sampler whose batches the main process sets before each epoch (workers persist)."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _training_examples(data: Any) -> tuple[torch.Tensor | DatasetRows, torch.Tensor | None, int | None]:
    """(x, labels or None, levels) of the training split: a Dataset of another kind than tensors stays one."""
    if isinstance(data, DataLoader) and not isinstance(data.dataset, TensorDataset):
        _map_style(data.dataset, "train=")
        rows = DatasetRows(data.dataset, workers=data.num_workers, collate_fn=data.collate_fn)
        return rows, None, rows.levels
    if isinstance(data, TorchDataset) and not isinstance(data, TensorDataset):
        _map_style(data, "train=")
        rows = DatasetRows(data)
        return rows, None, rows.levels
    return examples(data, "train")


def examples(data: Any, name: str) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """(x [N, *shape] float32, labels [N] int64 or None, levels) of data given in any of the module's forms,
    read whole; ``name`` names them in messages (``"test"``: ``test=``)."""
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, TensorDataset):
        data = tuple(data.tensors[:2]) if len(data.tensors) > 1 else data.tensors[0]
    elif isinstance(data, TorchDataset):
        _map_style(data, f"{name}=")
        data = _read_whole(data)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        x, y = data, None
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise UserError(f"{name}= is a {type(x).__name__}; pass a tensor or NumPy array [N, …], a pair (x, labels), "
                        f"a torch Dataset yielding x or (x, y), or a DataLoader")
    x = torch.as_tensor(x)
    if x.ndim == 3:  # [N, H, W]: grey images
        x = x.unsqueeze(1)
    if x.ndim not in (2, 4) or not len(x):
        raise UserError(f"{name}= has shape {list(x.shape)}; pass rows [N, D] or images [N, C, H, W] (N ≥ 1)")
    x, levels = _as_float(x, f"{name}=")
    if y is not None:
        y = torch.as_tensor(y)
        if y.shape != (len(x),) or y.is_floating_point():
            raise UserError(f"the labels of {name}= have shape {list(y.shape)} and dtype {y.dtype}; pass one whole "
                            f"number per example, [{len(x)}]")
        y = y.long()
    return x, y, levels


def _as_float(x: torch.Tensor, name: str) -> tuple[torch.Tensor, int | None]:
    """x in float32, and its levels: 8-bit values divided by 255 (256 levels), float ones as they are."""
    if x.dtype == torch.uint8:
        return x.float() / 255, 256
    if not (x.is_floating_point() or x.dtype == torch.bool):
        raise UserError(f"{name} holds values of dtype {x.dtype}; pass floating-point values (or 8-bit pixels, "
                        f"uint8)")
    return x.float(), None


def _read_whole(dataset: TorchDataset) -> tuple[torch.Tensor, torch.Tensor | None] | torch.Tensor:
    """A map-style Dataset's items collated into one batch: x, or (x, y) where items are (x, y, …)."""
    batch = default_collate([dataset[i] for i in range(len(dataset))])
    if isinstance(batch, (tuple, list)):
        return (batch[0], batch[1]) if len(batch) > 1 else batch[0]
    return batch


def _map_style(dataset: TorchDataset, name: str) -> None:
    if isinstance(dataset, IterableDataset):
        raise UserError(f"{name} is an IterableDataset, which has no length or indices for the run's seeded order; "
                        f"pass a map-style Dataset (__len__ and __getitem__) or tensors")


def _described(levels: int | None) -> str:
    return "8-bit" if levels else "floating-point"
