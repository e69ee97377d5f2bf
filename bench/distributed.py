"""N processes of C/N threads against 1 process of C threads: the same training, the same global batch.

    .venv/bin/python bench/distributed.py [--processes 2] [--cores C] [--arch mlp,conv] [--rounds 3]
                                          [--blocks 5] [--steps 40] [--batch-size 128] [--precision fp32]
                                          [--out bench/results/distributed.json]

On a machine of C cores, ``torchrun --nproc_per_node N`` (gloo) runs the
library's training step (``bench/trainer_steps.py``: ``Trainer.step`` and
its records, DistributedDataParallel as ``aevb train`` wraps it) with C/N
torch threads a process, against one process with C threads, at the same
global batch: the same model, the same data, the same updates (issue 32:
the result does not depend on the number of workers).  Printed and written
as JSON:

* img/s — global batch × steps ÷ wall time of a block of ``--steps`` steps,
  from a barrier before it to a barrier after it on rank 0 (so the slowest
  rank counts); the median over the blocks of every round.
* efficiency — N-process img/s ÷ 1-process img/s (1.0: as fast; N would be
  perfect scaling only if the 1-process run used one core).
* all-reduce share — (ms/step with gradient sync − ms/step without it) ÷
  ms/step with it: the blocks alternate between DDP's ordinary step and the
  same step under ``no_sync()`` (the gradients stay local; the ranks then
  drift apart, which changes no amount of work).  This is the exposed cost
  of the gradient all-reduce: what it adds to the step beyond what overlaps
  with the backward pass, reducer bookkeeping included.  "all-reduce alone"
  is the median time of one ``dist.all_reduce`` of a float32 buffer as large
  as the gradients (one DDP bucket for these models) in the same processes.

The 1-process and N-process runs alternate, ``--rounds`` of each, every one
in fresh processes; inside a run, the blocks alternate too.  ``--precision``
is fp32 by default: ``auto`` times a multiply in each process and could take
bf16 with C threads and fp32 with C/N, which would compare two arithmetics.
Run it on an idle machine; the load average at the start and end is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

DEFAULT_OUT = BENCH / "results" / "distributed.json"


# --------------------------------------------------------------------------- one run (1 process, or each torchrun worker)


def worker(args: argparse.Namespace) -> None:
    import torch
    from torch import distributed as dist

    torch.set_num_threads(args.threads)
    from trainer_steps import TrainerSteps, bench_config

    from aevb.training import distributed

    device = torch.device("cpu")
    workers = distributed.start(device)
    try:
        config = bench_config(args.arch, args.batch_size, precision=args.precision, device="cpu")
        steps = TrainerSteps(config, device, workers)
        model = steps.model
        n_grad = sum(p.numel() for p in model.parameters() if p.requires_grad)

        def block(sync: bool) -> float:
            distributed.barrier(workers)
            start = time.perf_counter()
            with nullcontext() if sync else steps.loss_of.no_sync():
                steps.run(args.steps)
            distributed.barrier(workers)
            return time.perf_counter() - start

        variants = [True, False] if workers.distributed else [True]
        for sync in variants:  # warm-up: the first steps allocate, DDP builds its buckets
            block(sync)
        seconds: dict[str, list[float]] = {"sync": [], "no_sync": []}
        for _ in range(args.blocks):
            for sync in variants:
                seconds["sync" if sync else "no_sync"].append(block(sync))
        allreduce_ms = None
        if workers.distributed:
            buffer = torch.zeros(n_grad)
            times = []
            for i in range(25):
                distributed.barrier(workers)
                start = time.perf_counter()
                dist.all_reduce(buffer)
                times.append(time.perf_counter() - start)
            allreduce_ms = 1e3 * statistics.median(times[5:])
        if workers.writes:
            result = {"arch": args.arch, "data": Path(steps.data.dataset.name).name, "data_shape": list(steps.data.dataset.data_shape),
                      "train_examples": steps.data.examples, "processes": workers.world_size,
                      "threads": torch.get_num_threads(), "batch_size": args.batch_size, "steps": args.steps,
                      "precision": "fp32" if steps.step_dtype is None else str(steps.step_dtype).replace("torch.", ""),
                      "loss": steps.loss_name, "gradient_elements": n_grad,
                      "seconds": {k: v for k, v in seconds.items() if v}, "allreduce_alone_ms": allreduce_ms}
            Path(args.result).write_text(json.dumps(result))
    finally:
        distributed.stop(workers)


# --------------------------------------------------------------------------- the parent: rounds of 1 and N processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(arch: str, processes: int, threads: int, args: argparse.Namespace) -> dict:
    """One run in fresh processes (torchrun for more than one); rank 0's result, or {"error": …}."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        own = [str(Path(__file__).resolve()), "--worker", "--arch", arch, "--threads", str(threads),
               "--steps", str(args.steps), "--blocks", str(args.blocks), "--batch-size", str(args.batch_size),
               "--precision", args.precision, "--result", str(result)]
        if processes == 1:
            command = [sys.executable, *own]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                       "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *own]
        source = str(BENCH.parent / "src")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)}
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.timeout} s"}
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-4:]
            return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
        return json.loads(result.read_text())


def summarise(runs: list[dict], batch_size: int, steps: int) -> dict:
    """Medians over every block of every run of one setup."""
    blocks = {k: [s for run in runs for s in run["seconds"].get(k, [])] for k in ("sync", "no_sync")}
    out = {"runs": len(runs), "blocks": len(blocks["sync"])}
    for kind, seconds in blocks.items():
        if seconds:
            median = statistics.median(seconds)
            out[f"ms_per_step_{kind}"] = 1e3 * median / steps
            out[f"images_per_s_{kind}"] = batch_size * steps / median
    alone = [run["allreduce_alone_ms"] for run in runs if run.get("allreduce_alone_ms") is not None]
    if alone:
        out["allreduce_alone_ms"] = statistics.median(alone)
    if "ms_per_step_no_sync" in out:
        out["allreduce_share"] = 1 - out["ms_per_step_no_sync"] / out["ms_per_step_sync"]
    return out


def compare(runs: dict[str, list[dict]], errors: dict[str, str], batch_size: int, steps: int) -> dict:
    """One model's entry: the 1-process ("one") and N-process ("many") summaries, the efficiency, the raw runs."""
    entry: dict = {kind: ({"error": errors[kind]} if kind in errors else summarise(runs[kind], batch_size, steps))
                   for kind in ("one", "many")}
    if runs["one"]:
        info = runs["one"][0]
        entry["info"] = {k: info[k] for k in ("data", "data_shape", "train_examples", "precision", "loss",
                                              "gradient_elements")}
    if "error" not in entry["one"] and "error" not in entry["many"]:
        entry["efficiency"] = entry["many"]["images_per_s_sync"] / entry["one"]["images_per_s_sync"]
    entry["raw"] = runs
    return entry


def table(result: dict) -> str:
    lines = []
    for arch, entry in result["archs"].items():
        one, many = entry["one"], entry["many"]
        info = entry.get("info", {})
        n, c = result["processes"], result["cores"]
        lines.append(f"{arch} VAE {info.get('data_shape')} on {info.get('data')} ({info.get('train_examples')} "
                     f"training examples), global batch {result['batch_size']}, {info.get('precision')}, "
                     f"loss {info.get('loss')}, {info.get('gradient_elements')} gradient elements")
        header = ("setup", "img/s", "ms/step", "efficiency", "all-reduce share", "all-reduce alone")
        rows = []
        if "error" in one or "error" in many:
            rows.append((f"error: {one.get('error') or many.get('error')}", "", "", "", "", ""))
        else:
            rows.append((f"1 process × {c} threads", f"{one['images_per_s_sync']:.0f}", f"{one['ms_per_step_sync']:.2f}",
                         "1.00×", "—", "—"))
            rows.append((f"{n} processes × {c // n} thread{'s' if c // n > 1 else ''}",
                         f"{many['images_per_s_sync']:.0f}", f"{many['ms_per_step_sync']:.2f}",
                         f"{entry['efficiency']:.2f}×", f"{many['allreduce_share']:.1%}",
                         f"{many['allreduce_alone_ms']:.3f} ms"))
            rows.append((f"{n} processes, no_sync (no all-reduce)", f"{many['images_per_s_no_sync']:.0f}",
                         f"{many['ms_per_step_no_sync']:.2f}",
                         f"{many['images_per_s_no_sync'] / one['images_per_s_sync']:.2f}×", "", ""))
        widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
        lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
        lines.append("  ".join("-" * w for w in widths))
        for r in rows:
            lines.append("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                                   for i, (v, w) in enumerate(zip(r, widths))))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--arch", default="mlp,conv", help="comma-separated: mlp, conv")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setup, alternating")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks in each run (each kind)")
    parser.add_argument("--steps", type=int, default=40, help="steps in a block")
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    parser.add_argument("--timeout", type=int, default=900, help="seconds a run may take")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--report", help="print the table of an earlier run's JSON and stop")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.report:
        print(table(json.loads(Path(args.report).read_text())))
        return
    if args.cores % args.processes:
        parser.error(f"--cores {args.cores} is not a multiple of --processes {args.processes}")
    import torch

    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "processes": args.processes, "cores": args.cores,
              "batch_size": args.batch_size, "steps_per_block": args.steps, "blocks": args.blocks,
              "rounds": args.rounds, "precision": args.precision, "loadavg_start": os.getloadavg()[0], "archs": {}}
    for arch in args.arch.split(","):
        runs: dict[str, list[dict]] = {"one": [], "many": []}
        errors: dict[str, str] = {}
        for r in range(args.rounds):
            for kind, processes in (("one", 1), ("many", args.processes)):
                print(f"{arch}: round {r + 1}/{args.rounds}, {processes} process(es) × "
                      f"{args.cores // processes} thread(s)", file=sys.stderr, flush=True)
                run = launch(arch, processes, args.cores // processes, args)
                if "error" in run:
                    errors[kind] = run["error"]
                else:
                    runs[kind].append(run)
        entry = compare(runs, errors, args.batch_size, args.steps)
        result["archs"][arch] = entry
    result["loadavg_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"distributed bench, {result['date']}, {result['machine']}, torch {result['torch']}; {args.cores} cores; "
          f"load average {result['loadavg_start']:.2f} → {result['loadavg_end']:.2f}; {args.rounds} rounds × "
          f"{args.blocks} blocks of {args.steps} steps\n")
    print(table(result))
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
