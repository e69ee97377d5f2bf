"""Shared test helpers: where the real MNIST test set lives, and a marker to skip without it."""

from __future__ import annotations

from pathlib import Path

import pytest

# The real MNIST test set (10,000 images, IDX as published), shipped beside the repository.
MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
MNIST_IMAGES = MNIST_DIR / "t10k-images-idx3-ubyte.gz"
MNIST_LABELS = MNIST_DIR / "t10k-labels-idx1-ubyte.gz"

requires_mnist = pytest.mark.skipif(
    not (MNIST_IMAGES.is_file() and MNIST_LABELS.is_file()),
    reason=f"the MNIST test set is not in {MNIST_DIR}",
)
