"""Whether bf16 multiplies pay on this device: what ``--precision auto|fp32|bf16`` resolves to.

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

What bf16 changes in the arithmetic is the layers' rule, in
:mod:`aevb.model.precision`; this module only decides whether to ask for it.
"""

from __future__ import annotations

import functools
import platform
import timeit

import torch

from aevb.config import PRECISIONS
from aevb.errors import UserError
from aevb.model.precision import cpu_flag, amx_usable


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
            return bool(cpu_flag("_is_avx512_bf16_supported") or amx_usable())
        return True
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
