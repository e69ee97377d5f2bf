"""Checkpoints: the whole training state in one safetensors file, and resuming from it.

A checkpoint holds everything that decides the future of a run: the
weights, the optimiser's moments, the global and shuffling RNG states, the
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
from aevb.run.folder import PATH_OPTIONS, resolved_path, with_absolute_paths

RESUMABLE = ("epochs", "steps", "device", "compile")  # what --resume may change


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

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        meta = loads_json(metadata["meta"])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise UserError(f"checkpoint {path} is corrupt or unreadable ({e}); delete it and train again") from None
    return state, meta


def checkpoint_step(path: Path) -> int:
    """The training step of a checkpoint, from its header alone (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = loads_json((f.metadata() or {})["meta"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint {path} is corrupt or unreadable ({e}); delete it and train again") from None
    return _count(meta, "step", path)


def _count(meta: Any, field: str, path: Path) -> int:
    """``meta[field]``, a whole number ≥ 0 (a UserError naming the checkpoint and the field otherwise)."""
    value = meta.get(field) if isinstance(meta, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserError(f"checkpoint {path} is corrupt: its {field} is {value!r}, not a count ≥ 0; delete the "
                        f"run's checkpoints and train again")
    return value


def checkpoint_model(path: Path, model_name: str) -> tuple[Model, int | None]:
    """The model of a checkpoint, in eval mode on the CPU, and the step it was saved at."""
    state, meta = read_checkpoint(path)
    model = build_model(model_name, **legacy_model_args(model_name, meta["model_kwargs"]))
    _load_prefixed(model, state, "model.", path)
    model.eval()
    return model, meta.get("step")


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
                        f"{', '.join('--' + k for k in RESUMABLE)} may change): undo the change in its config.json, "
                        f"or start a new run with --config")


def restore(path: Path, model: Model, optimizer: torch.optim.Optimizer, shuffle: torch.Generator,
            config: RunConfig, examples: int) -> Position:
    """Load the training state of ``path`` into ``model``, ``optimizer`` and ``shuffle``; the position to go on from.

    Everything that would otherwise fail later, or silently train on from a
    state that is not the run's, is a UserError here: a config or training
    data other than the run's (``examples``: the number of training examples
    now), non-finite weights, missing or malformed optimiser state, a shuffle
    order that is not one of the data.
    """
    state, meta = read_checkpoint(path)
    _check_unchanged(path, meta, config)
    _check_same_data(path, meta, state, config, model, examples)

    def corrupt(what: str) -> UserError:
        return UserError(f"checkpoint {path} is corrupt: {what}; delete the run's checkpoints and train again")

    _load_prefixed(model, state, "model.", path)
    if not all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()):
        raise corrupt("its weights hold NaN or infinite values")
    perm = state.get("position.perm")
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


def _check_same_data(path: Path, meta: dict, state: dict, config: RunConfig, model: Model, examples: int) -> None:
    """The training data now must be as many examples, of the shape, as the checkpoint was trained on."""
    saved_shape = (meta.get("model_kwargs") or {}).get("data_shape")
    trained_on = meta.get("examples")
    perm = state.get("position.perm")
    if trained_on is None and perm is not None and perm.dim() == 1:  # checkpoints from before "examples"
        trained_on = perm.numel()
    if (saved_shape is not None and tuple(saved_shape) != tuple(model.data_shape)) or (
            trained_on is not None and trained_on != examples):
        was = f"{trained_on} examples of shape {tuple(saved_shape or ())}"
        raise UserError(f"the training data of {path.parent.parent} ({config.data}) are not the ones its checkpoint "
                        f"was trained on ({was}; now {examples} of shape {tuple(model.data_shape)}); restore those "
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
