"""Learning-rate schedules (``--lr-schedule``, ``--lr-warmup``): torch's schedulers, stepped by the loop.

* ``constant``, ``cosine`` (Loshchilov & Hutter 2017, to 0 at the last step)
  and ``step`` (×0.1 at 50% and 75% of the steps): one ``LambdaLR`` whose
  factor of step s rises linearly over the first ``warmup`` steps, then
  follows the schedule over the rest; stepped after every optimiser step.
* ``one-cycle``: ``OneCycleLR`` (Smith & Topin 2019) peaking at ``--lr``
  after ``warmup`` steps (30% of the run by default); every step.
* ``plateau``: ``ReduceLROnPlateau`` on the validation −ELBO, ×0.5 after 2
  epochs without a better one; stepped at each epoch's end.

The scheduler's ``state_dict`` goes into the checkpoint, so a resumed run
follows the same learning rates bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

from aevb.config import RunConfig
from aevb.errors import UserError


def _factor(schedule: str, warmup: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of --lr at step s (0-based) for constant, cosine and step, with a linear warm-up."""
    rest = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / rest)  # [0, 1] over the steps after the warm-up
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "step":
            return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
        return 1.0

    return factor


@dataclass
class LRSchedule:
    """The run's scheduler and when it steps: after every optimiser step, or at each epoch's end on a loss."""

    scheduler: LRScheduler | ReduceLROnPlateau
    per_epoch: bool  # plateau: stepped with the validation loss at each epoch's end

    def after_step(self) -> None:
        if not self.per_epoch:
            self.scheduler.step()

    def after_epoch(self, loss: float | None) -> None:
        if self.per_epoch and loss is not None:
            self.scheduler.step(loss)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


def make_lr_schedule(optimizer: torch.optim.Optimizer, config: RunConfig, total_steps: int,
                     has_validation: bool) -> LRSchedule | None:
    """The scheduler of ``config.lr_schedule`` over ``total_steps`` steps, with ``config.lr_warmup``.

    None for a constant rate without warm-up: the default step then runs no
    scheduler at all, as before there was a choice.
    """
    schedule, warmup = config.lr_schedule, config.lr_warmup
    if schedule == "constant" and not warmup:
        return None
    if schedule == "plateau":
        if warmup:
            raise UserError("--lr-schedule plateau lowers the rate when the validation ELBO stalls and has no "
                            "warm-up: drop --lr-warmup, or use cosine or one-cycle")
        if not has_validation:
            raise UserError("--lr-schedule plateau watches the validation ELBO, and the run has no validation "
                            "split: add --val-split (0.1: a tenth of the examples), never the test set")
        return LRSchedule(ReduceLROnPlateau(optimizer, factor=0.5, patience=2), per_epoch=True)
    if schedule == "one-cycle":
        if warmup >= total_steps:
            raise UserError(f"--lr-warmup {warmup} is not shorter than the run's {total_steps} steps; "
                            f"give fewer warm-up steps")
        start = warmup / total_steps if warmup else 0.3
        return LRSchedule(OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=start,
                                     cycle_momentum=False), per_epoch=False)
    return LRSchedule(LambdaLR(optimizer, _factor(schedule, warmup, total_steps)), per_epoch=False)
