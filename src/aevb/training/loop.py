"""The training loop, run folders and checkpoints.

``train(config)`` is the whole of ``aevb train``: it loads the data, builds
the model, runs Adam, logs to ``metrics.jsonl`` and writes checkpoints,
pictures and the exported model into the run folder:

    RUN/config.json            resolved configuration (pass it back to reproduce)
    RUN/metrics.jsonl          one record per logged step and per epoch
    RUN/checkpoints/last.safetensors   model + optimiser + RNG + position (atomic)
    RUN/model/                 the trained model (aevb.load)
    RUN/images/                reconstructions during training, samples at the end

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
import re
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aevb.data import datasets as data_module
from aevb.acceleration import fused
from aevb.acceleration import optim
from aevb.config import RunConfig, make_config, model_options, run_options
from aevb.errors import NonFiniteLossError, UserError
from aevb.analysis.figures import reconstruction_grid, sample_grid
from aevb.io import write_json, write_safetensors, write_text
from aevb.model.base import Model, build_model, legacy_model_args, load
from aevb.acceleration.bf16 import resolve_precision
from aevb.model.precision import matmul_dtype
from aevb.options import as_flag
from aevb.registry import DATASETS, LIKELIHOODS, MODELS
from aevb.acceleration.runtime import denormals_flushed, keep_freed_memory
from aevb.training.schedules import make_schedule

CHECKPOINT = Path("checkpoints") / "last.safetensors"
RUN_OUTPUTS = ("config.json", "metrics.jsonl", "eval.json", "report.html", "checkpoints", "model", "images", "tensorboard")
RUN_FILE_SUFFIXES = (".png", ".json", ".jsonl", ".safetensors", ".html", ".tmp")  # what a run writes in those folders
NONFINITE_ADVICE = "Try a lower --lr, --grad-clip, or a likelihood with a floor"


class Interrupted(UserError):
    """Training stopped by Ctrl-C after saving a checkpoint."""

    exit_code = 130


# ---------------------------------------------------------------------------
# devices, data and run folders


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for, but this PyTorch has no MPS support; use --device cpu or auto")
    return torch.device(name)


def load_dataset(config: RunConfig) -> data_module.Dataset:
    return data_module.load_data(
        config.data, labels=config.labels, data_dir=config.data_dir, test_split=config.test_split,
        val_split=config.val_split, shuffle=config.shuffle, seed=config.seed,
        image_size=config.image_size, download=config.download, stream=config.stream,
    )


def held_out(dataset: data_module.Dataset, config: RunConfig, split: str = "test") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The evaluation split, binarised or dequantised as in training.

    Dynamic binarisation and dequantisation draw the held-out set once with a
    fixed seed, so every evaluation of every run on these data sees the same
    images.
    """
    x = getattr(dataset, split)
    y = getattr(dataset, f"{split}_labels")
    if x is None:
        return None, None
    if config.binarize == "dynamic":
        generator = torch.Generator().manual_seed(1234)
        x = data_module.binarize(x, "dynamic", generator)
    else:
        x = data_module.binarize(x, config.binarize)
    if config.dequantize:
        x = data_module.dequantize(x, check_dequantize(config, dataset), torch.Generator().manual_seed(1234))
    return x, y


def check_data_range(config: RunConfig, dataset: data_module.Dataset) -> None:
    """A likelihood over [0, 1] (Bernoulli, continuous Bernoulli) refuses data outside it: its loss would have no bound."""
    if not LIKELIHOODS.get(config.likelihood).unit_interval or isinstance(dataset.train, data_module.StreamedImages):
        return  # streamed data are 8-bit pixels, in [0, 1] by construction
    if config.binarize == "threshold":
        return  # x > 0.5 is 0 or 1 whatever x was
    low, high = dataset.train.min().item(), dataset.train.max().item()
    if low < 0 or high > 1:
        raise UserError(f"--likelihood {config.likelihood} models values in [0, 1], but {config.data} holds values "
                        f"from {low:.4g} to {high:.4g}; use --likelihood gaussian-learned, gaussian-diag or laplace-learned "
                        f"for real-valued data, or rescale it to [0, 1]")


def check_dequantize(config: RunConfig, dataset: data_module.Dataset | None = None) -> int | None:
    """Refuse --dequantize where it means nothing; the number of levels of the data where it applies."""
    if not config.dequantize:
        return None
    if config.binarize != "none" or LIKELIHOODS.get(config.likelihood).discrete:
        raise UserError(f"--dequantize makes 8-bit pixels continuous, for a continuous likelihood; "
                        f"--likelihood {config.likelihood} with --binarize {config.binarize} models discrete "
                        f"values: drop --dequantize, or choose a continuous likelihood without --binarize")
    if dataset is not None and not dataset.levels:
        raise UserError(f"--dequantize needs quantised pixels (8-bit images, digits), but {config.data} holds "
                        f"real values; drop --dequantize")
    return dataset.levels if dataset is not None else None


def check_data_shape(model: Model, x: torch.Tensor, run: str | Path, data: str) -> None:
    """The run's data must have the shape its model was trained on (checked before any progress bar)."""
    if tuple(x.shape[1:]) != tuple(model.data_shape):
        shape = "×".join(map(str, x.shape[1:]))
        raise UserError(f"the data {data} hold examples of shape {shape}, but the model of {run} was trained on "
                        f"{'×'.join(map(str, model.data_shape))}; point 'data' in {Path(run) / 'config.json'} "
                        f"at data of the training shape")


def _data_name(source: str) -> str:
    name = Path(source).name if ("/" in source or "." in source) else source
    name = re.sub(r"(\.gz|\.npy|\.npz|\.csv)$", "", name)
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "data"


def check_model_options(config: RunConfig) -> None:
    """Refuse options that the chosen model would ignore or whose values it refuses together (one line, before a
    run folder is made).

    A model takes the options it declares (``Model.options``) and the run
    options that require one of those (``Option.requires``: the β schedules
    need β).  Any other model's option, or a run option whose requirement the
    model lacks, set away from its default is a user error; then the model
    checks its options' values together (:meth:`Model.check_options`, as its
    constructor does), naming them as flags.
    """
    cls = MODELS.get(config.model)
    taken = {option.name for option in cls.options}
    of_other_models = {option.name for option in model_options()} - taken
    ignored = sorted(option.name for option in run_options().values()
                     if (option.name in of_other_models or option.requires not in taken | {None})
                     and getattr(config, option.name) != option.default)
    if ignored:
        flags = ", ".join(as_flag(name) for name in ignored)
        raise UserError(f"{flags} {'does' if len(ignored) == 1 else 'do'} not apply to --model {config.model}; "
                        f"drop {'it' if len(ignored) == 1 else 'them'} or choose a model that takes "
                        f"{'it' if len(ignored) == 1 else 'them'}")
    cls.check_options({option.name: getattr(config, option.name) for option in cls.options}, as_flag)


def new_run_dir(config: RunConfig, force: bool = False) -> Path:
    """The run folder a new run will write: ``--out`` (refusing to overwrite without --force), or the base name
    ``runs/MODEL-DATA`` that :func:`make_run_dir` numbers.

    Nothing is created or cleared here: :func:`make_run_dir` does that once
    the data and the model have loaded, so a run that fails to start leaves
    no stub folder and ``--force`` deletes no earlier results for nothing.
    """
    if config.out:
        run_dir = Path(config.out)
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"--out {run_dir} is a file; pass a folder for the run")
        if run_dir.exists() and any(run_dir.iterdir()) and not force:
            raise UserError(f"run folder {run_dir} already exists; pass --force to overwrite it, "
                            f"--resume {run_dir} to continue it, or another --out")
        return run_dir
    return Path("runs") / f"{config.model}-{_data_name(config.data)}"  # numbered by make_run_dir


PATH_OPTIONS = ("data", "labels", "data_dir")


def resolved_path(value: Any) -> Any:
    """A data, labels or data-folder option as an absolute path where it names an existing file or folder."""
    if isinstance(value, str) and value and value not in DATASETS.names() and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def _with_absolute_paths(config: RunConfig) -> RunConfig:
    """``config`` with its data, labels and data folder as absolute paths, so the run folder works from anywhere."""
    import dataclasses

    changes = {name: resolved_path(getattr(config, name)) for name in PATH_OPTIONS}
    changes = {name: value for name, value in changes.items() if value != getattr(config, name)}
    return dataclasses.replace(config, **changes) if changes else config


def make_run_dir(run_dir: Path, config: RunConfig, force: bool = False) -> Path:
    """Create the run folder and return it, first clearing what an earlier run wrote there under --force.

    A numbered folder (no --out) is claimed with an exclusive ``mkdir``, so
    runs started together get a folder each; an --out folder must still be
    empty (or --force given) when the run claims it.
    """
    if config.out is None:  # runs/MODEL-DATA, else the first free runs/MODEL-DATA-N
        base = run_dir
        base.parent.mkdir(parents=True, exist_ok=True)
        n = 1
        while True:
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                n += 1
                run_dir = base.with_name(f"{base.name}-{n}")
    elif run_dir.exists() and force:
        _clear_run_outputs(run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"run folder {run_dir} was filled while this run loaded its data; pass another --out")
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    return run_dir


def _clear_run_outputs(run_dir: Path) -> None:
    """Delete what an earlier run wrote in ``run_dir`` (for --force), and nothing else.

    The files of :data:`RUN_OUTPUTS`, and in its folders only the kinds of file
    a run writes there (pictures, JSON, weights, TensorBoard events, temporary
    files): a photo or notes the user keeps in ``images/`` or ``model/`` stay,
    and so do those folders then.
    """
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if not path.is_dir():
            path.unlink(missing_ok=True)
            continue
        for entry in sorted(path.rglob("*"), reverse=True):  # a folder's files before the folder
            if entry.is_dir() and not entry.is_symlink():
                if not any(entry.iterdir()):
                    entry.rmdir()
            elif entry.suffix in RUN_FILE_SUFFIXES or entry.name.startswith("events.out.tfevents."):
                entry.unlink()
        if not any(path.iterdir()):
            path.rmdir()


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The configuration of an existing run folder (UserError if it is not one)."""
    from aevb.config import read_config_file

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}; pass a folder written by 'aevb train'")
    path = run_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not an aevb run folder (no config.json); pass the folder that 'aevb train' wrote")
    if (run_dir / "weights.safetensors").is_file():  # RUN/model, or any model that Model.save wrote
        raise UserError(f"{run_dir} is an exported model, not a run folder; pass the run folder it is in "
                        f"({run_dir.parent}), or load it with aevb.load('{run_dir}')")
    return make_config(read_config_file(path))


def load_run_model(run_dir: str | Path, device: torch.device | None = None) -> Model:
    """The trained model of a run: RUN/model, or the last checkpoint if the run did not finish."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)  # a UserError unless this is a run folder
    if (run_dir / "model" / "config.json").is_file():
        return load(run_dir / "model", device=device)
    checkpoint = run_dir / CHECKPOINT
    if not checkpoint.is_file():
        raise UserError(f"{run_dir} has neither a trained model nor a checkpoint; train it first")
    state, meta = read_checkpoint(checkpoint)
    model = build_model(config.model, **legacy_model_args(config.model, meta["model_kwargs"]))
    _load_prefixed(model, state, "model.", checkpoint)
    model.eval()
    import warnings

    warnings.warn(f"{run_dir} has not finished training: using its last checkpoint, at step {meta.get('step')}",
                  UnfinishedRunWarning, stacklevel=2)
    model.checkpoint_step = meta.get("step")  # recorded in eval.json
    return model.to(device) if device is not None else model


class UnfinishedRunWarning(UserWarning):
    """A command used the last checkpoint of a run that has not finished training."""


# ---------------------------------------------------------------------------
# checkpoints: one safetensors file; tensors for state, JSON metadata for the rest


@dataclass
class Position:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches done in the current epoch
    perm: torch.Tensor | None = None  # the current epoch's order, [N] int64


def write_checkpoint(path: Path, model: Model, optimizer: torch.optim.Optimizer, position: Position,
                     shuffle: torch.Generator, model_kwargs: dict, settings: dict | None = None,
                     examples: int | None = None) -> None:
    """The whole training state in one safetensors file.

    ``settings`` (the run's config) and ``examples`` (the number of training
    examples) are what a resume is checked against.
    """
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    optim_state = optimizer.state_dict()
    for index, state in optim_state["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.shuffle"] = shuffle.get_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    if position.perm is not None:
        tensors["position.perm"] = position.perm
    meta = {
        "step": position.step, "epoch": position.epoch, "batch": position.batch,
        "param_groups": optim_state["param_groups"], "model_kwargs": model_kwargs, "config": settings,
        "examples": examples,
    }
    write_safetensors(path, tensors, metadata={"format": "aevb-checkpoint", "meta": json.dumps(meta)})


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(metadata["meta"])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise UserError(f"checkpoint {path} is corrupt or unreadable ({e}); delete it and train again") from None
    return state, meta


def _load_prefixed(module: torch.nn.Module, state: dict, prefix: str, path: Path) -> None:
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(sub)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else "different tensors"
        raise UserError(f"checkpoint {path} does not fit the model that config.json describes ({detail}); "
                        f"undo the change to the model options in config.json") from None


RESUMABLE = ("epochs", "steps", "device", "compile")  # what --resume may change


def _check_unchanged(path: Path, meta: dict, config: RunConfig) -> None:
    """The run's config.json must still say what the checkpoint was trained with (but for RESUMABLE)."""
    saved = meta.get("config")
    if not isinstance(saved, dict):  # checkpoints from before aevb recorded it
        return
    now = json.loads(json.dumps(_with_absolute_paths(config).to_dict()))  # tuples as lists, as stored
    saved = {k: resolved_path(v) if k in PATH_OPTIONS else v for k, v in saved.items()}
    changed = [k for k in now if k not in RESUMABLE and k != "out" and k in saved and saved[k] != now[k]]
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} → {now[k]!r}" for k in changed)
        raise UserError(f"the configuration to resume {path.parent.parent} with differs from the one its checkpoint "
                        f"was trained with ({detail}); --resume continues a run as it was trained (only "
                        f"{', '.join('--' + k for k in RESUMABLE)} may change): undo the change in its config.json, "
                        f"or start a new run with --config")


def _restore(path: Path, model: Model, optimizer: torch.optim.Optimizer, shuffle: torch.Generator,
             config: RunConfig, examples: int) -> Position:
    """Load the training state of ``path`` into ``model``, ``optimizer`` and ``shuffle``; the position to go on from.

    Everything that would otherwise fail later, or silently train on from a
    state that is not the run's, is a UserError here: a config or training
    data other than the run's (``examples``: the number of training examples
    now), non-finite weights, missing or malformed optimiser state, a shuffle
    order that is not one of the data.
    """
    run_dir = path.parent.parent
    state, meta = read_checkpoint(path)
    _check_unchanged(path, meta, config)
    saved_shape = (meta.get("model_kwargs") or {}).get("data_shape")
    trained_on = meta.get("examples")
    perm = state.get("position.perm")
    if trained_on is None and perm is not None and perm.dim() == 1:  # checkpoints from before "examples"
        trained_on = perm.numel()
    if (saved_shape is not None and tuple(saved_shape) != tuple(model.data_shape)) or (
            trained_on is not None and trained_on != examples):
        was = f"{trained_on} examples of shape {tuple(saved_shape or ())}"
        raise UserError(f"the training data of {run_dir} ({config.data}) are not the ones its checkpoint was trained on "
                        f"({was}; now {examples} of shape {tuple(model.data_shape)}); restore those data to resume, "
                        f"or start a new run on these")

    def corrupt(what: str) -> UserError:
        return UserError(f"checkpoint {path} is corrupt: {what}; delete the run's checkpoints and train again")

    _load_prefixed(model, state, "model.", path)
    if not all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()):
        raise corrupt("its weights hold NaN or infinite values")
    if perm is not None and (perm.dtype != torch.int64 or perm.shape != (examples,)
                             or not torch.equal(perm.sort().values, torch.arange(examples))):
        raise corrupt("its shuffle order (position.perm) is no order of the training examples")
    try:
        optim_state: dict[str, Any] = {"state": {}, "param_groups": meta["param_groups"]}
        for key, value in state.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optim_state["state"].setdefault(int(index), {})[name] = value
        step = int(meta["step"])
        _check_optimizer_state(optimizer, optim_state, step)
        optimizer.load_state_dict(optim_state)
        torch.set_rng_state(state["rng.torch"])
        shuffle.set_state(state["rng.shuffle"])
        position = Position(step, int(meta["epoch"]), int(meta["batch"]), perm)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a hand-edited or foreign file
        raise corrupt(f"its optimiser, random or position state cannot be read ({type(e).__name__}: {e})") from None
    cuda_states = [state[k] for k in sorted(state) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return position


def _check_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, step: int) -> None:
    """A ValueError unless ``saved`` is state this optimiser could have written after ``step`` steps.

    ``load_state_dict`` takes any values: a string learning rate fails only in
    the next step, and an empty state would silently restart Adam's moments.
    """
    if step > 0 and not saved["state"]:
        raise ValueError(f"no optimiser state after {step} steps")
    kinds = {frozenset(entry) for entry in saved["state"].values()}
    if len(kinds) > 1:
        raise ValueError("the parameters' optimiser states hold different entries")
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"{len(saved['param_groups'])} parameter groups for {len(optimizer.param_groups)}")
    for group, ours in zip(saved["param_groups"], optimizer.param_groups):
        for key, value in ours.items():
            if key != "params" and key in group and not _same_kind(group[key], value):
                raise ValueError(f"parameter group setting {key}={group[key]!r}")


def _same_kind(saved: Any, ours: Any) -> bool:
    """Whether a saved optimiser setting has the type of ours (numbers for numbers, pairs for pairs)."""
    if isinstance(ours, bool) or ours is None:
        return isinstance(saved, bool) or saved is None
    if isinstance(ours, (int, float)) or torch.is_tensor(ours):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved)
    if isinstance(ours, (tuple, list)):
        return isinstance(saved, (tuple, list)) and len(saved) == len(ours) and all(
            _same_kind(s, o) for s, o in zip(saved, ours))
    return type(saved) is type(ours)


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
        position = _restore(run_dir / CHECKPOINT, model, optimizer, shuffle, config, x_train.shape[0])
    else:
        position = Position()
        run_dir = make_run_dir(run_dir, config, force)
        config = _with_absolute_paths(config)
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
