"""A saved model read back: :func:`load` (``aevb.load``) and the training step it was exported at.

What :meth:`aevb.model.base.Model.save` writes, ``config.json`` and
``weights.safetensors``, is checked before anything is built: every size
against the weights' header (:mod:`aevb.model.weights`), the values finite.
Nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from aevb.errors import UserError
from aevb.io import loads_json
from aevb.model.base import FORMAT, Model, build_model, legacy_model_args
from aevb.model.weights import WeightsDoNotFit, check_finite, check_fits, check_list_lengths, read_header
from aevb.registry import NETWORKS, is_import_path


def exported_step(path: str | Path) -> int | None:
    """The training step a saved model was exported at (``Model.save(path, step=…)``); None where not recorded."""
    config_path = Path(path) / "config.json"
    try:
        step = loads_json(config_path.read_bytes()).get("step")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{config_path} is corrupt ({e}); re-export the model") from None
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise UserError(f"{config_path} is corrupt: its step is {step!r}, not a count ≥ 0; re-export the model")
    return step


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None, *,
         encoder: nn.Module | None = None, decoder: nn.Module | None = None) -> Model:
    """Load a model saved with :meth:`Model.save`, in the dtype it was saved in (or ``dtype``).  Nothing is unpickled.

    A model whose network is an import path (``arch="my_package.nets:build"``) is rebuilt by importing it; one
    built with networks of your own (``encoder=``, ``decoder=``) takes the same networks again here, and its
    weights are loaded into them.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config_path, weights_path = path / "config.json", path / "weights.safetensors"
    if not path.is_dir():
        raise UserError(f"no saved model at {path}: expected a folder with config.json and weights.safetensors")
    if (path / "model" / "config.json").is_file() and not config_path.is_file() or \
            (path / "model").is_dir() and (path / "checkpoints").is_dir():
        raise UserError(f"{path} is a run folder; load its model with aevb.load('{path / 'model'}')")
    for required in (config_path, weights_path):
        if not required.is_file():
            raise UserError(f"{path} is not a saved aevb model: {required.name} is missing")
    try:
        config = loads_json(config_path.read_bytes())
        name, args = config["model"], config["args"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path} is corrupt ({e}); re-export the model") from None
    if config.get("format") != FORMAT:
        raise UserError(f"{config_path} is not an aevb model config (format {config.get('format')!r})")
    stored = _DTYPES.get(config.get("dtype", "float32"))
    if stored is None:
        raise UserError(f"{config_path} names an unknown dtype {config.get('dtype')!r}; re-export the model")
    networks = {}
    if isinstance(args, dict) and "arch" in args and args["arch"] is None:
        if encoder is None or decoder is None:
            raise UserError(f"the model at {path} was built with networks of your own; load it with "
                            f"aevb.load('{path}', encoder=..., decoder=...) and the same networks, or build them "
                            f"from an import path (arch='my_package.nets:build') so that load imports them")
        networks = {"encoder": encoder, "decoder": decoder}
    elif encoder is not None or decoder is not None:
        raise UserError(f"the model at {path} builds its own networks (arch={args.get('arch')!r}); drop encoder= "
                        f"and decoder=")
    elif isinstance(args, dict) and is_import_path(args.get("arch")):
        NETWORKS.get(args["arch"])  # here, so that an import that fails says so, not "re-export the model"
    fix = "re-export the model"
    # every size config.json gives is checked against the weights' header before anything is allocated
    header = read_header(weights_path, fix)
    try:
        args = legacy_model_args(name, args)
        check_list_lengths(args, header, weights_path, str(config_path), fix)
        checked = check_fits(lambda: build_model(name, **args, **networks), header, weights_path, str(config_path),
                             dtype=stored)
        model = build_model(name, **args, **networks).to(stored)
    except WeightsDoNotFit:
        raise
    except UserError as e:
        raise UserError(f"{config_path} describes no model aevb can build ({e}); re-export the model") from None
    except (ValueError, TypeError, AttributeError) as e:  # a hand-edited value: "latent_dim": "x"
        raise UserError(f"{config_path} is corrupt ({type(e).__name__}: {e}); re-export the model") from None
    try:
        state = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights_path} is corrupt or unreadable ({e}); re-export the model") from None
    if not checked:  # a network that could not be built on the meta device: compared now
        check_fits(lambda: model, read_header(weights_path, fix), weights_path, str(config_path))
    check_finite(state, weights_path, "re-export the model from a run whose training did not diverge")
    model.load_state_dict(state)
    model.eval()
    if dtype is not None:
        model.to(dtype)
    return model.to(device) if device is not None else model
