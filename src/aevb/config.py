"""The configuration of a training run: one typed dataclass, defined once.

Every field is a command-line flag of ``aevb train`` (``latent_dim`` →
``--latent-dim``) and a key of a TOML or JSON config file; the command line
builds its options from these fields, so an option is never defined twice.
The resolved configuration is written to ``RUN/config.json`` and
``aevb train --config RUN/config.json`` reproduces the run.

This module does not import torch, so that ``aevb --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aevb.errors import UserError
from aevb.registry import DATASETS, LIKELIHOODS, MODELS, NETWORKS, PRIORS, SCHEDULES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FORMAT = "aevb-run"
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.manual_seed takes
# Options added after config.json's format was first written, with the values that
# reproduce a run from before them (whose config.json, listing every option, lacks them).
OPTIONS_ADDED_LATER = {"precision": "fp32", "output_bias": "default", "posterior_scale": "log-scale"}
BINARIZE_MODES = ("none", "threshold", "dynamic")
STREAM_MODES = ("auto", "yes", "no")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
OUTPUT_BIAS_INITS = ("data-mean", "default")
POSTERIOR_SCALES = ("log-variance", "log-scale")
CORRUPTIONS = ("gaussian", "masking", "salt-and-pepper")
SPARSITY_PENALTIES = ("l1", "kl")
JACOBIAN_MODES = ("auto", "exact", "projections")


# side of the largest square images a folder is resized to: a float32 batch of 128 RGB images of 1024²
# pixels is 1.6 GB already, and a resize to a size no data set has is a typing slip
MAX_IMAGE_SIZE = 1024


def _opt(default: Any, help: str, *, group: str, choices: Any = None, short: str | None = None,
         metavar: str | None = None):
    return field(default=default, metadata={"help": help, "group": group, "choices": choices,
                                            "short": short, "metavar": metavar})


@dataclass
class RunConfig:
    # -- data ---------------------------------------------------------------
    data: str = _opt("digits", "registered data set (see choices) or a path: IDX/.npy/.npz/.csv file or an image folder", group="data", metavar="NAME|PATH")
    labels: str | None = _opt(None, "labels file for --data FILE (IDX, .npy or .csv)", group="data", metavar="FILE")
    data_dir: str | None = _opt(None, "folder holding the published files of mnist/fashion-mnist/cifar10", group="data", metavar="DIR")
    download: bool = _opt(False, "download mnist/fashion-mnist/cifar10 with torchvision when missing", group="data")
    test_split: float = _opt(0.1, "held-out test examples: a count (2000) or a fraction (0.1), taken from the end in file order (an image folder with class subfolders: in a seeded random order, as with --shuffle)", group="data", metavar="N|F")
    val_split: float = _opt(0.0, "validation examples taken from the end of the training part (0: report the test set each epoch)", group="data", metavar="N|F")
    shuffle: bool = _opt(False, "shuffle (seeded) before splitting instead of splitting in file order", group="data")
    image_size: int | None = _opt(None, "resize and centre-crop an image folder to this size (default 64)", group="data", metavar="PX")
    binarize: str = _opt("none", "binarise images for Bernoulli likelihoods: none, threshold (>0.5) or dynamic (resampled each epoch)", group="data", choices=BINARIZE_MODES)
    dequantize: bool = _opt(False, "add uniform noise within each 8-bit level, (k + u)/256, to train and evaluate a continuous likelihood (gaussian*, laplace*, continuous-bernoulli) as a density over [0, 1]: bits/dim are then an upper bound on those of the 8-bit data, and only then reported; the noise is drawn afresh for every batch, once (seeded) for evaluation", group="data")
    stream: str = _opt("auto", "read the training images batch by batch from a memory-mapped .npy file (an image folder: from its 8-bit pixels, decoded once into ~/.cache/aevb/folders) instead of converting all of them to float32 up front: yes, no, or auto (when the float32 copy would take more than half of the available memory)", group="data", choices=STREAM_MODES)
    # -- model --------------------------------------------------------------
    model: str = _opt("vae", "model", group="model", choices=MODELS)
    likelihood: str = _opt("bernoulli", "likelihood p(x|z)", group="model", choices=LIKELIHOODS)
    arch: str = _opt("mlp", "encoder/decoder network", group="model", choices=NETWORKS)
    latent_dim: int = _opt(20, "dimension of z", group="model", metavar="D")
    hidden: list[int] | None = _opt(None, "hidden sizes, comma-separated (mlp default 400; conv: its linear layer)", group="model", metavar="N[,N…]")
    likelihood_scale: float | None = _opt(None, "fixed σ of gaussian / scale of laplace, or initial value of the learned ones (default 1)", group="model", metavar="S")
    beta: float = _opt(1.0, "weight of the KL term in the training loss (β-VAE); the reported ELBO always uses 1", group="model")
    beta_warmup: int = _opt(0, "steps over which β rises linearly from 0 to --beta (0: constant)", group="model", metavar="STEPS")
    beta_schedule: str = _opt("linear", "KL weight schedule: constant, linear (over --beta-warmup steps; constant while that is 0) or cyclical (Fu et al. 2019: --beta-cycles ramps from 0 to --beta, each over --beta-ratio of its cycle)", group="model", choices=SCHEDULES)
    beta_cycles: int = _opt(4, "cycles of the cyclical β schedule over the run", group="model", metavar="M")
    beta_ratio: float = _opt(0.5, "fraction of each cycle over which the cyclical β rises (then stays at --beta)", group="model", metavar="R")
    free_bits: float = _opt(0.0, "free bits λ (Kingma et al. 2016): the training loss uses Σ_d max(λ, batch-mean KL_d) per latent dimension d, in nats (0: off); VAE with a factorising prior", group="model", metavar="NATS")
    posterior_scale: str = _opt("log-variance", "what the encoder outputs for the Gaussian posterior's scale: log σ² (trains faster under Adam) or log σ (models from before aevb had the choice)", group="model", choices=POSTERIOR_SCALES)
    prior: str = _opt("standard", "prior p(z): standard normal, a learned mixture of Gaussians (mog) or the VampPrior (vamp)", group="model", choices=PRIORS)
    prior_components: int | None = _opt(None, "components K of the mog prior (default 10) or pseudo-inputs of the vamp prior (default 100)", group="model", metavar="K")
    stochastic_layers: int = _opt(2, "hvae: stochastic layers, each of --latent-dim dimensions", group="model", metavar="L")
    corruption: str = _opt("gaussian", "dae: corruption of the input: gaussian (additive noise of σ = level), masking (each value zeroed with probability level) or salt-and-pepper (each value set to 0 or 1 with probability level)", group="model", choices=CORRUPTIONS)
    noise_level: float = _opt(0.3, "dae: corruption level (σ or probability)", group="model", metavar="LEVEL")
    sparsity: str = _opt("l1", "sparse-ae: penalty on the code: l1 (Σ|z_d|) or kl (Σ_d KL(ρ ‖ ρ̂_d) with ρ̂_d the batch-mean sigmoid activation)", group="model", choices=SPARSITY_PENALTIES)
    sparsity_weight: float = _opt(0.1, "sparse-ae: weight of the sparsity penalty", group="model", metavar="W")
    sparsity_target: float = _opt(0.05, "sparse-ae: target mean activation ρ of the kl penalty", group="model", metavar="RHO")
    contractive_weight: float = _opt(0.1, "cae: weight of the penalty ‖∂f/∂x‖²_F", group="model", metavar="W")
    jacobian: str = _opt("auto", "cae: Jacobian norm exactly (one backward pass per code dimension), by random projections, or auto (exact up to 16 code dimensions)", group="model", choices=JACOBIAN_MODES)
    jacobian_projections: int = _opt(1, "cae: random projections per example for --jacobian projections", group="model", metavar="N")
    mc_samples: int = _opt(1, "Monte Carlo samples of z per example in the VAE loss", group="model", metavar="L")
    k: int = _opt(5, "importance samples of the IWAE bound", group="model")
    # -- training -----------------------------------------------------------
    epochs: int = _opt(10, "passes over the training data", group="training")
    steps: int | None = _opt(None, "stop after this many optimiser steps instead (overrides --epochs)", group="training")
    batch_size: int = _opt(128, "examples per optimiser step", group="training")
    lr: float = _opt(3e-3, "Adam learning rate", group="training")
    adam_betas: list[float] = _opt((0.9, 0.999), "Adam β1,β2", group="training", metavar="B1,B2")
    output_bias: str = _opt("data-mean", "initial bias of the decoder's last layer: data-mean (p(x|z) starts at the training set's average image) or default (torch's initialisation)", group="training", choices=OUTPUT_BIAS_INITS)
    grad_clip: float | None = _opt(None, "clip the gradient norm to this value", group="training", metavar="NORM")
    seed: int = _opt(0, "random seed: the same seed and config give the same weights on CPU", group="training")
    device: str = _opt("auto", "where to train: auto picks cuda, then mps, then cpu", group="training", choices=DEVICES)
    precision: str = _opt("auto", "multiplies of the training step: bf16 (bfloat16 matrix multiplies, and convolutions on GPUs; all else float32; see aevb.precision), fp32, or auto (bf16 where it is faster than fp32: CPUs with AMX or a bf16 multiply measured 1.5× faster, GPUs from Ampere on; else fp32); the test ELBO is always float32", group="training", choices=PRECISIONS)
    compile: bool = _opt(False, "compile the training loss with torch.compile (on the CPU it needs a C++ compiler): faster steps after a compile of several seconds, so it pays on long runs only; measured in bench/README.md", group="training")
    log_every: int = _opt(50, "steps between metric records (values are read from the device only then)", group="training", metavar="STEPS")
    image_every: int = _opt(0, "steps between reconstruction pictures (0: at about ten epoch ends over the run)", group="training", metavar="STEPS")
    eval_batch_size: int = _opt(1000, "examples per batch for validation and evaluation", group="training")
    tensorboard: bool = _opt(False, "also log to TensorBoard (needs the tensorboard package)", group="training")
    wandb: bool = _opt(False, "also log to Weights & Biases (needs the wandb package)", group="training")
    out: str | None = _opt(None, "run folder (default runs/MODEL-DATA, numbered so nothing is overwritten)", group="training", metavar="DIR")

    def model_kwargs(self, data_shape: tuple[int, ...]) -> dict[str, Any]:
        """Arguments of :func:`aevb.models.build_model` for this run."""
        kwargs: dict[str, Any] = dict(data_shape=data_shape, latent_dim=self.latent_dim, arch=self.arch,
                                      likelihood=self.likelihood, hidden=self.hidden)
        if self.likelihood_scale is not None:
            kwargs["likelihood_args"] = {"scale": self.likelihood_scale}
        if MODELS.get(self.model).posterior_family == "gaussian":
            kwargs["posterior_args"] = {"scale_param": self.posterior_scale}
        # each model says which run options it takes (imports torch: called by training only)
        kwargs.update(MODELS.get(self.model).run_kwargs(self))
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    def validate(self) -> "RunConfig":
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise UserError(f"unknown --{flag(f.name)} {value!r}; choose one of: {', '.join(choices)}")
        for f in dataclasses.fields(self):  # NaN passes every comparison below; ±inf is no setting either
            value = getattr(self, f.name)
            numbers = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                raise UserError(f"--{flag(f.name)} must be a finite number, got {value}")
        positive = ("latent_dim", "epochs", "batch_size", "mc_samples", "k", "log_every", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if self.lr <= 0 or self.beta < 0:
            raise UserError(f"need --lr > 0 and --beta ≥ 0, got lr={self.lr}, beta={self.beta}")
        for name in ("beta_warmup", "image_every"):
            if getattr(self, name) < 0:
                raise UserError(f"--{flag(name)} must be ≥ 0 (0: {'off' if name == 'beta_warmup' else 'the default'}), "
                                f"got {getattr(self, name)}")
        if self.image_size is not None and not 1 <= self.image_size <= MAX_IMAGE_SIZE:
            raise UserError(f"--image-size must be between 1 and {MAX_IMAGE_SIZE} pixels, got {self.image_size}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise UserError(f"--grad-clip is a gradient norm and must be > 0, got {self.grad_clip}; leave it out "
                            f"for no clipping")
        if self.likelihood_scale is not None and self.likelihood_scale <= 0:
            raise UserError(f"--likelihood-scale must be > 0, got {self.likelihood_scale}")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise UserError(f"--seed must be in [-2^63, 2^64), got {self.seed}")
        if self.hidden is not None and any(h < 1 for h in self.hidden):
            raise UserError(f"--hidden sizes must be positive, got {self.hidden}")
        # a layer's size is a 64-bit count to torch: beyond that its error names no option
        for name, sizes in (("latent_dim", [self.latent_dim]), ("hidden", self.hidden or [])):
            if any(size >= 2**31 for size in sizes):
                raise UserError(f"--{flag(name)} must be below 2^31, got {sizes[0] if name == 'latent_dim' else sizes}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise UserError(f"--adam-betas takes two numbers in [0, 1), got {self.adam_betas}")
        if self.beta_schedule == "constant" and self.beta_warmup:
            raise UserError("--beta-warmup sets the linear schedule; drop it or use --beta-schedule linear")
        if self.beta_cycles < 1 or not 0 < self.beta_ratio <= 1:
            raise UserError(f"need --beta-cycles ≥ 1 and 0 < --beta-ratio ≤ 1, got {self.beta_cycles} and {self.beta_ratio}")
        if self.free_bits < 0 or self.noise_level < 0 or self.sparsity_weight < 0 or self.contractive_weight < 0:
            raise UserError("--free-bits, --noise-level, --sparsity-weight and --contractive-weight must be ≥ 0")
        if not 0 < self.sparsity_target < 1:
            raise UserError(f"--sparsity-target must be in (0, 1), got {self.sparsity_target}")
        if self.corruption != "gaussian" and self.noise_level > 1:
            raise UserError(f"--noise-level is a probability for --corruption {self.corruption}, got {self.noise_level}")
        if self.jacobian_projections < 1 or (self.prior_components is not None and self.prior_components < 1):
            raise UserError("--jacobian-projections and --prior-components must be at least 1")
        return self


def flag(name: str) -> str:
    return name.replace("_", "-")


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def coerce(name: str, value: Any) -> Any:
    """Convert a value from the command line or a config file to the field's type."""
    f = FIELDS[name]
    kind = f.type if isinstance(f.type, str) else str(f.type)
    if value is None:
        if "None" in kind:
            return None
        raise UserError(f"--{flag(name)} needs a value")
    try:
        if kind.startswith("list[int]"):
            return _list(value, int)
        if kind.startswith("list[float]"):
            return _list(value, float)
        if kind.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind.startswith("float"):
            number = float(value)
            if name.endswith("_split") and number >= 1:  # a count of examples, else a fraction
                if not number.is_integer():
                    raise UserError(f"--{flag(name)} {value}: a count of examples must be whole, and a "
                                    f"fraction below 1")
                return int(number)
            return number
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"--{flag(name)}: cannot read {value!r} as {kind.split(' ')[0]}") from None


def _list(value: Any, kind: type) -> list:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    return [kind(v) for v in value]


def read_config_file(path: str | Path, *, template: bool = False) -> dict[str, Any]:
    """Read a TOML or JSON config file into {field: value}; unknown keys are an error.

    ``template``: the file configures a new run (``aevb train --config``), so a
    run's own config.json gives no ``out``: that is where the run it records
    lives (or, for a copied run folder, the folder it was copied from), and a new
    run trains into a folder of its own, never over one.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    if path.suffix not in (".toml", ".json"):
        raise UserError(f"config file {path}: aevb reads TOML (.toml) or JSON (.json) config files, not "
                        f"{path.suffix or 'files without a suffix'}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        else:
            raw = json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"config file {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a table of options")
    is_run_config = raw.pop("format", None) == FORMAT
    # allow [data] / [model] / [training] tables in TOML
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key in ("data", "model", "training"):
            flat.update(value)
        else:
            flat[key] = value
    normalised = {k.replace("-", "_"): v for k, v in flat.items()}
    if is_run_config:  # a run's config.json lists every option it had: reproduce runs written before these
        normalised = _as_read_now({**OPTIONS_ADDED_LATER, **normalised})
        if template:
            normalised.pop("out", None)
    unknown = sorted(set(normalised) - set(FIELDS))
    if unknown:
        raise UserError(f"config file {path} has unknown options: {', '.join(unknown)}; see 'aevb train --help'")
    return {k: coerce(k, v) for k, v in normalised.items()}


def _as_read_now(values: dict[str, Any]) -> dict[str, Any]:
    """A run's stored options, with values earlier versions accepted and ignored put as they are read now.

    Earlier versions took --grad-clip 0 for "no clipping" and ignored
    --image-size for anything but a folder; both are refused when given today.
    """
    if values.get("grad_clip") == 0:
        values["grad_clip"] = None
    data = values.get("data")
    if values.get("image_size") is not None and data is not None and not Path(str(data)).expanduser().is_dir():
        values["image_size"] = None
    return values


def make_config(file_values: dict[str, Any] | None = None, **overrides: Any) -> RunConfig:
    """Defaults, then a config file's values, then explicit overrides; validated."""
    values = dict(file_values or {})
    unknown = sorted(set(values) - set(FIELDS) | set(overrides) - set(FIELDS))
    if unknown:
        raise UserError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; the options are "
                        f"the fields of aevb.config.RunConfig ('aevb train --help' lists them)")
    values.update({k: coerce(k, v) for k, v in overrides.items()})
    return RunConfig(**values).validate()
