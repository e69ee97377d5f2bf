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

Both settings are applied at the library's entry points, :func:`aevb.training.train`
and :func:`aevb.evaluate` (which the commands go through), or by a user's
explicit call: never as a side effect of a maths function.
:func:`keep_freed_memory` does nothing on other C libraries; training and
evaluation also run inside :func:`denormals_flushed` (below: subnormal floats
slowed long MNIST runs by a quarter).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator

import torch

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


# --------------------------------------------------------------------------- subnormal numbers
#
# Trained on MNIST, a Bernoulli decoder drives the logits of the always-black border
# pixels towards −∞ (their maximum-likelihood value), and after about 700 steps σ(l),
# the gradients of those pixels and Adam's moments of their weights fall below 2^−126
# into float32's subnormal range.  x86 cores compute on subnormal operands and results
# in microcode, a hundred times slower, and from then on every step of the MLP VAE
# took 1.25× as long (3.5 → 4.4 ms on the 2-core CPU of bench/README.md; the
# convolutional VAE 1.12×).  Flushing them to zero changes only values below 1e-38,
# which no loss, gradient step or log-likelihood here can resolve: Adam's update
# m / (√v + 1e-8) is the same for v = 1e-40 and v = 0.  The flag is per thread, so
# it is set on PyTorch's OpenMP worker threads too: on the main thread alone, the
# workers' share of every parallel kernel stayed slow.

_inside: ContextVar[bool] = ContextVar("aevb_denormals_flushed", default=False)
_PROBE_SIZE = 1 << 17  # float32 values: split between the threads by PyTorch's elementwise kernels
_team: dict = {}  # "parallel": the GOMP_parallel whose team is PyTorch's (None: none found); "size": the largest team set


@functools.lru_cache(maxsize=None)
def _fe_functions():
    """libm's ``fesetmode`` (as a pointer) and ``fegetmode``, or None.

    glibc's ``fesetmode`` (2.25 on) loads the whole floating-point control
    state but the exception flags, flush-to-zero and denormals-are-zero
    included; ``fesetenv`` keeps only rounding and exception bits.
    """
    try:
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        return ctypes.cast(libm.fesetmode, ctypes.c_void_p), libm.fegetmode
    except (OSError, AttributeError):
        return None


def _openmp_libraries() -> list[str]:
    """Paths of the OpenMP runtimes in this process (GNU, Intel, LLVM), PyTorch's own first.

    scikit-learn and others load their own copy; its team is not PyTorch's.
    """
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if any(name in line for name in ("libgomp", "libiomp", "libomp"))}
    except OSError:  # no /proc: not Linux
        return []
    torch_dir = str(Path(torch.__file__).parent)
    return sorted(paths, key=lambda path: (not path.startswith(torch_dir), path))


def _gomp_parallel(path: str):
    try:
        parallel = ctypes.CDLL(path).GOMP_parallel  # loaded already: the same instance
    except (OSError, AttributeError):
        return None
    parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    return parallel


def _broadcast(parallel, fe, threads: int) -> None:
    """Every thread of an OpenMP team loads this thread's floating-point modes (C only: no Python in the workers).

    With no Python and so no GIL in the workers: a worker cannot take it
    while the interpreter shuts down, and the team would never finish.
    """
    fesetmode, fegetmode = fe
    modes = ctypes.create_string_buffer(64)  # larger than any libc's femode_t
    if fegetmode(modes) == 0:
        parallel(fesetmode, modes, threads, 0)


def _to_workers() -> None:
    """Load this thread's floating-point modes on every thread of PyTorch's OpenMP team.

    The team is the largest thread count set so far (a pool keeps the
    threads of a larger team after ``torch.set_num_threads`` lowers it).
    PyTorch's library is found once, by a probe: subnormals made before this
    thread flushes, multiplied on all threads after the broadcast.
    """
    fe = _fe_functions()
    threads = _team["size"] = max(torch.get_num_threads(), _team.get("size", 1))
    if fe is None or threads == 1:
        return
    if "parallel" in _team:
        if _team["parallel"] is not None:
            _broadcast(_team["parallel"], fe, threads)
        return
    flushing = flushing_denormals()
    torch.set_flush_denormal(False)
    probe = torch.full((_PROBE_SIZE,), 1e-39)  # subnormal: made while this thread does not flush
    torch.set_flush_denormal(flushing)
    for path in _openmp_libraries():
        parallel = _gomp_parallel(path)
        if parallel is None:
            continue
        _broadcast(parallel, fe, threads)
        if not flushing or not bool(probe.mul(3.0).count_nonzero()):
            if flushing:  # a probed team: PyTorch's, kept for every later call
                _team["parallel"] = parallel
            return
    if flushing:
        _team["parallel"] = None  # no team reached the workers: this thread alone, and no search again


def _set_flush_denormal(flush: bool) -> None:
    """torch.set_flush_denormal on this thread and on every intra-op worker (nothing where unsupported)."""
    if torch.set_flush_denormal(flush):
        _to_workers()


def flushing_denormals() -> bool:
    """Whether this thread flushes subnormal floats to zero."""
    return torch.tensor(1e-39, dtype=torch.float32).mul(1.0).item() == 0.0


@contextmanager
def denormals_flushed() -> Iterator[None]:
    """Flush subnormal floats to zero inside, on this thread and PyTorch's CPU worker threads.

    The training loop and the importance sampler run inside; on exit the
    setting is what it was.  A caller who turned flushing on with
    ``torch.set_flush_denormal(True)`` (which sets it on the calling thread
    only) keeps it, and PyTorch's workers get it too.  Does nothing where the
    processor has no such mode.
    """
    if _inside.get():  # an enclosing denormals_flushed has set every thread: the sampler inside training
        yield
        return
    token = _inside.set(True)
    try:
        if flushing_denormals():
            _to_workers()
            yield
            return
        try:
            _set_flush_denormal(True)
            yield
        finally:
            _set_flush_denormal(False)
    finally:
        _inside.reset(token)
