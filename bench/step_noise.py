"""The single-process training step with the step's noise drawn as issue 32 draws it, against the draw before.

    .venv/bin/python bench/step_noise.py [--rounds 7] [--steps 50] [--batch-size 128] [--out FILE.json]

Since issue 32 (one run across processes) the trainer draws each step's
noise (reparameterisation, dynamic binarisation) from a generator reseeded
by (seed, step), inside ``aevb.model.noise.batch_rows``, so that 1 process
and N give the same training.  "before" is the step as it was: the same
batch, binarised with ``torch.bernoulli`` and the loss drawn from torch's
global generator.  Both are the MNIST-shaped MLP VAE (784-400-20, Bernoulli,
the fused loss the trainer picks) with fused Adam, at batch 128, timed in
interleaved blocks of ``--steps`` steps after a warm-up; the median of each
and their ratio are printed.  Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import aevb
from aevb.acceleration import fused
from aevb.acceleration.optim import Adam
from aevb.model import noise
from aevb.training.distributed import seed_step, step_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = aevb.VAE(data_shape=(1, 28, 28), latent_dim=20, arch="mlp", hidden=[400])
    plan = fused.plan(model)
    optimizer = Adam(model.parameters(), lr=1e-3)
    data = torch.rand(60 * args.batch_size, 1, 28, 28)
    generator = step_generator(torch.device("cpu"))
    b = args.batch_size

    def step(x: torch.Tensor) -> None:
        out = fused.vae_loss(model, x, 1.0, plan)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    def before(i: int) -> None:
        step(torch.bernoulli(data[(i % 60) * b:(i % 60 + 1) * b]))

    def after(i: int) -> None:
        with noise.batch_rows(seed_step(generator, 0, i), 0, b, b):
            x = data[(i % 60) * b:(i % 60 + 1) * b]
            step((noise.rand(x.shape, 0, dtype=x.dtype) < x).to(x.dtype))

    def block(run) -> float:
        start = time.perf_counter()
        for i in range(args.steps):
            run(i)
        return (time.perf_counter() - start) / args.steps

    block(before), block(after)  # warm-up
    times = {"before": [], "after": []}
    for _ in range(args.rounds):
        times["before"].append(block(before))
        times["after"].append(block(after))
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {**{f"{k}_ms_per_step": 1e3 * v for k, v in medians.items()},
              "after_over_before": medians["after"] / medians["before"], "threads": torch.get_num_threads(),
              "batch_size": b}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
