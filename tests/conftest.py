"""Shared test helpers: the real MNIST test set and a marker to skip without it, the CLI run
in-process, and one torch thread for modules of small tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aevb.cli import main

# The real MNIST test set (10,000 images, IDX as published), shipped beside the repository.
MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
MNIST_IMAGES = MNIST_DIR / "t10k-images-idx3-ubyte.gz"
MNIST_LABELS = MNIST_DIR / "t10k-labels-idx1-ubyte.gz"

requires_mnist = pytest.mark.skipif(
    not (MNIST_IMAGES.is_file() and MNIST_LABELS.is_file()),
    reason=f"the MNIST test set is not in {MNIST_DIR}",
)


def aevb_cli(*args) -> int:
    """Run ``aevb ARGS`` in this process; its exit status."""
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    raise AssertionError("aevb.cli.main returned without an exit status")


@pytest.fixture(scope="module")
def one_thread():
    """The tensors are small: one intra-op thread is as fast on an idle machine and
    avoids OpenMP spin-waiting (many times slower) on a busy one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _no_user_cache(tmp_path_factory):
    """Keep what aevb caches (decoded image folders, feature classifiers) out of the user's ~/.cache, in this
    process and those it starts.

    For the whole session, so that module-scoped fixtures (made before any test's
    own fixtures) are covered too; the classifiers trained once serve every test."""
    import aevb.data.sources

    cache = tmp_path_factory.getbasetemp() / "aevb-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(aevb.data.sources, "CACHE_DIR", cache)
        patch.setenv("AEVB_CACHE", str(cache))  # for the aevb processes tests start
        yield
