"""Data sets: :func:`load_data` turns what a user names into a :class:`Dataset` split train / val / test.

Whatever the source, :func:`load_data` returns a :class:`Dataset` of float32
tensors held in memory (or, for a training set too large for that, a
:class:`~aevb.data.streaming.StreamedImages` that converts batch by batch):

* images: ``[N, C, H, W]``, channels first, pixel values in ``[0, 1]``;
* tabular data: ``[N, D]``, each column standardised with the training split's
  mean and standard deviation (recorded in ``Dataset.standardization``).

Sources, each read into a :class:`~aevb.data.sources.SourceData` (all
examples, before splitting) by its own module:

* registered names (:mod:`aevb.data.named`): ``digits`` (scikit-learn's
  bundled 8x8 digits, always offline), ``mnist``, ``fashion-mnist``,
  ``cifar10`` (torchvision; fetched only when ``download=True``);
* a file (:mod:`aevb.data.files`): IDX as published for MNIST-like sets
  (gzipped or not), ``.npy``, ``.npz``, ``.csv``;
* a folder of images, read recursively; subfolders become classes
  (:mod:`aevb.data.folders`).

A new named data set is one function registered with
``@DATASETS.register("name")`` that takes ``(data_dir, download)`` and returns
a :class:`SourceData`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from aevb.config import STREAM_MODES
from aevb.data import sources
from aevb.data.files import load_file
from aevb.data.folders import load_folder
from aevb.data.sources import SourceData
from aevb.data.streaming import StreamedImages
from aevb.errors import UserError
from aevb.registry import DATASETS

@dataclass
class Dataset:
    """A data set split into train / validation / test tensors, all in memory.

    ``kind`` is ``"image"`` (``[N, C, H, W]`` in [0, 1]) or ``"tabular"``
    (``[N, D]``, standardised).  ``levels`` is the number of discrete
    intensity levels of the original data (256 for 8-bit images, 17 for
    ``digits``) so bits per dimension can be reported; ``None`` for
    real-valued data.
    """

    name: str
    train: torch.Tensor | StreamedImages  # [N_train, *data_shape] float32
    test: torch.Tensor  # [N_test, *data_shape] float32
    val: torch.Tensor | None = None  # [N_val, *data_shape] float32
    train_labels: torch.Tensor | None = None  # [N_train] int64
    test_labels: torch.Tensor | None = None  # [N_test] int64
    val_labels: torch.Tensor | None = None  # [N_val] int64
    kind: str = "image"
    levels: int | None = None
    classes: list[str] | None = None  # classes[label] is the name of a label
    standardization: dict | None = None  # tabular: {"mean": [D], "std": [D]} of the train split
    columns: list[str] | None = None  # tabular: the column names of a CSV file's header
    # the known factors of variation of each example (shapes): [N_split, K] int64, named by factor_names
    train_factors: torch.Tensor | None = None
    val_factors: torch.Tensor | None = None
    test_factors: torch.Tensor | None = None
    factor_names: list[str] | None = None

    def original_units(self, x: torch.Tensor) -> torch.Tensor:
        """Rows x [N, D] of this standardised table back in the units of the file (the inverse of the
        standardisation); other data as they are."""
        if self.standardization is None:
            return x
        mean = torch.tensor(self.standardization["mean"], dtype=torch.float64)
        std = torch.tensor(self.standardization["std"], dtype=torch.float64)
        return x.cpu().double() * std + mean

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        """Rows x [N, D] in the file's units standardised as this table's training split was: float32."""
        if self.standardization is None:
            return x
        mean = torch.tensor(self.standardization["mean"], dtype=torch.float64)
        std = torch.tensor(self.standardization["std"], dtype=torch.float64)
        return ((x.double() - mean) / std).float()

    def column_names(self) -> list[str]:
        """The names of a table's D columns: the CSV header's, else x1 … xD."""
        return self.columns or [f"x{i + 1}" for i in range(self.data_shape[0])]

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one example: (C, H, W) for images, (D,) for tabular data."""
        return tuple(self.train.shape[1:])

    def __repr__(self) -> str:
        val = 0 if self.val is None else len(self.val)
        return (
            f"Dataset(name={self.name!r}, kind={self.kind!r}, data_shape={self.data_shape}, "
            f"train={len(self.train)}, val={val}, test={len(self.test)}, levels={self.levels}, "
            f"labels={self.train_labels is not None}, classes={self.classes})"
        )


def load_data(
    source: str,
    *,
    labels: str | None = None,
    data_dir: str | None = None,
    test_split: float | int = 0.1,
    val_split: float | int = 0,
    shuffle: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    download: bool = False,
    stream: str = "auto",
    part: tuple[int, int] = (0, 1),
) -> Dataset:
    """Load a registered data set, a data file or an image folder, and split it.

    source: a registered name (``digits``, ``mnist``, ``fashion-mnist``,
        ``cifar10``) or a path to a file or folder.  A registered name wins over
        a path of the same name; write ``./digits`` for the folder.
    labels: path of a labels file (IDX, ``.npy``, ``.csv``/``.txt`` of
        integers, one per example) for a data file.
    data_dir: where the torchvision data sets live (default
        ``~/.cache/aevb/NAME``).  A folder holding the four published IDX files
        of MNIST / Fashion-MNIST (gzipped or not) is read directly.
    test_split, val_split: a count (whole number) or a fraction (0 < f < 1)
        of all examples.  The test set is taken from the end, in file order,
        and the validation set from the end of what remains.  Sources with an
        official test set use it and ignore ``test_split``.
    shuffle, seed: permute the examples with a seeded ``torch.Generator``
        before splitting (the training set only, for official splits).
    image_size: resize and centre-crop the images of a folder to this side
        (a warning says how many that changed); without it they keep the
        size they all share, and a folder of several sizes is refused.
        Refused for other sources, which keep their size.
    download: let torchvision fetch a registered data set that is missing.
    stream: ``"yes"`` keeps the training images of a ``.npy`` file
        (memory-mapped) or an image folder (8-bit pixels) as stored and
        converts them to float32 batch by batch (:mod:`aevb.data.streaming`);
        ``"no"`` converts everything up front; ``"auto"`` streams when the
        float32 copy would take more than half of the memory available.
    part: (i, n): this process checks the values of a memory-mapped ``.npy``
        file in its i-th of n parts of rows only (torchrun's worker i of n; the
        others check theirs, and a value out of range in any part stops them
        all): the file is read once over all of them.  (0, 1): the whole.
    """
    source = str(source)
    if stream not in STREAM_MODES:
        raise UserError(f"unknown stream mode {stream!r}; choose one of: {', '.join(STREAM_MODES)}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1
    ):
        raise UserError(f"image_size={image_size!r} is invalid; give a whole number of pixels ≥ 1")
    if source in DATASETS:
        if labels is not None:
            raise UserError(
                f"labels files are for data files; the data set {source!r} has its own labels, drop --labels"
            )
        if stream == "yes":
            raise UserError(f"--stream yes reads a .npy file or an image folder batch by batch; the registered "
                            f"data set {source!r} is loaded into memory: drop --stream")
        if image_size is not None:
            raise UserError(f"--image-size resizes the images of a folder; the data set {source!r} keeps its own "
                            f"size: drop --image-size")
        root = Path(data_dir).expanduser() if data_dir else sources.CACHE_DIR.expanduser() / source
        loader: Callable[[Path, bool], SourceData] = DATASETS.get(source)
        data = loader(root, download)
    else:
        path = Path(source).expanduser()
        given = [name for name, value in (("--data-dir", data_dir), ("--download", download)) if value]
        if given:
            raise UserError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for the registered data sets "
                            f"({', '.join(DATASETS.names())}), not for the path {source}: drop "
                            f"{'it' if len(given) == 1 else 'them'}")
        if image_size is not None and not path.is_dir():
            raise UserError(f"--image-size resizes the images of a folder; {source} is a file whose examples keep "
                            f"their shape: drop --image-size")
        data = _load_path(path, labels, image_size, stream, part)
    return _split(source, data, test_split=test_split, val_split=val_split, shuffle=shuffle, seed=seed)


def read_examples(path: str | Path, labels: str | None = None, image_size: int | None = None) -> SourceData:
    """Every example of a data file or image folder, in memory and before any split or standardisation
    (the data of ``aevb encode --data``)."""
    return _load_path(Path(path).expanduser(), labels, image_size, "no")


def _load_path(path: Path, labels: str | None, image_size: int | None, stream: str = "auto",
               part: tuple[int, int] = (0, 1)) -> SourceData:
    """SourceData of a data file (with an optional labels file) or an image folder."""
    if not path.exists():
        raise UserError(
            f"data file or folder not found: {path}; pass a registered name "
            f"({', '.join(DATASETS.names())}) or an existing path"
        )
    if path.is_dir():
        if labels is not None:
            raise UserError(f"the labels of an image folder come from its subfolder names; drop --labels for {path}")
        return load_folder(path, image_size, stream)
    return load_file(path, labels, stream, part)


def split_count(split: object, n: int, option: str) -> int:
    """How many of n examples a split option asks for: a count, or a fraction of n."""
    if isinstance(split, numbers.Real) and not isinstance(split, bool):
        if 0 < split < 1:
            return max(1, round(float(split) * n))
        if split >= 0 and float(split).is_integer():
            return int(split)
    raise UserError(f"{option}={split!r} is invalid; give a count (a whole number) or a fraction between 0 and 1")


def _split(name: str, data: SourceData, *, test_split, val_split, shuffle: bool, seed: int) -> Dataset:
    """Split SourceData into train / val / test (from the end), standardising tabular data."""
    x, y, factors = data.x, data.y, data.factors  # [N, *data_shape], [N], [N, K]
    n = len(x)
    if data.test_x is None:
        n_test = split_count(test_split, n, "test_split")
        if n_test == 0:
            raise UserError("test_split=0 leaves no test examples; give a count ≥ 1 or a fraction between 0 and 1")
    else:
        n_test = 0  # the official test set is used instead
    n_val = split_count(val_split, n, "val_split")
    n_train = n - n_test - n_val
    if n_train < 1:
        raise UserError(
            f"test_split={test_split!r} and val_split={val_split!r} leave no training examples "
            f"out of {n}; use smaller splits"
        )
    streamed = isinstance(x, StreamedImages)

    def take(index, held_out: bool = False):
        """x[index]; for streamed images lazily, except the held-out splits, which are loaded."""
        if not streamed:
            return x[index]
        return x.subset(index).load() if held_out else x.subset(index)

    if shuffle or data.grouped_by_class:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # [N]
        x = take(perm)
        y = None if y is None else y[perm]
        factors = None if factors is None else factors[perm]

    def part(t: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
        return None if t is None else t[start:stop]

    train, train_y = take(slice(0, n_train)), part(y, 0, n_train)
    val, val_y = None, None
    if n_val:
        val, val_y = take(slice(n_train, n_train + n_val), held_out=True), part(y, n_train, n_train + n_val)
    if data.test_x is None:
        test, test_y = take(slice(n_train + n_val, n), held_out=True), part(y, n_train + n_val, n)
    else:
        test, test_y = data.test_x, data.test_y
    # an official test set comes without factors: only sources that draw their own (shapes) have them
    factor_splits = (None, None, None) if factors is None or data.test_x is not None else (
        part(factors, 0, n_train), part(factors, n_train, n_train + n_val) if n_val else None,
        part(factors, n_train + n_val, n))

    standardization = None
    if data.kind == "tabular":
        mean = train.double().mean(0)  # [D]
        std = train.double().std(0, unbiased=False)  # [D]
        # a column constant in training (MNIST's border pixels as rows) keeps its scale: dividing by a
        # clamped 1e-8 would send its test values, which may vary, to ±1e8 (as scikit-learn's scaler does)
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
        train, test = [((t - mean) / std).float() for t in (train, test)]
        val = None if val is None else ((val - mean) / std).float()
        standardization = {"mean": mean.tolist(), "std": std.tolist()}

    return Dataset(
        name=name,
        train=train,
        test=test,
        val=val,
        train_labels=train_y,
        test_labels=test_y,
        val_labels=val_y,
        kind=data.kind,
        levels=data.levels,
        classes=None if data.classes is None else list(data.classes),
        standardization=standardization,
        columns=data.columns,
        train_factors=factor_splits[0],
        val_factors=factor_splits[1],
        test_factors=factor_splits[2],
        factor_names=None if factor_splits[2] is None else list(data.factor_names),
    )
