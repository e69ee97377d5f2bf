"""What every source of examples gives :func:`aevb.data.datasets.load_data`, and where aevb keeps data.

A registered data set (:mod:`aevb.data.named`), a data file
(:mod:`aevb.data.files`) and an image folder (:mod:`aevb.data.folders`) are
each read into a :class:`SourceData`: all examples, before splitting.
``CACHE_DIR`` is where the torchvision data sets are fetched to, where
the decoded pixels of streamed image folders are kept and the feature
classifiers of the sample quality; ``$AEVB_CACHE`` sets it (``~/.cache/aevb``
otherwise), and it is read when used (``sources.CACHE_DIR``), so a test can
point it elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from aevb.data.streaming import StreamedImages

# default data_dir of the torchvision data sets: CACHE_DIR / name; image folders' decoded pixels: CACHE_DIR / folders;
# feature classifiers of the sample quality: CACHE_DIR / classifiers.  $AEVB_CACHE moves it (for every process)
CACHE_DIR = Path(os.environ.get("AEVB_CACHE") or "~/.cache/aevb")


@dataclass
class SourceData:
    """All examples of a source in file order, before splitting (what a loader returns).

    Sources with an official test set (MNIST, CIFAR-10) give it as ``test_x``
    and ``test_y``; the train/validation split is then made from ``x`` alone.
    """

    x: torch.Tensor | StreamedImages  # [N, *data_shape] float32
    y: torch.Tensor | None  # [N] int64
    kind: str  # "image" or "tabular"
    levels: int | None
    classes: list[str] | None = None
    test_x: torch.Tensor | None = None  # [N_test, *data_shape] official test set
    test_y: torch.Tensor | None = None  # [N_test]
    # file order groups the examples by class (an image folder's subfolders): splits from the end would
    # hold out the last classes alone, so the split always shuffles (seeded) first
    grouped_by_class: bool = False
    columns: list[str] | None = None  # a table's column names, from the header of its CSV file
    # the known factors of variation that made each example (shapes): values 0..n_k − 1 [N, K] int64
    factors: torch.Tensor | None = None
    factor_names: list[str] | None = None
