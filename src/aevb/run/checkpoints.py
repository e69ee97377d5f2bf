"""Checkpoints: the whole training state in one safetensors file, and resuming from it.

A checkpoint holds everything that decides the future of a run: the
weights, the optimiser's moments, the global RNG state of every worker (and
the world size) and the shuffling RNG state, the
epoch's permutation and the position in it (tensors), and the step, the
optimiser's settings, the model's arguments and the run's configuration
(JSON metadata).  So a resumed run continues bit for bit on CPU, and a
resume on another configuration or other data is refused, not trained on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from aevb.config import RunConfig
from aevb.errors import UserError
from aevb.io import loads_json, write_safetensors
from aevb.model.base import Model, build_model, legacy_model_args
from aevb.model.weights import (DTYPE_NAMES, WeightsDoNotFit, check_finite, check_fits, check_list_lengths,
                                 read_header)
from aevb.options import shown
from aevb.run.folder import PATH_OPTIONS, resolved_path, with_absolute_paths

RESUMABLE = ("epochs", "steps", "device", "compile", "checkpoint_every", "join_timeout")  # what --resume may change


@dataclass
class Position:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches done in the current epoch
    perm: torch.Tensor | None = None  # the current epoch's order, [N] int64
    best: float | None = None  # the lowest validation loss (−ELBO; an AE: reconstruction) at an epoch's end
    best_epoch: int = 0  # the epoch that reached it (early stopping counts the epochs since)


def write_checkpoint(path: Path, model: Model, optimizer: torch.optim.Optimizer, position: Position,
                     shuffle: torch.Generator, model_kwargs: dict, settings: dict | None = None,
                     examples: int | None = None, lr_schedule: Any = None,
                     rng_states: list[torch.Tensor] | None = None, precision: dict[str, str] | None = None) -> None:
    """The whole training state in one safetensors file.

    ``rng_states``: the global RNG state of every worker of a run across
    processes, rank 0's first (default: this process's alone).

    ``settings`` (the run's config) and ``examples`` (the number of training
    examples) are what a resume is checked against; ``lr_schedule`` (anything
    with a JSON-able ``state_dict()``: the learning-rate scheduler) is
    restored with the rest; ``precision`` is what
    ``--precision`` resolved to on which kind of device (``{"device": "cpu",
    "multiplies": "bf16"}``), which a resume on that kind takes again.
    """
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    optim_state = optimizer.state_dict()
    for index, state in optim_state["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    rng_states = rng_states or [torch.get_rng_state()]
    tensors["rng.torch"] = rng_states[0]
    for rank, rng_state in enumerate(rng_states[1:], start=1):
        tensors[f"rng.torch.rank{rank}"] = rng_state
    tensors["rng.shuffle"] = shuffle.get_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    if position.perm is not None:
        tensors["position.perm"] = position.perm
    meta = {
        "step": position.step, "epoch": position.epoch, "batch": position.batch,
        "param_groups": optim_state["param_groups"], "model_kwargs": model_kwargs, "config": settings,
        "examples": examples, "best": position.best, "best_epoch": position.best_epoch,
        "lr_schedule": None if lr_schedule is None else lr_schedule.state_dict(),
        "world_size": len(rng_states),
        "precision": precision,
    }
    write_safetensors(path, tensors, metadata={"format": "aevb-checkpoint", "meta": json.dumps(meta)})


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the metadata of a checkpoint, the metadata's fields checked (:func:`read_meta`)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    return state, _checked_meta(metadata, path)


def read_meta(path: Path) -> dict:
    """A checkpoint's metadata alone, from its header (no tensor is read); each field checked."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    return _checked_meta(metadata, path)


def checkpoint_step(path: Path) -> int:
    """The training step of a checkpoint, from its header alone."""
    return read_meta(path)["step"]


def _unreadable(path: Path, error: Exception) -> UserError:
    return UserError(f"checkpoint {path} is corrupt or unreadable ({error}); delete it and train again")


def _corrupt(path: Path, what: str) -> UserError:
    return UserError(f"checkpoint {path} is corrupt: {what}; delete the run's checkpoints and train again")


def _checked_meta(metadata: dict, path: Path) -> dict:
    """The checkpoint's JSON metadata, each field of the kind aevb writes (a UserError naming the field)."""
    try:
        meta = loads_json(metadata["meta"])
    except (KeyError, ValueError, TypeError) as e:
        raise _unreadable(path, e) from None
    if not isinstance(meta, dict):
        raise _corrupt(path, "its metadata is no table")
    for field in ("step", "epoch", "batch"):
        value = meta.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _corrupt(path, f"its {field} is {value!r}, not a count ≥ 0")
    examples = meta.get("examples")
    if examples is not None and (not isinstance(examples, int) or isinstance(examples, bool) or examples < 1):
        raise _corrupt(path, f"its examples is {examples!r}, not a count ≥ 1")
    for field, kind, name in (("model_kwargs", dict, "a table"), ("param_groups", list, "a list"),
                              ("config", (dict, type(None)), "a table")):
        if not isinstance(meta.get(field), kind):
            raise _corrupt(path, f"its {field} is {type(meta.get(field)).__name__}, not {name}")
    precision = meta.get("precision")  # absent from checkpoints written before it was recorded
    if precision is not None and not (isinstance(precision, dict) and precision.get("multiplies") in ("fp32", "bf16")
                                      and isinstance(precision.get("device"), str)):
        raise _corrupt(path, f"its precision is {shown(precision)}, not the kind of device and fp32 or bf16")
    return meta


def checkpoint_model(path: Path, model_name: str) -> tuple[Model, int | None]:
    """The model of a checkpoint, in eval mode on the CPU, and the step it was saved at.

    The sizes the checkpoint's model arguments give are checked against its
    tensors before the model is built, and its weights must be finite.
    """
    state, meta = read_checkpoint(path)
    kwargs = legacy_model_args(model_name, meta["model_kwargs"])
    header = {name: (tuple(t.shape), DTYPE_NAMES.get(t.dtype, str(t.dtype))) for name, t in state.items()}
    fix = "delete it and train again"
    try:
        check_list_lengths(kwargs, header, path, "its model arguments (model_kwargs)", fix)
        check_fits(lambda: build_model(model_name, **kwargs), header, path, "its model arguments (model_kwargs)",
                   prefix="model.")
        model = build_model(model_name, **kwargs)
    except WeightsDoNotFit:
        raise
    except UserError as e:
        raise _corrupt(path, f"its model arguments describe no model aevb can build ({e})") from None
    check_finite({k: v for k, v in state.items() if k.startswith("model.")}, path, fix)
    _load_prefixed(model, state, "model.", path)
    model.eval()
    return model, meta["step"]


def _load_prefixed(module: torch.nn.Module, state: dict, prefix: str, path: Path) -> None:
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(sub)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else "different tensors"
        raise UserError(f"checkpoint {path} does not fit the model that config.json describes ({detail}); "
                        f"undo the change to the model options in config.json") from None


def _check_unchanged(path: Path, meta: dict, config: RunConfig) -> None:
    """The run's config.json must still say what the checkpoint was trained with (but for RESUMABLE)."""
    saved = meta.get("config")
    if not isinstance(saved, dict):  # checkpoints from before aevb recorded it
        return
    now = json.loads(json.dumps(with_absolute_paths(config).to_dict()))  # tuples as lists, as stored
    saved = {k: resolved_path(v) if k in PATH_OPTIONS else v for k, v in saved.items()}
    changed = [k for k in now if k not in RESUMABLE and k != "out" and k in saved and saved[k] != now[k]]
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} → {now[k]!r}" for k in changed)
        raise UserError(f"the configuration to resume {path.parent.parent} with differs from the one its checkpoint "
                        f"was trained with ({detail}); --resume continues a run as it was trained (only "
                        f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} may change): undo the change in its config.json, "
                        f"or start a new run with --config")


def check_resumable(path: Path, config: RunConfig, model_kwargs: dict, examples: int) -> None:
    """Before the model is built, from the checkpoint's header alone: it is this run's (its configuration, its
    data) and its tensors are those of the model ``model_kwargs`` describe, so no size read from a file is
    allocated before it is checked."""
    meta = read_meta(path)
    fix = "delete the run's checkpoints and train again, or undo the change to its config.json"
    header = read_header(path, fix)
    _check_unchanged(path, meta, config)
    perm = header.get("position.perm")
    _check_same_data(path, meta, perm[0][0] if perm is not None and len(perm[0]) == 1 else None, config,
                     tuple(model_kwargs["data_shape"]), examples)
    described_by = f"the model {path.parent.parent / 'config.json'} describes"
    check_list_lengths(model_kwargs, header, path, described_by, fix)
    check_fits(lambda: build_model(config.model, **model_kwargs), header, path, described_by, prefix="model.")


def restore(path: Path, model: Model, optimizer: torch.optim.Optimizer, shuffle: torch.Generator,
            config: RunConfig, examples: int, lr_schedule: Any = None, rank: int = 0,
            world_size: int = 1) -> Position:
    """Load the training state of ``path`` into ``model``, ``optimizer`` and ``shuffle``; the position to go on from.

    Everything that would otherwise fail later, or silently train on from a
    state that is not the run's, is a UserError here: a config or training
    data other than the run's (``examples``: the number of training examples
    now), non-finite weights or optimiser state, missing or malformed
    optimiser state, a position that is no place in the run (a negative step,
    a batch past its epoch's end), random states of another kind, a shuffle
    order that is not one of the data.  Worker ``rank`` of ``world_size``
    takes its own global RNG state where the run had as many workers, else
    rank 0's.
    """
    state, meta = read_checkpoint(path)
    _check_unchanged(path, meta, config)
    perm = state.get("position.perm")
    _check_same_data(path, meta, perm.numel() if perm is not None and perm.dim() == 1 else None, config,
                     model.data_shape, examples)

    def corrupt(what: str) -> UserError:
        return _corrupt(path, what)

    _load_prefixed(model, state, "model.", path)
    if not all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()):
        raise corrupt("its weights hold NaN or infinite values")
    if perm is not None and (perm.dtype != torch.int64 or perm.shape != (examples,)
                             or not torch.equal(perm.sort().values, torch.arange(examples))):
        raise corrupt("its shuffle order (position.perm) is no order of the training examples")
    step, epoch, batch = meta["step"], meta["epoch"], meta["batch"]
    steps_per_epoch = math.ceil(examples / config.batch_size)
    if batch > steps_per_epoch or step != epoch * steps_per_epoch + batch:
        raise corrupt(f"its position (step {step}, epoch {epoch}, batch {batch}) is no place in a run of "
                      f"{steps_per_epoch} steps an epoch")
    _check_tensor_state(path, state, list(model.parameters()))
    try:
        optim_state: dict[str, Any] = {"state": {}, "param_groups": meta["param_groups"]}
        for key, value in state.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optim_state["state"].setdefault(int(index), {})[name] = value
        _check_optimizer_state(optimizer, optim_state, step)
        optimizer.load_state_dict(optim_state)
        if lr_schedule is not None and meta.get("lr_schedule") is not None:
            lr_schedule.load_state_dict(meta["lr_schedule"])
        same_workers = int(meta.get("world_size", 1)) == world_size
        torch.set_rng_state(state[f"rng.torch.rank{rank}" if rank and same_workers else "rng.torch"])
        shuffle.set_state(state["rng.shuffle"])
        best = meta.get("best")  # checkpoints from before aevb kept the best epoch have none
        position = Position(step, epoch, batch, perm, None if best is None else float(best),
                            int(meta.get("best_epoch") or 0))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a hand-edited or foreign file
        raise corrupt(f"its optimiser, random or position state cannot be read ({type(e).__name__}: {e})") from None
    cuda_states = [state[k] for k in sorted(state) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return position


def _check_tensor_state(path: Path, state: dict[str, torch.Tensor], parameters: list[torch.Tensor]) -> None:
    """The optimiser's tensors finite numbers of their parameters' shapes, the random states bytes."""
    for key, value in state.items():
        if key.startswith("optim."):
            index = key.split(".")[1]
            if not value.is_floating_point():
                raise _corrupt(path, f"its optimiser state {key} is {value.dtype}, not floating point")
            if not bool(torch.isfinite(value).all()):
                raise _corrupt(path, f"its optimiser state {key} holds NaN or infinite values")
            if not index.isdigit() or int(index) >= len(parameters):
                raise _corrupt(path, f"its optimiser state {key} belongs to no parameter of the model")
            if value.dim() and value.shape != parameters[int(index)].shape:
                raise _corrupt(path, f"its optimiser state {key} has shape {tuple(value.shape)}, its parameter "
                                     f"{tuple(parameters[int(index)].shape)}")
        elif key.startswith("rng.") and value.dtype != torch.uint8:
            raise _corrupt(path, f"its random state {key} is {value.dtype}, not bytes (uint8)")


def _check_same_data(path: Path, meta: dict, perm_length: int | None, config: RunConfig,
                     data_shape: tuple[int, ...], examples: int) -> None:
    """The training data now must be as many examples, of the shape, as the checkpoint was trained on."""
    saved_shape = meta["model_kwargs"].get("data_shape")
    trained_on = meta.get("examples")
    if trained_on is None:  # checkpoints from before "examples": the length of the shuffle order
        trained_on = perm_length
    if (saved_shape is not None and tuple(saved_shape) != tuple(data_shape)) or (
            trained_on is not None and trained_on != examples):
        was = f"{trained_on} examples of shape {tuple(saved_shape or ())}"
        raise UserError(f"the training data of {path.parent.parent} ({config.data}) are not the ones its checkpoint "
                        f"was trained on ({was}; now {examples} of shape {tuple(data_shape)}); restore those "
                        f"data to resume, or start a new run on these")


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
