"""Training images read batch by batch from their stored pixels, for data sets too large for memory as float32.

The in-memory path converts a data set to float32 once, four bytes a value:
a CelebA-sized folder (200,000 images of 64×64×3) becomes 9.8 GB.
:class:`StreamedImages` keeps the pixels as stored instead — a memory-mapped
``.npy`` file, which the operating system's page cache reads from disk as
batches ask for it; for an image folder, a cache file of its decoded 8-bit
pixels, written once (``~/.cache/aevb/folders``) — and converts only the
rows of each batch, with the arithmetic of the in-memory path, so training
sees the same numbers (``tests/test_streaming.py`` trains both ways and
compares every logged loss).

:func:`aevb.data.datasets.load_data` chooses it (``stream="auto"``, ``aevb train
--stream``) when the float32 copy would take more than half of the memory
available (:func:`should_stream`).  Only the training split streams: the
test and validation splits are loaded as tensors, since evaluation and the
figures read them whole.  It supports what the training loop and the evaluation do with a
training set: ``len``, ``shape``, indexing by batch (slices, index tensors),
``to(device)``, ``mean(0)`` (:func:`mean_example`), and a transform applied
per batch (binarisation, dequantisation: :meth:`StreamedImages.transformed`).  Loading
still reads a file once, a block of rows at a time, to check its value range.
Batches are converted in the training loop's thread; on a GPU they are
copied to the device one at a time (no worker processes or pinned memory).
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

import numpy as np
import torch

# rows converted at a time by mean(): bounded memory whatever the data set's size
_CHUNK_ROWS = 4096
# stream="auto" streams a training set whose float32 copy would take more than this
# fraction of the memory available when the data are loaded
STREAM_MEMORY_FRACTION = 0.5


class StreamedImages:
    """Images [N, C, H, W] in float32, converted from ``pixels`` one batch at a time.

    pixels: a NumPy array or memory map viewed as [N_all, C, H, W] (any
        strides: channels-last files are a transposed view), of 8-bit or
        float values.
    scale: divide by this after the float32 cast (255 for 8-bit pixels);
        None for float pixels already in [0, 1].
    rows: the examples of this set, as indices into pixels (None: all);
        :meth:`subset` composes them without reading any pixels.
    transform: applied to each float32 batch as it is read, on the CPU
        (:meth:`transformed`); None: the images as they are.
    """

    def __init__(self, pixels: np.ndarray, scale: float | None, *, rows: np.ndarray | None = None,
                 device: torch.device | str = "cpu",
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if pixels.ndim != 4:
            raise ValueError(f"StreamedImages needs pixels viewed as [N, C, H, W], got shape {pixels.shape}")
        self.pixels = pixels
        self.scale = scale
        self.rows = rows
        self.device = torch.device(device)
        self.transform = transform

    def _replace(self, **changes) -> StreamedImages:
        state = {"rows": self.rows, "device": self.device, "transform": self.transform}
        return StreamedImages(self.pixels, self.scale, **{**state, **changes})

    # -- the tensor-like surface ------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.pixels.shape[1:]))

    def __len__(self) -> int:
        return len(self.pixels) if self.rows is None else len(self.rows)

    def __getitem__(self, index) -> torch.Tensor:
        """float32 images of the given examples on this set's device: [b, C, H, W] (or [C, H, W] for an int)."""
        index = _as_numpy_index(index)
        source = index if self.rows is None else self.rows[index]
        x = pixels_to_float(self.pixels[source], self.scale)  # only these rows are read
        if self.transform is not None:
            x = self.transform(x)
        return x.to(self.device)

    def to(self, device: torch.device | str) -> StreamedImages:
        return self._replace(device=torch.device(device))

    def mean(self, dim: int = 0) -> torch.Tensor:
        """The mean image [C, H, W]: :func:`mean_example`."""
        if dim != 0:
            raise ValueError("StreamedImages.mean supports dim=0 (the mean example) only")
        return mean_example(self)

    # -- building sets from sets ---------------------------------------------------

    def subset(self, index) -> StreamedImages:
        """The examples at ``index`` (a slice or integer indices), lazily: no pixels are read."""
        index = _as_numpy_index(index)
        base = np.arange(len(self.pixels)) if self.rows is None else self.rows
        return self._replace(rows=base[index])

    def transformed(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> StreamedImages:
        """This set with ``fn`` applied to each batch as it is read, after any transform it already has."""
        before = self.transform
        return self._replace(transform=fn if before is None else lambda x: fn(before(x)))

    def load(self) -> torch.Tensor:
        """All examples as one float32 tensor [N, C, H, W] (for the small held-out splits)."""
        return self[0:len(self)]

    def __repr__(self) -> str:
        kind = "memory-mapped" if isinstance(self.pixels, np.memmap) else "in memory"
        return (f"StreamedImages({len(self)} images {tuple(self.shape[1:])}, {self.pixels.dtype} pixels {kind}, "
                f"device={self.device}{', transformed per batch' if self.transform is not None else ''})")


def mean_example(x: torch.Tensor | StreamedImages, part: tuple[int, int] = (0, 1),
                 combine: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The mean of x [N, *shape] over examples, [*shape] float32 on x's device.

    Summed in float64 on the CPU a chunk of rows at a time, so memory stays
    bounded and a tensor and the streamed images of the same data give the
    same bits (a float32 ``x.mean(0)`` depends on torch's summation order).

    ``part`` (i, n) with ``combine``: this process reads only the chunks i,
    i + n, i + 2n, … and ``combine`` (a sum over the n processes: an
    all-reduce) brings the others' chunk sums [chunks, *shape]; the chunk sums
    are then added in order, so the mean has the same bits as one process's.
    """
    starts = range(0, len(x), _CHUNK_ROWS)
    if part == (0, 1):
        sums: Iterable[torch.Tensor] = (x[start:start + _CHUNK_ROWS].cpu().double().sum(0) for start in starts)
    else:
        sums = torch.zeros((len(starts), *x.shape[1:]), dtype=torch.float64)  # [chunks, *shape], 0 but for ours
        for chunk in range(part[0], len(starts), part[1]):
            sums[chunk] = x[starts[chunk]:starts[chunk] + _CHUNK_ROWS].cpu().double().sum(0)
        sums = combine(sums)
    total = torch.zeros(tuple(x.shape[1:]), dtype=torch.float64)
    for chunk_sum in sums:
        total += chunk_sum
    return (total / max(len(x), 1)).float().to(x.device)


def pixels_to_float(pixels: np.ndarray, scale: float | None) -> torch.Tensor:
    """float32 tensor of ``pixels`` (a view [b, C, H, W]) divided by ``scale``: the one conversion of both paths."""
    values = pixels.astype(np.float32, order="C")
    if scale is not None:
        values /= scale
    return torch.from_numpy(values)


def _as_numpy_index(index):
    """A torch index (any device), list or slice as something NumPy indexes by."""
    if isinstance(index, torch.Tensor):
        return index.cpu().numpy()
    if isinstance(index, list):
        return np.asarray(index)
    return index


def should_stream(stream: str, n_values: int) -> bool:
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
