"""Data sets: a registry of named loaders, and readers for data files and image folders.

Whatever the source, :func:`load_data` returns a :class:`Dataset` of float32
tensors held in memory (or, for a training set too large for that, a
:class:`~aevb.streaming.StreamedImages` that converts batch by batch):

* images: ``[N, C, H, W]``, channels first, pixel values in ``[0, 1]``;
* tabular data: ``[N, D]``, each column standardised with the training split's
  mean and standard deviation (recorded in ``Dataset.standardization``).

Sources:

* registered names: ``digits`` (scikit-learn's bundled 8x8 digits, always
  offline), ``mnist``, ``fashion-mnist``, ``cifar10`` (torchvision; fetched
  only when ``download=True``);
* a file: IDX as published for MNIST-like sets (gzipped or not), ``.npy``,
  ``.npz``, ``.csv``;
* a folder of images, read recursively; subfolders become classes.

A new named data set is one function registered with
``@DATASETS.register("name")`` that takes ``(data_dir, download)`` and returns
a :class:`SourceData` (all examples, before splitting).
"""

from __future__ import annotations

import gzip
import io
import itertools
import math
import numbers
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from aevb.config import BINARIZE_MODES, STREAM_MODES
from aevb.errors import UserError
from aevb.registry import DATASETS
from aevb.data.streaming import StreamedImages, pixels_to_float

# stream="auto" streams a training set whose float32 copy would take more than this
# fraction of the memory available when the data are loaded
STREAM_MEMORY_FRACTION = 0.5
DEFAULT_IMAGE_SIZE = 64  # side of the square images made from a folder
CACHE_DIR = Path("~/.cache/aevb")  # default data_dir of the torchvision data sets: CACHE_DIR / name

SUPPORTED_FORMATS = (
    "IDX files as published for MNIST (gzipped or not), .npy, .npz, .csv, or a folder of images"
)

# IDX type codes (third byte of the magic number) → big-endian numpy dtype.
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_TEXT_SUFFIXES = (".csv", ".tsv", ".txt")


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


# --------------------------------------------------------------------------- entry point


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
    image_size: side of the square images made from a folder (default 64);
        refused for other sources, which keep their size.
    download: let torchvision fetch a registered data set that is missing.
    stream: ``"yes"`` keeps the training images of a ``.npy`` file
        (memory-mapped) or an image folder (8-bit pixels) as stored and
        converts them to float32 batch by batch (:mod:`aevb.streaming`);
        ``"no"`` converts everything up front; ``"auto"`` streams when the
        float32 copy would take more than half of the memory available.
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
        root = Path(data_dir).expanduser() if data_dir else CACHE_DIR.expanduser() / source
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
        data = _load_path(path, labels, image_size or DEFAULT_IMAGE_SIZE, stream)
    return _split(source, data, test_split=test_split, val_split=val_split, shuffle=shuffle, seed=seed)


def _split_count(split: object, n: int, option: str) -> int:
    """How many of n examples a split option asks for: a count, or a fraction of n."""
    if isinstance(split, numbers.Real) and not isinstance(split, bool):
        if 0 < split < 1:
            return max(1, round(float(split) * n))
        if split >= 0 and float(split).is_integer():
            return int(split)
    raise UserError(f"{option}={split!r} is invalid; give a count (a whole number) or a fraction between 0 and 1")


def _split(name: str, data: SourceData, *, test_split, val_split, shuffle: bool, seed: int) -> Dataset:
    """Split SourceData into train / val / test (from the end), standardising tabular data."""
    x, y = data.x, data.y  # [N, *data_shape], [N]
    n = len(x)
    if data.test_x is None:
        n_test = _split_count(test_split, n, "test_split")
        if n_test == 0:
            raise UserError("test_split=0 leaves no test examples; give a count ≥ 1 or a fraction between 0 and 1")
    else:
        n_test = 0  # the official test set is used instead
    n_val = _split_count(val_split, n, "val_split")
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
    )


# --------------------------------------------------------------------------- registered data sets


@DATASETS.register("digits")
def _digits(data_dir: Path, download: bool) -> SourceData:
    """scikit-learn's bundled handwritten digits: 1797 images 8x8, intensities 0..16 (offline)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16).unsqueeze(1)  # [1797, 1, 8, 8]
    y = torch.from_numpy(bunch.target.astype(np.int64))  # [1797]
    return SourceData(x, y, "image", levels=17, classes=[str(d) for d in range(10)])


_MNIST_CLASSES = [str(d) for d in range(10)]
_FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
_CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                    "dog", "frog", "horse", "ship", "truck"]  # fmt: skip


@DATASETS.register("mnist")
def _mnist(data_dir: Path, download: bool) -> SourceData:
    """MNIST: 60,000 + 10,000 (official test set) handwritten digits 28x28, 8-bit."""
    return _mnist_like("mnist", "MNIST", _MNIST_CLASSES, data_dir, download)


@DATASETS.register("fashion-mnist")
def _fashion_mnist(data_dir: Path, download: bool) -> SourceData:
    """Fashion-MNIST: 60,000 + 10,000 (official test set) clothing images 28x28, 8-bit."""
    return _mnist_like("fashion-mnist", "FashionMNIST", _FASHION_CLASSES, data_dir, download)


@DATASETS.register("cifar10")
def _cifar10(data_dir: Path, download: bool) -> SourceData:
    """CIFAR-10: 50,000 + 10,000 (official test set) colour images 32x32, 8-bit."""
    train, test = _torchvision("cifar10", "CIFAR10", data_dir, download)
    return SourceData(
        x=_uint8_images(train.data),  # [50000, 3, 32, 32]
        y=_targets(train.targets),
        kind="image",
        levels=256,
        classes=_CIFAR10_CLASSES,
        test_x=_uint8_images(test.data),  # [10000, 3, 32, 32]
        test_y=_targets(test.targets),
    )


_MNIST_FILES = (  # as published, in the order (train x, train y, test x, test y)
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _mnist_like(name: str, torchvision_class: str, classes: list[str], root: Path, download: bool) -> SourceData:
    """The four published IDX files in root (or root/raw) if there, else torchvision."""
    published = _find_files(root, _MNIST_FILES)
    if published is not None:
        train_x, train_y, test_x, test_y = (read_idx(p) for p in published)
        train_x, test_x = _uint8_images(train_x), _uint8_images(test_x)  # [N, 1, 28, 28]
        train_y = _labels_tensor(train_y, len(train_x), str(published[1]))
        test_y = _labels_tensor(test_y, len(test_x), str(published[3]))
    else:
        train, test = _torchvision(name, torchvision_class, root, download, expected=_MNIST_FILES)
        train_x, train_y = _uint8_images(train.data), _targets(train.targets)
        test_x, test_y = _uint8_images(test.data), _targets(test.targets)
    return SourceData(train_x, train_y, "image", levels=256, classes=classes, test_x=test_x, test_y=test_y)


def _find_files(root: Path, names: tuple[str, ...]) -> list[Path] | None:
    """Paths of all the named files (or NAME.gz) in root or root/raw, or None if any is missing."""
    for folder in (root, root / "raw"):
        found = [next((p for p in (folder / n, folder / f"{n}.gz") if p.is_file()), None) for n in names]
        if None not in found:
            return found
    return None


def _torchvision(name: str, class_name: str, root: Path, download: bool, expected: tuple[str, ...] = ()):
    """(train, test) torchvision data sets; UserError when they are missing or cannot be fetched."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, class_name)
    try:
        return cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError … when files are missing
        cause = _one_line(exc)
        if download:
            raise UserError(
                f"could not download {name} into {root} ({cause}); check the connection, "
                f"or pass --data-dir (data_dir=) with a folder holding the published files"
            ) from exc
        missing = [n for n in expected if not (root / n).is_file() and not (root / f"{n}.gz").is_file()]
        which = f" (missing {', '.join(missing)})" if missing else ""
        raise UserError(
            f"{name} files not found in {root}{which}; pass --data-dir (data_dir=) with a folder "
            f"holding the published files, or --download (download=True) to fetch them"
        ) from exc


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (for UserError messages)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _uint8_images(data) -> torch.Tensor:
    """8-bit images [N, H, W] or [N, H, W, C] (tensor or array) → float32 [N, C, H, W] in [0, 1]."""
    x = torch.as_tensor(np.asarray(data))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # [N, C, H, W]
    return x.to(torch.float32).div_(255).contiguous()


def _targets(targets) -> torch.Tensor:
    return torch.as_tensor(np.asarray(targets), dtype=torch.int64)  # [N]


# --------------------------------------------------------------------------- files


def _load_path(path: Path, labels: str | None, image_size: int, stream: str = "auto") -> SourceData:
    """SourceData of a data file (with an optional labels file) or an image folder."""
    if not path.exists():
        raise UserError(
            f"data file or folder not found: {path}; pass a registered name "
            f"({', '.join(DATASETS.names())}) or an existing path"
        )
    if path.is_dir():
        if labels is not None:
            raise UserError(f"the labels of an image folder come from its subfolder names; drop --labels for {path}")
        return _load_folder(path, image_size, stream)
    mappable = _format_suffix(path) == ".npy" and path.suffix.lower() != ".gz"
    if stream == "yes" and not mappable:
        raise UserError(f"--stream yes reads a .npy file or an image folder batch by batch, not {path}; "
                        f"save the images with numpy.save, or drop --stream")
    # a memory map reads nothing yet: whether to stream is decided from the shape
    x, y = (_np_load(path, mmap=True), None) if mappable and stream != "no" else _read_data_file(path)
    where = str(path)
    if labels is not None:
        y, where = _read_labels(Path(labels).expanduser()), str(labels)
    view, levels, scale = _image_view(x, str(path))
    if view is None:
        if stream == "yes":
            raise UserError(f"--stream yes is for images; {path} holds rows of a table [N, D]: drop --stream")
        # a copy: a table is small, and a read-only memory map would make torch warn of its writes
        xt, kind = torch.from_numpy(np.array(x, dtype=np.float32)), "tabular"  # [N, D]
    else:
        xt, kind = _images(view, scale, stream), "image"
    yt = None if y is None else _labels_tensor(y, len(xt), where)
    return SourceData(xt, yt, kind, levels, classes=_class_names(yt))


def _images(view: np.ndarray, scale: float | None, stream: str) -> torch.Tensor | StreamedImages:
    """Images from pixels viewed as [N, C, H, W]: streamed, or converted to float32 now."""
    if _streams(stream, view.size):
        return StreamedImages(view, scale)
    return pixels_to_float(view, scale)


def _streams(stream: str, n_values: int) -> bool:
    """Whether ``stream`` (yes, no, auto) streams a training set of n_values pixel values."""
    return stream == "yes" or (stream == "auto" and _too_large_for_memory(4 * n_values))  # 4: bytes of a float32


def _too_large_for_memory(n_bytes: int) -> bool:
    """Whether n_bytes exceed STREAM_MEMORY_FRACTION of the memory available now (False where unknown)."""
    available = None
    try:
        with open("/proc/meminfo") as f:  # Linux: MemAvailable counts reclaimable caches
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return False
    return n_bytes > STREAM_MEMORY_FRACTION * available


def _read_data_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(data [N, ...], labels [N] or None) from an IDX, .npy, .npz or .csv file."""
    suffix = _format_suffix(path)
    if suffix == ".npy":
        return _np_load(path), None
    if suffix == ".npz":
        return _read_npz(path)
    if suffix in _TEXT_SUFFIXES:
        return _read_text(path), None
    if _looks_like_idx(path):
        return read_idx(path), None
    raise UserError(f"unsupported data file {path}; supported: {SUPPORTED_FORMATS}")


def _read_labels(path: Path) -> np.ndarray:
    """Integer labels [N] from an IDX, .npy or .csv/.txt file (one integer per example)."""
    if not path.is_file():
        raise UserError(f"labels file not found: {path}; pass an existing IDX, .npy or .csv file")
    suffix = _format_suffix(path)
    if suffix == ".npy":
        y = _np_load(path)
    elif suffix in _TEXT_SUFFIXES:
        y = _read_text(path)
    elif _looks_like_idx(path):
        y = read_idx(path)
    else:
        raise UserError(f"unsupported labels file {path}; supported: IDX, .npy, .csv or .txt of integers")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise UserError(f"labels file {path} has shape {list(y.shape)}; expected one integer per example")
    return y


def _labels_tensor(y: np.ndarray, n: int, where: str) -> torch.Tensor:
    """Validated int64 labels [N]."""
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise UserError(
            f"{where} has {len(y)} labels but the data have {n} examples; pass the labels that belong to the data"
        )
    if y.dtype.kind not in "iub" and not (y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all()):
        raise UserError(f"labels in {where} are not integers; pass class indices 0, 1, 2, …")
    return torch.from_numpy(y.astype(np.int64))


def _class_names(y: torch.Tensor | None) -> list[str] | None:
    """Names "0" … "K-1" when the labels are exactly 0..K-1, else None."""
    if y is None or len(y) == 0:
        return None
    values = torch.unique(y)
    if values[0] != 0 or values[-1] != len(values) - 1:
        return None
    return [str(v) for v in range(len(values))]


def _format_suffix(path: Path) -> str:
    """Lower-case suffix naming the format, looking through a final .gz ("x.csv.gz" → ".csv")."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped if it is gzip-compressed (recognised by its magic bytes)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"file not found: {path}; pass an existing file") from None
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror}); check the path and its permissions") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise UserError(f"{path} is a corrupt or truncated gzip file ({exc}); fetch it again") from None
    return data


def _is_idx_header(head: bytes) -> bool:
    return len(head) >= 4 and head[0] == 0 and head[1] == 0 and head[2] in _IDX_DTYPES and head[3] >= 1


def _looks_like_idx(path: Path) -> bool:
    """Whether the file starts with an IDX magic number (after gunzipping)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                head = f.read(4)
    except (OSError, EOFError, zlib.error):
        return False
    return _is_idx_header(head)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, the format MNIST is published in, gzipped or not.

    Layout: a magic number (two zero bytes, a type code, the number of
    dimensions), each dimension as a big-endian uint32, then the values in C
    order.  0x00000803 is uint8 images [N, H, W]; 0x00000801 uint8 labels [N].
    Returns the array with native byte order, e.g. uint8 [10000, 28, 28] for
    ``t10k-images-idx3-ubyte.gz``.  A wrong magic number, or a byte count that
    does not match the header, raises UserError.
    """
    path = Path(path)
    data = _read_bytes(path)
    if not _is_idx_header(data[:4]):
        raise UserError(
            f"{path} is not an IDX file (magic number 0x{data[:4].hex()}); expected 0x00000803 "
            f"for images or 0x00000801 for labels, as published for MNIST"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(
            f"{path} is truncated: {len(data)} bytes cannot hold its {ndim}-dimensional header; fetch it again"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise UserError(
            f"{path} is truncated or corrupt: its header promises {'x'.join(map(str, dims))} values "
            f"({expected} bytes in all) but it holds {len(data)} bytes; fetch it again"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _np_load(path: Path, mmap: bool = False) -> np.ndarray:
    """An array from a .npy file (gzipped or not; with mmap, a read-only memory map); no pickles."""
    try:
        source = io.BytesIO(_read_bytes(path)) if path.suffix.lower() == ".gz" else path
        array = np.load(source, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"cannot read {path} as a .npy array ({_one_line(exc)}); save it with numpy.save") from None
    if not isinstance(array, np.ndarray):
        raise UserError(f"{path} is not a .npy array; save it with numpy.save")
    return array


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(data, labels) from a .npz: data under "x" or "images" (else the first array), labels under "y" or "labels"."""
    try:
        source = io.BytesIO(_read_bytes(path)) if path.suffix.lower() == ".gz" else path
        with np.load(source, allow_pickle=False) as npz:
            keys = list(npz.keys())
            if not keys:
                raise UserError(f"{path} holds no arrays; save the data with numpy.savez(path, x=data)")
            x_key = next((k for k in ("x", "images") if k in keys), keys[0])
            y_key = next((k for k in ("y", "labels") if k in keys), None)
            return npz[x_key], (None if y_key is None else npz[y_key])
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read {path} as a .npz archive ({_one_line(exc)}); save it with numpy.savez") from None


def _read_text(path: Path) -> np.ndarray:
    """Numeric rows [N, D] (float64) from a .csv/.tsv/.txt file; a non-numeric first row is a header."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read {path} ({exc}); check the file") from None
    delimiter = "," if "," in first else ("\t" if "\t" in first else None)
    try:
        [float(v) for v in first.split(delimiter) if v.strip()]
        header = 0
    except ValueError:
        header = 1
    try:
        array = np.loadtxt(path, delimiter=delimiter, skiprows=header, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise UserError(
            f"cannot read {path} as numeric rows ({_one_line(exc)}); every row needs the same number of numbers"
        ) from None
    if array.size == 0:
        raise UserError(f"{path} holds no numeric rows; pass a file with one example per row")
    return array


def _image_view(a: np.ndarray, where: str) -> tuple[np.ndarray | None, int | None, float | None]:
    """(pixels viewed as [N, C, H, W], levels, scale) of an array of examples; (None, None, None) for a table.

    uint8 (or integers 0..255 with ≥ 3 dims) are images / 255 (``scale``),
    256 levels; bool → images, 2 levels; floats with ≥ 3 dims must already lie
    in [0, 1].  Image layouts: [N, H, W] → [N, 1, H, W]; [N, H, W, C] with C in
    (1, 3, 4) → [N, C, H, W]; [N, C, H, W] kept.  2-D arrays [N, D] are
    tabular, except uint8 rows whose length is a square number (flattened
    images, e.g. 784 → [N, 1, 28, 28]).  Only views are taken, so a memory
    map is read (in chunks) just for the range checks.
    """
    if a.dtype.kind not in "biuf":
        raise UserError(f"{where} holds {a.dtype} values; the data must be numbers")
    if a.ndim < 2 or a.ndim > 4 or len(a) == 0:
        raise UserError(
            f"{where} holds an array of shape {list(a.shape)}; expected examples along the first "
            f"axis: [N, D] rows, or images [N, H, W], [N, H, W, C] or [N, C, H, W] (labels go in --labels)"
        )
    lo, hi, finite = _range(a)
    if not finite:
        raise UserError(f"{where} contains NaN or infinite values; remove or fill them")
    if a.ndim == 2:
        # 8-bit rows of s² values are grey images; of 3·s² (s ≥ 4), colour ones in CIFAR-10's python
        # layout, each channel's plane after the other (3·s² is never a square, so the two cannot clash)
        side, colour_side = math.isqrt(a.shape[1]), math.isqrt(a.shape[1] // 3)
        if a.dtype == np.uint8 and side * side == a.shape[1]:
            a = a.reshape(len(a), side, side)
        elif a.dtype == np.uint8 and a.shape[1] % 3 == 0 and colour_side**2 * 3 == a.shape[1] and colour_side >= 4:
            a = a.reshape(len(a), 3, colour_side, colour_side)
        else:
            return None, None, None
    if a.ndim == 3:
        a = a[:, None]  # [N, 1, H, W]
    elif a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
        a = a.transpose(0, 3, 1, 2)  # [N, H, W, C] → [N, C, H, W]
    elif a.shape[1] not in (1, 3, 4):
        raise UserError(
            f"{where} has shape {list(a.shape)}; 4-D images need 1, 3 or 4 channels, "
            f"first [N, C, H, W] or last [N, H, W, C]"
        )
    if a.dtype.kind == "b":
        return a, 2, None
    if a.dtype.kind in "iu":
        if lo < 0 or hi > 255:
            raise UserError(
                f"{where}: integer pixel values must lie in 0..255, found {lo}..{hi}; rescale them to floats in [0, 1]"
            )
        return a, 256, 255.0
    if lo < 0 or hi > 1:
        raise UserError(
            f"{where}: float pixel values must lie in [0, 1], found {lo:g}..{hi:g}; "
            f"rescale them (8-bit values: divide by 255)"
        )
    return a, None, None


def _range(a: np.ndarray, rows: int = 4096) -> tuple:
    """(min, max, all finite) of an array, a block of rows at a time (a memory map is never read whole)."""
    lo, hi = None, None
    for start in range(0, len(a), rows):
        block = np.asarray(a[start:start + rows])
        if block.dtype.kind == "f" and not np.isfinite(block).all():
            return None, None, False
        lo = block.min() if lo is None else min(lo, block.min())
        hi = block.max() if hi is None else max(hi, block.max())
    return lo, hi, True


# --------------------------------------------------------------------------- image folders


def _load_folder(root: Path, image_size: int, stream: str = "auto") -> SourceData:
    """Every readable image under root, sorted by path, as [N, C, S, S] in [0, 1] with S = image_size.

    Images are turned upright as their EXIF orientation says (as every viewer
    shows them), converted to RGB (to greyscale if all are greyscale), resized so
    the short side is S, and centre-cropped to S x S.  Unreadable files are
    named in a warning and skipped.  With two or more subfolders holding
    images, the top-level subfolder is the class (like torchvision's
    ImageFolder), and the split shuffles first.  In memory, the images are decoded and converted to float32.
    Streamed (``stream``: yes, or auto for a folder too large for memory as
    float32), they are decoded once into a cache file of 8-bit pixels
    (:func:`_decoded_folder`) that later runs memory-map without decoding.
    """
    from PIL import Image

    Image.init()
    extensions = {e.lower() for e in Image.registered_extensions()}
    files = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in extensions and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )  # fmt: skip
    bad: list[Path] = []
    modes: dict[Path, str] = {}
    for p in files:  # headers only: the common mode must be known before decoding
        try:
            with Image.open(p) as im:
                modes[p] = im.mode
        except Exception:
            bad.append(p)
    mode = "L" if modes and all(m in GREY_MODES for m in modes.values()) else "RGB"
    readable = list(modes)
    shape = (image_size, image_size) if mode == "L" else (image_size, image_size, 3)  # of one image, uint8

    streamed = _streams(stream, len(readable) * math.prod(shape))
    if streamed:
        stacked, kept, failed = _decoded_folder(root, readable, mode, image_size, shape)
    else:
        pixels: list[np.ndarray] = []  # each [S, S] or [S, S, 3] uint8
        kept, failed = [], []
        for p, decoded in zip(readable, _decode_all(readable, mode, image_size, f"decoding {root.name or root}")):
            if decoded is None:
                failed.append(p)
            else:
                pixels.append(decoded)
                kept.append(p)
        stacked = np.stack(pixels) if pixels else None  # [N, S, S] or [N, S, S, 3] uint8
    bad += failed
    if bad:
        names = ", ".join(str(p.relative_to(root)) for p in sorted(bad)[:20])
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        warnings.warn(f"skipped {len(bad)} unreadable image file(s) in {root}: {names}{more}", stacklevel=3)
    if not kept:
        data_files = sorted(p.name for p in root.iterdir() if p.is_file() and (
            _format_suffix(p) in (".npy", ".npz", *_TEXT_SUFFIXES) or _looks_like_idx(p)))
        hint = (f"; it holds data files ({', '.join(data_files[:3])}{', …' if len(data_files) > 3 else ''}): pass one "
                f"with --data FILE (and its labels with --labels FILE)") if data_files else ""
        raise UserError(f"no readable images in folder {root}; pass a folder of image files (PNG, JPEG, …){hint}")

    folders = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in kept]
    classes = sorted({f for f in folders if f is not None})
    y, rows = None, None
    if len(classes) >= 2:
        loose = [p.name for p, f in zip(kept, folders) if f is None]
        if loose:
            names = ", ".join(loose[:20]) + (f" and {len(loose) - 20} more" if len(loose) > 20 else "")
            warnings.warn(f"skipped {len(loose)} image(s) outside the class subfolders of {root}: {names}", stacklevel=3)
            rows = np.array([i for i, f in enumerate(folders) if f is not None])
        y = torch.tensor([classes.index(f) for f in folders if f is not None], dtype=torch.int64)  # [N]
    else:
        classes = None

    view = stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)  # [N, C, S, S]
    if streamed:
        x = StreamedImages(view, 255.0, rows=rows)
    else:
        x = pixels_to_float(view if rows is None else view[rows], 255.0)
    return SourceData(x, y, "image", levels=256, classes=classes, grouped_by_class=y is not None)


def _decode_all(files: list[Path], mode: str, image_size: int, description: str) -> Iterator[np.ndarray | None]:
    """Each file's pixels (:func:`_decode`) in order, None for a file that cannot be decoded.

    Large folders are decoded on a few threads: Pillow releases the GIL while
    it decodes and resizes, so two cores decode a folder of JPEGs about 1.7×
    as fast as one.  At most 16 images a thread are in flight, so a folder of
    any size streams through in constant memory.  A progress bar shows on a
    terminal from 2,000 images.
    """
    def decode(path: Path) -> np.ndarray | None:
        try:
            return _decode(path, mode, image_size)
        except Exception:
            return None

    results: Iterable[np.ndarray | None]
    workers = min(8, _usable_cores())
    if workers == 1 or len(files) < 256:
        results = map(decode, files)
    else:
        results = _ordered_map(decode, files, workers, in_flight=16 * workers)
    if len(files) < 2000:
        yield from results
        return
    from tqdm.auto import tqdm

    yield from tqdm(results, total=len(files), desc=description, unit="image", leave=False, disable=None)


def _usable_cores() -> int:
    """Cores this process may run on (a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _ordered_map(fn, items: list, workers: int, in_flight: int) -> Iterator:
    """fn(item) for each item, in order, computed on ``workers`` threads with at most ``in_flight`` pending."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="aevb-decode") as pool:
        pending: deque = deque()
        remaining = iter(items)
        for item in itertools.islice(remaining, in_flight):
            pending.append(pool.submit(fn, item))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(remaining, 1):
                pending.append(pool.submit(fn, item))
            yield result


# Pillow modes of one-channel images: bilevel, 8-bit (with alpha), 16- and 32-bit integer, float
GREY_MODES = ("1", "L", "LA", "I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _decode(path: Path, mode: str, image_size: int) -> np.ndarray:
    """One image file as uint8 pixels [S, S] (mode L) or [S, S, 3] (RGB)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        upright = ImageOps.exif_transpose(im)  # a camera's portrait JPEG is stored sideways
        return np.asarray(_resize_crop(_eight_bit(upright).convert(mode), image_size))


def _eight_bit(im):
    """A 16-bit, 32-bit or float grey image as 8-bit grey (Pillow's convert would clip it at 255, all white).

    16-bit (I;16*, or I holding values above 255): value / 257; float (F):
    [0, 1] if it stays there, else clipped to [0, 255].  Other modes as they are.
    """
    from PIL import Image

    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    values = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16") or (im.mode == "I" and values.max(initial=0) > 255):
        values = values / 257
    elif im.mode == "F" and values.max(initial=0) <= 1 and values.min(initial=0) >= 0:
        values = values * 255
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


DECODER = 2


def _decoded_folder(root: Path, files: list[Path], mode: str, image_size: int,
                    shape: tuple[int, ...]) -> tuple[np.ndarray, list[Path], list[Path]]:
    """(pixels [N, *shape] uint8 memory-mapped, files decoded, files that failed) of an image folder.

    Decoded one image at a time into ``CACHE_DIR/folders/NAME-SIZEpx-KEY.npy``,
    never all in memory, and written atomically; KEY hashes the folder's path,
    the mode, the size and every file's name, size and modification time, so a
    changed folder is decoded again and an unchanged one is not.  A sidecar
    ``.json`` lists which files the rows are.
    """
    import hashlib
    import json

    from aevb.io import atomic_write, write_json

    stats = [p.stat() for p in files]  # one stat call a file: a folder can hold 200k of them
    listing = [(str(p.relative_to(root)), st.st_size, st.st_mtime_ns) for p, st in zip(files, stats)]
    # DECODER: how files become pixels (2: EXIF orientation applied); a change decodes cached folders again
    key = hashlib.sha256(json.dumps([str(root.resolve()), mode, image_size, DECODER, listing]).encode()).hexdigest()[:20]
    cache = CACHE_DIR.expanduser() / "folders" / f"{root.resolve().name or 'root'}-{image_size}px-{key}.npy"
    index = cache.with_suffix(".json")
    if cache.is_file() and index.is_file():
        try:
            kept = json.loads(index.read_text())["kept"]
            pixels = _np_load(cache, mmap=True)
            if pixels.shape == (len(kept), *shape) and pixels.dtype == np.uint8:
                return pixels, *_kept_and_failed(files, kept)
        except (UserError, ValueError, KeyError, IndexError, TypeError):
            pass  # a damaged cache: decode again
    kept: list[int] = []

    def write(tmp: str) -> None:
        pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), *shape))
        for i, decoded in enumerate(_decode_all(files, mode, image_size,
                                                f"decoding {root.name or root} into {cache.parent}")):
            if decoded is not None:
                pixels[len(kept)] = decoded
                kept.append(i)
        pixels.flush()
        if len(kept) < len(files):  # drop the unused rows at the end, a block at a time: constant memory
            trimmed = f"{tmp}.rows"
            try:
                rows = np.lib.format.open_memmap(trimmed, mode="w+", dtype=np.uint8, shape=(len(kept), *shape))
                for start in range(0, len(kept), 4096):
                    stop = min(start + 4096, len(kept))
                    rows[start:stop] = pixels[start:stop]
                rows.flush()
                del rows, pixels
                os.replace(trimmed, tmp)
            finally:
                if os.path.exists(trimmed):
                    os.unlink(trimmed)
        else:
            del pixels

    try:
        atomic_write(cache, write)
        write_json(index, {"folder": str(root.resolve()), "image_size": image_size, "mode": mode, "kept": kept})
    except UserError as exc:  # atomic_write's, for an unwritable cache
        raise UserError(f"{exc}: the decoded images of {root} go there; or load the folder into memory "
                        f"with --stream no") from None
    return _np_load(cache, mmap=True), *_kept_and_failed(files, kept)


def _kept_and_failed(files: list[Path], kept: list[int]) -> tuple[list[Path], list[Path]]:
    decoded = set(kept)
    return [files[i] for i in kept], [p for i, p in enumerate(files) if i not in decoded]


def _resize_crop(im, size: int):
    """PIL image resized (bicubic) so its short side is `size`, then centre-cropped to size x size."""
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return im.crop((left, top, left + size, top + size))


# --------------------------------------------------------------------------- helpers for training and figures


def binarize(x: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Binarise pixels x in [0, 1] (any shape): "none" returns x, "threshold" (x > 0.5),
    "dynamic" a fresh Bernoulli(x) sample on every call (Salakhutdinov & Murray 2008).

    The generator must live on x's device.  Streamed images are binarised
    batch by batch, as they are read.
    """
    if isinstance(x, StreamedImages) and mode in BINARIZE_MODES:
        return x if mode == "none" else x.transformed(lambda batch: binarize(batch, mode, generator))
    if mode == "none":
        return x
    if mode == "threshold":
        return (x > 0.5).to(x.dtype)
    if mode == "dynamic":
        return torch.bernoulli(x, generator=generator)
    raise UserError(f"unknown binarization {mode!r}; choose one of: {', '.join(BINARIZE_MODES)}")


def dequantize(x: torch.Tensor, levels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniformly dequantised pixels (k + u) / levels, u ~ U[0, 1), of x = k / (levels − 1) (any shape).

    The bins [k, k + 1) / levels tile [0, 1], one a level, and each holds its
    level's value k / (levels − 1); a density p over [0, 1] then gives each
    level the probability P_k = ∫ p over its bin, and by Jensen's inequality
    E_u[−log p((k + u) / levels)] + log levels ≥ −log P_k: the bits per
    dimension of a continuous likelihood on dequantised data bound those of
    the discrete data from above (Theis et al. 2016).  The generator must
    live on x's device; without one the global generator draws u.  Streamed
    images are dequantised batch by batch, as they are read.
    """
    if isinstance(x, StreamedImages):
        return x.transformed(lambda batch: dequantize(batch, levels, generator))
    k = (x * (levels - 1)).round_()
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (k + u).div_(levels)


def holdout_indices(labels: torch.Tensor | None, n: int = 10, *, num_examples: int | None = None) -> torch.Tensor:
    """Indices [≤ n] of a small fixed set of examples for reconstruction pictures.

    With labels [N]: the first example of each class (classes in ascending
    order), then the second of each, and so on, until there are n; without:
    the first n examples.  Never more than there are (``num_examples``, or
    the number of labels).
    """
    if labels is None:
        return torch.arange(n if num_examples is None else min(n, num_examples))
    labels = labels.reshape(-1).cpu()
    order = torch.argsort(labels, stable=True)  # [N] grouped by class, file order within a class
    grouped = labels[order]
    starts = torch.ones_like(grouped, dtype=torch.bool)  # [N] True at the first example of a class
    starts[1:] = grouped[1:] != grouped[:-1]
    group_start = torch.cummax(torch.where(starts, torch.arange(len(grouped)), 0), dim=0).values
    rank = torch.arange(len(grouped)) - group_start  # [N] place of each example within its class
    by_rank = torch.argsort(rank, stable=True)  # first of every class, then second of every class, …
    return order[by_rank][:n]