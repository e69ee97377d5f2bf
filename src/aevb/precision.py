"""Mixed precision: matrix multiplies and convolutions in bfloat16, everything else in float32.

On processors with bfloat16 matrix units (x86 with AMX, CUDA GPUs from
Ampere on) a bf16 matrix multiply runs 2–4× faster than an fp32 one; at
batch 128 the multiplies are most of a VAE's training step, and they are
most of an importance-sampled evaluation.  AVX512-BF16 alone (bf16 dot
products in the vector units) is native, and faster or slower by CPU: the
benchmark's matrix-multiply peak was 417 GFLOP/s in bf16 against 195 in fp32
on one 2-core Xeon (a bf16 peak far below any AMX CPU's), and a 2048²
multiply ran at 147 against 260 on another without AMX (where the MNIST
training steps were 1.3× (conv) and 1.5× (MLP) slower in bf16).  So
``--precision auto`` takes bf16 only where it is faster
(:func:`bf16_is_faster`: AMX, or a measured multiply), and ``--precision
bf16`` wherever it is native.
Inside :func:`matmul_dtype`, the layers of :mod:`aevb.layers` cast their input,
weight and bias to bf16 for the multiply (which accumulates in fp32) and
return bf16 (linear layers too small to gain stay fp32: ``MIN_LOWERED_MACS``);
the model casts its networks' outputs back to fp32
(``objectives.at_least_float32``).  Only the layer outputs are rounded to
bf16 (3 significant digits), as they would be by casting each one to fp32
and back: weights, optimiser state, the likelihood, the KL and every sum
stay fp32, and so does everything outside the context.  Training's step and
the importance sampler of ``aevb eval`` use it (``--precision``); the test
ELBO that training reports never does.

This is a different rule from ``torch.autocast``, which also keeps the
distribution parameters, and so the log-densities computed from them, in
bf16.  ``tests/test_precision.py`` checks that a bf16 step gives the fp32
loss and gradients to bf16 rounding, that training reaches the same test
ELBO, and that bf16 moves an importance-sampled log p(x) several times less
than drawing other samples does; ``bench/`` measures the speed.
"""

from __future__ import annotations

import functools
import platform
import timeit
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch

from .config import PRECISIONS
from .errors import UserError

_matmul_dtype: ContextVar[torch.dtype | None] = ContextVar("aevb_matmul_dtype", default=None)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 if its dtype is narrower (bf16, fp16), else unchanged (float32, float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


@contextmanager
def matmul_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Run the multiplies of aevb's layers in ``dtype`` (None: the weights' own dtype)."""
    token = _matmul_dtype.set(dtype)
    try:
        yield
    finally:
        _matmul_dtype.reset(token)


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware (not by emulation, which is slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        # oneDNN's answer is yes for any AVX512BW CPU (Skylake), which emulates bf16 dot products;
        # native ones take AVX512-BF16 or AMX
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            return bool(_cpu_flag("_is_avx512_bf16_supported") or amx_usable())
        return True
    return False


def _cpu_flag(name: str) -> bool:
    """torch.cpu's private test ``name`` of a CPU feature; False where this build has none."""
    test = getattr(torch.cpu, name, None)
    return bool(test()) if test is not None else False


@functools.cache
def amx_usable() -> bool:
    """Whether this CPU has AMX tiles and the kernel lets this process use them (what oneDNN's bf16 kernels need)."""
    try:  # _init_amx asks the kernel for the tile state: False where it is refused
        return bool(torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx())
    except AttributeError:  # private API of torch.cpu, absent from other builds
        return False


# How much faster than fp32 a bf16 multiply must be, on a CPU without AMX, for
# ``--precision auto`` to take it: its speed-up in the steps is smaller than
# in a large multiply (casts, small layers).  The three such CPUs measured sat
# far either side of it (Xeons 2.1× and 0.5×, an AMD EPYC 2.8–2.9×, where bf16
# made the MNIST MLP step 1.31× faster and the conv step 1.08×), so the choice
# does not flip between runs.
MIN_BF16_SPEEDUP = 1.5


@functools.cache
def bf16_matmul_speedup() -> float:
    """fp32 time over bf16 time of a 1024² matrix multiply on this CPU (best of 3 each, after a warm-up).

    Large enough that both run near their peaks (at 512² fp32 reached only
    60% of its peak on the 2-core AMX CPU).  Measured once per process, with
    torch's threads, in about 50 ms (on that CPU; it runs only where bf16 is
    native without AMX).  It draws from a generator of its own, not torch's
    global one, so a seeded run draws the same numbers whether or not this ran.
    """
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1024, 1024, generator=generator)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y
        best[dtype] = min(timeit.repeat(lambda: x @ y, number=1, repeat=3))
    return best[torch.float32] / best[torch.bfloat16]


def bf16_is_faster(device: torch.device) -> bool:
    """Whether bf16 multiplies are faster than fp32 ones on ``device``.

    CUDA: native bf16 (tensor cores from Ampere on).  CPU: native bf16 and
    either AMX tiles (:func:`amx_usable`) or, without them, a measured
    multiply at least ``MIN_BF16_SPEEDUP`` times faster than fp32
    (:func:`bf16_matmul_speedup`).
    """
    if device.type == "cpu":
        return bf16_is_native(device) and (amx_usable() or bf16_matmul_speedup() >= MIN_BF16_SPEEDUP)
    return bf16_is_native(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The multiply dtype for ``--precision``: None (fp32) or torch.bfloat16.

    ``auto`` is bf16 where it is faster than fp32 (:func:`bf16_is_faster`),
    else fp32; ``bf16`` is taken wherever the device multiplies bf16 natively
    and refused where it would be emulated (slower still).
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if bf16_is_faster(device) else None
    if not bf16_is_native(device):
        raise UserError(f"--precision bf16: this {device.type} device has no native bfloat16 matrix multiply "
                        f"(it would be emulated, slower than fp32); use --precision fp32 or auto")
    return torch.bfloat16


# Multiply-accumulates in one call below which a linear layer stays in float32 inside
# the context: its bf16 multiply saves less time than casting its weight,
# input and gradients costs, which does not shrink with the batch.  MLP VAE
# step at batch 128 on the 2-core AMX CPU: its 400 → 40 and 20 → 400 layers
# (2.0M and 1.0M MACs) took 0.34 ms of backward in bf16 against 0.22 in float32,
# and the step was 4% faster with them in float32; its 784 → 400 layers (40M) and
# every layer of an importance-sampled evaluation (4,096 rows) stay bf16.
MIN_LOWERED_MACS = 1 << 22


def compute_dtype(weight: torch.Tensor) -> torch.dtype | None:
    """The dtype a layer with this weight multiplies in: the context's, for float32 weights only."""
    dtype = _matmul_dtype.get()
    if dtype is None or weight.dtype != torch.float32:  # a float64 model asked for float64 on purpose
        return None
    return dtype


def convolution_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout a convolution in the multiply dtype takes its input in: channels-last on the CPU.

    oneDNN's bf16 convolutions compute in channels-last (NHWC).  Given NCHW
    tensors they convert each input and output, and the elementwise kernels
    between layers slow down tenfold where two operands differ in layout;
    given channels-last ones, a layer's output is already the next one's
    input.  MNIST conv VAE step at batch 128, interleaved in one process:
    10.0 ms with float32 NCHW convolutions, 7.4 ms in bf16 channels-last
    (with the bf16 linear layers in both).  GPUs keep the layout they are
    given (not measured here).
    """
    return torch.channels_last if x.device.type == "cpu" and x.dim() == 4 else torch.preserve_format
