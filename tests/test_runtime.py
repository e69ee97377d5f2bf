"""Process settings (aevb.acceleration.runtime): subnormal floats flushed on every thread while aevb works, and restored."""

from __future__ import annotations

import pytest
import torch

import aevb
from aevb.acceleration import runtime

supports_flushing = torch.set_flush_denormal(False)  # True where the processor has the mode (x86 with SSE)
needs_flushing = pytest.mark.skipif(not supports_flushing, reason="this processor cannot flush subnormal floats")


@pytest.fixture
def two_threads():
    """Two intra-op threads, so that a large elementwise kernel runs on the main thread and a worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _subnormal_results(tiny: torch.Tensor) -> int:
    """How many of 3·tiny are not flushed to zero; the kernel splits 2^20 values between the threads."""
    return int((tiny * 3.0).ne(0).sum())


@needs_flushing
def test_flushed_on_every_thread_inside_and_restored_after(two_threads):
    tiny = torch.full((1 << 20,), 1e-39)  # subnormal in float32, made before any flag is set
    assert not runtime.flushing_denormals()
    assert _subnormal_results(tiny) == tiny.numel()
    with runtime.denormals_flushed():
        assert runtime.flushing_denormals()
        # on the main thread alone, the worker's half of the kernel would stay subnormal
        assert _subnormal_results(tiny) == 0
    assert not runtime.flushing_denormals()
    assert _subnormal_results(tiny) == tiny.numel()


@needs_flushing
def test_a_callers_own_setting_is_left_on_and_reaches_the_workers(two_threads):
    tiny = torch.full((1 << 20,), 1e-39)
    torch.set_flush_denormal(True)  # torch's own: the calling thread only
    try:
        assert 0 < _subnormal_results(tiny) < tiny.numel()
        with runtime.denormals_flushed():
            assert _subnormal_results(tiny) == 0
        assert runtime.flushing_denormals()
    finally:
        runtime._set_flush_denormal(False)
    assert not runtime.flushing_denormals()
    assert _subnormal_results(tiny) == tiny.numel()


@needs_flushing
def test_fewer_threads_inside_still_restores_every_worker(two_threads):
    tiny = torch.full((1 << 20,), 1e-39)
    with runtime.denormals_flushed():
        torch.set_num_threads(1)  # the pool keeps its second thread, flushed
    torch.set_num_threads(2)
    assert _subnormal_results(tiny) == tiny.numel()


@needs_flushing
def test_a_step_on_normal_numbers_is_unchanged(two_threads):
    """Flushing touches values below 1e-38 only: a fresh model's loss and gradients are bit for bit the same."""
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    results = []
    for flushed in (False, True):
        torch.manual_seed(0)
        model = aevb.VAE(data_shape=(1, 28, 28), latent_dim=8, arch="mlp")
        with runtime.denormals_flushed() if flushed else torch.no_grad():
            torch.manual_seed(1)
            with torch.enable_grad():
                out = model.loss(x)
                out.loss.backward()
        results.append([out.loss.detach(), *(p.grad for p in model.parameters())])
    for a, b in zip(*results):
        assert torch.equal(a, b)
