"""The run's data as the training loop takes them: loaded once, each step's rows binarised or dequantised afresh.

What each of torchrun's workers reads (every worker draws the same order of
the whole training set each epoch, and takes its rows of each global batch:
:mod:`aevb.training.distributed`; its rows differ from epoch to epoch, so
over a run a worker's rows cover the whole set):

* a user's Dataset (``aevb.train(config, train=dataset)``): a worker's
  DataLoader is given only its rows of each global batch, so its
  ``__getitem__`` is called for its share alone, read ahead by its loader's
  worker processes, with the epoch's order set before each epoch (the
  distributed sampler's ``set_epoch``);
* a memory-mapped ``.npy`` file and a streamed image folder
  (:mod:`aevb.data.streaming`): a worker reads (pages in) only its rows of
  each batch; at load, it checks the values of its part of the file alone
  (:func:`aevb.data.datasets.load_data`'s ``part``; a bad value in any part
  stops every worker with one message).  A streamed folder's images are
  decoded into their cache file by one worker a machine, while the others
  wait (:func:`_load_dataset`); every worker reads the images' headers;
* the data set's mean example (the decoder's first bias,
  ``--output-bias data-mean``): each worker sums its chunks of rows, an
  all-reduce adds them, to the same bits as one process
  (:meth:`TrainingData.mean_example`); the first 4,096 rows, from which a
  likelihood's one scale starts, are read by every worker, only for a
  likelihood that has one;
* data held in memory (the registered sets, IDX, ``.npz``, ``.csv``, a
  ``.npy`` not streamed, an image folder not streamed): read whole by every
  worker, since those formats cannot be read by rows (compressed, text,
  decoded images) and a worker's rows change every epoch; a worker then
  copies only its rows of each batch.  The registered sets are small enough
  that this is right (digits: 1,797 images of 8×8; MNIST, Fashion-MNIST:
  70,000 of 28×28, 220 MB as float32; CIFAR-10: 60,000 of 32×32×3, 740 MB);
  a larger data set is streamed (``--stream yes``: a ``.npy`` file, or an
  image folder decoded once into its cache);
* the validation and test splits: read whole by every worker, which
  validates on all of them (the same numbers on every rank, which choose the
  best checkpoint alike); ``aevb eval`` under torchrun shares their
  computation, not their reading (:mod:`aevb.analysis.evaluation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from aevb.config import RunConfig
from aevb.data import transforms
from aevb.data.datasets import Dataset
from aevb.data.memory import DatasetRows
from aevb.data.streaming import StreamedImages, mean_example
from aevb.model import noise
from aevb.registry import DATASETS
from aevb.run.data import (check_data_range, check_dequantize, check_likelihood_scores, class_count, held_out,
                           load_dataset)
from aevb.training import distributed
from aevb.training.distributed import Workers


@dataclass
class TrainingData:
    """The run's data as the loop uses them, prepared once before the model is built."""

    dataset: Dataset
    train: torch.Tensor | StreamedImages  # [N, *data_shape] on the device (streamed: read per batch)
    device: torch.device  # of the training batches
    binarize: str  # --binarize: "dynamic" draws every batch afresh
    levels: int | None  # the data's quantisation levels under --dequantize, else None
    eval_name: str  # "val", or "test" where the run has no validation split
    eval_x: torch.Tensor | None  # [M, *data_shape] that split, validated at every epoch's end
    holdout: torch.Tensor | None  # [≤10, *data_shape] images of that split (one a class) pictured while training
    workers: Workers = Workers()  # this process among torchrun's workers: which rows of a batch it reads
    # a conditional run's (--conditional): the number of classes K, and the labels [N], [M], [≤10] of the three
    # above, on the device; None for another run
    n_classes: int | None = None
    train_labels: torch.Tensor | None = None
    eval_labels: torch.Tensor | None = None
    holdout_labels: torch.Tensor | None = None

    @classmethod
    def load(cls, config: RunConfig, device: torch.device, given: Dataset | None = None,
             workers: Workers = Workers()) -> TrainingData:
        """The data ``config`` names, or the data set ``given`` in memory (:func:`aevb.data.memory.memory_dataset`)."""
        dataset = given if given is not None else _load_dataset(config, workers)
        levels = check_dequantize(config, dataset)
        check_data_range(config, dataset)
        check_likelihood_scores(config, dataset)
        x_train = dataset.train
        if config.binarize == "threshold":
            x_train = transforms.binarize(x_train, "threshold")
        x_train = x_train.to(device)
        eval_name = "val" if dataset.val is not None else "test"
        x_eval, y_eval = held_out(dataset, config, eval_name)
        if x_eval is not None and torch.is_tensor(x_train):
            # resident beside the training set, as it is validated at every epoch's end: copied once, not each time
            x_eval = x_eval.to(device)
        holdout = holdout_index = None  # pictured from the validation split where there is one: the test set is for aevb eval
        if dataset.kind == "image" and x_eval is not None and len(x_eval):
            holdout_index = transforms.holdout_indices(y_eval, 10, num_examples=len(x_eval))
            holdout = x_eval[holdout_index].to(device)
        n_classes = class_count(config, dataset)
        if n_classes is None:
            return cls(dataset, x_train, device, config.binarize, levels, eval_name, x_eval, holdout, workers)
        return cls(dataset, x_train, device, config.binarize, levels, eval_name, x_eval, holdout, workers,
                   n_classes=n_classes, train_labels=dataset.train_labels.to(device), eval_labels=y_eval.to(x_eval.device),
                   holdout_labels=None if holdout is None else y_eval[holdout_index].to(device))

    @property
    def examples(self) -> int:
        return self.train.shape[0]

    @property
    def index_device(self) -> torch.device:
        """Where an epoch's order indexes the training examples: the resident tensor's device; the CPU for
        streamed files and a user's Dataset, whose rows are read on the host (an index on a GPU would be
        copied back at every step, a host synchronisation)."""
        return self.train.device if torch.is_tensor(self.train) else torch.device("cpu")

    def batches(self, order: torch.Tensor, start: int, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """The epoch's global batches of the examples in ``order`` [N], from the ``start``-th on: each as its
        number of examples b and this worker's share of it, the indices [b_r] of its rows (:meth:`Workers.rows`),
        or for a user's Dataset those examples [b_r, *data_shape] themselves, read by this worker alone (ahead,
        by its DataLoader's workers).  :meth:`rows` makes the share the examples a step takes."""
        order = order.to(self.index_device)  # once here, not at every batch
        begins = range(start * batch_size, len(order), batch_size)
        totals = (min(batch_size, len(order) - begin) for begin in begins)
        if isinstance(self.train, DatasetRows):
            share = self.workers.rows if self.workers.distributed else None
            yield from zip(totals, self.train.batches(order, start, batch_size, share))
            return
        for begin, total in zip(begins, totals):
            first, last = self.workers.rows(total)
            yield total, order[begin + first:begin + last]

    def residuals(self, rows: int = 4096) -> torch.Tensor:
        """The first ``rows`` training examples as training sees them, less the mean example: [rows, *data_shape].

        Dequantised with a seeded generator of their own, so that the global
        one draws the same noise whether or not a scale is started from them.
        """
        x = self.train[: min(rows, self.examples)].to(self.device)  # streamed images: read and converted
        if self.binarize != "none":
            x = transforms.binarize(x, self.binarize, torch.Generator(device=x.device).manual_seed(1234))
        if self.levels:
            x = transforms.dequantize(x, self.levels, torch.Generator(device=x.device).manual_seed(1234))
        return x - self.mean_example().to(x.device)

    def rows(self, share: torch.Tensor) -> torch.Tensor:
        """This worker's examples of a global batch from its share of :meth:`batches`: [b_r, *data_shape],
        binarised or dequantised afresh (inside :func:`aevb.model.noise.batch_rows`: with the rows of the batch's
        noise)."""
        if isinstance(self.train, DatasetRows):
            x = share
        else:
            # index_select copies whole rows (2.5× faster than x_train[index] for 128 images); streamed images
            # read only these rows
            x = self.train.index_select(0, share) if torch.is_tensor(self.train) else self.train[share]
        return self._prepared(x)

    def mean_example(self) -> torch.Tensor:
        """The training set's mean example [*data_shape]; under torchrun each worker reads its chunks of rows."""
        if not self.workers.distributed:
            return mean_example(self.train)
        combine = lambda sums: distributed.all_sum(self.workers, sums.to(self.device)).cpu()  # noqa: E731
        return mean_example(self.train, (self.workers.rank, self.workers.world_size), combine)

    def labels(self, share: torch.Tensor) -> torch.Tensor | None:
        """The labels [b_r] of the examples :meth:`rows` takes from the same share, for a conditional run; None for
        another (a conditional run reads its examples by index: a Dataset read by batches is refused)."""
        if self.train_labels is None:
            return None
        return self.train_labels.index_select(0, share.to(self.train_labels.device))

    def _prepared(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, *data_shape] binarised (dynamic) or dequantised afresh."""
        if self.binarize == "dynamic":
            # bernoulli(p) is u < p for u ~ U[0, 1): the u of noise.rand are the example's wherever it is computed
            x = (noise.rand(x.shape, 0, dtype=x.dtype, device=x.device) < x).to(x.dtype)
        if self.levels:
            x = transforms.dequantize(x, self.levels, uniform=noise.rand(x.shape, 0, dtype=x.dtype, device=x.device))
        return x


def _load_dataset(config: RunConfig, workers: Workers) -> Dataset:
    """The data set ``config`` names, each worker checking its part of a memory-mapped file's values.

    An image folder that may stream is decoded once into a cache file of its pixels (:mod:`aevb.data.folders`):
    under torchrun by one worker a machine (``LOCAL_RANK`` 0) while the others wait, and then map it.
    """
    part = (workers.rank, workers.world_size)
    folder = config.data not in DATASETS and config.stream != "no" and Path(config.data).expanduser().is_dir()
    if not (workers.distributed and folder):
        return load_dataset(config, part=part)
    if workers.local_rank != 0:
        distributed.barrier(workers)  # until the cache is written
        return load_dataset(config, part=part)
    try:
        return load_dataset(config, part=part)
    finally:  # a failure too: the others then fail alike, and agree() says it once
        distributed.barrier(workers)
