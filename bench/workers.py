"""The measurements, each run in its own process by ``bench/run.py``.

A worker is a function of JSON-able keyword arguments returning a dict; the
process adds its own peak resident memory (``peak_rss_mb``), so setups never
share a peak.  Run one by hand with

    .venv/bin/python bench/run.py --worker aevb_step --params '{"arch": "mlp"}'
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import (LATENT, MNIST_IMAGES, MNIST_LABELS, N_TEST, N_TRAIN, TARGET_NATS, copy_aevb_weights, load_mnist,
                    macs_per_image, make_plain, mnist_uint8, peak_rss_mb, plain_log_likelihood, plain_loss,
                    plain_neg_elbo, sync)
from prototypes import applied

WORKERS = {}


def worker(fn):
    WORKERS[fn.__name__] = fn
    return fn


class _Stop(Exception):
    pass


def _aevb_model(arch: str, hidden: int | None = None, device: str = "cpu", image: list | None = None):
    """The benchmark's VAE; ``image`` [C, H, W] for another data shape than MNIST's (1, 28, 28)."""
    import aevb

    kwargs = dict(data_shape=tuple(image or (1, 28, 28)), latent_dim=LATENT, arch=arch, likelihood="bernoulli")
    if hidden:
        kwargs["hidden"] = [hidden]
    return aevb.VAE(**kwargs).to(device)


def _train_flops(arch: str, hidden: int | None = None, image: list | None = None) -> dict:
    """Forward MACs per image of the model (counted on aevb's), training FLOPs = 3 × 2 × MACs."""
    model = _aevb_model(arch, hidden, image=image)
    x = torch.rand(1, *(image or (1, 28, 28)))
    macs = macs_per_image(model, lambda v: model.loss(v), x)
    dec = macs_per_image(model.decoder, lambda v: model.decoder(v), torch.zeros(1, LATENT))
    enc = macs_per_image(model.encoder, lambda v: model.encoder(v), x)
    return {"forward_flops": 2 * macs["total"], "train_flops": 6 * macs["total"], "weights": macs["weights"],
            "decoder_flops": 2 * dec["total"], "encoder_flops": 2 * enc["total"]}


@worker
def flops(arch: str = "mlp", hidden: int | None = None) -> dict:
    return _train_flops(arch, hidden)


@worker
def matmul(device: str = "cpu", dtype: str = "float32") -> dict:
    from common import matmul_peak

    return {**matmul_peak(device, dtype=getattr(torch, dtype)), "dtype": dtype}


# --------------------------------------------------------------------------- (a) aevb's library loop


def _subset_files(tmp: Path, n_train: int) -> tuple[Path, Path]:
    """.npy files holding the first n_train images then the 2,000 test images (and labels)."""
    from aevb.data.files import read_idx

    images, labels = mnist_uint8(), read_idx(MNIST_LABELS)
    keep = np.r_[0:n_train, len(images) - N_TEST:len(images)]
    np.save(tmp / "images.npy", images[keep])
    np.save(tmp / "labels.npy", labels[keep].astype(np.int64))
    return tmp / "images.npy", tmp / "labels.npy"


def _steady_images_per_s(records: list[dict], batch: int) -> float | None:
    """Images over time across metrics.jsonl step records, skipping the first (warm-up) record."""
    steps = [r for r in records if "images_per_s" in r]
    images, seconds, last = 0.0, 0.0, steps[0]["step"] if steps else 0
    for r in steps[1:]:
        n = (r["step"] - last) * batch
        images += n
        seconds += n / r["images_per_s"]
        last = r["step"]
    return images / seconds if seconds else None


@worker
def aevb_train(arch: str = "mlp", max_epochs: int = 10, min_epochs: int = 10, target: float | None = None,
               device: str = "cpu", n_train: int = 8000, lr: float | None = None, batch_size: int | None = None,
               precision: str | None = None, output_bias: str | None = None,
               patches: list | None = None, save_model: str | None = None, seed: int = 0,
               stream: str | None = None, options: dict | None = None) -> dict:
    """aevb.training.train on the reference data; epoch times and test −ELBO from its own evaluations.

    Trains up to ``max_epochs``; stops after ``min_epochs`` once the test
    −ELBO is ≤ ``target`` (time to quality).  Wall-clock times exclude the
    loop's evaluation passes but include everything else it does per epoch.
    ``lr``, ``batch_size``, ``precision``, ``output_bias``: None keeps the
    library's default (its recipe).  ``stream`` (``yes``/``no``) reads the
    images from a uint8 .npy file, memory-mapped and converted per batch or
    converted up front (``aevb train --stream``).  ``options``: any other
    config fields (``{"adam_betas": [0.9, 0.99]}``), for trying recipes.
    """
    import aevb.training.loop as T
    from aevb.config import make_config

    tmp = Path(tempfile.mkdtemp(prefix="aevb-bench-"))
    if n_train == 8000 and stream is None:
        data, labels = MNIST_IMAGES, MNIST_LABELS
    else:
        data, labels = _subset_files(tmp, n_train)
    recipe = {k: v for k, v in dict(lr=lr, batch_size=batch_size, precision=precision,
                                    output_bias=output_bias, stream=stream).items() if v is not None}
    recipe.update(options or {})
    # val_split=0: the test −ELBO after every epoch, on all other images, as measured before validation was the default
    config = make_config(data=str(data), labels=str(labels), test_split=N_TEST, val_split=0, arch=arch, latent_dim=LATENT,
                         likelihood="bernoulli", epochs=max_epochs, device=device, out=str(tmp / "run"), seed=seed,
                         **recipe)
    batch_size = config.batch_size
    state = {"t0": None, "eval_s": 0.0, "epochs": []}
    make_optimizer, mean_elbo_terms = T.make_optimizer, T.mean_elbo_terms

    def timed_optimizer(*args, **kwargs):
        optimizer = make_optimizer(*args, **kwargs)
        state["t0"] = time.perf_counter()
        return optimizer

    def timed_eval(model, x, batch_size=1000):
        sync(device)
        start = time.perf_counter()
        terms = mean_elbo_terms(model, x, batch_size)
        end = time.perf_counter()
        wall = start - state["t0"] - state["eval_s"]
        state["eval_s"] += end - start
        state["epochs"].append({"epoch": len(state["epochs"]) + 1, "wall_s": wall, "neg_elbo": -terms["elbo"]})
        done = len(state["epochs"])
        if done >= min_epochs and (target is None or -terms["elbo"] <= target) and done < max_epochs:
            state["model"] = model
            raise _Stop
        state["model"] = model
        return terms

    T.make_optimizer, T.mean_elbo_terms = timed_optimizer, timed_eval
    try:
        with applied(patches):
            T.train(config, force=True, progress=False)
    except _Stop:
        pass
    finally:
        T.make_optimizer, T.mean_elbo_terms = make_optimizer, mean_elbo_terms
    if save_model:
        state["model"].save(save_model)
    records = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return _summary("aevb", state["epochs"], n_train, target, arch=arch,
                    images_per_s=_steady_images_per_s(records, batch_size),
                    recipe={k: getattr(config, k) for k in ("lr", "batch_size", "precision", "output_bias", "stream")},
                    logged_test_elbo=[r["test_elbo"] for r in records if "test_elbo" in r])


def _summary(setup: str, epochs: list[dict], n_train: int, target: float | None, **extra) -> dict:
    """Per-epoch times → seconds per epoch (median after the first), −ELBO at 10, time to target."""
    times = [e["wall_s"] for e in epochs]
    per_epoch = [b - a for a, b in zip([0.0, *times[:-1]], times)]
    steady = per_epoch[1:] or per_epoch
    reached = next((e for e in epochs if e["neg_elbo"] <= target), None) if target else None
    at10 = next((e["neg_elbo"] for e in epochs if e["epoch"] == 10), None)
    out = {"setup": setup, "epochs": epochs, "seconds_per_epoch": statistics.median(steady),
           "epoch_images_per_s": n_train / statistics.median(steady),
           "neg_elbo_at_10": at10, "neg_elbo_last": epochs[-1]["neg_elbo"], "epochs_run": len(epochs),
           "time_to_target_s": reached["wall_s"] if reached else None,
           "epochs_to_target": reached["epoch"] if reached else None, "target": target}
    out.setdefault("images_per_s", None)
    out.update(extra)
    return out


# --------------------------------------------------------------------------- (b) the hand-written loop


@worker
def plain_train(arch: str = "mlp", max_epochs: int = 10, min_epochs: int = 10, target: float | None = None,
                device: str = "cpu", n_train: int = 8000, lr: float = 1e-3, batch_size: int = 128,
                seed: int = 0) -> dict:
    """The loop a user writes: DataLoader(TensorDataset, shuffle=True), loss by hand, Adam, .item() per step."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    x_train, x_test = load_mnist(n_train)
    x_test = x_test.to(device)
    loader = DataLoader(TensorDataset(x_train), batch_size=batch_size, shuffle=True)
    model = make_plain(arch).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    epochs, train_s, rates = [], 0.0, []
    for epoch in range(1, max_epochs + 1):
        model.train()
        sync(device)
        start = time.perf_counter()
        train_loss = 0.0
        for (x,) in loader:
            x = x.to(device)
            optimizer.zero_grad()
            loss = plain_loss(model, x)
            loss.backward()
            optimizer.step()
            train_loss += loss.item()
        sync(device)
        seconds = time.perf_counter() - start
        train_s += seconds
        rates.append(n_train / seconds)
        epochs.append({"epoch": epoch, "wall_s": train_s, "neg_elbo": plain_neg_elbo(model, x_test)})
        if epoch >= min_epochs and (target is None or epochs[-1]["neg_elbo"] <= target):
            break
    return _summary("plain", epochs, n_train, target, images_per_s=statistics.median(rates[1:] or rates))


# --------------------------------------------------------------------------- bare steps


def _time_steps(step, seconds: float, device: str, warmup: int = 10, blocks: int = 5) -> float:
    """Median seconds per step over ``blocks`` timed blocks of about seconds/blocks each."""
    for i in range(warmup):
        step(i)
    sync(device)
    start = time.perf_counter()
    n = warmup
    while time.perf_counter() - start < 0.3 and n < warmup + 200:
        step(n)
        n += 1
    sync(device)
    per = (time.perf_counter() - start) / (n - warmup)
    per_block = max(3, int(seconds / blocks / per))
    results = []
    for _ in range(blocks):
        sync(device)
        t = time.perf_counter()
        for i in range(per_block):
            step(i)
        sync(device)
        results.append((time.perf_counter() - t) / per_block)
    return statistics.median(results)


def _batches(x: torch.Tensor, batch: int):
    n = x.shape[0]
    state = {"perm": torch.randperm(n, device=x.device), "pos": 0}

    def next_batch():
        if state["pos"] + batch > n:
            state["perm"], state["pos"] = torch.randperm(n, device=x.device), 0
        index = state["perm"][state["pos"]:state["pos"] + batch]
        state["pos"] += batch
        return x[index]

    return next_batch


class _AevbStep:
    """aevb's model step on resident MNIST: the trainer's loss in ``precision``, backward, Adam (fused by default).

    The one setup of the step workers (aevb_step, step_breakdown, ab_step).
    """

    def __init__(self, arch: str, batch_size: int, device: str, precision: str = "auto",
                 hidden: int | None = None, fused: bool = True, image: list | None = None):
        from aevb.acceleration import optim
        from aevb.acceleration.bf16 import resolve_precision

        self.dtype = resolve_precision(precision, torch.device(device))
        torch.manual_seed(0)
        # another image shape: uniform pixels, as many as MNIST's training images (speed only)
        x_train = load_mnist()[0] if image is None else torch.rand(N_TRAIN, *image)
        self.model = _aevb_model(arch, hidden, device, image)
        # the library's optimiser (torch's fused Adam, aevb.acceleration.optim's lean step), or torch's per-parameter loop
        self.optimizer = (optim.Adam(self.model.parameters(), lr=1e-3) if fused
                          else torch.optim.Adam(self.model.parameters(), lr=1e-3, foreach=False))
        self.next_batch = _batches(x_train.to(device), batch_size)
        # the loss aevb's trainer takes for this model (the fused one for the MLP VAE)
        from aevb.config import make_config
        from aevb.training.accelerations import make_loss

        self.loss_of = make_loss(self.model, make_config(arch=arch), torch.device(device))

    def loss(self, x: torch.Tensor):
        from aevb.model.precision import matmul_dtype

        with matmul_dtype(self.dtype):
            return self.loss_of(x, self.model.beta)

    def __call__(self, i: int = 0) -> None:
        out = self.loss(self.next_batch())
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()


@worker
def aevb_step(arch: str = "mlp", batch_size: int = 128, hidden: int | None = None, device: str = "cpu",
              seconds: float = 2.0, patches: list | None = None, fused: bool = True, precision: str = "auto",
              image: list | None = None) -> dict:
    """aevb's model step alone: x = x_train[perm slice]; model.loss(x) (in ``precision``); backward; fused Adam.

    ``image`` [C, H, W]: the network aevb builds for that shape, on uniform pixels.
    """
    from aevb.acceleration.runtime import denormals_flushed

    step = _AevbStep(arch, batch_size, device, precision, hidden, fused, image)
    with applied(patches), denormals_flushed():  # as the library's loop runs
        per_step = _time_steps(step, seconds, device)
    flops = _train_flops(arch, hidden, image)
    return {"setup": "aevb-step", "arch": arch, "batch_size": batch_size, "hidden": hidden, "patches": patches or [],
            "image": image or [1, 28, 28],
            "precision": str(step.dtype or torch.float32),
            "ms_per_step": per_step * 1e3, "images_per_s": batch_size / per_step, "train_flops": flops["train_flops"]}


@worker
def plain_step(arch: str = "mlp", batch_size: int = 128, device: str = "cpu", seconds: float = 2.0,
               fused: bool = False) -> dict:
    """The hand-written model step on resident tensors (no DataLoader), default or fused Adam."""
    torch.manual_seed(0)
    x_train, _ = load_mnist()
    x_train = x_train.to(device)
    model = make_plain(arch).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused or None)
    next_batch = _batches(x_train, batch_size)

    def step(i):
        loss = plain_loss(model, next_batch())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    per_step = _time_steps(step, seconds, device)
    return {"setup": "plain-step", "arch": arch, "batch_size": batch_size, "fused": fused,
            "ms_per_step": per_step * 1e3, "images_per_s": batch_size / per_step}


@worker
def step_breakdown(arch: str = "mlp", batch_size: int = 128, device: str = "cpu", repeats: int = 300,
                   patches: list | None = None, precision: str = "auto") -> dict:
    """Milliseconds of forward+loss, backward, fused Adam and batch gathering in aevb's step."""
    step = _AevbStep(arch, batch_size, device, precision)
    parts = {"batch": [], "forward_loss": [], "backward": [], "adam": [], "log_buffer": []}
    buffer = torch.zeros(50, 5, device=device)
    with applied(patches):
        for i in range(repeats + 20):
            t0 = time.perf_counter()
            x = step.next_batch()
            sync(device)
            t1 = time.perf_counter()
            out = step.loss(x)
            sync(device)
            t2 = time.perf_counter()
            step.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            sync(device)
            t3 = time.perf_counter()
            step.optimizer.step()
            sync(device)
            t4 = time.perf_counter()
            buffer[i % 50] = out.as_tensor()
            sync(device)
            t5 = time.perf_counter()
            if i >= 20:
                for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                    parts[key].append(value)
    return {"arch": arch, "patches": patches or [],
            **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in parts.items()}}


# --------------------------------------------------------------------------- evaluation


def _eval_model(model_path: str | None, device: str):
    import aevb

    if model_path and Path(model_path, "config.json").is_file():
        return aevb.load(model_path, device=device)
    torch.manual_seed(0)
    return _aevb_model("mlp", device=device).eval()


@worker
def aevb_ll(model_path: str | None = None, k: int = 5000, n_images: int = 2000, batch_size: int = 500,
            device: str = "cpu", patches: list | None = None, precision: str = "fp32") -> dict:
    """model.log_likelihood(x, n_samples=k) over the last n_images test images, in batches, with the process
    settings that aevb eval (aevb.evaluate) applies: freed memory kept, subnormal floats flushed.

    ``precision``: of the sampler's multiplies, as ``aevb eval --precision``.
    """
    from aevb.acceleration.bf16 import resolve_precision
    from aevb.acceleration.runtime import denormals_flushed, keep_freed_memory
    from aevb.model.precision import matmul_dtype

    keep_freed_memory()
    torch.manual_seed(0)
    _, x_test = load_mnist()
    x = x_test[-n_images:].to(device)
    model = _eval_model(model_path, device)
    with applied(patches), denormals_flushed(), matmul_dtype(resolve_precision(precision, torch.device(device))):
        model.log_likelihood(x[:2], n_samples=64)  # warm-up
        sync(device)
        start = time.perf_counter()
        values = [model.log_likelihood(x[i:i + batch_size], n_samples=k) for i in range(0, n_images, batch_size)]
        sync(device)
        seconds = time.perf_counter() - start
    flops = _train_flops("mlp")
    work = n_images * (flops["encoder_flops"] + k * flops["decoder_flops"])
    return {"setup": "aevb-ll", "k": k, "n_images": n_images, "batch_size": batch_size, "patches": patches or [],
            "precision": precision, "seconds": seconds, "ms_per_image": seconds / n_images * 1e3, "gflops": work / seconds / 1e9,
            "mean_log_likelihood": float(torch.cat(values).mean())}


@worker
def plain_ll(model_path: str | None = None, k: int = 1000, n_images: int = 100, device: str = "cpu") -> dict:
    """The plain per-image importance sampler on the same weights (copied into the hand-written model)."""
    torch.manual_seed(0)
    _, x_test = load_mnist()
    x = x_test[-n_images:].to(device)
    plain = copy_aevb_weights(_eval_model(model_path, device), make_plain("mlp").to(device)).eval()
    plain_log_likelihood(plain, x[:2], 64)
    sync(device)
    start = time.perf_counter()
    values = plain_log_likelihood(plain, x, k)
    sync(device)
    seconds = time.perf_counter() - start
    flops = _train_flops("mlp")
    work = n_images * (flops["encoder_flops"] + k * flops["decoder_flops"])
    return {"setup": "plain-ll", "k": k, "n_images": n_images, "seconds": seconds,
            "ms_per_image": seconds / n_images * 1e3, "gflops": work / seconds / 1e9,
            "mean_log_likelihood": float(values.mean())}


@worker
def ll_memory(model_path: str | None = None, k: int = 1000, n_images: int = 100, impl: str = "aevb",
              device: str = "cpu", patches: list | None = None) -> dict:
    """Peak resident memory added by one importance-sampled evaluation of n_images at k samples."""
    torch.manual_seed(0)
    keep_freed_memory()
    _, x_test = load_mnist()
    x = x_test[-n_images:].to(device)
    model = _eval_model(model_path, device)
    plain = copy_aevb_weights(model, make_plain("mlp").to(device)).eval() if impl == "plain" else None
    with applied(patches):
        model.log_likelihood(x[:1], n_samples=2)
        plain_log_likelihood(copy_aevb_weights(model, make_plain("mlp")).eval(), x[:1], 2)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before = peak_rss_mb()
        if impl == "aevb":
            model.log_likelihood(x, n_samples=k)
        else:
            plain_log_likelihood(plain, x, k)
        added = peak_rss_mb() - before
    out = {"impl": impl, "k": k, "n_images": n_images, "patches": patches or [], "added_rss_mb": added}
    if device == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def run_worker(name: str, params: dict) -> dict:
    result = WORKERS[name](**params)
    result["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available() and params.get("device") == "cuda":
        result["cuda_peak_mb"] = result.get("cuda_peak_mb", torch.cuda.max_memory_allocated() / 2 ** 20)
    result["threads"] = torch.get_num_threads()
    return result



# --------------------------------------------------------------------------- A/B of the prototypes, in one process


def _interleaved(variants: dict, run_block, rounds: int) -> dict:
    """Run each variant's block in turn, ``rounds`` times; median seconds per block of each.

    Alternating in one process keeps slow drifts of the machine's load from
    favouring one variant.
    """
    times = {name: [] for name in variants}
    first = next(iter(variants))
    with applied(variants[first]):
        run_block(first)  # warm-up: first-call costs (imports, allocator, page cache) fall here
    for _ in range(rounds):
        for name, patches in variants.items():
            with applied(patches):
                times[name].append(run_block(name))
    return {name: statistics.median(ts) for name, ts in times.items()}


@worker
def ab_step(arch: str = "mlp", batch_size: int = 128, device: str = "cpu", rounds: int = 9, steps: int = 30) -> dict:
    """aevb's model step, library loss vs the fast-loss prototype, interleaved blocks of ``steps`` steps."""
    step = _AevbStep(arch, batch_size, device)

    def block(name):
        for _ in range(3):  # settle
            step()
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        return (time.perf_counter() - start) / steps

    medians = _interleaved({"library": [], "fast-loss": ["fast-loss"], "fast-bce": ["fast-bce"]}, block, rounds)
    return {"arch": arch, "ms_per_step": {k: v * 1e3 for k, v in medians.items()},
            "images_per_s": {k: batch_size / v for k, v in medians.items()}}


@worker
def ab_loop(epochs: int = 3, rounds: int = 3, device: str = "cpu") -> dict:
    """aevb.training.train (mlp) with and without the loop prototypes, interleaved; seconds per epoch."""
    import aevb.training.loop as T
    from aevb.config import make_config

    tmp = Path(tempfile.mkdtemp(prefix="aevb-ab-"))
    make_optimizer, mean_elbo_terms = T.make_optimizer, T.mean_elbo_terms
    state = {}

    def timed_optimizer(*args, **kwargs):
        optimizer = make_optimizer(*args, **kwargs)
        state["t0"] = time.perf_counter()
        return optimizer

    def timed_eval(model, x, batch_size=1000):
        start = time.perf_counter()
        state["last"] = start - state["t0"] - state["eval_s"]  # loop time up to this epoch's end
        terms = mean_elbo_terms(model, x, batch_size)
        state["eval_s"] += time.perf_counter() - start
        return terms

    def block(name):
        config = make_config(data=str(MNIST_IMAGES), labels=str(MNIST_LABELS), test_split=N_TEST, val_split=0,
                             arch="mlp", epochs=epochs, device=device, out=str(tmp / name))
        state["eval_s"] = 0.0
        T.make_optimizer, T.mean_elbo_terms = timed_optimizer, timed_eval
        try:
            T.train(config, force=True, progress=False)
            return state["last"] / epochs
        finally:
            T.make_optimizer, T.mean_elbo_terms = make_optimizer, mean_elbo_terms

    variants = {"library": [], "no-epoch-io": ["no-epoch-io"], "fast-loss": ["fast-loss"],
                "fast-loss+no-epoch-io": ["fast-loss", "no-epoch-io"]}
    medians = _interleaved(variants, block, rounds)
    return {"seconds_per_epoch": medians, "note": "loop time from the optimiser's creation to the last "
            "epoch's end, minus evaluation passes, divided by epochs"}


@worker
def ab_eval(k: int = 1000, n_images: int = 100, rounds: int = 5, device: str = "cpu", model_path: str | None = None) -> dict:
    """Importance-sampled log-likelihood variants, interleaved, on the same model and images, with aevb eval's
    process settings (freed memory kept, subnormals flushed) for every variant."""
    import aevb.model.objectives as O
    from aevb.acceleration.bf16 import bf16_is_native
    from aevb.acceleration.runtime import denormals_flushed, keep_freed_memory
    from aevb.model.precision import matmul_dtype
    from prototypes import fast_log_likelihood

    def bf16(fn):
        def run():
            with matmul_dtype(torch.bfloat16):
                return fn()
        return run

    _, x_test = load_mnist()
    x = x_test[-n_images:].to(device)
    model = _eval_model(model_path, device)
    plain = copy_aevb_weights(model, make_plain("mlp").to(device)).eval()
    variants = {
        "library (default: 4096 rows)": lambda: model.log_likelihood(x, n_samples=k),
        "library, 16384 rows": lambda: model.log_likelihood(x, n_samples=k, chunk_size=max(1, 16384 // n_images)),
        "library, 1024 rows": lambda: model.log_likelihood(x, n_samples=k, chunk_size=max(1, 1024 // n_images)),
        "fast-ll (4096 rows)": lambda: fast_log_likelihood(model, x, k, rows=4096),
        "fast-ll (2048 rows)": lambda: fast_log_likelihood(model, x, k, rows=2048),
        "fast-ll (16384 rows)": lambda: fast_log_likelihood(model, x, k, rows=16384),
        "fast-ll, F.softplus (4096 rows)": lambda: fast_log_likelihood(
            model, x, k, rows=4096, softplus_sum=lambda l: torch.nn.functional.softplus(l).sum(-1)),
        "plain per image": lambda: plain_log_likelihood(plain, x, k),
    }
    if bf16_is_native(torch.device(device)):  # aevb eval --precision bf16
        variants["library, bf16 multiplies"] = bf16(lambda: model.log_likelihood(x, n_samples=k))
    del O
    times = {name: [] for name in variants}
    with torch.no_grad(), denormals_flushed():
        for fn in variants.values():
            fn()
        for _ in range(rounds):
            for name, fn in variants.items():
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - start)
    flops = _train_flops("mlp")
    work = n_images * (flops["encoder_flops"] + k * flops["decoder_flops"])
    return {"k": k, "n_images": n_images,
            "ms_per_image": {n: statistics.median(t) / n_images * 1e3 for n, t in times.items()},
            "gflops": {n: work / statistics.median(t) / 1e9 for n, t in times.items()}}
