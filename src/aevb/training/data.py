"""The run's data as the training loop takes them: loaded once, each step's rows binarised or dequantised afresh."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from aevb.config import RunConfig
from aevb.data import transforms
from aevb.data.datasets import Dataset
from aevb.data.memory import DatasetRows
from aevb.data.streaming import StreamedImages, mean_example
from aevb.model import noise
from aevb.run.data import check_data_range, check_dequantize, check_likelihood_scores, class_count, held_out, load_dataset


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
    # a conditional run's (--conditional): the number of classes K, and the labels [N], [M], [≤10] of the three
    # above, on the device; None for another run
    n_classes: int | None = None
    train_labels: torch.Tensor | None = None
    eval_labels: torch.Tensor | None = None
    holdout_labels: torch.Tensor | None = None

    @classmethod
    def load(cls, config: RunConfig, device: torch.device, given: Dataset | None = None) -> TrainingData:
        """The data ``config`` names, or the data set ``given`` in memory (:func:`aevb.data.memory.memory_dataset`)."""
        dataset = given if given is not None else load_dataset(config)
        levels = check_dequantize(config, dataset)
        check_data_range(config, dataset)
        check_likelihood_scores(config, dataset)
        x_train = dataset.train
        if config.binarize == "threshold":
            x_train = transforms.binarize(x_train, "threshold")
        x_train = x_train.to(device)
        eval_name = "val" if dataset.val is not None else "test"
        x_eval, y_eval = held_out(dataset, config, eval_name)
        holdout = holdout_index = None  # pictured from the validation split where there is one: the test set is for aevb eval
        if dataset.kind == "image" and x_eval is not None and len(x_eval):
            holdout_index = transforms.holdout_indices(y_eval, 10, num_examples=len(x_eval))
            holdout = x_eval[holdout_index].to(device)
        n_classes = class_count(config, dataset)
        if n_classes is None:
            return cls(dataset, x_train, device, config.binarize, levels, eval_name, x_eval, holdout)
        return cls(dataset, x_train, device, config.binarize, levels, eval_name, x_eval, holdout, n_classes,
                   dataset.train_labels.to(device), y_eval, None if holdout is None else y_eval[holdout_index].to(device))

    @property
    def examples(self) -> int:
        return self.train.shape[0]

    def batches(self, order: torch.Tensor, start: int, batch_size: int) -> Iterator[torch.Tensor]:
        """The epoch's global batches of the examples in ``order`` [N], from the ``start``-th on: each the indices
        [b] of its examples, or for a user's Dataset the examples [b, *data_shape] themselves (read ahead by its
        DataLoader's workers).  :meth:`rows` takes a worker's rows of one."""
        if isinstance(self.train, DatasetRows):
            yield from self.train.batches(order, start, batch_size)
            return
        for begin in range(start * batch_size, len(order), batch_size):
            yield order[begin:begin + batch_size]

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
        return x - mean_example(self.train).to(x.device)

    def rows(self, batch: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The examples ``start:stop`` of a global batch from :meth:`batches`: [stop − start, *data_shape], binarised
        or dequantised afresh (inside :func:`aevb.model.noise.batch_rows`: with the rows of the batch's noise)."""
        whole = stop - start == len(batch)
        if isinstance(self.train, DatasetRows):
            x = batch if whole else batch[start:stop]
        else:
            index = batch if whole else batch[start:stop]
            # index_select copies whole rows (2.5× faster than x_train[index] for 128 images); streamed images index
            x = self.train.index_select(0, index) if torch.is_tensor(self.train) else self.train[index]
        return self._prepared(x)

    def labels(self, batch: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
        """The labels [stop − start] of the examples :meth:`rows` takes, for a conditional run; None for another."""
        if self.train_labels is None:
            return None
        index = batch if stop - start == len(batch) else batch[start:stop]
        return self.train_labels.index_select(0, index)

    def _prepared(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, *data_shape] binarised (dynamic) or dequantised afresh."""
        if self.binarize == "dynamic":
            # bernoulli(p) is u < p for u ~ U[0, 1): the u of noise.rand are the example's wherever it is computed
            x = (noise.rand(x.shape, 0, dtype=x.dtype, device=x.device) < x).to(x.dtype)
        if self.levels:
            x = transforms.dequantize(x, self.levels, uniform=noise.rand(x.shape, 0, dtype=x.dtype, device=x.device))
        return x
