"""Process-level settings that make PyTorch's CPU kernels run at their measured speed.

glibc's ``malloc`` returns large freed blocks to the operating system (its
trim and mmap thresholds adapt only slowly), so a loop that allocates and
frees the same multi-megabyte tensors every iteration — the importance
sampler decodes 4,096 rows of logits per chunk — page-faults them in again
each time: the first 100 images of an evaluation ran 1.5× slower than the
next 100 (bench: 6.2 vs 4.0 ms per image at k=1000).  Fixing both
thresholds keeps freed memory in the process for reuse; the price is that
resident memory stays at its peak instead of shrinking after it, as with
jemalloc or tcmalloc, which PyTorch recommends for CPU work.

:func:`keep_freed_memory` is called by the command line and by the library's
training and evaluation entry points; it does nothing on other C libraries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # bytes: above any single tensor the loops allocate per step
_done = False


def keep_freed_memory() -> bool:
    """Stop glibc from unmapping freed blocks below 1 GiB; True where it applied (Linux/glibc), once per process."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    _done = bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD))
    return _done
