"""The registered data sets: ``digits``, ``mnist``, ``fashion-mnist`` and ``cifar10``.

Each is a function registered with ``@DATASETS.register("name")`` that
takes ``(data_dir, download)`` and returns a
:class:`~aevb.data.sources.SourceData` (all examples, before splitting); a
new named data set is one more such function here.  ``digits`` is
scikit-learn's bundled 8x8 digits, always offline; MNIST and Fashion-MNIST
are read from their four published IDX files in ``data_dir`` (or its
``raw/``) when they are there, else (like CIFAR-10) through torchvision,
which fetches them only when ``download=True``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from aevb.data.files import labels_tensor, one_line, read_idx
from aevb.data.sources import SourceData
from aevb.errors import UserError
from aevb.registry import DATASETS


@DATASETS.register("digits")
def _digits(data_dir: Path, download: bool) -> SourceData:
    """scikit-learn's bundled handwritten digits: 1797 images 8x8, intensities 0..16 (offline)."""
    from sklearn.datasets import load_digits  # deferred: importing scikit-learn takes most of a second

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
        train_y = labels_tensor(train_y, len(train_x), str(published[1]))
        test_y = labels_tensor(test_y, len(test_x), str(published[3]))
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
    import torchvision.datasets  # deferred: about a second to import, and only these loaders use it

    cls = getattr(torchvision.datasets, class_name)
    try:
        return cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError … when files are missing
        cause = one_line(exc)
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




def _uint8_images(data) -> torch.Tensor:
    """8-bit images [N, H, W] or [N, H, W, C] (tensor or array) → float32 [N, C, H, W] in [0, 1]."""
    x = torch.as_tensor(np.asarray(data))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # [N, C, H, W]
    return x.to(torch.float32).div_(255).contiguous()


def _targets(targets) -> torch.Tensor:
    return torch.as_tensor(np.asarray(targets), dtype=torch.int64)  # [N]

