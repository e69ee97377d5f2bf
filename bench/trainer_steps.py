"""The library's training step as ``aevb train`` takes it, without a run folder: for the benches that time it.

``bench/distributed.py`` and ``bench/gpu.py`` time :meth:`TrainerSteps.run`:
the trainer's own :meth:`aevb.training.loop.Trainer.step` and ``after_step``
(the data path from batch to loss, the step's noise, the optimiser, and a
metrics record every ``log_every`` steps with its one read-back, reduced
over the workers under torchrun) over the epochs' shuffled batches, as
``Trainer._run_epochs`` runs them.  Left out: what an epoch's end does
(validation, checkpoint, pictures) and the progress bar.  The model, its
loss (fused or compiled), the optimiser, the multiplies' dtype and
DistributedDataParallel come from the functions ``aevb.training.train``
calls, so the benches time what users run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common import MNIST_IMAGES, MNIST_LABELS, N_TEST

from aevb.acceleration import fused
from aevb.acceleration.runtime import denormals_flushed, keep_freed_memory
from aevb.config import RunConfig, make_config
from aevb.model.base import build_model
from aevb.run.checkpoints import Position
from aevb.training import distributed
from aevb.training.data import TrainingData
from aevb.training.distributed import Workers
from aevb.training.accelerations import make_loss, make_optimizer, step_precision
from aevb.training.loop import Trainer
from aevb.training.metrics import NoLog
from aevb.training.validation import mean_elbo_terms


def bench_config(arch: str = "mlp", batch_size: int = 128, **options) -> RunConfig:
    """The benchmark's run: the MLP (784-400-20) or conv VAE, Bernoulli, Adam 1e-3, on the MNIST split (the first
    8,000 test images train, the last 2,000 test) where ``../shared/data/mnist`` holds it, else the bundled digits."""
    data = (dict(data=str(MNIST_IMAGES), labels=str(MNIST_LABELS), test_split=N_TEST) if MNIST_IMAGES.exists()
            else dict(data="digits"))
    return make_config(**data, arch=arch, latent_dim=20, batch_size=batch_size, lr=1e-3, val_split=0, seed=0,
                       **options)


class TrainerSteps:
    """A :class:`~aevb.training.loop.Trainer` on ``config``'s data and model, stepped without a run folder."""

    def __init__(self, config: RunConfig, device: torch.device, workers: Workers = Workers()):
        keep_freed_memory()  # as train() does
        torch.manual_seed(config.seed)
        self.workers = workers
        data = TrainingData.load(config, device, workers=workers)  # each worker its rows of every batch
        model_kwargs = config.model_kwargs(data.dataset.data_shape)
        model = build_model(config.model, **model_kwargs).to(device)
        if config.output_bias == "data-mean":
            model.init_output_bias(data.mean_example())
        optimizer = make_optimizer(model, config, device)
        # which loss the trainer took (its choice, make_loss), said in the benches' tables
        self.loss_name = "compiled" if config.compile else "fused" if fused.plan(model) is not None else "model.loss"
        self.loss_of = distributed.data_parallel(model, make_loss(model, config, device), device, workers)
        step_dtype = distributed.from_rank0(workers, step_precision(config, device, None))
        self.trainer = Trainer(config=config, run_dir=Path("/nonexistent"), model=model, optimizer=optimizer,
                               loss_of=self.loss_of, data=data, position=Position(),
                               shuffle=torch.Generator().manual_seed(config.seed), step_dtype=step_dtype,
                               model_kwargs=model_kwargs, folder=None, workers=workers)
        self.trainer.log, self.trainer.bar = NoLog(), None
        self.model, self.data, self.step_dtype = model, data, step_dtype
        self._batches = None

    def run(self, steps: int) -> None:
        """``steps`` optimiser steps, a new shuffled epoch wherever one ends (its end-of-epoch work left out)."""
        trainer, position = self.trainer, self.trainer.position
        with denormals_flushed():
            for _ in range(steps):
                if position.perm is None or position.batch >= trainer.steps_per_epoch:
                    position.perm = torch.randperm(self.data.examples, generator=trainer.shuffle)
                    position.batch = 0
                    self._batches = self.data.batches(position.perm, 0, trainer.config.batch_size)
                trainer.step(next(self._batches))
                trainer.after_step(stop=False)

    def test_neg_elbo(self, seed: int = 0) -> float:
        """Mean −ELBO (one sample, nats, float32) of the test split, with torch's generator seeded by ``seed``."""
        torch.manual_seed(seed)
        return -mean_elbo_terms(self.model, self.data.eval_x, self.trainer.config.eval_batch_size)["elbo"]
