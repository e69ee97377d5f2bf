"""Shared test helpers: the real MNIST test set and a marker to skip without it, the CLI run
in-process, one torch thread for modules of small tensors, and a headless Chromium."""

from __future__ import annotations

import shutil
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


# Chromium as the distribution installs it (apt-get install chromium): Playwright's own browser download cannot
# reach its servers from these machines.  Flags: no sandbox (containers, root), and nothing the browser would
# fetch by itself, so that a test sees only the page's own requests.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def chromium():
    """A headless Chromium driven by Playwright (a ``Browser``: ``chromium.new_page()``), shared by the session;
    skipped where either is missing."""
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install 'aevb[test]')")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
