"""Samplers fitted to a run's codes, kept in its folder, and :func:`draw`: samples of a run from any sampler.

    RUN/samplers/gmm.safetensors   the fitted sampler's tensors
    RUN/samplers/gmm.json          its options, what the fit found, the seed, and what it was fitted to: the
                                   digest of the model's weights and the digest of the tensors file

    sampler = fit_sampler(run, "flow", {"transforms": 4})   # fitted to the training split's codes, saved
    x = draw(run, "gmm", 64, torch.Generator().manual_seed(0))   # [64, *data_shape]: decoder means

The codes are the posterior means E_q[z|x] of the run's training split (the
deterministic autoencoder's codes themselves).  A saved fit is used only
while the model's weights are those it was fitted to (a resumed or
retrained run refits); ``aevb fit-sampler`` always fits afresh, so other
options never find an old fit.  Writing owns the run folder
(:func:`aevb.run.owner.own_run`), so the run's list of files names the
sampler and ``--force`` sets it aside with the run.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from aevb.errors import UserError
from aevb.io import loads_json, write_json, write_safetensors
from aevb.model.base import Model
from aevb.options import as_flag
from aevb.registry import SAMPLERS
from aevb.run.open import Run
from aevb.run.owner import own_run
from aevb.sampling.codes import codes
from aevb.sampling.samplers import PriorSampler, Sampler

SAMPLER_FOLDER = "samplers"


class UnsavedSamplerWarning(UserWarning):
    """A sampler was fitted but could not be written into the run folder (another process owns it, or it is
    read-only): it served this command only."""


def sampler_paths(run_dir: str | Path, name: str) -> tuple[Path, Path]:
    """(RUN/samplers/NAME.safetensors, RUN/samplers/NAME.json)."""
    folder = Path(run_dir) / SAMPLER_FOLDER
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def training_codes(run: Run) -> torch.Tensor:
    """The posterior means [N, D] of the run's training split, prepared as in training."""
    x, _ = run.held_out("train")
    if not isinstance(x, torch.Tensor):
        raise UserError(f"{run.path}'s training data are read a batch at a time (streamed or a Dataset of yours), "
                        f"which a sampler is not fitted to; sample it with --sampler prior")
    if len(x) < 2:
        raise UserError(f"{run.path} has {len(x)} training example(s): too few codes to fit a sampler to")
    run.check_data_shape(x)
    return codes(run.model, x)[0]


def weights_digest(model: Model) -> str:
    """SHA-256 of the model's weights (names, shapes, dtypes and values): what a fitted sampler belongs to."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fitted_samplers() -> list[str]:
    """The names of the samplers fitted to codes (the others, the prior, are the model's own)."""
    return [name for name, entry in SAMPLERS.items() if entry.fitted]


def _fitted_class(name: str) -> type[Sampler]:
    entry = SAMPLERS.get(name)  # an unknown name: a UserError naming the choices
    if not entry.fitted:
        raise UserError(f"the {name} sampler is the model's own and is not fitted; fit one of: "
                        f"{', '.join(fitted_samplers())}")
    return entry


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every option of sampler ``name``: those given checked (as ``--flag`` in messages), the others at their
    defaults; an option of another sampler is refused."""
    entry = _fitted_class(name)
    declared = {option.name: option for option in entry.options}
    foreign = sorted(set(options) - set(declared))
    if foreign:
        raise UserError(f"{', '.join(map(as_flag, foreign))} {'is not an option' if len(foreign) == 1 else 'are not options'} "
                        f"of the {name} sampler (its options: {', '.join(map(as_flag, declared)) or 'none'})")
    return {key: option.check(options.get(key, option.default), option.flag) for key, option in declared.items()}


def fit_sampler(run: Run, name: str, options: dict[str, Any] | None = None, *, seed: int = 0,
                echo: Callable[[str], None] | None = None) -> tuple[Sampler, Path | None]:
    """Fit sampler ``name`` to the codes of the run's training split with ``options`` (the others at their
    defaults) and write it into the run folder: (the sampler, the path of its JSON record, or None where unsaved).

    A folder that cannot be written now (another process owns it, or it is
    read-only) gets an :class:`UnsavedSamplerWarning`, and the fit serves the caller.
    """
    entry, checked = _fitted_class(name), check_options(name, options or {})
    model, echo = run.model, echo or (lambda message: None)
    z = training_codes(run)
    echo(f"fitting the {name} sampler to the posterior means of {len(z)} training examples")
    sampler = entry.fit_to(model, z, seed, **checked)
    try:
        return sampler, save_sampler(run.path, name, sampler, checked, seed=seed, codes=len(z), model=model,
                                     step=run.provenance.step)
    except UserError as e:
        warnings.warn(f"the {name} sampler was fitted but not saved ({e}); it serves this command only",
                      UnsavedSamplerWarning, stacklevel=2)
        return sampler, None


def save_sampler(run_dir: Path, name: str, sampler: Sampler, options: dict[str, Any], *, seed: int, codes: int,
                 model: Model, step: int | None) -> Path:
    """Write a fitted sampler into RUN/samplers/, owning the run folder; the JSON file's path."""
    tensors_path, record_path = sampler_paths(run_dir, name)
    tensors, description = sampler.state()
    with own_run(run_dir, f"aevb fit-sampler ({name})", brief=True):
        tensors_path.parent.mkdir(exist_ok=True)
        write_safetensors(tensors_path, tensors)
        record = {"sampler": name, "options": options, "seed": seed, "codes": codes, "latent_dim": model.latent_dim,
                  "fitted_to": "the posterior means of the training split", "step": step,
                  "weights_sha256": weights_digest(model), "tensors_sha256": _file_digest(tensors_path),
                  "fit": description}
        write_json(record_path, record)  # written last: a sampler without it was never saved
    return record_path


def saved_sampler(run_dir: str | Path, name: str, model: Model) -> tuple[Sampler | None, dict | None, str]:
    """(the sampler saved in the run folder, its record, "") where it was fitted to ``model``'s weights; else
    (None, the record where there is a readable one, why it does not serve)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors_path, record_path = sampler_paths(run_dir, name)
    if not record_path.is_file():
        return None, None, f"no {name} sampler is fitted (aevb fit-sampler RUN --sampler {name})"
    damaged = f"{record_path} is damaged; fit it again with aevb fit-sampler RUN --sampler {name}"
    try:
        record = loads_json(record_path.read_bytes())
    except (ValueError, OSError):
        return None, None, damaged
    if not isinstance(record, dict) or record.get("sampler") != name or not isinstance(record.get("fit"), dict):
        return None, None, damaged
    if record.get("weights_sha256") != weights_digest(model) or record.get("latent_dim") != model.latent_dim:
        return None, record, f"the {name} sampler was fitted to other weights of the model (step {record.get('step')})"
    try:
        if not tensors_path.is_file() or _file_digest(tensors_path) != record.get("tensors_sha256"):
            return None, record, damaged
        sampler = SAMPLERS.get(name).restore(load_file(tensors_path), record["fit"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError):
        return None, record, damaged
    return sampler, record, ""


def sampler_for(run: Run, name: str, *, seed: int = 0, echo: Callable[[str], None] | None = None) -> Sampler:
    """Sampler ``name`` of the run: the prior, or a fitted one as saved (fitted now with ``seed`` where there is
    none, or refitted, with the options and seed it had, where it was fitted to other weights or is damaged)."""
    entry = SAMPLERS.get(name)
    if not entry.fitted:
        return PriorSampler(run.model)
    echo = echo or (lambda message: None)
    sampler, record, reason = saved_sampler(run.path, name, run.model)
    if sampler is not None:
        echo(f"{name} sampler: {_summary(record)}")
        return sampler
    options = {}
    if record is not None and isinstance(record.get("options"), dict):
        options = record["options"]  # refitted as it was fitted before
        recorded = record.get("seed")
        if isinstance(recorded, int) and not isinstance(recorded, bool) and 0 <= recorded < 2**63:
            seed = recorded
        echo(f"{reason}: fitting it again with the same options")
    return fit_sampler(run, name, options, seed=seed, echo=echo)[0]


def _summary(record: dict) -> str:
    options = ", ".join(f"{as_flag(k)} {','.join(map(str, v)) if isinstance(v, list) else v}"
                        for k, v in (record.get("options") or {}).items() if v is not None)
    return f"fitted to {record.get('codes')} training codes ({options or 'default options'})"


@torch.no_grad()
def draw(run: Run, sampler: str, n: int, generator: torch.Generator | None = None, temperature: float = 1.0, *,
         echo: Callable[[str], None] | None = None) -> torch.Tensor:
    """Samples [n, *data_shape] of the run's model: the means of p(x|z) for z drawn from ``sampler`` (``prior``,
    ``gmm``, ``flow``; fitted now and saved where it has no fit of these weights).

    ``generator``: on the model's device; one seed gives the same samples
    every time, before and after the sampler is saved and loaded.  ``echo`` is
    told which fit is used, or that one is made.
    """
    if n < 1 or not 0 <= temperature < float("inf"):
        raise UserError(f"draw n ≥ 1 samples at a finite temperature ≥ 0, not n = {n} at T = {temperature}")
    return decode_samples(run.model, sampler_for(run, sampler, echo=echo), n, generator, temperature)


@torch.no_grad()
def decode_samples(model: Model, sampler: Sampler, n: int, generator: torch.Generator | None = None,
                   temperature: float = 1.0) -> torch.Tensor:
    """[n, *data_shape]: the means of p(x|z) for n codes z [n, D] from ``sampler``, the model in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return sampler.decoded(model, n, generator, temperature)
    finally:
        model.train(was_training)
