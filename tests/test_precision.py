"""Mixed-precision training (aevb.model.precision): bf16 multiplies, float32 everything else.

A bf16 step must give the float32 loss and gradients up to bf16 rounding of
the layer outputs, leave everything outside its context untouched, and train
to the same test ELBO.
"""

from __future__ import annotations

import math

import pytest
import torch

import aevb
from aevb.model import layers, precision
from aevb.errors import UserError
from aevb.acceleration import bf16
from aevb.acceleration.bf16 import bf16_is_faster, bf16_is_native, resolve_precision
from aevb.model.precision import matmul_dtype

BF16 = torch.bfloat16


def _batch(shape, seed=0):
    return torch.rand(16, *shape, generator=torch.Generator().manual_seed(seed))


def _loss_and_grads(model, x, dtype):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same ε in both precisions
    with matmul_dtype(dtype):
        out = model.loss(x)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch,shape", [("mlp", (1, 28, 28)), ("conv", (1, 28, 28)), ("conv", (3, 32, 32))])
def test_bf16_step_matches_fp32_to_bf16_rounding(arch, shape):
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=shape, latent_dim=8, arch=arch, likelihood="bernoulli")
    x = _batch(shape)
    ref, ref_grads = _loss_and_grads(model, x, None)
    out, grads = _loss_and_grads(model, x, BF16)
    # the loss and its terms stay float32, and agree to bf16's 3 significant digits
    assert out.loss.dtype == torch.float32 and out.reconstruction.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-2, atol=0)
    torch.testing.assert_close(out.kl, ref.kl, rtol=2e-2, atol=1e-2)
    for name, g in grads.items():
        assert g.dtype == torch.float32
        # direction and size of each parameter's gradient, not each tiny entry
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), ref_grads[name].flatten(), dim=0)
        assert cosine > 0.99, (name, float(cosine))
        assert abs(g.norm() / ref_grads[name].norm() - 1) < 0.05, name
    # and the multiplies really ran in bf16: not bit-identical to fp32, convolutions included
    assert all(not torch.equal(g, ref_grads[name]) for name, g in grads.items())


def test_outside_the_context_layers_are_the_torch_layers():
    torch.manual_seed(0)
    layer = layers.Linear(5, 3)
    x = torch.randn(4, 5)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    conv = layers.ConvTranspose2d(4, 2, 4, stride=2, padding=1)
    h = torch.randn(2, 4, 7, 7)
    reference = torch.nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1)
    reference.load_state_dict(conv.state_dict())
    assert torch.equal(conv(h), reference(h))
    with matmul_dtype(BF16):
        pass
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    # a float64 model is never lowered
    layer64 = layers.Linear(5, 3).double()
    with matmul_dtype(BF16):
        y = layer64(x.double())
    assert y.dtype == torch.float64
    assert torch.equal(y, torch.nn.functional.linear(x.double(), layer64.weight, layer64.bias))


def test_linear_layers_too_small_to_gain_multiply_in_fp32():
    torch.manual_seed(0)
    small, large = layers.Linear(400, 40), layers.Linear(784, 400)
    x = torch.rand(128, 400)
    assert x.numel() * small.out_features < precision.MIN_LOWERED_MACS <= 128 * 784 * large.out_features
    with matmul_dtype(BF16):
        y_small = small(x)
        y_small_from_bf16 = small(x.to(BF16))  # the output of a lowered layer before it
        y_large = large(torch.rand(128, 784))
        y_small_big_batch = small(torch.rand(4096, 400))  # an importance sampler's chunk: worth lowering
    assert y_small.dtype == torch.float32
    assert torch.equal(y_small, torch.nn.functional.linear(x, small.weight, small.bias))
    assert y_small_from_bf16.dtype == torch.float32
    assert y_large.dtype == BF16 and y_small_big_batch.dtype == BF16
    # the gradient reaches a lowered input through the cast
    h = x.to(BF16).requires_grad_()
    with matmul_dtype(BF16):
        small(h).sum().backward()
    assert h.grad is not None and h.grad.dtype == BF16


def test_resolve_precision(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("auto", cpu) is (BF16 if bf16_is_faster(cpu) else None)
    with pytest.raises(UserError, match="unknown --precision 'fp16'"):
        resolve_precision("fp16", cpu)
    # no bf16 at all: auto is fp32, bf16 is refused (it would be emulated)
    monkeypatch.setattr(bf16, "bf16_is_native", lambda device: False)
    monkeypatch.setattr(bf16, "amx_usable", lambda: True)
    assert resolve_precision("auto", cpu) is None
    with pytest.raises(UserError, match="no native bfloat16"):
        resolve_precision("bf16", cpu)
    # native bf16 dot products without matrix units (AVX512-BF16 alone): by the measured multiply,
    # slower than fp32 on one such CPU (then only on request), 2.1x faster on another
    monkeypatch.setattr(bf16, "bf16_is_native", lambda device: True)
    monkeypatch.setattr(bf16, "amx_usable", lambda: False)
    monkeypatch.setattr(bf16, "bf16_matmul_speedup", lambda: 0.5)
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("bf16", cpu) is BF16
    monkeypatch.setattr(bf16, "bf16_matmul_speedup", lambda: 2.1)
    assert resolve_precision("auto", cpu) is BF16
    # AMX: bf16 is the default
    monkeypatch.setattr(bf16, "amx_usable", lambda: True)
    assert resolve_precision("auto", cpu) is BF16
    assert resolve_precision("bf16", cpu) is BF16


def test_the_bf16_speedup_is_measured_once_without_touching_the_seeded_generator():
    bf16.bf16_matmul_speedup.cache_clear()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    speedup = bf16.bf16_matmul_speedup()
    assert torch.equal(torch.rand(3), expected)
    assert math.isfinite(speedup) and speedup > 0
    assert bf16.bf16_matmul_speedup() == speedup  # cached: one measurement per process


def test_an_x86_cpu_without_avx512_bf16_or_amx_has_no_native_bf16(monkeypatch):
    """oneDNN says bf16 for any AVX512BW CPU (Skylake), where bf16 dot products are emulated."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(bf16.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(bf16, "amx_usable", lambda: False)
    assert not bf16_is_native(cpu)
    with pytest.raises(UserError, match="no native bfloat16"):
        resolve_precision("bf16", cpu)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert bf16_is_native(cpu)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(bf16, "amx_usable", lambda: True)
    assert bf16_is_native(cpu)
    monkeypatch.setattr(bf16.platform, "machine", lambda: "aarch64")  # oneDNN's answer stands there
    monkeypatch.setattr(bf16, "amx_usable", lambda: False)
    assert bf16_is_native(cpu)


def test_amx_detection_agrees_with_torch():
    """AMX is usable only where the CPU reports its tiles; where usable, bf16 is native too."""
    from aevb.model.precision import amx_usable

    if not torch.cpu._is_amx_tile_supported():
        assert not amx_usable()
    if amx_usable():
        assert bf16_is_native(torch.device("cpu"))


@pytest.mark.skipif(not bf16_is_native(torch.device("cpu")), reason="this CPU has no native bf16 multiplies")
def test_bf16_training_reaches_the_fp32_elbo(tmp_path, one_thread):
    """The same run on digits in fp32 and bf16: the test ELBOs agree within noise, weights stay float32."""
    from aevb.config import make_config
    from aevb.training.loop import train

    results = {}
    for name in ("fp32", "bf16"):
        config = make_config(data="digits", epochs=30, precision=name, out=str(tmp_path / name), latent_dim=8,
                             val_split=0)  # the test ELBO each epoch, as before validation became the default
        model, run_dir = train(config, progress=False)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        records = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "test_elbo" in line]
        import json

        results[name] = [json.loads(r)["test_elbo"] for r in records]
    first, last = results["fp32"], results["bf16"]
    assert last[-1] > last[0] + 1.5  # it trained on after the first epoch
    # different rounding, different trajectory, same quality (measured: −24.532 fp32, −24.534 bf16)
    assert abs(last[-1] - first[-1]) < 1.0, (first[-1], last[-1])


@pytest.mark.parametrize("arch,model", [("mlp", "vae"), ("conv", "vae"), ("mlp", "hvae")])
def test_bf16_importance_sampler_is_fp32_within_monte_carlo_noise(arch, model, tmp_path, one_thread):
    """log p(x) with bf16 multiplies against float32 on the same samples, next to another seed's float32.

    Measured on digits after 15 epochs (k = 1,000): bf16 moves each image's
    estimate by 0.001–0.006 nats (std) and their mean by at most 2e-3, while
    drawing other samples moves each image by 0.01–0.08.
    """
    from aevb.config import make_config
    from aevb.run.data import held_out, load_dataset
    from aevb.training.loop import train

    config = make_config(data="digits", epochs=4, latent_dim=8, arch=arch, model=model, out=str(tmp_path / "run"))
    trained, _ = train(config, progress=False)
    x, _ = held_out(load_dataset(config), config, "test")
    estimates = {}
    for name, seed, dtype in (("fp32", 1, None), ("bf16", 1, BF16), ("other seed", 2, None)):
        torch.manual_seed(seed)
        with matmul_dtype(dtype):
            estimates[name] = trained.log_likelihood(x, n_samples=200).double()
    rounding = estimates["bf16"] - estimates["fp32"]
    monte_carlo = estimates["other seed"] - estimates["fp32"]
    assert not torch.equal(estimates["bf16"], estimates["fp32"])  # the multiplies did run in bf16
    assert rounding.abs().mean() < 0.25 * monte_carlo.abs().mean(), (rounding.abs().mean(), monte_carlo.abs().mean())
    assert abs(rounding.mean()) < 0.01
