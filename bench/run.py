"""aevb's benchmark suite: aevb against the hand-written PyTorch loop and pythae, in one run.

    .venv/bin/python bench/run.py [--quick] [--device cpu|cuda] [--out bench/results/NAME.json]

Every measurement runs in a fresh subprocess (``bench/workers.py``; pythae's in
``bench/.venv-pythae`` through ``bench/pythae_worker.py``), one at a time, so
each setup has its own peak resident memory and none warms another's caches.
The fp32 matrix-multiply peak is measured at the start and the end of the
run; utilisation figures use the larger of the two.  See bench/README.md for
what each column means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

PYTHAE_PYTHON = BENCH / ".venv-pythae" / "bin" / "python"
TARGET = 125.0
LIKE_FOR_LIKE = dict(lr=1e-3, batch_size=128)  # the optimiser of the hand-written loop and pythae
PLAIN_FP32 = dict(precision="fp32", output_bias="default")


# --------------------------------------------------------------------------- running workers


def call(name: str, timeout: float = 900, **params) -> dict:
    """Run one worker in its own process; its result, or {"error": …} if it failed."""
    pythae = name.startswith("pythae_")
    if pythae and not PYTHAE_PYTHON.exists():
        return {"error": "skipped: bench/.venv-pythae missing (run bench/setup_pythae.sh)"}
    python, script = (str(PYTHAE_PYTHON), BENCH / "pythae_worker.py") if pythae else (sys.executable, BENCH / "run.py")
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [python, str(script), "--worker", name, "--params", json.dumps(params), "--result", str(result)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=BENCH.parent)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
        out = json.loads(result.read_text())
    out["process_s"] = time.perf_counter() - start
    return out


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the suite


def _auto_precision(device: str) -> str:
    """What ``--precision auto`` resolves to here, and why: the machines differ in their bf16 hardware."""
    import torch

    from aevb.acceleration.bf16 import bf16_is_native, bf16_matmul_speedup, resolve_precision
    from aevb.model.precision import amx_usable

    chosen = "bf16" if resolve_precision("auto", torch.device(device)) else "fp32"
    if device != "cpu":
        return chosen
    if amx_usable():
        hardware = "AMX"
    elif bf16_is_native(torch.device("cpu")):
        hardware = f"AVX512-BF16, no AMX: a bf16 multiply {bf16_matmul_speedup():.1f}× fp32's speed"
    else:
        hardware = "no native bf16"
    return f"{chosen} ({hardware})"


def suite(quick: bool, device: str, skip_pythae: bool) -> dict:
    q = quick
    epochs = 2 if q else 10
    max_epochs = 2 if q else 30
    res: dict = {"quick": q, "device": device, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "python": platform.python_version(), "load_at_start": os.getloadavg()[0]}}
    import torch

    res["machine"]["torch"] = torch.__version__
    res["machine"]["auto_precision"] = _auto_precision(device)
    if device == "cuda":
        res["machine"]["gpu"] = torch.cuda.get_device_name(0)

    log("matmul peak …")
    res["matmul"] = [call("matmul", device=device)]
    res["matmul_bf16"] = call("matmul", device=device, dtype="bfloat16")  # for the bf16 rows' own utilisation
    res["flops"] = {arch: call("flops", arch=arch) for arch in ("mlp", "conv")}

    pythae_ok = not skip_pythae and PYTHAE_PYTHON.exists()
    if not pythae_ok:
        reason = "--skip-pythae" if skip_pythae else "bench/.venv-pythae missing: run bench/setup_pythae.sh"
        res["pythae_skipped"] = reason

    tmp = Path(tempfile.mkdtemp(prefix="aevb-bench-models-"))
    model_path = str(tmp / "mlp")
    # (1) training, side by side: the library loop, the hand-written loop, pythae.
    # One long run each (test −ELBO after 10 epochs, time to 125 nats, peak memory),
    # then ``rounds`` short interleaved runs of every setup, so that the throughput
    # columns are medians that a passing burst of load on the machine cannot decide.
    res["train"] = {}
    rounds = 1 if q else 3
    seconds = 1.5 if q else 2.5
    for arch in ("mlp", "conv"):
        kw = dict(arch=arch, device=device, target=TARGET, min_epochs=epochs,
                  max_epochs=max_epochs if arch == "mlp" else epochs)
        rows = {}
        log(f"train {arch}: aevb library loop, hand-written loop, pythae …")
        # like for like: the others' optimiser (Adam 1e-3, batch 128); aevb's precision and init
        rows["aevb"] = call("aevb_train", **kw, **LIKE_FOR_LIKE, save_model=model_path if arch == "mlp" else None)
        # and with nothing of aevb's own: fp32 multiplies, torch's init of the output bias
        rows["aevb fp32"] = call("aevb_train", **kw, **LIKE_FOR_LIKE, **PLAIN_FP32)
        # aevb train --compile: steady-state steps after torch.compile, whose time is in the first epoch
        rows["aevb compiled"] = call("aevb_train", **kw, **LIKE_FOR_LIKE, options={"compile": True})
        if arch == "mlp":  # time to quality with aevb's default recipe (aevb train with no options)
            rows["aevb recipe"] = call("aevb_train", arch=arch, device=device, target=TARGET, min_epochs=1,
                                       max_epochs=max_epochs)
        rows["plain"] = call("plain_train", **kw)
        rows["pythae"] = (call("pythae_train", **kw) if pythae_ok
                          else {"error": f"skipped: {res['pythae_skipped']}"})
        short = dict(arch=arch, device=device, min_epochs=3, max_epochs=3)
        steps = {"aevb-step": ("aevb_step", {}), "aevb-step fp32": ("aevb_step", {"precision": "fp32"}),
                 "plain-step": ("plain_step", {}),
                 "plain-step-fused": ("plain_step", {"fused": True})}
        for name in steps:
            rows[name] = {"rounds": []}
        # aevb's and the hand-written loop's rounds train for the full epochs from other seeds:
        # one run's test −ELBO moves by a few nats with the seed, so "the same ELBO" is a mean
        seeded = dict(arch=arch, device=device, min_epochs=epochs, max_epochs=epochs)
        for r in range(rounds):
            log(f"train {arch}: throughput round {r + 1}/{rounds} …")
            for name, worker, extra in (("aevb", "aevb_train", {**LIKE_FOR_LIKE, **seeded, "seed": r + 1}),
                                        ("aevb fp32", "aevb_train", {**LIKE_FOR_LIKE, **PLAIN_FP32, **short}),
                                        ("plain", "plain_train", {**seeded, "seed": r + 1}),
                                        ("pythae", "pythae_train", short)):
                if "error" not in rows[name] and not q:
                    rows[name].setdefault("rounds", []).append(call(worker, **extra))
            for name, (worker, extra) in steps.items():
                rows[name]["rounds"].append(call(worker, arch=arch, device=device, seconds=seconds, **extra))
        if arch == "mlp" and not q:
            # time to quality is one number per run too: two more runs of each setup that has one,
            # interleaved, and the median of three
            for r in range(2):
                log(f"train {arch}: time to {TARGET:.0f}, round {r + 1}/2 …")
                for name, worker in (("aevb recipe", "aevb_train"), ("plain", "plain_train"),
                                     ("pythae", "pythae_train")):
                    if "error" not in rows[name]:
                        rows[name].setdefault("target_rounds", []).append(
                            call(worker, arch=arch, device=device, target=TARGET, min_epochs=1,
                                 max_epochs=max_epochs))
        for name, row in rows.items():
            _median_throughput(row)
            _median_time_to_target(row)
            _neg_elbo_over_seeds(row)
        res["train"][arch] = rows

    # long runs: after about 700 steps on MNIST, subnormal floats slow every step they touch
    # (aevb.acceleration.runtime); the second half of each run is past that point
    res["long"] = {}
    if not q:
        for arch, n_epochs in (("mlp", 30), ("conv", 20)):
            log(f"train {arch}: {n_epochs} epochs, aevb and the hand-written loop …")
            kw = dict(arch=arch, device=device, min_epochs=n_epochs, max_epochs=n_epochs)
            res["long"][arch] = {"aevb": call("aevb_train", **kw, **LIKE_FOR_LIKE), "plain": call("plain_train", **kw)}

    # (2) where the time of aevb's step goes, and the prototypes (interleaved A/B in one process)
    log("step breakdown and prototypes …")
    res["breakdown"] = call("step_breakdown", arch="mlp", device=device, repeats=100 if q else 300)
    res["ab_step"] = {arch: call("ab_step", arch=arch, device=device, rounds=3 if q else 9) for arch in ("mlp", "conv")}
    res["ab_loop"] = call("ab_loop", device=device, epochs=2 if q else 3, rounds=1 if q else 3)

    # (3) evaluation: importance-sampled log-likelihood
    log("evaluation …")
    n_eval = 200 if q else 2000
    n_small = 20 if q else 100
    res["eval"] = {
        "aevb k=5000": call("aevb_ll", model_path=model_path, k=5000, n_images=n_eval, device=device),
        "aevb k=1000": call("aevb_ll", model_path=model_path, k=1000, n_images=n_small, batch_size=n_small,
                            device=device),
        "plain k=1000": call("plain_ll", model_path=model_path, k=1000, n_images=n_small, device=device),
        # aevb eval --precision bf16: the same estimate within noise (see the mean log p(x) column)
        "aevb k=5000 bf16": call("aevb_ll", model_path=model_path, k=5000, n_images=n_eval, device=device,
                                 precision="bf16"),
        "aevb k=1000 bf16": call("aevb_ll", model_path=model_path, k=1000, n_images=n_small, batch_size=n_small,
                                 device=device, precision="bf16"),
    }
    if pythae_ok:
        res["eval"]["pythae get_nll k=1000"] = call("pythae_nll", model_path=model_path, k=1000, n_images=n_small,
                                                    device=device)
    else:
        res["eval"]["pythae get_nll k=1000"] = {"error": f"skipped: {res['pythae_skipped']}"}
    res["ab_eval"] = call("ab_eval", model_path=model_path, k=1000, n_images=n_small, rounds=2 if q else 5,
                          device=device)
    res["memory"] = []
    # 10 images: many samples per chunk; 500 (aevb.evaluate's batch): 8 samples per chunk, so many chunks
    for impl, patches, n_images in (("aevb", None, 10), ("aevb", None, 500), ("aevb", ["fast-ll"], 10),
                                    ("plain", None, 2)):
        for k in (100, 5000) if q else (100, 1000, 5000, 20000):
            res["memory"].append(call("ll_memory", model_path=model_path, k=k, n_images=n_images, impl=impl,
                                      device=device, patches=patches))

    # (4) scaling
    log("scaling …")
    batches = (32, 128, 1024, 4096) if q else (32, 64, 128, 256, 512, 1024, 2048, 4096)
    res["scaling_batch"] = [call("aevb_step", arch="mlp", batch_size=b, device=device, seconds=1.0 if q else 2.0)
                            for b in batches]
    res["scaling_width"] = [call("aevb_step", arch="mlp", hidden=h, device=device, seconds=1.0 if q else 2.0)
                            for h in (100, 400, 1600)]
    # the convolutional networks aevb builds for colour images (CIFAR-10's 32×32, CelebA-style 64×64)
    res["scaling_image"] = [call("aevb_step", arch="conv", image=[3, size, size], precision=precision, device=device,
                                 seconds=1.0 if q else 3.0)
                            for size in ((32,) if q else (32, 64)) for precision in ("auto", "fp32")]
    sizes = (1000, 4000) if q else (1000, 2000, 4000, 8000)
    res["scaling_data"] = [call("aevb_train", arch="mlp", device=device, n_train=n, min_epochs=2 if q else 4,
                                max_epochs=2 if q else 4) for n in sizes]

    # (4b) the streaming path: the same run from a uint8 .npy, converted up front or memory-mapped
    log("streaming …")
    res["streaming"] = {}
    for stream in ("no", "yes"):
        res["streaming"][stream] = [call("aevb_train", arch=arch, device=device, stream=stream, min_epochs=3,
                                         max_epochs=3) for arch in ("mlp", "conv")]

    # (5) recipes for time to quality (full run only): what the default could be
    if not q:
        log("recipes …")
        res["recipes"] = {}
        for lr, batch, bias in ((1e-3, 128, "default"), (1e-3, 128, "data-mean"), (3e-3, 128, "default"),
                                (3e-3, 64, "data-mean"), (1e-2, 128, "data-mean")):
            res["recipes"][f"lr={lr:g} batch={batch} output-bias={bias}"] = call(
                "aevb_train", arch="mlp", device=device, target=TARGET, min_epochs=1, max_epochs=30, lr=lr,
                batch_size=batch, output_bias=bias)

    res["matmul"].append(call("matmul", device=device))
    res["machine"]["load_at_end"] = os.getloadavg()[0]
    res["peak_gflops"] = max(m.get("gflops", 0.0) for m in res["matmul"])
    return res


def _median_throughput(row: dict) -> None:
    """images_per_s (and seconds_per_epoch) of a setup: the median over its long run and its rounds."""
    if "error" in row:
        return
    runs = [r for r in [row, *row.get("rounds", [])] if r.get("images_per_s") and "error" not in r]
    if runs:
        row["images_per_s_runs"] = [r["images_per_s"] for r in runs]
        row["images_per_s"] = statistics.median(row["images_per_s_runs"])
        row.setdefault("ms_per_step", runs[0].get("ms_per_step"))
        row.setdefault("peak_rss_mb", runs[0].get("peak_rss_mb"))
    epoch_runs = [r["seconds_per_epoch"] for r in runs if r.get("seconds_per_epoch")]
    if epoch_runs:
        row["seconds_per_epoch_runs"] = epoch_runs
        row["seconds_per_epoch"] = statistics.median(epoch_runs)


def _neg_elbo_over_seeds(row: dict) -> None:
    """neg_elbo_at_10_runs: the test −ELBO after 10 epochs of the long run and of every round that trained as long."""
    if "error" not in row:
        runs = [r["neg_elbo_at_10"] for r in [row, *row.get("rounds", [])]
                if "error" not in r and r.get("neg_elbo_at_10") is not None]
        if len(runs) > 1:
            row["neg_elbo_at_10_runs"] = runs


def _median_time_to_target(row: dict) -> None:
    """time_to_target_s (and its epochs) of a setup with target rounds: the median run of them and the long run.

    A run that never reached the target counts as slower than any that did.
    """
    if "error" in row or not row.get("target_rounds"):
        return
    runs = [r for r in [row, *row["target_rounds"]] if "error" not in r]
    times = sorted(runs, key=lambda r: (r.get("time_to_target_s") is None, r.get("time_to_target_s") or 0.0))
    middle = times[(len(times) - 1) // 2]
    row["time_to_target_runs"] = [r.get("time_to_target_s") for r in runs]
    row["time_to_target_s"], row["epochs_to_target"] = middle.get("time_to_target_s"), middle.get("epochs_to_target")


# --------------------------------------------------------------------------- the table


def _seed_difference(aevb: list[float], plain: list[float]) -> str:
    """The difference of the mean test −ELBOs over seeds, ± its standard error."""
    se = (statistics.variance(aevb) / len(aevb) + statistics.variance(plain) / len(plain)) ** 0.5
    return (f"over {len(aevb)} seeds {statistics.mean(aevb) - statistics.mean(plain):+.2f} ± {se:.2f} "
            f"(aevb {statistics.mean(aevb):.2f}, sd {statistics.stdev(aevb):.2f}; "
            f"plain {statistics.mean(plain):.2f}, sd {statistics.stdev(plain):.2f})")


def _f(value, fmt="{:.0f}", missing="—") -> str:
    return missing if value is None else fmt.format(value)


def _mfu(images_per_s: float | None, train_flops: float | None, peak_gflops: float) -> str:
    """Model-FLOP utilisation against the fp32 peak, as a percentage string ("—" where unknown)."""
    if not images_per_s or not train_flops:
        return _f(None)
    return _f(images_per_s * train_flops / 1e9 / peak_gflops * 100, "{:.1f}%")


def _half_rates(row: dict, n_train: int = 8000) -> tuple[float | None, float | None]:
    """Training images per second over the first half of a run's epochs (after the first) and over the second."""
    epochs = row.get("epochs") or []
    if len(epochs) < 4:
        return None, None
    walls = [e["wall_s"] for e in epochs]
    k = len(walls) // 2
    return n_train * (k - 1) / (walls[k - 1] - walls[0]), n_train * (len(walls) - k) / (walls[-1] - walls[k - 1])


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "—"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns right-aligned after the first; a row of [label, message] (a skipped setup) spans the others."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *(r for r in rows if len(r) == len(headers)))]

    def line(cells: list[str]) -> str:
        if len(cells) < len(widths):
            return f"{str(cells[0]).ljust(widths[0])}  {cells[1]}"
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def report(res: dict) -> str:
    peak = res["peak_gflops"]
    out = [f"aevb benchmark — {'quick' if res['quick'] else 'full'} run on {res['device']}, {res['started']}; "
           f"fp32 matmul peak {peak:.0f} GFLOP/s ({res['matmul'][0].get('threads')} threads; "
           f"start {res['matmul'][0].get('gflops', 0):.0f}, end {res['matmul'][-1].get('gflops', 0):.0f}); "
           f"load average {res['machine']['load_at_start']:.1f} → {res['machine']['load_at_end']:.1f}; "
           f"--precision auto: {res['machine'].get('auto_precision', '?')}", ""]
    epochs = 2 if res["quick"] else 10
    rows = []
    for arch, setups in res["train"].items():
        train_flops = res["flops"][arch]["train_flops"]
        for name, r in setups.items():
            label = f"{arch} {name}"
            if "error" in r:
                rows.append([label, r["error"]])
                continue
            ips = r.get("images_per_s")
            ttq = r.get("time_to_target_s")
            ttq_s = (f"{ttq:.1f} s (ep {r['epochs_to_target']})" if ttq is not None
                     else ("not reached" if "epochs" in r else ""))
            rows.append([label, _f(ips), _f(r.get("seconds_per_epoch"), "{:.2f}", ""),
                         _mfu(ips, train_flops, peak),
                         _f(r.get("peak_rss_mb")),
                         _f(r.get("neg_elbo_at_10") if epochs == 10 else r.get("neg_elbo_last"), "{:.2f}", ""),
                         ttq_s])
    out.append(_table(["training (batch 128, Adam 1e-3; recipe: aevb's defaults)", "img/s", "s/epoch", "MFU", "RSS MB",
                       f"test −ELBO@{epochs}", f"time to {TARGET:.0f}"], rows))
    for arch, setups in res["train"].items():
        a, f, p, y = (setups.get(k, {}) for k in ("aevb", "aevb fp32", "plain", "pythae"))
        recipe = setups.get("aevb recipe", {})
        parts = []
        if a.get("images_per_s") and p.get("images_per_s"):
            parts.append(f"aevb/plain throughput {a['images_per_s'] / p['images_per_s']:.2f}×")
        if f.get("images_per_s") and p.get("images_per_s"):
            parts.append(f"aevb fp32/plain {f['images_per_s'] / p['images_per_s']:.2f}×")
        if a.get("images_per_s") and y.get("images_per_s"):
            parts.append(f"aevb/pythae {a['images_per_s'] / y['images_per_s']:.2f}×")
        if a.get("neg_elbo_at_10") and p.get("neg_elbo_at_10"):
            parts.append(f"−ELBO@10 aevb−plain {a['neg_elbo_at_10'] - p['neg_elbo_at_10']:+.2f} nats")
        if a.get("neg_elbo_at_10_runs") and p.get("neg_elbo_at_10_runs"):
            parts.append(_seed_difference(a["neg_elbo_at_10_runs"], p["neg_elbo_at_10_runs"]))
        c = setups.get("aevb compiled", {})
        if c.get("images_per_s") and p.get("images_per_s") and c.get("epochs"):
            parts.append(f"aevb compiled/plain {c['images_per_s'] / p['images_per_s']:.2f}× "
                         f"(first epoch {c['epochs'][0]['wall_s']:.1f} s, the compile)")
        if recipe.get("time_to_target_s") and p.get("time_to_target_s"):
            parts.append(f"time-to-{TARGET:.0f} plain/aevb-recipe "
                         f"{p['time_to_target_s'] / recipe['time_to_target_s']:.2f}×")
        if recipe.get("time_to_target_s") and y.get("time_to_target_s"):
            parts.append(f"pythae/aevb-recipe {y['time_to_target_s'] / recipe['time_to_target_s']:.2f}×")
        out.append(f"  {arch}: " + (", ".join(parts) or "no ratios"))

    b = res["breakdown"]
    if "error" not in b:
        out += ["", "aevb step (mlp, batch 128), median ms: " + ", ".join(
            f"{k[:-3]} {v:.2f}" for k, v in b.items() if k.endswith("_ms"))]

    rows = []
    for arch, r in res["ab_step"].items():
        if "error" in r:
            rows.append([f"{arch} step", r["error"]])
            continue
        ms = r["ms_per_step"]
        for name in [n for n in ms if n != "library"]:
            rows.append([f"{arch} step ms, {name}", f"{ms['library']:.2f}", f"{ms[name]:.2f}",
                         f"{ms['library'] / ms[name]:.2f}×"])
    loop = res["ab_loop"]
    if "error" in loop:
        rows.append(["mlp loop", loop["error"]])
    else:
        sec = loop["seconds_per_epoch"]
        for name in ("no-epoch-io", "fast-loss", "fast-loss+no-epoch-io"):
            rows.append([f"mlp loop s/epoch, {name}", f"{sec['library']:.3f}", f"{sec[name]:.3f}",
                         f"{sec['library'] / sec[name]:.2f}×"])
    out += ["", _table(["prototype A/B (bench/prototypes.py)", "library", "patched", "gain"], rows)]

    rows = []
    for name, r in res["eval"].items():
        if "error" in r:
            rows.append([name, r["error"]])
            continue
        gflops = r.get("gflops")
        rows.append([name, str(r["n_images"]), f"{r['seconds']:.2f}", f"{r['ms_per_image']:.2f}",
                     _f(gflops / peak * 100 if gflops else None, "{:.1f}%"), f"{r['mean_log_likelihood']:.2f}"])
    out += ["", _table(["importance-sampled log p(x)", "images", "seconds", "ms/image", "of fp32 peak",
                        "mean log p(x)"], rows)]
    ev = res["eval"]
    parts = []
    for name, other in (("plain k=1000", "plain"), ("pythae get_nll k=1000", "pythae")):
        for mine in ("aevb k=1000", "aevb k=1000 bf16"):
            if "ms_per_image" in ev.get(name, {}) and "ms_per_image" in ev.get(mine, {}):
                parts.append(f"{other}/{mine[5:]} {ev[name]['ms_per_image'] / ev[mine]['ms_per_image']:.2f}×")
    bf16_peak = res.get("matmul_bf16", {}).get("gflops")
    if bf16_peak and "gflops" in ev.get("aevb k=5000 bf16", {}):
        parts.append(f"k=5000 bf16 at {ev['aevb k=5000 bf16']['gflops'] / bf16_peak * 100:.1f}% of the bf16 peak "
                     f"({bf16_peak:.0f} GFLOP/s)")
    if parts:
        out.append("  speed-ups (ms per image): " + ", ".join(parts))
    ab = res.get("ab_eval", {})
    if "error" not in ab and ab:
        base = ab["ms_per_image"]["library (default: 4096 rows)"]
        rows = [[name, f"{ms:.2f}", f"{ab['gflops'][name] / peak * 100:.1f}%", f"{base / ms:.2f}×"]
                for name, ms in ab["ms_per_image"].items()]
        out += ["", _table([f"log p(x) A/B, k={ab['k']}, {ab['n_images']} images", "ms/image", "of peak",
                            "vs library"], rows)]
    mem = [r for r in res["memory"] if "error" not in r]
    if mem:
        groups: dict = {}
        for r in mem:
            groups.setdefault((r["impl"] + ("+" + "+".join(r["patches"]) if r["patches"] else ""), r["n_images"]), []).append(r)
        out.append("  added peak RSS vs k: " + "; ".join(
            f"{impl} ({n} images): " + ", ".join(f"k={r['k']} {r['added_rss_mb']:.0f} MB" for r in rs)
            for (impl, n), rs in groups.items()))

    rows = [[str(r.get("batch_size")), _f(r.get("images_per_s")),
             _mfu(r.get("images_per_s"), r.get("train_flops"), peak)]
            for r in res["scaling_batch"]]
    out += ["", _table(["batch (aevb step, mlp)", "img/s", "MFU"], rows)]
    rows = [[str(r.get("hidden")), _f(r.get("images_per_s")),
             _mfu(r.get("images_per_s"), r.get("train_flops"), peak)]
            for r in res["scaling_width"]]
    out += ["", _table(["hidden (aevb step, batch 128)", "img/s", "MFU"], rows)]
    if res.get("scaling_image"):
        rows = [["×".join(map(str, r.get("image", []))), r.get("precision", "?").removeprefix("torch."),
                 _f(r.get("images_per_s")),
                 _mfu(r.get("images_per_s"), r.get("train_flops"), peak)]
                for r in res["scaling_image"]]
        out += ["", _table(["image (aevb step, conv, batch 128)", "multiplies", "img/s", "MFU"], rows)]
    if res.get("long"):
        rows = []
        for arch, setups in res["long"].items():
            halves = {name: _half_rates(r) for name, r in setups.items()}
            (a1, a2), (p1, p2) = halves["aevb"], halves["plain"]
            n = len(setups["aevb"].get("epochs", []))
            rows.append([f"{arch} ({n} epochs)", _f(a1), _f(p1), _ratio(a1, p1), _f(a2), _f(p2), _ratio(a2, p2)])
        out += ["", _table(["long run (img/s from epoch times)", "aevb 1st half", "plain 1st half", "ratio",
                            "aevb 2nd half", "plain 2nd half", "ratio"], rows)]
    rows = []
    for r in res["scaling_data"]:
        if "error" in r:
            rows.append(["?", r["error"]])
            continue
        n = round(r["epoch_images_per_s"] * r["seconds_per_epoch"])
        rows.append([str(n), f"{r['seconds_per_epoch']:.3f}", f"{r['seconds_per_epoch'] / n * 1e6:.1f}"])
    out += ["", _table(["train images (aevb loop)", "s/epoch", "µs/image"], rows)]
    if res.get("streaming"):
        rows = []
        for stream, runs in res["streaming"].items():
            for r in runs:
                if "error" in r:
                    rows.append([stream, r["error"]])
                    continue
                rows.append([f"{r.get('arch', '?')} stream={stream}", _f(r.get("images_per_s")),
                             _f(r.get("seconds_per_epoch"), "{:.3f}", ""), _f(r.get("peak_rss_mb")),
                             _f(r.get("neg_elbo_last"), "{:.4f}", "")])
        out += ["", _table(["training data path (uint8 .npy, 3 epochs)", "img/s", "s/epoch", "RSS MB",
                            "test −ELBO@3"], rows)]
    if res.get("recipes"):
        rows = [[name, _f(r.get("time_to_target_s"), "{:.1f} s", "not reached"), _f(r.get("epochs_to_target")),
                 _f(r.get("neg_elbo_last"), "{:.2f}")] for name, r in res["recipes"].items()]
        out += ["", _table(["recipe (aevb library loop)", f"time to {TARGET:.0f}", "epochs", "last −ELBO"], rows)]
    return "\n".join(out)


# --------------------------------------------------------------------------- entry point


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 epochs, fewer sizes, smaller evaluation (≈ 3 min)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", default=str(BENCH / "results" / "latest.json"), help="where to write the JSON")
    parser.add_argument("--threads", type=int, help="torch threads in every worker (default: torch's default)")
    parser.add_argument("--skip-pythae", action="store_true", help="leave setup (c) out")
    parser.add_argument("--report", metavar="JSON", help="print the table of an earlier run and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        from workers import run_worker

        result = run_worker(args.worker, json.loads(args.params))
        text = json.dumps(result)
        Path(args.result).write_text(text) if args.result else print(text)
        return 0
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return 0
    if args.threads:
        os.environ["AEVB_BENCH_THREADS"] = str(args.threads)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: PyTorch sees no CUDA GPU here")
    start = time.perf_counter()
    res = suite(args.quick, args.device, args.skip_pythae)
    res["total_s"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(report(res))
    print(f"\n{res['total_s']:.0f} s in all; JSON in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
