"""KL weight schedules β(step): constant, linear warm-up and cyclical annealing.

Every entry is a function ``schedule(step, *, beta, warmup, cycles, ratio,
total_steps) -> float`` giving the KL weight of optimiser step ``step``
(0-based); :func:`make_schedule` binds the run's options.  Register a new
schedule with ``@SCHEDULES.register("name")``.

* ``constant``: β at every step.
* ``linear``: β·min(1, step / warmup), the KL warm-up of Bowman et al. 2016
  and Sønderby et al. 2016 (constant when warmup is 0).
* ``cyclical``: Fu et al. 2019 ("Cyclical annealing schedule", NAACL): the
  run's ``total_steps`` are cut into ``cycles`` cycles of ⌈total/cycles⌉
  steps; in each cycle β rises linearly from 0 to β over the first ``ratio``
  of the cycle and stays at β for the rest.
"""

from __future__ import annotations

import math
from typing import Callable

from aevb.errors import UserError
from aevb.registry import SCHEDULES


@SCHEDULES.register("constant")
def constant(step: int, *, beta: float, **_) -> float:
    return beta


@SCHEDULES.register("linear")
def linear(step: int, *, beta: float, warmup: int = 0, **_) -> float:
    return beta * min(1.0, step / warmup) if warmup else beta


@SCHEDULES.register("cyclical")
def cyclical(step: int, *, beta: float, cycles: int = 4, ratio: float = 0.5, total_steps: int = 1, **_) -> float:
    period = max(1, math.ceil(total_steps / cycles))
    tau = (step % period) / period  # position in the cycle, [0, 1)
    return beta * min(1.0, tau / ratio)


def make_schedule(name: str, *, beta: float, warmup: int = 0, cycles: int = 4, ratio: float = 0.5,
                  total_steps: int = 1) -> Callable[[int], float]:
    """β(step) for the named schedule with these options bound."""
    if cycles < 1 or not 0 < ratio <= 1:
        raise UserError(f"a cyclical schedule needs --beta-cycles ≥ 1 and 0 < --beta-ratio ≤ 1, "
                        f"got {cycles} and {ratio}")
    function = SCHEDULES.get(name)
    return lambda step: float(function(step, beta=beta, warmup=warmup, cycles=cycles, ratio=ratio,
                                       total_steps=total_steps))
