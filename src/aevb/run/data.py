"""A run's data: the data set its configuration names, the held-out splits prepared as in training, and the
checks that the data fit the run (range for the likelihood, quantisation for --dequantize, whether the likelihood
scores the data honestly, the model's shape)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from aevb.config import RunConfig
from aevb.data import transforms
from aevb.data.datasets import Dataset, load_data
from aevb.data.memory import IN_MEMORY, RERUN_ADVICE, DatasetRows
from aevb.data.streaming import StreamedImages
from aevb.errors import UserError
from aevb.model.base import Model
from aevb.registry import LIKELIHOODS


def load_dataset(config: RunConfig, part: tuple[int, int] = (0, 1)) -> Dataset:
    """The data set ``config`` names; ``part`` (i, n): the share of a memory-mapped file's rows this process
    checks (:func:`aevb.data.datasets.load_data`)."""
    if config.data == IN_MEMORY:
        raise UserError(f"this run was trained on data passed in memory (aevb.train(config, train=...)), which its "
                        f"config.json does not hold; {RERUN_ADVICE}")
    return load_data(
        config.data, labels=config.labels, data_dir=config.data_dir, test_split=config.test_split,
        val_split=config.val_split, shuffle=config.shuffle, seed=config.seed,
        image_size=config.image_size, download=config.download, stream=config.stream, part=part,
    )


def held_out(dataset: Dataset, config: RunConfig, split: str = "test") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The evaluation split, binarised or dequantised as in training.

    Dynamic binarisation and dequantisation draw the held-out set once with a
    fixed seed, so every evaluation of every run on these data sees the same
    images.
    """
    x = getattr(dataset, split)
    y = getattr(dataset, f"{split}_labels")
    if x is None:
        return None, None
    if config.binarize == "dynamic":
        generator = torch.Generator().manual_seed(1234)
        x = transforms.binarize(x, "dynamic", generator)
    else:
        x = transforms.binarize(x, config.binarize)
    if config.dequantize:
        x = transforms.dequantize(x, check_dequantize(config, dataset), torch.Generator().manual_seed(1234))
    return x, y


def check_data_range(config: RunConfig, dataset: Dataset) -> None:
    """A likelihood over [0, 1] (Bernoulli, continuous Bernoulli) refuses data outside it: its loss would have no bound."""
    if not LIKELIHOODS.get(config.likelihood).unit_interval or isinstance(dataset.train, (StreamedImages, DatasetRows)):
        return  # streamed data are 8-bit pixels, in [0, 1] by construction; a user's Dataset is read per batch only
    if config.binarize == "threshold":
        return  # x > 0.5 is 0 or 1 whatever x was
    low, high = dataset.train.min().item(), dataset.train.max().item()
    if low < 0 or high > 1:
        raise UserError(f"--likelihood {config.likelihood} models values in [0, 1], but {config.data} holds values "
                        f"from {low:.4g} to {high:.4g}; use --likelihood gaussian-learned, gaussian-diag or laplace-learned "
                        f"for real-valued data, or rescale it to [0, 1]")


def check_likelihood_scores(config: RunConfig, dataset: Dataset) -> None:
    """Refuse, or warn before training, where the likelihood's number would not be a likelihood of the data.

    * a density unbounded at exact 0 and 1 (continuous Bernoulli) on data
      holding such values: refused (its ELBO runs to +∞), unless dequantised;
    * a density on quantised values (8-bit pixels, binarised images) not
      dequantised: a warning (it is a density at those values, not their
      probability, and may exceed any probability: no bits/dim).

    A Bernoulli on grey values (the default on ``digits``, and the MNIST
    recipe) is bounded and is said where its number is shown: the
    evaluation's ``likelihood_note`` says what it is.
    """
    likelihood = LIKELIHOODS.get(config.likelihood)
    name = f"--likelihood {config.likelihood}"
    if config.dequantize:
        return  # pixels (k + u)/levels: inside (0, 1), and a density's bits/dim bound the 8-bit data's
    if likelihood.unbounded_at_endpoints and (config.binarize != "none" or _holds_endpoints(dataset)):
        if config.binarize != "none":
            fix = "for binary images use --likelihood bernoulli"
        elif dataset.levels:
            fix = "add --dequantize to train on pixels spread inside their levels, (k + u)/levels, strictly inside (0, 1)"
        else:
            fix = "rescale the values strictly inside (0, 1), or use --likelihood gaussian-learned"
        raise UserError(f"{name} has no bounded density at exactly 0 or 1, and {config.data} holds such values"
                        f"{' (binarised)' if config.binarize != 'none' else ''}: its ELBO would grow without bound "
                        f"as the decoder's logits run off; {fix}")
    quantised = config.binarize != "none" or dataset.levels
    if not likelihood.discrete and likelihood.normalized and quantised:
        levels = 2 if config.binarize != "none" else dataset.levels
        warnings.warn(f"{name} is a density, and {config.data} holds {levels}-level values: its log p(x) is a density "
                      f"at those values, not their probability (it can exceed any probability), and has no bits/dim; add "
                      f"--dequantize (without --binarize) to score it as a likelihood of the pixels", stacklevel=3)


def _holds_endpoints(dataset: Dataset) -> bool:
    """Whether the training data hold a value exactly 0 or 1 (streamed 8-bit pixels: assumed, as images do)."""
    if isinstance(dataset.train, StreamedImages):
        return True
    return bool(((dataset.train == 0) | (dataset.train == 1)).any())


def check_dequantize(config: RunConfig, dataset: Dataset | None = None) -> int | None:
    """Refuse --dequantize where it means nothing; the number of levels of the data where it applies."""
    if not config.dequantize:
        return None
    if config.binarize != "none" or LIKELIHOODS.get(config.likelihood).discrete:
        raise UserError(f"--dequantize makes 8-bit pixels continuous, for a continuous likelihood; "
                        f"--likelihood {config.likelihood} with --binarize {config.binarize} models discrete "
                        f"values: drop --dequantize, or choose a continuous likelihood without --binarize")
    if dataset is not None and not dataset.levels:
        raise UserError(f"--dequantize needs quantised pixels (8-bit images, digits), but {config.data} holds "
                        f"real values; drop --dequantize")
    return dataset.levels if dataset is not None else None


def check_data_shape(model: Model, x: torch.Tensor, run: str | Path, data: str) -> None:
    """The run's data must have the shape its model was trained on (checked before any progress bar)."""
    if tuple(x.shape[1:]) != tuple(model.data_shape):
        shape = "×".join(map(str, x.shape[1:]))
        raise UserError(f"the data {data} hold examples of shape {shape}, but the model of {run} was trained on "
                        f"{'×'.join(map(str, model.data_shape))}; point 'data' in {Path(run) / 'config.json'} "
                        f"at data of the training shape")


def class_count(config: RunConfig, dataset: Dataset) -> int | None:
    """K, the number of classes of a conditional run (``--conditional``), from the data set's labels; None for
    another run.  Every split's labels are checked here, once, to lie in [0, K): the training step then takes
    them as they are (a check there would wait for an accelerator at every step)."""
    if not config.conditional:
        return None
    if isinstance(dataset.train, DatasetRows):
        raise UserError("--conditional needs the labels of every training example, and a Dataset read a batch at a "
                        "time gives none to aevb; pass the training data as tensors or arrays with their labels, "
                        "train=(x, labels), or a TensorDataset(x, labels)")
    if dataset.train_labels is None:
        raise UserError(f"--conditional conditions the model on class labels, and {config.data} has none: pass a "
                        f"labels file (--labels FILE) with a data file, an image folder with one subfolder per class, "
                        f"a labelled data set (digits, mnist, …), or drop --conditional")
    splits = [labels for labels in (dataset.train_labels, dataset.val_labels, dataset.test_labels) if labels is not None]
    if len(splits) < 1 + (dataset.val is not None) + (dataset.test is not None):
        raise UserError(f"--conditional needs labels for every split of {config.data}, and a held-out split has none; "
                        f"pass test= and val= with their labels, (x, labels)")
    low = min(int(labels.min()) for labels in splits if len(labels))
    high = max(int(labels.max()) for labels in splits if len(labels))
    n_classes = len(dataset.classes) if dataset.classes else high + 1
    if low < 0 or high >= n_classes:
        raise UserError(f"--conditional takes labels 0 … K−1, and {config.data} holds a label "
                        f"{low if low < 0 else high} outside 0 … {n_classes - 1}; renumber the labels from 0")
    if n_classes < 2:
        raise UserError(f"--conditional: {config.data} has a single class, so a label tells the model nothing; "
                        f"drop --conditional")
    return n_classes
