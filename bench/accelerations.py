"""Each acceleration of aevb.acceleration (and of the layers) against the same step without it, side by side.

    .venv/bin/python bench/accelerations.py [--rounds 7] [--steps 20] [--out bench/results/accelerations.json]

An acceleration stays in aevb only while it makes the step it targets at least
1.05× faster (issue 28): this prints, for each, the median time of that step
with and without it over interleaved rounds in one process (blocks of
``--steps`` steps, alternating, after a warm-up), and their ratio.

| acceleration | target | off |
|---|---|---|
| fused VAE loss (acceleration.fused) | MNIST MLP VAE training step, batch 128, at the precision ``--precision auto`` takes here (and fp32) | model.loss |
| fused Adam (acceleration.optim) | the same step | torch.optim.Adam(foreach=True), the fallback |
| aevb's conv layers, float32 | MNIST conv VAE step, batch 128 | torch's nn.Conv2d / nn.ConvTranspose2d |
| bf16 multiplies (where native) | MLP and conv steps | float32 |
| weight gradient by multiply (bf16) | conv step in bf16 | oneDNN's kernel |
| subnormals flushed (acceleration.runtime) | MLP step after 1,000 steps of training | flushing off |
| freed memory kept (acceleration.runtime) | importance sampling, k = 1000, 100 images | glibc's defaults (own processes) |

Run it on an idle machine: nothing else may compete for the cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import load_mnist  # noqa: E402

import aevb  # noqa: E402
from aevb.acceleration import fused, optim, runtime  # noqa: E402
from aevb.acceleration.bf16 import bf16_is_native, resolve_precision  # noqa: E402
from aevb.model import layers  # noqa: E402
from aevb.model.precision import matmul_dtype  # noqa: E402

BATCH = 128


def _model(arch: str):
    torch.manual_seed(0)
    return aevb.VAE(data_shape=(1, 28, 28), latent_dim=20, arch=arch, likelihood="bernoulli")


class Step:
    """One training step of ``model`` on resident MNIST: loss, backward, optimiser step."""

    def __init__(self, model, x_train, loss="model", adam="aevb", dtype=None):
        self.model, self.x, self.dtype = model, x_train, dtype
        plan = fused.plan(model) if loss == "fused" else None
        if loss == "fused" and plan is None:
            raise ValueError("the fused loss does not compute this model")
        self.loss = (lambda x: fused.vae_loss(model, x, model.beta, plan)) if plan else model.loss
        self.optimizer = (optim.Adam(model.parameters(), lr=1e-3) if adam == "aevb"
                          else torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True))
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self) -> None:
        index = torch.randint(0, self.x.shape[0], (BATCH,), generator=self.generator)
        x = torch.bernoulli(self.x.index_select(0, index), generator=self.generator)
        with matmul_dtype(self.dtype):
            out = self.loss(x)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()


def _block(step, steps: int, context=nullcontext) -> float:
    with context():
        for _ in range(3):  # settle
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps


def compare(on, off, rounds: int, steps: int, context_on=nullcontext, context_off=nullcontext) -> dict:
    """Median ms per step of ``on`` and ``off`` (callables), interleaved over ``rounds``."""
    times = {"on": [], "off": []}
    for i in range(rounds):
        pairs = [("on", on, context_on), ("off", off, context_off)]
        for name, step, context in (pairs if i % 2 == 0 else pairs[::-1]):
            times[name].append(_block(step, steps, context))
    on_ms, off_ms = (1e3 * statistics.median(times[k]) for k in ("on", "off"))
    return {"on_ms": on_ms, "off_ms": off_ms, "speedup": off_ms / on_ms}


def _torch_layers(model):
    """The same model with torch's own convolution classes (same parameters, same state dict)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if type(module) is layers.Conv2d:
            module.__class__ = nn.Conv2d
        elif type(module) is layers.ConvTranspose2d:
            module.__class__ = nn.ConvTranspose2d
    return model


@contextmanager
def _no_weight_grad_by_matmul():
    real = layers.weight_grad_by_matmul
    layers.weight_grad_by_matmul = lambda *args: False
    try:
        yield
    finally:
        layers.weight_grad_by_matmul = real


def _trained_state(x_train, steps: int = 1000):
    """An MLP VAE after ``steps`` steps without flushing: its border-pixel gradients and moments are subnormal."""
    model = _model("mlp")
    model.init_output_bias(x_train.mean(0))
    step = Step(model, x_train, loss="fused")
    for _ in range(steps):
        step()
    return step


def _restoring(step):
    """``step`` restarted from the same weights and optimiser state before each block (flushing changes them)."""
    model_state = copy.deepcopy(step.model.state_dict())
    optim_state = copy.deepcopy(step.optimizer.state_dict())

    def restored():
        step.model.load_state_dict(model_state)
        step.optimizer.load_state_dict(optim_state)
        step.generator.manual_seed(0)
    return restored


def denormals(x_train, rounds: int, steps: int, trained_steps: int) -> dict:
    step = _trained_state(x_train, trained_steps)
    restore = _restoring(step)
    times = {"on": [], "off": []}
    for i in range(rounds):
        for name in (("on", "off") if i % 2 == 0 else ("off", "on")):
            restore()
            context = runtime.denormals_flushed if name == "on" else nullcontext
            times[name].append(_block(step, steps, context))
    on_ms, off_ms = (1e3 * statistics.median(times[k]) for k in ("on", "off"))
    return {"on_ms": on_ms, "off_ms": off_ms, "speedup": off_ms / on_ms}


def _sampling_seconds(keep: bool) -> float:
    """Seconds of an importance-sampled evaluation (k = 1000, 100 images) in a fresh process."""
    code = f"""
import time, torch, aevb
from aevb.acceleration import runtime
if {keep}:
    runtime.keep_freed_memory()
torch.manual_seed(0)
model = aevb.VAE(data_shape=(1, 28, 28), latent_dim=20, arch="mlp").eval()
x = torch.rand(100, 1, 28, 28).round()
start = time.perf_counter()
with runtime.denormals_flushed():
    model.log_likelihood(x, n_samples=1000)
print(time.perf_counter() - start)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def freed_memory(rounds: int) -> dict:
    times = {"on": [], "off": []}
    for i in range(rounds):
        for name in (("on", "off") if i % 2 == 0 else ("off", "on")):
            times[name].append(_sampling_seconds(name == "on"))
    on_ms, off_ms = (1e3 * statistics.median(times[k]) / 100 for k in ("on", "off"))  # per image
    return {"on_ms": on_ms, "off_ms": off_ms, "speedup": off_ms / on_ms, "unit": "ms per image"}


def suite(rounds: int, steps: int, trained_steps: int = 1000) -> dict:
    x_train = load_mnist()[0]
    results = {}

    def mlp(**kwargs):
        model = _model("mlp")
        model.init_output_bias(x_train.mean(0))
        return Step(model, x_train, **kwargs)

    # at the precision aevb train takes on this machine (--precision auto), and in float32 where that is bf16
    auto = resolve_precision("auto", torch.device("cpu"))
    precisions = [auto] + ([None] if auto is not None else [])
    for dtype in precisions:
        name = "bf16" if dtype is not None else "fp32"
        results[f"fused VAE loss (MLP step, {name})"] = compare(mlp(loss="fused", dtype=dtype),
                                                               mlp(loss="model", dtype=dtype), rounds, steps)
    results[f"fused Adam (MLP step, {'bf16' if auto is not None else 'fp32'})"] = compare(
        mlp(loss="fused", dtype=auto), mlp(loss="fused", adam="torch", dtype=auto), rounds, steps)
    conv = _model("conv")
    results["aevb conv layers, fp32 (conv step)"] = compare(
        Step(conv, x_train), Step(_torch_layers(conv), x_train), rounds, max(5, steps // 2))
    if bf16_is_native(torch.device("cpu")):
        bf16 = torch.bfloat16
        results["bf16 multiplies (MLP step)"] = compare(mlp(loss="fused", dtype=bf16), mlp(loss="fused"), rounds, steps)
        results["bf16 multiplies (conv step)"] = compare(
            Step(_model("conv"), x_train, dtype=bf16), Step(_model("conv"), x_train), rounds, max(5, steps // 2))
        results["weight gradient by multiply (conv step, bf16)"] = compare(
            Step(_model("conv"), x_train, dtype=bf16), Step(_model("conv"), x_train, dtype=bf16), rounds,
            max(5, steps // 2), context_off=_no_weight_grad_by_matmul)
    results[f"subnormals flushed (MLP step after {trained_steps:,} steps)"] = denormals(x_train, rounds, steps, trained_steps)
    results["freed memory kept (importance sampling)"] = freed_memory(max(3, rounds // 2))
    return results


def table(results: dict) -> str:
    lines = ["| acceleration (target) | with, ms | without, ms | speed-up | ≥ 1.05× |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['on_ms']:.2f} | {r['off_ms']:.2f} | {r['speedup']:.3f}× | "
                     f"{'yes' if r['speedup'] >= 1.05 else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--trained-steps", type=int, default=1000, help="steps before the subnormal comparison")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability {cpu}, "
          f"native bf16: {bf16_is_native(torch.device('cpu'))}", flush=True)
    results = suite(args.rounds, args.steps, args.trained_steps)
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
