"""The training loop (run folders and checkpoints: :mod:`aevb.run`).

``train(config)`` is the whole of ``aevb train``: it loads the data, builds
the model, runs Adam, logs to ``metrics.jsonl`` and writes checkpoints,
pictures and the exported model into the run folder (its layout:
:mod:`aevb.run.folder`).

The loop never reads a value back from the device except every
``log_every`` steps: the per-step terms are copied into a small device
buffer and checked (finite?) and logged in one transfer.  A checkpoint holds
everything that decides the future of the run (weights, Adam moments, the
global and shuffling RNG states, the permutation and position in the
epoch), so a resumed run continues bit for bit on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from aevb.data import datasets as data_module
from aevb.acceleration import fused
from aevb.acceleration import optim
from aevb.config import RunConfig
from aevb.errors import NonFiniteLossError, UserError
from aevb.analysis.figures import reconstruction_grid, sample_grid
from aevb.io import write_json, write_text
from aevb.model.base import Model, build_model
from aevb.acceleration.bf16 import resolve_precision
from aevb.model.precision import matmul_dtype
from aevb.registry import MODELS
from aevb.acceleration.runtime import denormals_flushed, keep_freed_memory
from aevb.run.checkpoints import Position, restore, write_checkpoint
from aevb.run.data import check_data_range, check_dequantize, held_out, load_dataset
from aevb.run.device import resolve_device
from aevb.run.folder import CHECKPOINT, make_run_dir, new_run_dir, with_absolute_paths
from aevb.training.schedules import make_schedule

NONFINITE_ADVICE = "Try a lower --lr, --grad-clip, or a likelihood with a floor"


class Interrupted(UserError):
    """Training stopped by Ctrl-C after saving a checkpoint."""

    exit_code = 130


# ---------------------------------------------------------------------------
# options


OBJECTIVE_OPTIONS = ("beta", "beta_warmup", "beta_schedule", "beta_cycles", "beta_ratio")


def check_model_options(config: RunConfig) -> None:
    """Refuse options that the chosen model would ignore (one line, before a run folder is made).

    A model takes the :class:`RunConfig` fields in its ``run_options``; any
    other model's option set away from its default, and the β schedule
    options for a model without a β-weighted KL term, are user errors.
    """
    import dataclasses

    cls = MODELS.get(config.model)
    taken = set(cls.run_options)
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    others = {name for _, other in MODELS.items() for name in other.run_options} | set(OBJECTIVE_OPTIONS)
    if "beta" in taken:
        taken |= set(OBJECTIVE_OPTIONS)
    if "prior" in taken:
        taken.add("prior_components")
    others.add("prior_components")
    ignored = sorted(name for name in others - taken if getattr(config, name) != defaults[name])
    if ignored:
        flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
        raise UserError(f"{flags} {'does' if len(ignored) == 1 else 'do'} not apply to --model {config.model}; "
                        f"drop {'it' if len(ignored) == 1 else 'them'} or choose a model that takes "
                        f"{'it' if len(ignored) == 1 else 'them'}")


# ---------------------------------------------------------------------------
# logging


def check_loggers(config: RunConfig) -> None:
    """The packages of --tensorboard and --wandb must be installed (checked before a run folder is made)."""
    import importlib.util

    for wanted, module, package in ((config.tensorboard, "tensorboard", "tensorboard"), (config.wandb, "wandb", "wandb")):
        if wanted and importlib.util.find_spec(module) is None:
            raise UserError(f"--{module} needs the {package} package: pip install {package}")


def _record(line: str) -> dict | None:
    """One line of metrics.jsonl as a dict; None for a blank, cut-off or foreign line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class MetricsLog:
    """``metrics.jsonl`` plus the optional TensorBoard / W&B mirrors."""

    def __init__(self, run_dir: Path, config: RunConfig, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # drop records written after the checkpoint we resume from, and a line a kill cut short
            kept = [line for line in self.path.read_text(errors="replace").splitlines()
                    if (record := _record(line)) is not None and record.get("step", 0) <= resume_step]
            write_text(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a", encoding="utf-8")
        self.mirrors = []  # their packages were checked by train() before the run folder was made
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.mirrors.append(("tb", SummaryWriter(str(run_dir / "tensorboard"))))
        if config.wandb:
            import wandb

            self.mirrors.append(("wandb", wandb.init(project="aevb", config=config.to_dict(), dir=str(run_dir))))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for kind, writer in self.mirrors:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            if kind == "tb":
                for k, v in numbers.items():
                    writer.add_scalar(k, v, record["step"])
            else:
                writer.log(numbers, step=record["step"])

    def close(self) -> None:
        self.file.close()
        for kind, writer in self.mirrors:
            writer.close() if kind == "tb" else writer.finish()


@contextmanager
def _stop_on_sigint():
    """First Ctrl-C asks the loop to stop at the next step boundary; a second one aborts."""
    requested = {"stop": False}
    if sys.platform == "win32" or not _in_main_thread():
        yield requested
        return

    def handler(signum, frame):
        if requested["stop"]:
            raise KeyboardInterrupt
        requested["stop"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------
# the loop


@torch.no_grad()
def mean_elbo_terms(model: Model, x: torch.Tensor, batch_size: int = 1000) -> dict[str, float]:
    """Mean ELBO, reconstruction and KL (nats per example) over x [N, ...], in eval mode.

    A model with a point-mass posterior (the AE) has no ELBO: only its
    reconstruction term −log p(x|z = f(x)) is returned.
    """
    from aevb.model.objectives import elbo_terms

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    has_density = model.posterior.has_density
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        if has_density:
            terms = elbo_terms(model, xb)
            totals += torch.stack([terms.reconstruction.sum(), terms.kl.sum()]).double()
        else:
            totals[0] += -model.decode(model.encode(xb).mean).log_prob(xb).double().sum()
    model.train(was_training)
    reconstruction, kl = (totals / x.shape[0]).tolist()
    if not has_density:
        return {"reconstruction": reconstruction}
    return {"elbo": -(reconstruction + kl), "reconstruction": reconstruction, "kl": kl}


def _make_optimizer(model: Model, config: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=config.lr, betas=tuple(config.adam_betas))
    # fused Adam is one kernel per step instead of several per parameter
    try:
        return optim.Adam(model.parameters(), **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), foreach=True, **kwargs)


def _first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name where it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _make_loss(model: Model, config: RunConfig, device: torch.device):
    """``loss_of(x, beta)``: ``model.loss(x, beta=beta)``, through ``torch.compile`` with ``--compile``.

    The compiled function takes β as a tensor (a float would be compiled
    into the graph, and a β schedule would recompile it every step) and
    full batches only: the last, smaller batch of an epoch runs eagerly, which
    costs less than compiling a second graph for its shape.  So does the
    first step, which fills the model's caches (the prior's distribution);
    traced, it would leave guards on them that the second step fails.  A
    failure to compile is the user's to fix (a missing C++ compiler): one message.
    """
    if not config.compile:
        return model.loss
    if device.type == "cpu":  # inductor's C++ build warns that this CPU machine has no CUDA
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    compiled = torch.compile(model.loss)
    warm = False

    def loss_of(x: torch.Tensor, beta: float):
        nonlocal warm
        if not warm:  # the general path, the one compiled, fills the caches
            warm = True
            with fused.disabled():
                return model.loss(x, beta=beta)
        if x.shape[0] != config.batch_size:
            return model.loss(x, beta=beta)
        try:
            # a CPU scalar, which a CUDA graph reads as a number: one on the GPU would be a copy to it each step
            return compiled(x, beta=torch.tensor(beta, dtype=torch.float32))
        except torch._dynamo.exc.TorchDynamoException as e:
            cause = getattr(e, "inner_exception", None) or e  # the backend's own error
            raise UserError(f"--compile: torch.compile failed ({type(cause).__name__}: {_first_line(cause)}); "
                            f"train without --compile") from None

    return loss_of


def train(config: RunConfig, *, resume: str | Path | None = None, force: bool = False,
          progress: bool = True) -> tuple[Model, Path]:
    """Train a model as ``config`` says; return it and its run folder.

    ``resume``: a run folder to continue from its last checkpoint.  ``config``
    must be the one the run was trained with (``read_run_config(resume)``)
    but for ``epochs``, ``steps`` and ``device``: more epochs or steps train
    further.  A run that finished training but not its export is exported.
    """
    keep_freed_memory()
    device = resolve_device(config.device)
    step_dtype = resolve_precision(config.precision, device)  # of the training step's multiplies; None: fp32
    if resume is not None:
        run_dir = Path(resume)
        checkpoint = run_dir / CHECKPOINT
        if not checkpoint.is_file():
            raise UserError(f"cannot resume {run_dir}: it has no checkpoint ({CHECKPOINT}); start a new run instead")
    else:
        check_model_options(config)
        check_dequantize(config)
        run_dir = new_run_dir(config, force)
    check_loggers(config)
    torch.manual_seed(config.seed)
    shuffle = torch.Generator().manual_seed(config.seed)

    dataset = load_dataset(config)
    levels = check_dequantize(config, dataset)
    check_data_range(config, dataset)
    x_train = dataset.train
    if config.binarize == "threshold":
        x_train = data_module.binarize(x_train, "threshold")
    x_train = x_train.to(device)
    x_eval, _ = held_out(dataset, config, "val" if dataset.val is not None else "test")
    eval_name = "val" if dataset.val is not None else "test"
    holdout = None
    if dataset.kind == "image" and dataset.test is not None and len(dataset.test):
        x_test, y_test = held_out(dataset, config, "test")
        holdout = x_test[data_module.holdout_indices(y_test, 10, num_examples=len(x_test))].to(device)

    model_kwargs = config.model_kwargs(dataset.data_shape)
    model = build_model(config.model, **model_kwargs).to(device)
    if resume is None and config.output_bias == "data-mean":
        model.init_output_bias(x_train)
    optimizer = _make_optimizer(model, config, device)
    loss_of = _make_loss(model, config, device)
    if resume is not None:
        position = restore(run_dir / CHECKPOINT, model, optimizer, shuffle, config, x_train.shape[0])
    else:
        position = Position()
        run_dir = make_run_dir(run_dir, config, force)
        config = with_absolute_paths(config)
        write_json(run_dir / "config.json", config.to_dict())

    n = x_train.shape[0]
    # index_select copies whole rows (2.5× faster than x_train[index] for 128 images); streamed images index
    gather = (lambda index: x_train.index_select(0, index)) if torch.is_tensor(x_train) else x_train.__getitem__
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = config.steps or config.epochs * steps_per_epoch
    if resume is not None:
        # fewer steps than done would export a model its config.json does not describe; as many, a run
        # whose export was interrupted exports now (and one already exported has nothing left to do)
        exported = (run_dir / "model" / "config.json").is_file()
        if total_steps < position.step or (total_steps == position.step and exported):
            asked = f"--steps {config.steps}" if config.steps else f"--epochs {config.epochs}"
            raise UserError(f"{run_dir} has already trained {position.step} steps ({position.step / steps_per_epoch:.4g} "
                            f"epochs), {'more than' if total_steps < position.step else 'as many as'} {asked} asks; "
                            f"pass a larger --epochs or --steps to train further")
        # the new length, before training: a run interrupted from here resumes toward it
        write_json(run_dir / "config.json", config.to_dict())
    log = MetricsLog(run_dir, config, position.step if resume is not None else None)
    buffer, names = None, ()  # [log_every, terms] on the device and the terms' names, from the first step
    filled, last_log_time, last_log_step = 0, time.perf_counter(), position.step
    image_every = config.image_every
    # by default, reconstruction pictures at about ten epoch ends over the run
    picture_epochs = max(1, math.ceil(total_steps / steps_per_epoch) // 10)

    beta_at = make_schedule(config.beta_schedule, beta=config.beta, warmup=config.beta_warmup,
                            cycles=config.beta_cycles, ratio=config.beta_ratio, total_steps=total_steps)

    def flush_log() -> None:
        nonlocal filled, last_log_time, last_log_step
        if filled == 0:
            return
        values = buffer[:filled].cpu()
        finite = torch.isfinite(values).all(dim=1)
        if not finite.all():
            bad = int((~finite).nonzero()[0])
            step = position.step - filled + bad + 1
            terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(names, values[bad].tolist()))
            raise NonFiniteLossError(f"non-finite loss at step {step} ({terms}); stopped, {kept_message()}. "
                                     f"{NONFINITE_ADVICE}")
        now = time.perf_counter()
        # "beta" is the β the last logged step trained with (step s uses beta_at(s - 1))
        record = {"step": position.step, "epoch": position.epoch + position.batch / steps_per_epoch,
                  **dict(zip(names, values.mean(0).tolist())), "beta": beta_at(position.step - 1),
                  "images_per_s": (position.step - last_log_step) * config.batch_size / max(now - last_log_time, 1e-9)}
        log.write(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.2f}", rec=f"{record['reconstruction']:.2f}",
                            kl=f"{record['kl']:.2f}", img_s=f"{record['images_per_s']:.0f}")
        filled, last_log_time, last_log_step = 0, now, position.step

    def kept_message() -> str:
        if (run_dir / CHECKPOINT).is_file():
            return f"the last good checkpoint {run_dir / CHECKPOINT} is kept"
        return "no checkpoint had been written yet"

    def save_checkpoint() -> None:
        write_checkpoint(run_dir / CHECKPOINT, model, optimizer, position, shuffle, model_kwargs, config.to_dict(), n)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=position.step, unit="step", dynamic_ncols=True,
                   desc=f"{config.model} {dataset.name}", file=sys.stderr)
    model.train()
    try:
        with _stop_on_sigint() as sigint, denormals_flushed():
            while position.step < total_steps:
                if position.perm is None:
                    position.perm = torch.randperm(n, generator=shuffle).to(device)
                while position.batch < steps_per_epoch and position.step < total_steps:
                    index = position.perm[position.batch * config.batch_size:(position.batch + 1) * config.batch_size]
                    x = gather(index)  # [b, *data_shape]
                    if config.binarize == "dynamic":
                        x = torch.bernoulli(x)
                    if levels:
                        x = data_module.dequantize(x, levels)
                    with matmul_dtype(step_dtype):
                        out = loss_of(x, beta_at(position.step))
                    optimizer.zero_grad(set_to_none=True)
                    out.loss.backward()
                    if config.grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    optimizer.step()
                    row = out.as_tensor()
                    if buffer is None:
                        buffer, names = row.new_zeros(config.log_every, row.numel()), out.names()
                    buffer[filled] = row
                    filled += 1
                    position.step += 1
                    position.batch += 1
                    if bar is not None:
                        bar.update(1)
                    if filled == config.log_every:
                        flush_log()
                    if holdout is not None and image_every and position.step % image_every == 0:
                        reconstruction_grid(model, holdout, run_dir / "images" / f"reconstructions-{position.step:07d}.png")
                    if sigint["stop"]:
                        flush_log()
                        save_checkpoint()
                        raise Interrupted(f"interrupted at step {position.step}; checkpoint saved, "
                                          f"continue with: aevb train --resume {run_dir}")
                if position.batch < steps_per_epoch:
                    break  # --steps reached mid-epoch
                flush_log()
                position.epoch += 1
                position.batch = 0
                position.perm = None
                if x_eval is not None and len(x_eval):
                    terms = mean_elbo_terms(model, x_eval, config.eval_batch_size)
                    log.write({"step": position.step, "epoch": position.epoch,
                               **{f"{eval_name}_{k}": v for k, v in terms.items()}})
                    if not all(math.isfinite(v) for v in terms.values()):
                        # the weights of the last step are broken: do not save them over the last good checkpoint
                        raise NonFiniteLossError(
                            f"non-finite {eval_name} loss after step {position.step} "
                            f"({', '.join(f'{eval_name}_{k}={v:.4g}' for k, v in terms.items())}); "
                            f"stopped, {kept_message()}. {NONFINITE_ADVICE}"
                        )
                    if bar is not None:
                        if "elbo" in terms:
                            bar.write(f"epoch {position.epoch}: {eval_name} ELBO {terms['elbo']:.2f} nats "
                                      f"(reconstruction {terms['reconstruction']:.2f}, KL {terms['kl']:.2f})")
                        else:
                            bar.write(f"epoch {position.epoch}: {eval_name} reconstruction −log p(x|z) "
                                      f"{terms['reconstruction']:.2f} nats")
                if holdout is not None and not image_every and position.epoch % picture_epochs == 0:
                    reconstruction_grid(model, holdout, run_dir / "images" / f"reconstructions-epoch{position.epoch:03d}.png")
                save_checkpoint()
                last_log_time = time.perf_counter()  # images_per_s counts training steps, not epoch-end work
            flush_log()
            if position.batch:  # stopped mid-epoch by --steps
                save_checkpoint()
    except (RuntimeError, ValueError) as error:
        # Non-finite weights give the distributions invalid parameters, which torch reports as an
        # error before the loss of that step can be checked: name the first non-finite loss
        # since the last record (flush_log raises), or else the weights.
        flush_log()
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise NonFiniteLossError(f"non-finite weights after step {position.step} ({_first_line(error)}); stopped, "
                                     f"{kept_message()}. {NONFINITE_ADVICE}") from None
        raise
    finally:
        if bar is not None:
            bar.close()
        log.close()

    model.eval()
    model.save(run_dir / "model")
    if dataset.kind == "image":
        sample_grid(model, run_dir / "images" / "samples.png", n=64, seed=config.seed)
        if holdout is not None:
            reconstruction_grid(model, holdout, run_dir / "images" / "reconstructions.png")
    return model, run_dir
