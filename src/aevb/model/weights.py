"""Reading weights back: every size and every value of a safetensors file checked before it is used.

A weights file comes with a description of the model it belongs to
(``config.json``'s arguments, a checkpoint's ``model_kwargs``), and either
may have been edited, cut short or swapped.  So before anything is
allocated, the model the description asks for is built on PyTorch's
``meta`` device, which holds shapes and no memory, and its tensors'
names, shapes and dtypes are compared with the file's header (which
safetensors reads without reading a tensor, :func:`read_header`): a
hand-edited ``"hidden": [5000000]`` is one error in milliseconds, and the
memory a load needs is bounded by the size of the files it reads
(:func:`check_fits`).  Once read, every floating-point tensor must be finite
(:func:`check_finite`).  Each problem is one message naming the file and the
tensor or field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from aevb.errors import UserError

# safetensors' names of the dtypes a model's tensors have
DTYPE_NAMES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}

Header = dict[str, tuple[tuple[int, ...], str]]  # tensor name → (shape, safetensors dtype name)


class WeightsDoNotFit(UserError):
    """A weights file does not hold the tensors its description asks for."""


def read_header(path: Path, fix: str) -> Header:
    """Every tensor's shape and dtype from a safetensors file's header (no tensor is read); ``fix`` ends the
    message of a file that is no safetensors file."""
    from safetensors import SafetensorError, safe_open  # imports torch's half of safetensors: here, not at --help

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupt or unreadable ({e}); {fix}") from None


def check_list_lengths(arguments: dict[str, Any], header: Header, file: Path, described_by: str, fix: str) -> None:
    """No list in a model's arguments (layer sizes, a shape) is longer than the file has tensors: each entry
    makes at least one, and a list of millions would be millions of layers to build before any comparison."""
    for name, value in arguments.items():
        if isinstance(value, (list, tuple)) and len(value) > max(len(header), 3):
            raise WeightsDoNotFit(f"{described_by} gives {name} {len(value)} entries, more than {file} has tensors "
                            f"({len(header)}); {fix}")


def check_fits(build: Callable[[], nn.Module], header: Header, file: Path, described_by: str, *,
               prefix: str = "", dtype: torch.dtype | None = None) -> bool:
    """Compare the tensors of ``build()``, built on the meta device (no memory), with the file's header.

    ``prefix``: of the model's tensors in the file (``model.`` in a
    checkpoint); ``dtype``: what the model is converted to before its
    weights are loaded.  A :class:`WeightsDoNotFit` names the tensors that are missing,
    unexpected or of another shape or dtype.  Returns False, having checked
    nothing, for a network that cannot be built without memory (a user's
    network that computes while it is built): the check after loading is then
    the only one.
    """
    try:
        with torch.device("meta"):
            model = build()
            if dtype is not None:
                model = model.to(dtype)
    except (RuntimeError, NotImplementedError):  # computing with a meta tensor: a user's network, checked later
        return False
    expected = {prefix + name: (tuple(t.shape), DTYPE_NAMES.get(t.dtype, str(t.dtype)))
                for name, t in model.state_dict().items()}
    stored = {name: entry for name, entry in header.items() if name.startswith(prefix)}
    problems = {
        "missing": sorted(set(expected) - set(stored)),
        "unexpected": sorted(set(stored) - set(expected)),
        "wrong shape": sorted(k for k in set(expected) & set(stored) if expected[k][0] != stored[k][0]),
        "wrong dtype": sorted(f"{k} ({stored[k][1]}, not {expected[k][1]})" for k in set(expected) & set(stored)
                              if expected[k][0] == stored[k][0] and expected[k][1] != stored[k][1]),
    }
    if any(problems.values()):
        raise WeightsDoNotFit(f"{file} does not match {described_by} ({_listed(problems)}); the two come from different "
                        f"models, or one was edited")
    return True


def check_finite(tensors: dict[str, torch.Tensor], file: Path, fix: str) -> None:
    """Every floating-point tensor read from ``file`` is finite (a UserError naming the first that is not)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{file}: tensor {name} holds NaN or infinite values; {fix}")


def _listed(problems: dict[str, list[str]]) -> str:
    return "; ".join(f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
                     for label, keys in problems.items() if keys)
