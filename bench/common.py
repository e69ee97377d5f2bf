"""What every setup of the benchmark shares: data, the hand-written models, FLOP counts.

This file is imported by ``bench/run.py`` (project venv) and by
``bench/pythae_worker.py`` (the pythae venv, which sees the project venv's
packages but not the editable aevb install, hence the ``src`` path below).
Nothing here depends on pythae.

The hand-written models are the PyTorch example's VAE (separate μ and log σ²
heads, ``std = exp(½ logvar)``) with the layer sizes of aevb's ``mlp`` and
``conv`` networks; :func:`copy_aevb_weights` maps an aevb model onto them (the
log-scale head times two is the log-variance head), so the two compute the
same function and the benchmark compares like with like
(``tests/test_bench_equivalence.py`` checks it).
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
MNIST_IMAGES = MNIST_DIR / "t10k-images-idx3-ubyte.gz"
MNIST_LABELS = MNIST_DIR / "t10k-labels-idx1-ubyte.gz"
N_TRAIN, N_TEST = 8000, 2000
LATENT = 20
TARGET_NATS = 125.0

if os.environ.get("AEVB_BENCH_THREADS"):  # run.py --threads N
    torch.set_num_threads(int(os.environ["AEVB_BENCH_THREADS"]))

try:
    import aevb  # noqa: F401
except ImportError:  # the pythae venv: use the project's source tree
    sys.path.insert(0, str(ROOT / "src"))


# --------------------------------------------------------------------------- data


def mnist_uint8() -> np.ndarray:
    """The 10,000 MNIST test images, uint8 [10000, 28, 28], read with aevb's IDX reader."""
    from aevb.data.files import read_idx

    return read_idx(MNIST_IMAGES)


def load_mnist(n_train: int = N_TRAIN) -> tuple[torch.Tensor, torch.Tensor]:
    """(train [n_train, 1, 28, 28], test [2000, 1, 28, 28]) float32 in [0, 1], not binarised.

    Train: the first ``n_train`` images; test: the last 2,000 (as aevb's
    ``test_split=2000`` splits the file).
    """
    images = torch.from_numpy(mnist_uint8()).float().div_(255).unsqueeze(1)
    return images[:n_train].contiguous(), images[-N_TEST:].contiguous()


# --------------------------------------------------------------------------- hand-written models


class PlainMLPVAE(nn.Module):
    """The PyTorch example's VAE: 784-400-(20, 20), 20-400-784, ReLU, logits out."""

    def __init__(self, hidden: int = 400, latent: int = LATENT, pixels: int = 784):
        super().__init__()
        self.fc1 = nn.Linear(pixels, hidden)
        self.fc21 = nn.Linear(hidden, latent)  # μ
        self.fc22 = nn.Linear(hidden, latent)  # log σ²
        self.fc3 = nn.Linear(latent, hidden)
        self.fc4 = nn.Linear(hidden, pixels)

    def encode(self, x):  # x [B, 1, 28, 28] -> μ, log σ² [B, 20]
        h = F.relu(self.fc1(x.flatten(1)))
        return self.fc21(h), self.fc22(h)

    def decode(self, z):  # z [N, 20] -> logits [N, 784]
        return self.fc4(F.relu(self.fc3(z)))


class PlainConvVAE(nn.Module):
    """The tutorial's convolutional VAE: conv 16 → conv 32 (4×4, stride 2) → 128 → (20, 20)."""

    def __init__(self, hidden: int = 128, latent: int = LATENT):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 4, 2, 1)
        self.conv2 = nn.Conv2d(16, 32, 4, 2, 1)
        self.fc1 = nn.Linear(32 * 7 * 7, hidden)
        self.fc21 = nn.Linear(hidden, latent)
        self.fc22 = nn.Linear(hidden, latent)
        self.fc3 = nn.Linear(latent, hidden)
        self.fc4 = nn.Linear(hidden, 32 * 7 * 7)
        self.deconv1 = nn.ConvTranspose2d(32, 16, 4, 2, 1)
        self.deconv2 = nn.ConvTranspose2d(16, 1, 4, 2, 1)

    def encode(self, x):  # x [B, 1, 28, 28]
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        h = F.relu(self.fc1(h.flatten(1)))
        return self.fc21(h), self.fc22(h)

    def decode(self, z):  # z [N, 20] -> logits [N, 784]
        h = F.relu(self.fc4(F.relu(self.fc3(z)))).view(-1, 32, 7, 7)
        return self.deconv2(F.relu(self.deconv1(h))).flatten(1)


def make_plain(arch: str, hidden: int | None = None) -> nn.Module:
    if arch == "mlp":
        return PlainMLPVAE(hidden or 400)
    if arch == "conv":
        return PlainConvVAE(hidden or 128)
    raise ValueError(arch)


def plain_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Negative ELBO averaged over the batch: BCE-with-logits summed over pixels + analytic KL."""
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    z = mu + torch.randn_like(std) * std
    logits = model.decode(z)
    reconstruction = F.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (reconstruction + kl) / x.shape[0]


@torch.no_grad()
def plain_neg_elbo(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> float:
    """Mean negative ELBO (one sample per example, nats) over x, in eval mode."""
    was = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(x), batch_size):
        total += float(plain_loss(model, x[start:start + batch_size])) * len(x[start:start + batch_size])
    model.train(was)
    return total / len(x)


def copy_aevb_weights(aevb_model, plain: nn.Module) -> nn.Module:
    """Load an aevb VAE's weights into the matching hand-written model (same function).

    aevb's encoder ends in one linear layer giving (μ, log σ²) (or (μ, log σ) for
    ``posterior_scale="log-scale"``, then doubled); the hand-written one has a μ
    head and a log σ² head.
    """
    enc = [m for m in aevb_model.encoder.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    dec = [m for m in aevb_model.decoder.modules() if isinstance(m, (nn.Linear, nn.ConvTranspose2d))]
    if isinstance(plain, PlainMLPVAE):
        enc_targets, head, dec_targets = [plain.fc1], enc[-1], [plain.fc3, plain.fc4]
    else:
        enc_targets, head = [plain.conv1, plain.conv2, plain.fc1], enc[-1]
        dec_targets = [plain.fc3, plain.fc4, plain.deconv1, plain.deconv2]
    with torch.no_grad():
        for src, dst in zip([*enc[:-1], *dec], [*enc_targets, *dec_targets], strict=True):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        d = plain.fc21.out_features
        plain.fc21.weight.copy_(head.weight[:d])
        plain.fc21.bias.copy_(head.bias[:d])
        factor = 1.0 if aevb_model.posterior.scale_param == "log-variance" else 2.0
        plain.fc22.weight.copy_(factor * head.weight[d:])
        plain.fc22.bias.copy_(factor * head.bias[d:])
    return plain


@torch.no_grad()
def plain_log_likelihood(model: nn.Module, x: torch.Tensor, k: int, eps: torch.Tensor | None = None) -> torch.Tensor:
    """Importance-sampled log p(x) [B], written as a user would: one image at a time.

    For each image: encode, draw k samples z ~ q(z|x), decode them all, and
    log-mean-exp the weights log p(x|z) + log p(z) − log q(z|x).  ``eps``
    [B, k, D] fixes the standard-normal draws (for tests).
    """
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]  # [1, 1, 28, 28]
        mu, logvar = model.encode(xi)  # [1, D]
        std = torch.exp(0.5 * logvar)
        e = torch.randn(k, mu.shape[1], device=mu.device) if eps is None else eps[i]  # [k, D]
        z = mu + std * e  # [k, D]
        logits = model.decode(z)  # [k, 784]
        log_px_z = -F.binary_cross_entropy_with_logits(logits, xi.flatten(1).expand_as(logits), reduction="none").sum(1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
        log_qz = torch.distributions.Normal(mu, std).log_prob(z).sum(1)
        out.append(torch.logsumexp(log_px_z + log_pz - log_qz, 0) - math.log(k))
    return torch.stack(out)


# --------------------------------------------------------------------------- FLOPs and the machine


def macs_per_image(module: nn.Module, run, x: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per image of Linear / Conv2d / ConvTranspose2d layers during ``run(x)``.

    Returns {"total": …, "weights": …}; conv MACs are counted from the actual
    output (conv) or input (transposed conv) maps, not from the weight count.
    """
    counts = {"total": 0}

    def hook(m, inputs, output):
        n = inputs[0].shape[0]
        if isinstance(m, nn.Linear):
            counts["total"] += output.numel() // n * m.in_features
        elif isinstance(m, nn.ConvTranspose2d):
            kh, kw = m.kernel_size
            counts["total"] += inputs[0].numel() // n * m.out_channels // m.groups * kh * kw
        elif isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            counts["total"] += output.numel() // n * m.in_channels // m.groups * kh * kw

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]
    try:
        with torch.no_grad():
            run(x[:1])
    finally:
        for h in handles:
            h.remove()
    counts["weights"] = sum(m.weight.numel() for m in module.modules()
                            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)))
    return counts


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str = "cpu", sizes=None, repeats: int = 5, dtype: torch.dtype = torch.float32) -> dict:
    """Best torch.mm rate over a few square sizes (GFLOP/s), torch's default threads; fp32 unless ``dtype``.

    On CUDA, TF32 stays off (torch's default for matmul), so this is the fp32 peak.
    """
    sizes = sizes or ((1024, 2048, 3072) if torch.device(device).type == "cpu" else (2048, 4096, 8192))
    best = {"gflops": 0.0, "n": None}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        for _ in range(2):
            torch.mm(a, b, out=c)
        sync(device)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b, out=c)
            sync(device)
            times.append(time.perf_counter() - t)
        rate = 2 * n ** 3 / min(times) / 1e9
        if rate > best["gflops"]:
            best = {"gflops": rate, "n": n}
    best["threads"] = torch.get_num_threads()
    return best


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loadavg() -> float:
    return os.getloadavg()[0]
