"""The training loop: ``train(config)``, the whole of ``aevb train``.

It loads the data, builds the model, runs Adam, logs to ``metrics.jsonl``
and writes checkpoints, pictures and the exported model into the run folder
(its layout: :mod:`aevb.run.folder`).  ``train`` reads top to bottom: it
prepares the run, then a :class:`Trainer` takes the steps left; one step is
:meth:`Trainer.step`, the data path from batch to loss.

The loop never reads a value back from the device except every
``log_every`` steps: the per-step terms are copied into a small device
buffer and checked (finite?) and logged in one transfer.  A checkpoint holds
everything that decides the future of the run (:mod:`aevb.run.checkpoints`),
so a resumed run continues bit for bit on CPU.

Under ``torchrun`` the workers train one model together
(:mod:`aevb.training.distributed`: what is global, what is per rank, and why
the result does not depend on their number); rank 0 alone writes the run folder.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

from aevb.acceleration.runtime import denormals_flushed, keep_freed_memory
from aevb.analysis.grids import reconstruction_grid, sample_grid
from aevb.config import RunConfig, check_model_options
from aevb.data.datasets import Dataset
from aevb.data.memory import IN_MEMORY, memory_dataset, origin
from aevb.errors import NonFiniteLossError, UserError, first_line
from aevb.io import atomic_write, write_json
from aevb.model import noise
from aevb.model.base import LossOutput, Model, build_model
from aevb.model.precision import matmul_dtype
from aevb.registry import LIKELIHOODS, MODELS
from aevb.run.checkpoints import Position, check_resumable, read_meta, restore, write_checkpoint
from aevb.run.data import check_dequantize
from aevb.run.device import resolve_device
from aevb.run.folder import BEST_CHECKPOINT, CHECKPOINT, RUN_PATHS, NewRun, with_absolute_paths
from aevb.run.owner import OwnedRun, own_run
from aevb.run.restart import AUTO, continue_or_start
from aevb.training import distributed
from aevb.training.accelerations import make_loss, make_optimizer, step_precision
from aevb.training.distributed import Workers
from aevb.training.lr_schedules import LRSchedule, make_lr_schedule
from aevb.training.data import TrainingData
from aevb.training.interrupt import Interrupted, StopRequest, stop_on_sigint
from aevb.training.metrics import MetricsLog, NoLog, StepTerms, check_loggers
from aevb.training.progress import ProgressBar
from aevb.training.schedules import make_schedule
from aevb.training.validation import epoch_line, mean_elbo_terms

NONFINITE_ADVICE = "Try a lower --lr, --grad-clip, or a likelihood with a floor"


def train(config: RunConfig, train: Any = None, test: Any = None, *, val: Any = None,
          resume: str | Path | None = None, force: bool = False, progress: bool = True) -> tuple[Model, Path]:
    """Train a model as ``config`` says; return it and its run folder.

    ``train``, ``test``, ``val``: data held in memory instead of ``config.data``: tensors or NumPy arrays
    [N, …] (or pairs ``(x, labels)``), torch Datasets yielding ``x`` or ``(x, y)``, or DataLoaders
    (:mod:`aevb.data.memory`); ``test`` and ``val`` are optional.  Tensors train on the fast path; any other
    Dataset is read a batch at a time through a DataLoader.  ``config.json`` then records ``data:
    "in-memory"`` and ``RUN/data.json`` what the data were: such a run cannot be re-run from its
    ``config.json`` alone (save the array and pass its path as ``data`` to make it so).

    ``resume``: a run folder to continue from its last checkpoint.  ``config``
    must be the one the run was trained with (``open_run(resume).config``)
    but for :data:`~aevb.run.checkpoints.RESUMABLE` (``epochs``, ``steps``,
    ``device``, …): more epochs or steps train further (a run on data in
    memory takes the same data again).  A run that finished training but not
    its export is exported.  ``resume="auto"`` (the string; a folder named
    auto is ``Path("auto")``): continue ``config.out`` where it has a
    checkpoint, else start it, so that the same call run again after a crash
    (or by ``torchrun --max-restarts``) goes on where the run got to
    (:mod:`aevb.run.restart`); a run it finds finished is returned as it is.
    The run folder is this process's alone while it trains
    (:mod:`aevb.run.owner`; rank 0's under torchrun); under ``force`` the run
    it replaces is kept aside until the new one's first checkpoint, and back
    if it fails before.
    """
    given = None
    if train is not None:
        given = memory_dataset(train, test, val, val_split=config.val_split if val is None else 0)
        config = dataclasses.replace(config, data=IN_MEMORY)
    elif test is not None or val is not None:
        raise UserError("test= and val= are splits of data given as train=; pass train= too, or name the data in "
                        "the config (data=...)")
    auto = isinstance(resume, str) and resume == AUTO
    keep_freed_memory()  # process-wide, at the entry point (and the subnormals flushed around the loop: fit)
    device = resolve_device(config.device)
    workers = distributed.start(device, timedelta(seconds=config.join_timeout))  # one unless torchrun started us
    try:
        distributed.check_same_config(workers, config.to_dict())  # a collective: every rank raises the same message
        if auto:
            resume, config, force = _continue_or_start(config, force, workers)
        result = _train(config, given, train, test, val, resume, force, progress, device, workers, auto)
        distributed.barrier(workers)  # rank 0 exports while the others are done: none leaves the group before it
        return result
    finally:
        distributed.stop(workers)


def _continue_or_start(config: RunConfig, force: bool, workers: Workers) -> tuple[Path | None, RunConfig, bool]:
    """``resume="auto"``: the run folder to continue (None: a new run), the configuration, and whether a new run
    replaces one that stopped before its first checkpoint; every worker must find the folder in the same state."""
    restart = distributed.agree(workers, lambda: continue_or_start(config, force))
    continues = distributed.gathered(workers, restart.resume is not None)
    if len(set(continues)) > 1:
        found = ", ".join(f"worker {rank} {'a checkpoint' if c else 'none'}" for rank, c in enumerate(continues))
        raise UserError(f"--resume auto: the workers do not see the same run folder {config.out} ({found}); put "
                        f"--out on a file system that every node sees")
    return restart.resume, restart.config, restart.replace


def _train(config: RunConfig, given: Dataset | None, train: Any, test: Any, val: Any, resume: str | Path | None,
           force: bool, progress: bool, device: torch.device, workers: Workers, auto: bool = False
           ) -> tuple[Model, Path]:
    device = distributed.worker_device(device, workers)
    if MODELS.get(config.model).batch_coupled and workers.world_size > 1:  # on every rank alike
        raise UserError(f"the {config.model} loss is a penalty on each batch as a whole, which a batch split over "
                        f"{workers.world_size} processes would change: train it on one process (without torchrun)")
    with ExitStack() as owning:

        def claim() -> tuple[Path | None, OwnedRun | None, NewRun | None, dict | None]:
            """The run folder, owned by rank 0 (the others read what it writes): to resume, or a new run's."""
            if resume is not None:
                if isinstance(resume, str) and not resume.strip():
                    raise UserError("--resume is empty; pass the folder of the run to continue")
                run_dir = Path(resume)
                folder = None
                if workers.writes:
                    folder = owning.enter_context(own_run(_existing_run(run_dir), "aevb train --resume"))
                    folder.check_paths(RUN_PATHS)
                _run_to_resume(run_dir)
                return run_dir, folder, None, read_meta(run_dir / CHECKPOINT)  # how it was trained up to there
            check_model_options(config)
            check_dequantize(config)
            # made only once the data and the model have loaded
            return None, None, owning.enter_context(NewRun(config, force)) if workers.writes else None, None

        run_dir, folder, new_run, trained = distributed.agree(workers, claim)
        # the accelerations (aevb.acceleration) are chosen here and nowhere else: the multiplies' dtype (refused
        # before the data load where the device lacks it; rank 0's for all, as auto times a multiply and the
        # ranks must agree), the optimiser and the loss below
        step_dtype = distributed.from_rank0(workers, step_precision(config, device, trained))  # None: fp32
        if workers.writes:
            check_loggers(config)
        torch.manual_seed(config.seed)
        shuffle = torch.Generator().manual_seed(config.seed)

        data = distributed.agree(workers, lambda: TrainingData.load(config, device, given, workers))
        distributed.agree(workers, lambda: distributed.check_shares(workers, data.examples, config.batch_size))
        if config.early_stopping and data.eval_name != "val":
            raise UserError(f"--early-stopping {config.early_stopping} watches the validation ELBO, and {config.data} "
                            f"has no validation split: add --val-split (0.1: a tenth of the examples), never the test set")
        if resume is None and config.likelihood_scale is None and LIKELIHOODS.get(config.likelihood).takes_scale:
            # a likelihood's one scale, fixed or learned, starts at the one that fits the data around their mean
            # (a σ of 1 on pixels in [0, 1] weighs the reconstruction so little that the KL shuts the latent
            # units); recorded as --likelihood-scale, so config.json re-runs it and a resume rebuilds it
            scale = LIKELIHOODS.get(config.likelihood).data_scale(data.residuals())
            if scale is not None:
                config = dataclasses.replace(config, likelihood_scale=scale)
        model_kwargs = config.model_kwargs(data.dataset.data_shape, data.n_classes)
        if MODELS.get(config.model).needs_dataset_size:
            model_kwargs["dataset_size"] = data.examples
        if resume is not None:  # the run's checkpoint, its data and the sizes of its model, before any is built
            distributed.agree(workers, lambda: check_resumable(run_dir / CHECKPOINT, config, model_kwargs,
                                                               data.examples))
        model = build_model(config.model, **model_kwargs).to(device)
        if resume is None and config.output_bias == "data-mean":
            model.init_output_bias(data.mean_example())
        optimizer = make_optimizer(model, config, device)
        total_steps = config.steps or config.epochs * math.ceil(data.examples / config.batch_size)
        lr_schedule = make_lr_schedule(optimizer, config, total_steps, has_validation=data.eval_name == "val")
        loss_of = distributed.data_parallel(model, make_loss(model, config, device), device, workers)
        if resume is not None:
            position = distributed.agree(workers, lambda: restore(run_dir / CHECKPOINT, model, optimizer, shuffle,
                                                                  config, data.examples, lr_schedule, workers.rank,
                                                                  workers.world_size))
        else:
            position = Position()
            if workers.writes:
                folder = new_run.start()
                run_dir = folder.path
                write_json(run_dir / "config.json", with_absolute_paths(config).to_dict())
                if given is not None:
                    write_json(run_dir / "data.json", origin(train, test, val))
            run_dir = distributed.from_rank0(workers, run_dir)
            config = with_absolute_paths(config)

        trainer = Trainer(config=config, run_dir=run_dir, model=model, optimizer=optimizer, loss_of=loss_of,
                          data=data, position=position, shuffle=shuffle, step_dtype=step_dtype,
                          model_kwargs=model_kwargs, folder=folder, lr_schedule=lr_schedule, workers=workers)
        if resume is not None:
            if auto and trainer.finished():  # the same command run again: its run is done
                if workers.writes:
                    warnings.warn(f"--resume auto: {run_dir} has trained all its {position.step} steps and is "
                                  f"exported; nothing left to do", ContinuedRunWarning, stacklevel=2)
                return model, run_dir
            distributed.agree(workers, trainer.check_steps_left)
            if auto and workers.writes:  # said in the log of every restart
                warnings.warn(f"--resume auto: continuing {run_dir} from its checkpoint at step {position.step} of "
                              f"{trainer.total_steps}", ContinuedRunWarning, stacklevel=2)
            if workers.writes:
                trainer.note_schedule_change(trained["config"])
                # the new length, before training: a run interrupted from here resumes toward it
                write_json(run_dir / "config.json", config.to_dict())
        log = MetricsLog(folder, config, position.step if resume is not None else None) if workers.writes else NoLog()
        trainer.fit(log, progress and workers.writes)
        if workers.writes:
            trainer.export()
    return model, run_dir


class ContinuedRunWarning(UserWarning):
    """``--resume auto`` found a checkpoint: the run goes on from it (or is finished)."""


class ScheduleChangedWarning(UserWarning):
    """A resumed run's new length changes the β its trained steps had."""


def _existing_run(run_dir: Path) -> Path:
    """``run_dir`` if it is a folder (a UserError naming it otherwise), before the folder is owned."""
    if not run_dir.is_dir():
        raise UserError(f"cannot resume {run_dir}: no such run folder; pass a folder written by 'aevb train'")
    return run_dir


def _run_to_resume(run_dir: Path) -> None:
    if not (run_dir / CHECKPOINT).is_file():
        raise UserError(f"cannot resume {run_dir}: it has no checkpoint ({CHECKPOINT}); start a new run instead")


@dataclass
class Trainer:
    """The state of a run between steps, and what happens at a step, a record, an epoch's end and a checkpoint."""

    config: RunConfig
    run_dir: Path
    model: Model
    optimizer: torch.optim.Optimizer
    loss_of: Callable[[torch.Tensor, float], LossOutput]  # make_loss: model.loss, the fused loss or a compiled one
    data: TrainingData
    position: Position  # where the run is: step, epoch, batch in the epoch's order
    shuffle: torch.Generator  # draws each epoch's order
    step_dtype: torch.dtype | None  # of the step's multiplies; None: fp32
    model_kwargs: dict  # the model's arguments, stored in the checkpoint
    folder: OwnedRun | None  # the run folder, this process's while it trains (rank 0's; None on the others)
    lr_schedule: LRSchedule | None = None  # --lr-schedule's scheduler; None: a constant rate
    workers: Workers = Workers()  # this process among torchrun's workers (one of one: the single-process run)

    def __post_init__(self) -> None:
        config = self.config
        self.noise = distributed.step_generator(self.data.device)  # reseeded by (seed, step) at every step
        self.steps_per_epoch = math.ceil(self.data.examples / config.batch_size)
        self.total_steps = config.steps or config.epochs * self.steps_per_epoch
        self.beta_at = make_schedule(config.beta_schedule, beta=config.beta, warmup=config.beta_warmup,
                                     cycles=config.beta_cycles, ratio=config.beta_ratio, total_steps=self.total_steps)
        # by default, reconstruction pictures at about ten epoch ends over the run
        self.picture_epochs = max(1, math.ceil(self.total_steps / self.steps_per_epoch) // 10)
        self.terms = StepTerms(min(config.log_every, self.total_steps))  # a record at least at the run's end
        self.last_log_time, self.last_log_step = time.perf_counter(), self.position.step
        self.val_loss: float | None = None  # the last validation −ELBO (an AE: reconstruction), for plateau
        self.log: MetricsLog | None = None  # and the progress bar, while fit runs
        self.bar = None

    def finished(self) -> bool:
        """Whether the run has trained all its steps and written its export."""
        return self.position.step == self.total_steps and (self.run_dir / "model" / "config.json").is_file()

    def check_steps_left(self) -> None:
        """A resumed run must have steps left to train, or its export left to write."""
        # fewer steps than done would export a model its config.json does not describe; as many, a run
        # whose export was interrupted exports now (and one already exported has nothing left to do)
        done, total = self.position.step, self.total_steps
        exported = (self.run_dir / "model" / "config.json").is_file()
        if total < done or (total == done and exported):
            asked = f"--steps {self.config.steps}" if self.config.steps else f"--epochs {self.config.epochs}"
            raise UserError(f"{self.run_dir} has already trained {done} steps ({done / self.steps_per_epoch:.4g} "
                            f"epochs), {'more than' if total < done else 'as many as'} {asked} asks; "
                            f"pass a larger --epochs or --steps to train further")

    def note_schedule_change(self, trained: dict | None) -> None:
        """Warn where this run's new length gives the steps already trained another β than they had.

        ``trained``: the configuration the checkpoint was written under.  A
        schedule that spreads over the run (``cyclical``: its cycles) changes
        with its length, so the run resumed is not the one it would have been
        trained as from the start; said once, before training goes on.
        """
        if not trained:
            return
        length = trained.get("steps") or (trained.get("epochs") or 0) * self.steps_per_epoch
        done = self.position.step
        if not isinstance(length, int) or length == self.total_steps or not done:
            return
        config = self.config
        before = make_schedule(config.beta_schedule, beta=config.beta, warmup=config.beta_warmup,
                               cycles=config.beta_cycles, ratio=config.beta_ratio, total_steps=length)
        probe = range(done) if done <= 10**5 else range(0, done, done // 10**5)  # every step, or 100,000 of them
        changed = sum(before(step) != self.beta_at(step) for step in probe)
        if changed:
            share = f"{changed / len(probe):.0%}"
            warnings.warn(f"--beta-schedule {config.beta_schedule} spreads over the whole run: with {self.total_steps} "
                          f"steps instead of {length}, {share} of the {done} steps already trained would have had "
                          f"another β, so this run differs from one trained to {self.total_steps} steps from the "
                          f"start (a new run of that length is one)", ScheduleChangedWarning, stacklevel=2)

    def fit(self, log: MetricsLog, progress: bool) -> None:
        """Train from the position to the last step, recording into ``log`` (closed at the end)."""
        self.log = log
        self.bar = self._progress_bar() if progress else None
        self.model.train()
        try:
            with stop_on_sigint() as ctrl_c, denormals_flushed():
                self._run_epochs(ctrl_c)
        except (RuntimeError, ValueError) as error:
            # Non-finite weights give the distributions invalid parameters, which torch reports as an
            # error before the loss of that step can be checked: name the first non-finite loss
            # since the last record (flush_log raises), or else the weights.
            self.flush_log()
            if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
                raise NonFiniteLossError(f"non-finite weights after step {self.position.step} ({first_line(error)}); "
                                         f"stopped, {self._kept_message()}. {NONFINITE_ADVICE}") from None
            raise
        finally:
            if self.bar is not None:
                self.bar.close()
            log.close()

    def _progress_bar(self) -> ProgressBar:
        return ProgressBar(self.run_dir.name, self.total_steps, self.position.step, self.steps_per_epoch)

    def _run_epochs(self, ctrl_c: StopRequest) -> None:
        position = self.position
        while position.step < self.total_steps and not self.stops_early():
            if position.perm is None:
                # on the CPU, as a checkpoint keeps it (a resumed run's order is read back there too);
                # batches() moves it to where the examples are indexed, once an epoch
                position.perm = torch.randperm(self.data.examples, generator=self.shuffle)
            batches = self.data.batches(position.perm, position.batch, self.config.batch_size)  # global batches
            while position.batch < self.steps_per_epoch and position.step < self.total_steps:
                self.step(next(batches))
                self.after_step(stop=ctrl_c.requested)
            batches.close()
            if position.batch < self.steps_per_epoch:
                break  # --steps reached mid-epoch
            self.end_epoch()
        if self.stops_early() and self.bar is not None:
            self.bar.write(f"early stopping: no better validation ELBO for {self.config.early_stopping} epochs "
                           f"after epoch {position.best_epoch} ({BEST_CHECKPOINT})")
        self.flush_log()
        if position.batch:  # stopped mid-epoch by --steps
            self.save_checkpoint()

    def step(self, batch: tuple[int, torch.Tensor]) -> None:
        """One optimiser step on this worker's rows of the next global batch of the epoch's order: ``batch``,
        its size and this worker's share (:meth:`TrainingData.batches`), with the noise of the step's seed."""
        position = self.position
        size, share = batch
        start, stop = self.workers.rows(size)
        generator = distributed.seed_step(self.noise, self.config.seed, position.step)
        with noise.batch_rows(generator, start, stop, size):
            x = self.data.rows(share)
            y = self.data.labels(share)  # [b_r] for a conditional run, else None
            with matmul_dtype(self.step_dtype):
                out = self.loss_of(x, self.beta_at(position.step), y)
        share = self.workers.share(size)  # 1 but for an uneven split among workers
        self.optimizer.zero_grad(set_to_none=True)
        (out.loss if share == 1 else out.loss * share).backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        if self.lr_schedule is not None:
            self.lr_schedule.after_step()
        self.terms.add(out, (stop - start) / size if self.workers.distributed else 1)
        position.step += 1
        position.batch += 1

    def after_step(self, stop: bool) -> None:
        """The progress bar, a record every log_every steps, pictures every image_every; ``stop``: Ctrl-C was pressed."""
        step, image_every = self.position.step, self.config.image_every
        if self.bar is not None:
            self.bar.update(step)
        if self.checkpoint_due():
            self.flush_log()  # a record at each checkpoint: a run resumed from it logs what an unbroken one does
            self.save_checkpoint()
        elif self.terms.full:
            self.flush_log()
        if self.workers.writes and self.data.holdout is not None and image_every and step % image_every == 0:
            reconstruction_grid(self.model, self.data.holdout, self.run_dir / "images" / f"reconstructions-{step:07d}.png",
                                label=self.data.holdout_labels)
        if stop:
            self.flush_log()
            self.save_checkpoint()
            raise Interrupted(f"interrupted at step {step}; checkpoint saved, "
                              f"continue with: aevb train --resume {self.run_dir}")

    def checkpoint_due(self) -> bool:
        """Whether --checkpoint-every asks for a checkpoint after this step (an epoch's end, and the run's, write
        their own)."""
        every, position = self.config.checkpoint_every, self.position
        return (bool(every) and position.step % every == 0 and position.batch < self.steps_per_epoch
                and position.step < self.total_steps)

    def flush_log(self) -> None:
        """Read the steps' terms back (one transfer), stop on a non-finite one, else record their mean."""
        # [steps since the last record, terms], the ranks' rows weighted by their share and summed
        values = self.terms.take(lambda rows: distributed.all_sum(self.workers, rows))
        if values is None:
            return
        position = self.position
        finite = torch.isfinite(values).all(dim=1)
        if not finite.all():
            bad = int((~finite).nonzero()[0])
            step = position.step - len(values) + bad + 1
            terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.terms.names, values[bad].tolist()))
            raise NonFiniteLossError(f"non-finite loss at step {step} ({terms}); stopped, {self._kept_message()}. "
                                     f"{NONFINITE_ADVICE}")
        now = time.perf_counter()
        images_per_s = (position.step - self.last_log_step) * self.config.batch_size / max(now - self.last_log_time, 1e-9)
        # "beta" is the β the last logged step trained with (step s uses beta_at(s - 1))
        record = {"step": position.step, "epoch": position.epoch + position.batch / self.steps_per_epoch,
                  **dict(zip(self.terms.names, values.mean(0).tolist())), "beta": self.beta_at(position.step - 1),
                  "images_per_s": images_per_s}
        self.log.write(record)
        if self.bar is not None:
            self.bar.show(record, position.step)
        self.last_log_time, self.last_log_step = now, position.step

    def end_epoch(self) -> None:
        """Record, validate, picture and checkpoint; the next epoch draws a new order."""
        position = self.position
        self.flush_log()
        position.epoch += 1
        position.batch = 0
        position.perm = None
        improved = False
        if self.data.eval_x is not None and len(self.data.eval_x):
            improved = self.validate()
            if self.lr_schedule is not None and self.data.eval_name == "val":
                self.lr_schedule.after_epoch(self.val_loss)
        if (self.workers.writes and self.data.holdout is not None and not self.config.image_every
                and position.epoch % self.picture_epochs == 0):
            reconstruction_grid(self.model, self.data.holdout,
                                self.run_dir / "images" / f"reconstructions-epoch{position.epoch:03d}.png",
                                label=self.data.holdout_labels)
        self.save_checkpoint()
        if improved and self.workers.writes:  # the checkpoint just written, kept beside the last
            atomic_write(self.run_dir / BEST_CHECKPOINT,
                         lambda tmp: shutil.copyfile(self.run_dir / CHECKPOINT, tmp))
        self.last_log_time = time.perf_counter()  # images_per_s counts training steps, not epoch-end work

    def stops_early(self) -> bool:
        """Whether --early-stopping's patience has run out: that many epochs without a better validation ELBO."""
        patience, position = self.config.early_stopping, self.position
        return bool(patience) and position.best is not None and position.epoch - position.best_epoch >= patience

    def validate(self) -> bool:
        """The mean ELBO terms of the held-out split, recorded; non-finite ones stop the run before a checkpoint.

        Returns whether the validation split's loss (−ELBO; an AE's
        reconstruction term) is the best yet; the test split chooses nothing.
        """
        name, step = self.data.eval_name, self.position.step
        terms = mean_elbo_terms(self.model, self.data.eval_x, self.config.eval_batch_size, self.data.eval_labels)
        self.log.write({"step": step, "epoch": self.position.epoch, **{f"{name}_{k}": v for k, v in terms.items()}})
        if not all(math.isfinite(v) for v in terms.values()):
            # the weights of the last step are broken: do not save them over the last good checkpoint
            raise NonFiniteLossError(
                f"non-finite {name} loss after step {step} "
                f"({', '.join(f'{name}_{k}={v:.4g}' for k, v in terms.items())}); "
                f"stopped, {self._kept_message()}. {NONFINITE_ADVICE}"
            )
        if self.bar is not None:
            self.bar.write(epoch_line(self.position.epoch, name, terms))
        if name != "val":
            return False
        loss = -terms["elbo"] if "elbo" in terms else terms["reconstruction"]
        self.val_loss = loss
        position = self.position
        if position.best is not None and not loss < position.best:
            return False
        position.best, position.best_epoch = loss, position.epoch
        return True

    def save_checkpoint(self) -> None:
        """The checkpoint, by rank 0, with every rank's random state (a collective: every rank calls it)."""
        rng_states = distributed.gathered(self.workers, torch.get_rng_state())
        if self.workers.writes:
            precision = {"device": self.data.device.type, "multiplies": "fp32" if self.step_dtype is None else "bf16"}
            write_checkpoint(self.run_dir / CHECKPOINT, self.model, self.optimizer, self.position, self.shuffle,
                             self.model_kwargs, self.config.to_dict(), self.data.examples, self.lr_schedule,
                             rng_states, precision)
            self.folder.checkpointed()  # the first one ends the keeping of a run that --force replaces

    def _kept_message(self) -> str:
        if (self.run_dir / CHECKPOINT).is_file():
            return f"the last good checkpoint {self.run_dir / CHECKPOINT} is kept"
        return "no checkpoint had been written yet"

    def export(self) -> None:
        """The trained model into RUN/model; for images, the final samples and reconstructions."""
        self.model.eval()
        self.model.save(self.run_dir / "model", step=self.position.step)
        if self.data.dataset.kind == "image":
            sample_grid(self.model, self.run_dir / "images" / "samples.png", n=64, seed=self.config.seed)
            if self.data.holdout is not None:
                reconstruction_grid(self.model, self.data.holdout, self.run_dir / "images" / "reconstructions.png",
                                    label=self.data.holdout_labels)
