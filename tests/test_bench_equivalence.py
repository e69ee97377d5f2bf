"""The benchmark compares like with like: bench/'s hand-written code computes aevb's numbers.

* the hand-written loss (BCE-with-logits summed + analytic KL) equals
  ``VAE.loss`` on the same weights and the same draws of ε;
* the plain per-image importance sampler equals ``log_likelihood`` on the
  same draws, and agrees statistically on independent draws;
* the prototypes in bench/prototypes.py (speed-ups proposed for the library)
  return the library's numbers;
* the FLOP counts used for utilisation are the hand counts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import kl_divergence

import aevb

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from common import (copy_aevb_weights, load_mnist, macs_per_image, make_plain,  # noqa: E402
                    plain_log_likelihood, plain_loss)
from prototypes import (applied, fast_bce_vae_loss, fast_log_likelihood, fast_vae_loss,  # noqa: E402
                        halving_softplus_sum)

from conftest import MNIST_IMAGES  # noqa: E402


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """24 test images in [0, 1] (real MNIST when it is here, else uniform noise)."""
    if MNIST_IMAGES.is_file():
        return load_mnist(100)[1][:24]
    return torch.rand(24, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def pair(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = aevb.VAE(data_shape=(1, 28, 28), latent_dim=20, arch=arch, likelihood="bernoulli")
    return model, copy_aevb_weights(model, make_plain(arch))


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_hand_written_loss_equals_aevb_loss_on_the_same_draws(arch, images):
    model, plain = pair(arch)
    torch.manual_seed(1)
    ours = model.loss(images).loss
    torch.manual_seed(1)
    theirs = plain_loss(plain, images)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_hand_written_terms_equal_aevb_terms_at_the_posterior_mean(arch, images):
    """The deterministic part: −log p(x | z = μ) and KL(q ‖ p), per example."""
    model, plain = pair(arch)
    with torch.no_grad():
        posterior = model.encode(images)
        reconstruction = -model.decode(posterior.mean).log_prob(images)
        kl = kl_divergence(posterior, model.prior())
        mu, logvar = plain.encode(images)
        plain_reconstruction = F.binary_cross_entropy_with_logits(
            plain.decode(mu), images.flatten(1), reduction="none").sum(1)
        plain_kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    torch.testing.assert_close(plain_reconstruction, reconstruction, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(plain_kl, kl, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("prototype", [fast_vae_loss, fast_bce_vae_loss], ids=["fast-loss", "fast-bce"])
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_fast_loss_prototypes_return_the_library_loss_and_gradients(arch, prototype, dtype, images):
    """In float32 and with bf16 multiplies (the benchmark's A/B runs the step in its default precision)."""
    from aevb.model.precision import matmul_dtype

    model, _ = pair(arch)
    torch.manual_seed(2)
    with matmul_dtype(dtype):
        ours = model.loss(images)
    ours.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(2)
    with matmul_dtype(dtype):
        fast = prototype(model, images)
    fast.loss.backward()
    for field in ("loss", "reconstruction", "kl", "mu", "sigma"):
        assert getattr(fast, field).dtype == torch.float32
        torch.testing.assert_close(getattr(fast, field), getattr(ours, field), rtol=1e-5, atol=1e-4)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5 if dtype is None else 1e-4)


def test_fast_loss_patch_is_scoped(images):
    model, _ = pair("mlp")
    library_loss = aevb.VAE.loss
    with applied(["fast-loss"]):
        assert aevb.VAE.loss is fast_vae_loss
        model.loss(images[:2])
    assert aevb.VAE.loss is library_loss


def test_plain_log_likelihood_equals_aevb_on_the_same_draws(images):
    model, plain = pair("mlp")
    k = 500
    for i in range(3):
        x = images[i:i + 1]
        torch.manual_seed(10 + i)
        ours = model.log_likelihood(x, n_samples=k, chunk_size=k)
        torch.manual_seed(10 + i)
        theirs = plain_log_likelihood(plain, x, k)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-3)


def test_plain_log_likelihood_agrees_with_batched_aevb_on_independent_draws(images):
    model, plain = pair("mlp")
    torch.manual_seed(3)
    ours = model.log_likelihood(images[:8], n_samples=2000)
    torch.manual_seed(4)
    theirs = plain_log_likelihood(plain, images[:8], 2000)
    assert (ours - theirs).abs().max() < 0.5


def test_fast_log_likelihood_prototype_equals_the_library(images):
    from aevb.model.precision import matmul_dtype

    model, _ = pair("mlp")
    x = images[:6]
    with torch.no_grad():
        torch.manual_seed(5)
        ours = model.log_likelihood(x, n_samples=300, chunk_size=70)
        torch.manual_seed(5)
        fast = fast_log_likelihood(model, x, n_samples=300, rows=6 * 64)
        with matmul_dtype(torch.bfloat16):  # runs (its last multiply stays float32)
            torch.manual_seed(5)
            fast_bf16 = fast_log_likelihood(model, x, n_samples=300, rows=6 * 64)
    torch.testing.assert_close(fast, ours, rtol=1e-5, atol=2e-3)
    torch.testing.assert_close(fast_bf16, ours, rtol=1e-3, atol=0.1)


def test_halving_softplus_sum_is_the_softplus_sum():
    logits = torch.randn(64, 784, generator=torch.Generator().manual_seed(0)) * 8
    torch.testing.assert_close(halving_softplus_sum(logits), F.softplus(logits).sum(-1), rtol=1e-6, atol=2e-3)


def test_flop_counts_are_the_hand_counts():
    mlp, _ = pair("mlp")
    conv, _ = pair("conv")
    x = torch.rand(1, 1, 28, 28)
    # mlp: one MAC per weight: 784·400 + 400·40 + 20·400 + 400·784
    assert macs_per_image(mlp, lambda v: mlp.loss(v), x)["total"] == 784 * 400 + 400 * 40 + 20 * 400 + 400 * 784
    # conv: 16·1·16·14² + 32·16·16·7² + 1568·128 + 128·40, then 20·128 + 128·1568 + 32·16·16·7² + 16·1·16·14²
    conv_macs = 16 * 16 * 196 + 32 * 16 * 16 * 49 + 1568 * 128 + 128 * 40
    conv_macs += 20 * 128 + 128 * 1568 + 32 * 16 * 16 * 49 + 16 * 16 * 196
    assert macs_per_image(conv, lambda v: conv.loss(v), x)["total"] == conv_macs
