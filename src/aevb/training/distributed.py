"""One run across processes: ``torchrun … aevb train`` trains one model with DistributedDataParallel.

torchrun starts the workers and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`start` joins them into one process
group (gloo on the CPU, NCCL on CUDA).  Two timeouts end a run that would
otherwise hang: joining (``--join-timeout``, 2 minutes: the workers start
together, so one missing by then stopped before it joined, and the others
say so instead of waiting) and each collective afterwards (:data:`TIMEOUT`:
a worker that died mid-run; torchrun restarts the group sooner where it
sees the death).  Without torchrun, or with one worker, nothing here runs a
collective: the run is the single-process run.

World-size independence, the design: the same configuration trains the same
model on 1 process or on N, to float rounding.

- ``--batch-size`` is the global batch.  Every rank draws the same order of
  the whole data set each epoch (the shuffle generator, seeded by ``--seed``,
  is the same on every rank) and takes its contiguous share of each global
  batch of b examples: rank r of W takes rows ``r·b//W : (r+1)·b//W``
  (:meth:`Workers.rows`).  A batch that would leave a rank without an example
  is refused (:func:`check_shares`).
- The noise of a step is drawn for the whole global batch from a generator
  seeded by (seed, step) (:func:`step_generator`), and each rank uses its
  rows of it (:mod:`aevb.model.noise`): the reparameterisation noise, IWAE
  samples, a denoising AE's corruption, dynamic binarisation and
  dequantisation are then the same for an example wherever it is computed.
  The single-process run draws the same way (one rank, all the rows).
- DDP averages the ranks' gradients; each rank's loss is the mean over its
  rows, so rank r scales its loss by W·b_r/b (:meth:`Workers.share`) and the
  average is the gradient of the global batch's mean even where the last
  batch of an epoch splits unevenly.
- The logged terms are weighted by b_r/b and summed over the ranks before
  they are written (:func:`all_sum`); validation runs on every rank with the
  same random state and gives the same numbers; rank 0 alone writes the run
  folder (metrics, pictures, checkpoints, the exported model).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
from torch import distributed as dist
from torch import nn

from aevb.errors import UserError

TIMEOUT = timedelta(minutes=10)  # of every collective: a worker that died ends the run, not hangs it


@dataclass(frozen=True)
class Workers:
    """This process's place among the run's workers; one worker of one is the single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    joined: bool = False  # whether start() made the process group (and stop() ends it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def writes(self) -> bool:
        """Whether this process writes the run folder (rank 0)."""
        return self.rank == 0

    def rows(self, batch: int) -> tuple[int, int]:
        """This rank's rows ``start, stop`` of a global batch of ``batch`` examples."""
        return self.rank * batch // self.world_size, (self.rank + 1) * batch // self.world_size

    def share(self, batch: int) -> float:
        """W·b_r/b: what this rank's mean loss is scaled by so that DDP's mean over ranks is the global mean."""
        start, stop = self.rows(batch)
        return self.world_size * (stop - start) / batch


def start(device: torch.device, join_timeout: timedelta = timedelta(minutes=2)) -> Workers:
    """Join torchrun's workers (from its environment variables); a single worker where torchrun did not start us.

    A worker that cannot join them within ``join_timeout`` (one of them
    stopped before, another address or port) stops with a UserError; the
    collectives of the group then wait up to :data:`TIMEOUT`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Workers()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():  # a user's script made the group: use it, leave it to them
        return Workers(dist.get_rank(), dist.get_world_size(), local_rank, joined=False)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # DDP imports torch._dynamo; imported after the group exists, it keeps references to the group that
    # destroy_process_group does not drop, so gloo's worker threads outlive stop() and may free a collective's
    # tensors while the interpreter shuts down: an abort at exit, about one two-worker run in 50 (measured; a
    # core dump showed ~AsyncAllgatherWork taking the GIL in a worker thread during Py_FinalizeEx).  Imported
    # before, the group goes with destroy_process_group and its threads are joined
    importlib.import_module("torch._dynamo")
    try:
        # init_process_group's own env:// rendezvous, but for the prefix: a group that torchrun restarts
        # (--max-restarts) meets in the store the one before it met in, whose keys (its workers' addresses, dead
        # now) are still there; each incarnation keys its own (measured: a restarted worker was refused by the
        # address of the killed one)
        store, rank, world_size = next(dist.rendezvous("env://", rank, world_size, timeout=join_timeout))
        store.set_timeout(join_timeout)
        store = dist.PrefixStore(f"aevb/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/default_pg", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=join_timeout)
    except (RuntimeError, ValueError) as error:
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"worker {rank} of {world_size} could not join the others at "
                        f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
                        f"{join_timeout.total_seconds():g} s (--join-timeout; {cause[:300]}): a worker that stopped "
                        f"before joining says why in its node's log; else check torchrun's --rdzv_endpoint / "
                        f"--master_addr and that every node runs the same command") from None
    # joining is quick, a collective may wait for rank 0 writing a checkpoint or the export: the longer timeout
    _set_timeout(TIMEOUT)
    return Workers(rank, world_size, local_rank, joined=True)


def _set_timeout(timeout: timedelta) -> None:
    """The default group's timeout of its collectives from now on (``dist.set_timeout``; torch before it: the
    private setter it replaced)."""
    setter = getattr(dist, "set_timeout", None)
    if setter is None:
        from torch.distributed.distributed_c10d import _set_pg_timeout as setter
    setter(timeout)


def barrier(workers: Workers) -> None:
    """Wait for every rank (a worker that tore the group down while another still used it aborted at exit)."""
    if workers.distributed:
        dist.barrier()


def stop(workers: Workers) -> None:
    if workers.joined and dist.is_initialized():
        dist.destroy_process_group()


def worker_device(device: torch.device, workers: Workers) -> torch.device:
    """Each worker on a machine takes its own GPU (LOCAL_RANK); CPU workers share the CPU."""
    if workers.distributed and device.type == "cuda":
        return torch.device("cuda", workers.local_rank)
    return device


def check_shares(workers: Workers, examples: int, batch_size: int) -> None:
    """Every batch of an epoch (the last, smaller one too) must give every worker at least one example."""
    last = examples % batch_size
    smallest = min(batch_size, examples) if last == 0 else last
    if smallest < workers.world_size:
        raise UserError(f"a batch of {smallest} examples (--batch-size {batch_size} over {examples} training "
                        f"examples) cannot be shared by {workers.world_size} workers; choose a --batch-size such "
                        f"that every batch, the last of an epoch too, holds at least {workers.world_size} examples")


def agree(workers: Workers, check: Callable[[], Any]) -> Any:
    """``check()`` on every rank; a UserError on any rank is raised on every rank (one message, no rank left waiting)."""
    error = None
    try:
        result = check()
    except UserError as e:
        error, result = str(e), None
    if workers.distributed:
        errors: list[str | None] = [None] * workers.world_size
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise UserError(error)
    return result


def check_same_config(workers: Workers, settings: dict) -> None:
    """Every worker must have been started with the same configuration (``settings``: the run's config as a
    dict): nodes started with other options would train other runs under one name."""
    if not workers.distributed:
        return
    everyone = gathered(workers, settings)
    first = everyone[0]
    differing = sorted({k for other in everyone[1:] for k in set(first) | set(other) if other.get(k) != first.get(k)})
    if differing:
        raise UserError(f"the {workers.world_size} workers were started with different options "
                        f"({', '.join('--' + k.replace('_', '-') for k in differing)}); run the same aevb train "
                        f"command on every node")


def from_rank0(workers: Workers, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if not workers.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(workers: Workers, values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks, in place."""
    if workers.distributed:
        dist.all_reduce(values)
    return values


def gathered(workers: Workers, value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), rank 0's first."""
    if not workers.distributed:
        return [value]
    values: list[Any] = [None] * workers.world_size
    dist.all_gather_object(values, value)
    return values


def step_generator(device: torch.device) -> torch.Generator:
    """The generator of the steps' noise, reseeded at each step by :func:`seed_step`."""
    return torch.Generator(device=device)


def seed_step(generator: torch.Generator, seed: int, step: int) -> torch.Generator:
    """``generator`` seeded by (seed, step): the noise of a step, the same on every rank and after a resume."""
    digest = hashlib.blake2b(f"aevb-step-noise:{seed}:{step}".encode(), digest_size=8).digest()
    return generator.manual_seed(int.from_bytes(digest, "little") & 0xFFFF_FFFF)  # the CPU generator keeps 32 bits


class _Objective(nn.Module):
    """``loss_of(x, beta, label)`` as a module's forward, for DistributedDataParallel to wrap (its gradient hooks
    are armed by a call through its forward).  ``label``: the rank's rows of the global batch's labels (a
    conditional model), taken as its rows of x are, so the labels do not depend on the number of workers."""

    def __init__(self, model: nn.Module, loss_of: Callable):
        super().__init__()
        self.model, self.loss_of = model, loss_of

    def forward(self, x: torch.Tensor, beta: float, label: torch.Tensor | None = None):
        return self.loss_of(x, beta, label)


def data_parallel(model: nn.Module, loss_of: Callable, device: torch.device, workers: Workers) -> Callable:
    """``loss_of`` through DistributedDataParallel: its backward averages the gradients over the ranks."""
    if not workers.distributed:
        return loss_of
    device_ids = [device.index] if device.type == "cuda" else None
    # not static_graph=True: its first step's gradients were not the average (measured: a step of 2 workers then
    # differed from 1 worker's by 2·lr)
    wrapped = nn.parallel.DistributedDataParallel(_Objective(model, loss_of), device_ids=device_ids)
    return wrapped
