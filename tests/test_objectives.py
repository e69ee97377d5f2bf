"""The estimators against exact answers: probabilistic PCA, the exact posterior,
the ordering of the bounds, numerical safety, and real MNIST."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import aevb
from aevb.model import objectives
from aevb.errors import UserError

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
MNIST_IMAGES = MNIST_DIR / "t10k-images-idx3-ubyte.gz"

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------
# probabilistic PCA: a linear Gaussian VAE has an exact log-likelihood

D, K, SIGMA = 8, 2, 0.3


def ppca_marginal(model, x: torch.Tensor) -> torch.Tensor:
    """Exact log p(x) = log N(x; b, WWᵀ + σ²I) [B] from the model's own decoder and σ."""
    linear = model.decoder[0]
    W, b = linear.weight.detach().double(), linear.bias.detach().double()  # [D, K], [D]
    sigma = model.likelihood.scale.detach().double()
    cov = W @ W.T + sigma**2 * torch.eye(W.shape[0], dtype=F64)
    return torch.distributions.MultivariateNormal(b, cov).log_prob(x.double())


@pytest.fixture(scope="module")
def ppca():
    """2000 points from a pPCA model, and a linear VAE fitted to them by Adam (float64)."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(D, K, generator=gen, dtype=F64)
    b = torch.randn(D, generator=gen, dtype=F64)
    x = torch.randn(2000, K, generator=gen, dtype=F64) @ W.T + b + SIGMA * torch.randn(2000, D, generator=gen, dtype=F64)
    true_cov = W @ W.T + SIGMA**2 * torch.eye(D, dtype=F64)
    true_log_p = torch.distributions.MultivariateNormal(b, true_cov).log_prob(x)

    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(D,), latent_dim=K, arch="linear", likelihood="gaussian-learned").to(F64)
    untrained = ppca_marginal(model, x).mean().item()
    with torch.no_grad():
        # start with small posterior σ and the decoder bias at the data mean; otherwise Adam
        # spends over a thousand steps on the collapsed-posterior plateau (W is still learned)
        model.encoder[1].bias[K:] = -2.0
        model.decoder[0].bias.copy_(x.mean(0))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(600):  # full batch
        opt.zero_grad()
        model.loss(x).loss.backward()
        opt.step()
    model.eval()
    return model, x, true_log_p, untrained


def test_ppca_fit_is_maximum_likelihood(ppca):
    model, x, true_log_p, untrained = ppca
    fitted = ppca_marginal(model, x).mean().item()
    # training maximised the exact marginal: the fit is as good as the generating model
    # (the ML solution beats it on its own training data) and far better than at init
    assert fitted > untrained + 5
    assert fitted > true_log_p.mean().item() - 0.01
    assert abs(model.likelihood.scale.item() - SIGMA) < 0.02


def test_ppca_importance_sampling_matches_exact_log_likelihood(ppca):
    model, x, _, _ = ppca
    exact = ppca_marginal(model, x).mean().item()
    torch.manual_seed(1)
    many = model.log_likelihood(x, n_samples=1000)
    assert many.dtype == F64 and many.shape == (2000,)
    assert abs(many.mean().item() - exact) < 0.05
    torch.manual_seed(2)
    elbo = model.elbo(x, n_samples=20).mean().item()
    assert elbo <= exact
    torch.manual_seed(3)
    few = model.log_likelihood(x, n_samples=1).mean().item()
    torch.manual_seed(3)
    some = model.log_likelihood(x, n_samples=10).mean().item()
    # more samples, closer to the exact value (from below on average)
    assert abs(exact - many.mean().item()) < abs(exact - few)
    assert abs(exact - some) < abs(exact - few)
    assert few < some < exact + 1e-3


def exact_posterior_ppca(n: int = 40, dtype=F64):
    """A linear VAE whose encoder is the exact pPCA posterior.

    W has orthogonal columns, so M = WᵀW + σ²I is diagonal and the exact posterior
    N(M⁻¹Wᵀ(x − b), σ²M⁻¹) is a diagonal Gaussian the encoder can represent:
    mean rows M⁻¹Wᵀ with bias −M⁻¹Wᵀb, log-variance rows zero with bias log(σ²/M_ii).
    Then every importance weight p(x|z)p(z)/q(z|x) equals p(x) exactly.
    """
    gen = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(D, K, generator=gen, dtype=F64))
    W = Q * torch.tensor([2.0, 0.7], dtype=F64)  # orthogonal columns
    b = torch.randn(D, generator=gen, dtype=F64)
    x = torch.randn(n, K, generator=gen, dtype=F64) @ W.T + b + SIGMA * torch.randn(n, D, generator=gen, dtype=F64)
    M = W.T @ W + SIGMA**2 * torch.eye(K, dtype=F64)
    assert torch.allclose(M, torch.diag(M.diagonal()))
    m = M.diagonal()
    A = W.T / m[:, None]  # M⁻¹Wᵀ [K, D]
    model = aevb.VAE(data_shape=(D,), latent_dim=K, arch="linear", likelihood="gaussian-learned").to(F64)
    with torch.no_grad():
        encoder = model.encoder[1]  # Linear(D, 2K): rows [:K] mean, rows [K:] log σ²
        encoder.weight.zero_()
        encoder.weight[:K] = A
        encoder.bias[:K] = -A @ b
        encoder.bias[K:] = torch.log(SIGMA**2 / m)
        model.decoder[0].weight.copy_(W)
        model.decoder[0].bias.copy_(b)
        model.likelihood.log_scale.fill_(math.log(SIGMA))
    return model.to(dtype).eval(), x.to(dtype)


def test_exact_posterior_gives_exact_log_likelihood_in_every_chunking():
    model, x = exact_posterior_ppca()
    exact = ppca_marginal(model, x)
    torch.manual_seed(0)
    weights = objectives.log_weights(model, x, 30)  # [30, B]
    torch.testing.assert_close(weights, exact.expand(30, -1), atol=1e-9, rtol=0)  # zero variance
    for n_samples, chunk_size in [(50, 7), (50, None), (50, 50), (50, 1), (50, 500), (1, None), (3, 2)]:
        estimate = model.log_likelihood(x, n_samples=n_samples, chunk_size=chunk_size)
        torch.testing.assert_close(estimate, exact, atol=1e-6, rtol=0, msg=f"{n_samples=} {chunk_size=}")
    for k in (1, 5, 64):
        torch.testing.assert_close(objectives.iwae_bound(model, x, k), exact, atol=1e-6, rtol=0)
    # with the exact posterior the bound is tight: ELBO = log p(x) (Monte Carlo over the reconstruction term)
    torch.manual_seed(1)
    elbo = model.elbo(x, n_samples=4000)
    torch.testing.assert_close(elbo, exact, atol=0.05, rtol=0)
    assert abs(elbo.mean().item() - exact.mean().item()) < 0.01
    # a slightly wrong posterior loses the tightness: the estimator is sensitive to q
    with torch.no_grad():
        model.encoder[1].bias[K:] += 0.6  # log σ² (σ 35% too wide)
    torch.manual_seed(0)
    assert objectives.log_weights(model, x, 30).std(0).min() > 1e-3
    torch.manual_seed(0)
    assert (model.elbo(x, n_samples=200) < exact - 1e-3).all()


def test_exact_posterior_in_float32_is_close():
    model, x = exact_posterior_ppca(dtype=torch.float32)
    exact = ppca_marginal(model, x)
    torch.manual_seed(0)
    estimate = model.log_likelihood(x, n_samples=50, chunk_size=7)
    assert estimate.dtype == torch.float32
    torch.testing.assert_close(estimate.double(), exact, atol=1e-4, rtol=0)


def test_chunks_combine_to_one_log_sum_exp():
    """With a posterior that is not exact, the chunked estimate is the log-mean-exp of all weights drawn."""
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(6,), latent_dim=3, arch="mlp", likelihood="gaussian", hidden=[16]).to(F64)
    x = torch.randn(5, 6, dtype=F64)
    n, chunk = 23, 4
    torch.manual_seed(1)
    estimate = model.log_likelihood(x, n_samples=n, chunk_size=chunk)
    torch.manual_seed(1)
    posterior = model.encode(x)
    weights = torch.cat([objectives.log_weights(model, x, min(chunk, n - s), posterior) for s in range(0, n, chunk)])
    assert weights.shape == (n, 5) and weights.std(0).min() > 0.01
    expected = torch.log(torch.exp(weights).mean(0))  # safe here: weights are moderate
    torch.testing.assert_close(estimate, expected, atol=1e-10, rtol=0)


def test_log_likelihood_rejects_zero_samples():
    model, x = exact_posterior_ppca(n=3)
    with pytest.raises(UserError, match="n_samples must be a whole number ≥ 1"):
        model.log_likelihood(x, n_samples=0)


def test_log_sum_exp_keeps_very_small_weights_finite():
    """Weights around −1e4 nats: exp underflows to 0, the log-sum-exp does not."""
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(D,), latent_dim=K, arch="linear", likelihood="gaussian").eval()
    with torch.no_grad():
        model.decoder[0].weight.zero_()  # p(x|z) = N(x; 0, I) whatever z, so log p(x) = log p(x|z)
        model.decoder[0].bias.zero_()
        model.encoder[1].weight.zero_()
        model.encoder[1].bias.zero_()
        model.encoder[1].bias[K:] = math.log(1.3)  # q wider than the prior: weights vary, finite variance
    x = torch.full((4, D), 50.0)
    exact = -0.5 * D * 50.0**2 - 0.5 * D * math.log(2 * math.pi)  # ≈ −1e4
    torch.manual_seed(1)
    weights = objectives.log_weights(model, x, 100)
    assert (weights < -9000).all() and torch.exp(weights).sum() == 0  # a naive mean of exp would give log 0
    torch.manual_seed(1)
    estimate = model.log_likelihood(x, n_samples=2000, chunk_size=300)
    assert torch.isfinite(estimate).all()
    torch.testing.assert_close(estimate, torch.full((4,), exact), atol=0.1, rtol=0)
    torch.manual_seed(1)
    bound = objectives.iwae_bound(model, x, 50)
    assert torch.isfinite(bound).all() and (bound < exact + 0.5).all()


# ---------------------------------------------------------------------------
# the bounds on real data: ELBO ≤ IWAE(5) ≤ IWAE(50)


@pytest.fixture(scope="module")
def digits_vae():
    from sklearn.datasets import load_digits

    images = load_digits().images / 16.0  # [1797, 8, 8] in [0, 1]
    x = torch.from_numpy((images > 0.5).astype(np.float32)).unsqueeze(1)  # binarised: a true likelihood
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(1, 8, 8), latent_dim=8, arch="mlp", likelihood="bernoulli", hidden=[128])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            model.loss(x[idx]).loss.backward()
            opt.step()
    return model.eval(), x


def test_bounds_are_ordered(digits_vae):
    model, x = digits_vae
    torch.manual_seed(0)
    with torch.no_grad():
        elbo = model.elbo(x)  # [1797], each estimated independently
        iwae5 = objectives.iwae_bound(model, x, 5)
        iwae50 = objectives.iwae_bound(model, x, 50)
    assert elbo.mean() < iwae5.mean() < iwae50.mean() < 0  # a log-probability of binary data
    # and not by luck: each step up is many standard errors of the per-example differences
    for lower, higher in ((elbo, iwae5), (iwae5, iwae50)):
        difference = higher - lower
        assert difference.mean() > 4 * difference.std() / math.sqrt(len(x))


def test_one_sample_estimate_has_the_elbo_as_mean(digits_vae):
    model, x = digits_vae
    torch.manual_seed(1)
    one = model.log_likelihood(x, n_samples=1)  # log w, one z per example
    torch.manual_seed(2)
    with torch.no_grad():
        elbo = model.elbo(x, n_samples=200)  # nearly the exact ELBO per example
    difference = one - elbo
    stderr = difference.std().item() / math.sqrt(len(x))
    assert abs(difference.mean().item()) < 4 * stderr
    assert difference.std().item() > 0.1  # one sample is noisy, so the check above is not vacuous


def test_one_sample_elbo_terms_equal_those_with_a_sample_dimension(digits_vae):
    """n_samples = 1 draws z [B, D] with no sample dimension: the same z, terms and gradients as z [1, B, D]."""
    model, x = digits_vae
    x = x[:64]

    def with_sample_dimension():
        posterior = model.encode(x)
        z = posterior.rsample((1,))
        reconstruction = -model.decode(z).log_prob(x).mean(0)
        return reconstruction, objectives.kl_term(posterior, model.prior(), z)

    def one_sample():
        terms = objectives.elbo_terms(model, x, 1)
        return terms.reconstruction, terms.kl

    results = []
    for terms in (one_sample, with_sample_dimension):
        model.zero_grad()
        torch.manual_seed(4)
        reconstruction, kl = terms()
        (reconstruction + kl).mean().backward()
        results.append((reconstruction, kl, *[p.grad.clone() for p in model.parameters()]))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    model.zero_grad()


def test_iwae_bound_with_one_sample_is_the_log_weight(digits_vae):
    model, x = digits_vae
    x = x[:100]
    torch.manual_seed(3)
    bound = objectives.iwae_bound(model, x, 1)
    torch.manual_seed(3)
    with torch.no_grad():
        q = model.encode(x)
        z = q.rsample((1,))  # [1, B, D]
        log_w = model.decode(z).log_prob(x) + model.prior().log_prob(z) - q.log_prob(z)
    torch.testing.assert_close(bound.detach(), log_w[0], atol=1e-4, rtol=0)
    torch.manual_seed(3)
    torch.testing.assert_close(model.log_likelihood(x, n_samples=1), bound.detach())


# ---------------------------------------------------------------------------
# real MNIST


def read_mnist_images(path: Path) -> np.ndarray:
    """uint8 [N, 28, 28]: the project's IDX reader if it exists, else a minimal one."""
    try:
        from aevb.data.files import read_idx
    except ImportError:
        with gzip.open(path, "rb") as f:
            data = f.read()
        assert data[:4] == b"\x00\x00\x08\x03"
        return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)
    return np.asarray(read_idx(path))


@pytest.mark.slow
@pytest.mark.skipif(not MNIST_IMAGES.is_file(), reason=f"the MNIST test set is not in {MNIST_DIR}")
def test_mnist_vae_learns_and_importance_sampling_tightens():
    images = read_mnist_images(MNIST_IMAGES)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    x = torch.from_numpy(images.astype(np.float32) / 255).unsqueeze(1)  # [10000, 1, 28, 28]
    train, test = x[:8000], x[8000:]

    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(1, 28, 28), latent_dim=20, arch="mlp", likelihood="bernoulli", hidden=[400])
    with torch.no_grad():
        torch.manual_seed(1)
        before = -model.elbo(test).mean().item()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(2)
    model.train()
    for _ in range(2):
        for idx in torch.randperm(len(train), generator=gen).split(128):
            opt.zero_grad()
            model.loss(train[idx]).loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        after = -model.elbo(test).mean().item()
    assert before > 450  # 784 pixels at about ln 2 nats each, untrained
    assert after < 200

    subset = test[:200]
    estimates = []
    for n in (1, 10, 100):
        torch.manual_seed(3)
        estimates.append(model.log_likelihood(subset, n_samples=n).mean().item())
    assert estimates[0] < estimates[1] < estimates[2] < 0
    assert estimates[2] - estimates[0] > 1.0  # the posterior is not exact, so the gap is real


def test_keep_freed_memory_is_idempotent_and_leaves_estimates_unchanged():
    """The allocator setting changes speed only: the same draws give the same log p(x)."""
    import sys

    import aevb
    from aevb.acceleration.runtime import keep_freed_memory

    applied = keep_freed_memory()
    assert keep_freed_memory() is applied
    if sys.platform.startswith("linux"):
        import platform

        if platform.libc_ver()[0] == "glibc":
            assert applied
    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(1, 8, 8), latent_dim=3, arch="mlp", likelihood="bernoulli").eval()
    x = torch.rand(5, 1, 8, 8)
    torch.manual_seed(1)
    first = model.log_likelihood(x, 64)
    torch.manual_seed(1)
    assert torch.equal(model.log_likelihood(x, 64), first)
