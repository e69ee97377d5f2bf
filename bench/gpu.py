"""The single-GPU path: aevb's training loop against a plain PyTorch loop on the same device, in one command.

    .venv/bin/python bench/gpu.py                       # on a GPU: MLP VAE 784-400-20, batch 1024, 3,000 steps each
    .venv/bin/python bench/gpu.py --device cpu --tiny   # the same code on the CPU in seconds (tests/test_bench_gpu.py)
    .venv/bin/python bench/gpu.py --variants aevb,plain --steps 1000 --batch-size 4096 --out FILE.json
    .venv/bin/python bench/gpu.py --report FILE.json    # the table of an earlier run

Every variant trains the MLP VAE (784-400-20, Bernoulli, Adam 1e-3) from
the same seed for ``--steps`` steps at ``--batch-size`` on the MNIST split
(the bundled digits where ``../shared/data/mnist`` is absent), its data
resident on the device, and is timed in blocks of ``--block`` steps that end
with a device synchronisation; img/s is the median over the blocks after
the first (warm-up, compilation).  Then its test −ELBO (one sample, float32,
the 2,000 test images).

| variant | what it is |
|---|---|
| aevb | the library's step as ``aevb train`` takes it (``bench/trainer_steps.py``: the fused loss, aevb's Adam, a record every 50 steps), fp32 multiplies |
| aevb bf16 | the same with ``--precision bf16`` (bf16 multiplies, all else float32) |
| aevb compile | the same with ``--compile`` (``torch.compile`` of ``model.loss``, its default mode) |
| aevb compile reduce-overhead | ``--compile`` with ``mode="reduce-overhead"`` (CUDA graphs on a GPU), patched here: a prototype, not an option of the library |
| plain | the loop a user writes: the PyTorch example's model and loss, ``torch.optim.Adam``, the same resident batches, and ``loss.item()`` every step (the example's running total) |
| plain no-item | the same without the per-step ``.item()`` |
| plain bf16 | ``torch.autocast(bfloat16)`` around the forward pass and loss, no ``.item()`` |
| plain compile reduce-overhead | the plain loss through ``torch.compile(mode="reduce-overhead")``, fused Adam, no ``.item()`` |

On a GPU it also trains ``aevb`` on the CPU (``--cpu-steps``, default the
same steps) and gives each variant's test −ELBO against that one (issue 32:
within 1 nat), and counts the host synchronisations per step of each
variant with ``torch.cuda.set_sync_debug_mode("warn")`` over one block
(``plain`` shows one a step: its ``.item()``; aevb's loop should show one a
record, 1/50, and one an epoch: its order's copy to the device).  The compile variants are left out on the CPU unless named
in ``--variants`` (inductor's C++ build takes minutes on 2 cores).  TF32
stays off (torch's default), so fp32 means fp32.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import torch  # noqa: E402

from common import PlainMLPVAE, plain_loss, plain_neg_elbo  # noqa: E402
from trainer_steps import TrainerSteps, bench_config  # noqa: E402

from aevb.training.data import TrainingData  # noqa: E402

DEFAULT_OUT = BENCH / "results" / "gpu.json"
COMPILED = ("aevb compile", "aevb compile reduce-overhead", "plain compile reduce-overhead")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the variants: each a (step(n), test −ELBO)


def aevb_variant(device: torch.device, args, **options) -> tuple[Callable[[int], None], Callable[[], float], dict]:
    mode = options.pop("compile_mode", None)
    steps = TrainerSteps(bench_config("mlp", args.batch_size, device=device.type, **options), device)
    if mode is not None:  # the trainer's CompiledLoss, compiled in another mode
        steps.trainer.loss_of.compiled = torch.compile(steps.model.loss, mode=mode)
    info = {"multiplies": "fp32" if steps.step_dtype is None else "bf16", "loss": steps.loss_name,
            "data": Path(steps.data.dataset.name).name, "data_shape": list(steps.data.dataset.data_shape),
            "train_examples": steps.data.examples}
    return steps.run, steps.test_neg_elbo, info


def plain_variant(device: torch.device, args, item: bool = True, bf16: bool = False,
                  compile_mode: str | None = None) -> tuple[Callable[[int], None], Callable[[], float], dict]:
    data = TrainingData.load(bench_config("mlp", args.batch_size, device=device.type), device)  # aevb's splits
    x_train, x_test = data.train, data.eval_x
    torch.manual_seed(0)
    model = PlainMLPVAE(pixels=math.prod(data.dataset.data_shape)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True if compile_mode else None)
    loss_fn = torch.compile(plain_loss, mode=compile_mode) if compile_mode else plain_loss
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    state = {"order": None, "at": 0, "total": 0.0}
    n, b = x_train.shape[0], args.batch_size

    def run(steps: int) -> None:
        for _ in range(steps):
            if state["order"] is None or state["at"] >= n:
                state["order"], state["at"] = torch.randperm(n, device=device), 0
            x = x_train[state["order"][state["at"]:state["at"] + b]]
            state["at"] += b
            with autocast():
                loss = loss_fn(model, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if item:
                state["total"] += loss.item()  # the PyTorch example's running total: a host sync each step

    def test_neg_elbo() -> float:
        torch.manual_seed(0)
        return plain_neg_elbo(model, x_test)

    return run, test_neg_elbo, {"multiplies": "bf16 (autocast)" if bf16 else "fp32", "loss": "plain_loss"}


VARIANTS: dict[str, Callable] = {
    "aevb": lambda device, args: aevb_variant(device, args, precision="fp32"),
    "aevb bf16": lambda device, args: aevb_variant(device, args, precision="bf16"),
    "aevb compile": lambda device, args: aevb_variant(device, args, precision="fp32", compile=True),
    "aevb compile reduce-overhead": lambda device, args: aevb_variant(device, args, precision="fp32", compile=True,
                                                                      compile_mode="reduce-overhead"),
    "plain": lambda device, args: plain_variant(device, args),
    "plain no-item": lambda device, args: plain_variant(device, args, item=False),
    "plain bf16": lambda device, args: plain_variant(device, args, item=False, bf16=True),
    "plain compile reduce-overhead": lambda device, args: plain_variant(device, args, item=False,
                                                                        compile_mode="reduce-overhead"),
}


# --------------------------------------------------------------------------- timing


def host_syncs(run: Callable[[int], None], steps: int, device: torch.device) -> float | None:
    """Host synchronisations per step over ``steps`` steps (CUDA's sync debug mode); None off CUDA."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(steps)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def measure(name: str, device: torch.device, args) -> dict:
    """One variant's row; a variant that fails (no bf16 here, no compiler, a CUDA graph refused) says why in it."""
    try:
        return _measure(name, device, args)
    except Exception as error:  # noqa: BLE001 — reported, and the other variants still run
        return {"variant": name, "device": device.type, "error": f"{type(error).__name__}: {error}".splitlines()[0]}
    finally:
        if "compile" in name:
            torch._dynamo.reset()


def _measure(name: str, device: torch.device, args) -> dict:
    """Train one variant for args.steps steps in timed blocks; its throughput, host syncs and test −ELBO."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run, test_neg_elbo, info = VARIANTS[name](device, args)
    blocks, done, syncs = [], 0, None
    start = time.perf_counter()
    while done < args.steps:
        n = min(args.block, args.steps - done)
        if len(blocks) == 1 and syncs is None and device.type == "cuda":  # after the warm-up: one block counted
            syncs = host_syncs(run, n, device)
            done += n
            continue
        _sync(device)
        t = time.perf_counter()
        run(n)
        _sync(device)
        blocks.append((n, time.perf_counter() - t))
        done += n
    train_s = time.perf_counter() - start
    timed = blocks[1:] or blocks  # the first block warms up (and compiles)
    per_step = statistics.median(s / n for n, s in timed)
    result = {"variant": name, "device": device.type, **info, "batch_size": args.batch_size, "steps": args.steps,
              "images_per_s": args.batch_size / per_step, "ms_per_step": 1e3 * per_step,
              "first_block_s": blocks[0][1], "train_s": train_s, "host_syncs_per_step": syncs,
              "test_neg_elbo": test_neg_elbo()}
    if device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


# --------------------------------------------------------------------------- output


def table(result: dict) -> str:
    rows = result["rows"]
    reference = result.get("cpu_reference") or {}
    plain = next((r for r in rows if r["variant"] == "plain" and "error" not in r), None)
    header = ("variant", "img/s", "ms/step", "vs plain", "syncs/step", "test −ELBO", "vs CPU aevb")
    lines, out = [], []
    separate = bool(reference) and reference.get("device") != result["device"]  # on the CPU: the aevb row itself
    for r in [*rows, *([reference] if separate else [])]:
        name = r["variant"] + (" (cpu reference)" if separate and r is reference else "")
        if "error" in r:
            out.append((name, r["error"][:70], "", "", "", "", ""))
            continue
        ratio = f"{r['images_per_s'] / plain['images_per_s']:.2f}×" if plain and r["device"] == plain["device"] else ""
        syncs = "—" if r.get("host_syncs_per_step") is None else f"{r['host_syncs_per_step']:.3f}"
        gap = (f"{r['test_neg_elbo'] - reference['test_neg_elbo']:+.2f}"
               if reference and "error" not in reference and not (separate and r is reference) else "")
        out.append((name, f"{r['images_per_s']:,.0f}", f"{r['ms_per_step']:.3f}", ratio, syncs,
                    f"{r['test_neg_elbo']:.2f}", gap))
    widths = [max(len(str(row[i])) for row in (header, *out)) for i in range(len(header))]
    lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    lines.append("  ".join("-" * w for w in widths))
    for row in out:
        lines.append("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", help="comma-separated names (default: all; on the CPU all but the compiled)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3000, help="training steps of each variant")
    parser.add_argument("--block", type=int, default=100, help="steps in a timed block")
    parser.add_argument("--cpu-steps", type=int, help="steps of the CPU reference (default --steps; 0: none)")
    parser.add_argument("--tiny", action="store_true", help="batch 64, 6 steps in blocks of 2: checks that it runs")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--report", help="print the table of an earlier run's JSON and stop")
    args = parser.parse_args(argv)
    if args.report:
        result = json.loads(Path(args.report).read_text())
        print(table(result))
        return result
    if args.tiny:
        args.batch_size, args.steps, args.block = 64, 6, 2
    device = torch.device(args.device)
    names = args.variants.split(",") if args.variants else [n for n in VARIANTS if device.type == "cuda" or n not in COMPILED]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; the variants are {list(VARIANTS)}")
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device.type, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
              "tf32": torch.backends.cuda.matmul.allow_tf32, "batch_size": args.batch_size, "steps": args.steps,
              "block": args.block, "rows": []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(f"{name} on {device.type} …", file=sys.stderr, flush=True)
        result["rows"].append(measure(name, device, args))
        Path(args.out).write_text(json.dumps(result, indent=1))  # what is done survives a timeout
    cpu_steps = args.steps if args.cpu_steps is None else args.cpu_steps
    if device.type != "cpu" and cpu_steps:
        print("aevb on cpu (reference) …", file=sys.stderr, flush=True)
        reference_args = argparse.Namespace(**{**vars(args), "steps": cpu_steps})
        result["cpu_reference"] = measure("aevb", torch.device("cpu"), reference_args)
    elif device.type == "cpu":  # the aevb row is the CPU's own
        result["cpu_reference"] = next((r for r in result["rows"] if r["variant"] == "aevb"), None)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"single-device bench, {result['date']}, {result['gpu'] or result['cpu']}, torch {result['torch']}, "
          f"batch {args.batch_size}, {args.steps} steps a variant (blocks of {args.block})\n")
    print(table(result))
    print(f"written to {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
