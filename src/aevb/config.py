"""The configuration of a training run: the run's options, each declared once.

Every option is a command-line flag of ``aevb train`` (``latent_dim`` →
``--latent-dim``) and a key of a TOML or JSON config file; the command line
builds its flags from :func:`run_options`, so an option is never defined
twice.  The run's own options are the fields of :class:`RunConfig`; a model's
options are declared beside the model (``Model.options``, :mod:`aevb.options`)
and collected here from every registered model, so that a new model brings
its flags with it.  A value is checked by its option's
:meth:`~aevb.options.Option.check` (the one check, which the model
constructors use too) in :meth:`RunConfig.validate`, with the rules between
run options.  The resolved configuration is written to ``RUN/config.json``
and ``aevb train --config RUN/config.json`` reproduces the run.

This module does not import torch, so that ``aevb --help`` stays fast: the
models' options are read from their source until their modules are imported
(:meth:`aevb.registry.Registry.options`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aevb.errors import UserError
from aevb.io import MAX_NESTING, loads_json, nesting
from aevb.options import COUNTS, Option, as_flag
from aevb.registry import DATASETS, LIKELIHOODS, MODELS, NETWORKS, SCHEDULES

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
IW_SAMPLES = 1000  # importance samples a test example of `aevb eval` and `aevb report` by default
STREAM_MODES = ("auto", "yes", "no")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
OUTPUT_BIAS_INITS = ("data-mean", "default")
OPTIMIZERS = ("adam", "adamw", "sgd")  # torch.optim's, by --optimizer (adam: the fused one of aevb.acceleration)
LR_SCHEDULES = ("constant", "cosine", "step", "plateau", "one-cycle")  # aevb.training.lr_schedules
POSTERIOR_SCALES = ("log-variance", "log-scale")


# side of the largest square images a folder is resized to: a float32 batch of 128 RGB images of 1024²
# pixels is 1.6 GB already, and a resize to a size no data set has is a typing slip
MAX_IMAGE_SIZE = 1024
LAYER_SIZES = 2**31  # a layer's size is a 64-bit count to torch: beyond that its error names no option


def _opt(default: Any, help: str, *, group: str, **rule: Any):
    """A field of :class:`RunConfig`: its default, and the rest of its :class:`~aevb.options.Option`."""
    return field(default=default, metadata={"help": help, "group": group, **rule})


@dataclass
class RunConfig:
    """The options of a run: its own as fields, and those of the registered models in :attr:`model_options`.

    Every option reads as an attribute (``config.latent_dim``, ``config.noise_level``).  Build one with
    :func:`make_config`, which reads and checks the values.
    """

    # -- data ---------------------------------------------------------------
    data: str = _opt("digits", "registered data set (see choices) or a path: IDX/.npy/.npz/.csv file or an image folder", group="data", metavar="NAME|PATH")
    labels: str | None = _opt(None, "labels file for --data FILE (IDX, .npy or .csv)", group="data", metavar="FILE")
    data_dir: str | None = _opt(None, "folder holding the published files of mnist/fashion-mnist/cifar10", group="data", metavar="DIR")
    download: bool = _opt(False, "download mnist/fashion-mnist/cifar10 with torchvision when missing", group="data")
    test_split: float = _opt(0.1, "held-out test examples: a count (2000) or a fraction (0.1), taken from the end in file order (an image folder with class subfolders: in a seeded random order, as with --shuffle)", group="data", metavar="N|F")
    val_split: float = _opt(0.1, "validation examples taken from the end of the training part (in the seeded order of --shuffle where given), whose ELBO is reported each epoch and chooses the best checkpoint (0: none; the test set is then reported each epoch, and chooses nothing)", group="data", metavar="N|F")
    shuffle: bool = _opt(False, "shuffle (seeded) before splitting instead of splitting in file order", group="data")
    image_size: int | None = _opt(None, "resize and centre-crop the images of a folder to PX×PX (default: their own size, when all share one)", group="data", metavar="PX", low=1, high=MAX_IMAGE_SIZE, memory=True)
    binarize: str = _opt("none", "binarise images for Bernoulli likelihoods: none, threshold (>0.5) or dynamic (resampled at every step)", group="data", choices=BINARIZE_MODES)
    dequantize: bool = _opt(False, "add uniform noise within each 8-bit level, (k + u)/256, to train and evaluate a continuous likelihood (gaussian*, laplace*, continuous-bernoulli) as a density over [0, 1]: bits/dim are then an upper bound on those of the 8-bit data, and only then reported; the noise is drawn afresh for every batch, once (seeded) for evaluation", group="data")
    stream: str = _opt("auto", "read the training images batch by batch from a memory-mapped .npy file (an image folder: from its 8-bit pixels, decoded once into ~/.cache/aevb/folders) instead of converting all of them to float32 up front: yes, no, or auto (when the float32 copy would take more than half of the available memory)", group="data", choices=STREAM_MODES)
    # -- model (then each registered model's own options: run_options) ----
    model: str = _opt("vae", "model", group="model", choices=MODELS)
    likelihood: str = _opt("bernoulli", "likelihood p(x|z)", group="model", choices=LIKELIHOODS)
    arch: str = _opt("mlp", "encoder/decoder network: a registered one or the import path of a function of yours like theirs, my_package.nets:build (see aevb.model.networks), which config.json records and every command that opens the run imports", group="model", choices=NETWORKS)
    latent_dim: int = _opt(20, "dimension of z", group="model", metavar="D", low=1, below=LAYER_SIZES, memory=True)
    hidden: list[int] | None = _opt(None, "hidden sizes, comma-separated (mlp default 400; conv: its linear layer)", group="model", metavar="N[,N…]", low=1, below=LAYER_SIZES, memory=True)
    likelihood_scale: float | None = _opt(None, "fixed σ of gaussian / scale of laplace, or initial value of the learned ones (default: the one that best fits the training data around their mean, recorded in config.json; 1 with gaussian is the MSE loss)", group="model", metavar="S", above=0)
    conditional: bool = _opt(False, "condition encoder and decoder on the data's class labels, q(z|x,y) and p(x|z,y), the prior staying p(z) (vae, iwae, hvae); the number of classes K is the labels' and is recorded in the model; aevb sample --label K draws one class", group="model")
    posterior_scale: str = _opt("log-variance", "what the encoder outputs for the Gaussian posterior's scale: log σ² (trains faster under Adam) or log σ (models from before aevb had the choice)", group="model", choices=POSTERIOR_SCALES)
    # -- training -----------------------------------------------------------
    beta_warmup: int = _opt(0, "steps over which β rises linearly from 0 to --beta (0: constant)", group="training", metavar="STEPS", low=0, requires="beta")
    beta_schedule: str = _opt("linear", "KL weight schedule: constant, linear (over --beta-warmup steps; constant while that is 0) or cyclical (Fu et al. 2019: --beta-cycles ramps from 0 to --beta, each over --beta-ratio of its cycle)", group="training", choices=SCHEDULES, requires="beta")
    beta_cycles: int = _opt(4, "cycles of the cyclical β schedule over the run", group="training", metavar="M", low=1, requires="beta")
    beta_ratio: float = _opt(0.5, "fraction of each cycle over which the cyclical β rises (then stays at --beta)", group="training", metavar="R", above=0, high=1, requires="beta")
    epochs: int = _opt(10, "passes over the training data", group="training", low=1)
    early_stopping: int | None = _opt(None, "stop when the validation ELBO has not improved for this many epochs (needs a validation split, --val-split); the best epoch's checkpoint is kept in any case as checkpoints/best.safetensors", group="training", metavar="EPOCHS", low=1)
    steps: int | None = _opt(None, "stop after this many optimiser steps instead (overrides --epochs)", group="training", low=1)
    batch_size: int = _opt(128, "examples per optimiser step", group="training", low=1, below=COUNTS, memory=True)
    optimizer: str = _opt("adam", "torch optimiser: adam (fused: the fast path), adamw (decoupled weight decay) or sgd (momentum 0.9)", group="training", choices=OPTIMIZERS)
    lr: float = _opt(3e-3, "learning rate (the peak of --lr-schedule)", group="training", above=0)
    adam_betas: list[float] = _opt((0.9, 0.999), "Adam β1,β2 (adam, adamw)", group="training", metavar="B1,B2")
    weight_decay: float = _opt(0.0, "weight decay: L2 added to the gradient (adam, sgd) or decoupled (adamw)", group="training", metavar="WD", low=0)
    lr_schedule: str = _opt("constant", "learning rate over the run: constant, cosine (to 0 at the last step), step (×0.1 at 50% and 75% of the steps), plateau (×0.5 after 2 epochs without a better validation ELBO) or one-cycle (torch's OneCycleLR)", group="training", choices=LR_SCHEDULES)
    lr_warmup: int = _opt(0, "steps over which the learning rate rises linearly to --lr first (constant, cosine, step; one-cycle: its rising part)", group="training", metavar="STEPS", low=0)
    output_bias: str = _opt("data-mean", "initial bias of the decoder's last layer: data-mean (p(x|z) starts at the training set's average image) or default (torch's initialisation)", group="training", choices=OUTPUT_BIAS_INITS)
    grad_clip: float | None = _opt(None, "clip the gradient norm to this value", group="training", metavar="NORM", above=0,
                                     hint="leave it out for no clipping")
    seed: int = _opt(0, "random seed: the same seed and config give the same weights on CPU", group="training", low=SEED_RANGE[0],
                     below=SEED_RANGE[1] + 1)
    device: str = _opt("auto", "where to train: auto picks cuda, then mps, then cpu", group="training", choices=DEVICES)
    precision: str = _opt("auto", "multiplies of the training step: bf16 (bfloat16 matrix multiplies, and convolutions on GPUs; all else float32; see aevb.precision), fp32, or auto (bf16 where it is faster than fp32: CPUs with AMX or a bf16 multiply measured 1.5× faster, GPUs from Ampere on; else fp32); the test ELBO is always float32", group="training", choices=PRECISIONS)
    compile: bool = _opt(False, "compile the training loss with torch.compile (on the CPU it needs a C++ compiler): faster steps after a compile of several seconds, so it pays on long runs only; measured in bench/README.md", group="training")
    log_every: int = _opt(50, "steps between metric records (values are read from the device only then)", group="training", metavar="STEPS", low=1, below=COUNTS, memory=True)
    join_timeout: int = _opt(120, "seconds a worker of torchrun waits for the others to join its process group before it stops with a message (they start together: one missing by then stopped before, or runs another command); collectives wait 10 minutes", group="training", metavar="SECONDS", low=1)
    checkpoint_every: int = _opt(0, "steps between checkpoints within an epoch, besides the one at each epoch's end (0: at epoch ends only): what a restart (--resume auto) trains again at most", group="training", metavar="STEPS", low=0)
    image_every: int = _opt(0, "steps between reconstruction pictures (0: at about ten epoch ends over the run)", group="training", metavar="STEPS", low=0)
    eval_batch_size: int = _opt(1000, "examples per batch for validation and evaluation", group="training", low=1,
                                below=COUNTS, memory=True)
    tensorboard: bool = _opt(False, "also log to TensorBoard (needs the tensorboard package)", group="training")
    wandb: bool = _opt(False, "also log to Weights & Biases (needs the wandb package)", group="training")
    out: str | None = _opt(None, "run folder (default runs/MODEL-DATA, numbered so nothing is overwritten)", group="training", metavar="DIR")
    # the options the registered models declare (Model.options), by name; missing ones take their defaults
    model_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        given = dict(self.model_options)  # a copy: dataclasses.replace passes the same dict to the new config
        self.model_options = {option.name: option.default for option in model_options()} | given

    def __getattr__(self, name: str) -> Any:
        """A model's option: ``config.noise_level`` (called only where no field or method has the name)."""
        values = self.__dict__.get("model_options")  # no recursion while the object is made or copied
        if values is not None and name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        values = self.__dict__.get("model_options")
        if values is not None and name in values:
            values[name] = value
        else:
            super().__setattr__(name, value)

    def values(self) -> dict[str, Any]:
        """Every option's value by name, the run's own then the models' (copies, as make_config takes them)."""
        values = dataclasses.asdict(self)
        return values | values.pop("model_options")

    def model_kwargs(self, data_shape: tuple[int, ...], n_classes: int | None = None) -> dict[str, Any]:
        """Arguments of :func:`aevb.model.base.build_model` for this run; ``n_classes``: the data's classes, for a
        conditional run (``--conditional``: :func:`aevb.run.data.class_count`)."""
        kwargs: dict[str, Any] = dict(data_shape=data_shape, latent_dim=self.latent_dim, arch=self.arch,
                                      likelihood=self.likelihood, hidden=self.hidden)
        if self.likelihood_scale is not None:
            kwargs["likelihood_args"] = {"scale": self.likelihood_scale}
        if MODELS.get(self.model).posterior_family == "gaussian":
            kwargs["posterior_args"] = {"scale_param": self.posterior_scale}
        # the model's own options (imports torch: called by training only)
        kwargs.update(MODELS.get(self.model).run_kwargs(self))
        if n_classes is not None:
            kwargs["n_classes"] = n_classes
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.values()}

    def validate(self) -> "RunConfig":
        """``self`` if every option's value passes its check and the rules between the run's options hold.

        The rules between a model's own options are the model's (``Model.check_options``), checked when the
        model is chosen (:func:`check_model_options`).
        """
        values = self.values()
        for option in run_options().values():
            if option.name in values:
                option.check(values[option.name], option.flag)
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise UserError(f"--adam-betas takes two numbers in [0, 1), got {self.adam_betas}")
        if self.beta_schedule == "constant" and self.beta_warmup:
            raise UserError("--beta-warmup sets the linear schedule; drop it or use --beta-schedule linear")
        return self


def flag(name: str) -> str:
    return name.replace("_", "-")


def _field_option(f: dataclasses.Field) -> Option:
    """The :class:`Option` that a field of RunConfig declares (its annotation, less ``| None``, is its kind)."""
    return Option(f.name, f.default, kind=f.type.removesuffix(" | None"), **f.metadata)


# the run's own options, in field order
RUN_OPTIONS = {f.name: _field_option(f) for f in dataclasses.fields(RunConfig) if f.name != "model_options"}


def model_options() -> list[Option]:
    """The options of every registered model, in registry order; one shared by several models (beta) once.

    Read from the models' source while their modules are not imported (no torch for ``--help``).
    """
    taken = {*RUN_OPTIONS, *vars(RunConfig), "model_options"}  # the run's options, and RunConfig's attributes
    options: dict[str, Option] = {}
    for model in MODELS.names():
        for option in MODELS.options(model):
            if option.name in taken:
                raise ValueError(f"model {model!r} declares an option {option.name!r}, a name the run configuration "
                                 f"has already; rename it")
            if options.setdefault(option.name, option) != option:
                raise ValueError(f"model {model!r} declares an option {option.name!r} that another model declares "
                                 f"differently; declare it once and share it")
    return list(options.values())


def run_options() -> dict[str, Option]:
    """Every option of a run by name, in ``--help`` order: the run's data and model options, the models' own, then
    the run's training options."""
    own = list(RUN_OPTIONS.values())
    first_training = next(i for i, option in enumerate(own) if option.group == "training")
    return {option.name: option for option in [*own[:first_training], *model_options(), *own[first_training:]]}


def memory_options(config: RunConfig) -> list[str]:
    """The options of this run that multiply the memory it needs (``Option.memory``), as ``--k 5000``: those of
    its model and the run's own, the ones set away from their defaults first (for an out-of-memory message)."""
    of_models = {option.name for option in model_options()}
    of_this_model = {option.name for option in MODELS.options(config.model)}
    asked = [(option, getattr(config, option.name)) for option in run_options().values()
             if option.memory and (option.name not in of_models or option.name in of_this_model)]
    asked = [(option, value) for option, value in asked if value is not None]
    asked.sort(key=lambda entry: entry[1] == entry[0].default)  # stable: the ones given first
    return [f"{option.flag} {','.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"
            for option, value in asked]


def coerce(name: str, value: Any) -> Any:
    """Convert a value from the command line or a config file to the option's kind."""
    return run_options()[name].parse(value)


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
            raw = _loads_toml(text)
        else:
            raw = loads_json(text)
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
    options = run_options()
    unknown = sorted(set(normalised) - set(options))
    if unknown:
        raise UserError(f"config file {path} has unknown options: {', '.join(unknown)}; see 'aevb train --help'")
    return {k: options[k].parse(v) for k, v in normalised.items()}


def _loads_toml(text: str) -> dict[str, Any]:
    """``tomllib.loads``; input nested more than ``MAX_NESTING`` levels is a ``TOMLDecodeError`` like any other bad
    TOML."""
    try:
        value = tomllib.loads(text)
    except RecursionError:
        value = None
    if value is None or nesting(value) > MAX_NESTING:
        raise tomllib.TOMLDecodeError(f"nested more than {MAX_NESTING} levels deep") from None
    return value


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
    options = run_options()
    values = dict(file_values or {})
    unknown = sorted(set(values) - set(options) | set(overrides) - set(options))
    if unknown:
        raise UserError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; the options are "
                        f"aevb.config.run_options(): RunConfig's fields and the models' options ('aevb train --help' "
                        f"lists them)")
    values.update({k: options[k].parse(v) for k, v in overrides.items()})
    own = {k: v for k, v in values.items() if k in RUN_OPTIONS}
    return RunConfig(**own, model_options={k: v for k, v in values.items() if k not in RUN_OPTIONS}).validate()


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
    cls = MODELS.get(config.model)  # imports the model modules (torch): called when a run starts, not for --help
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
    if config.conditional and not cls.takes_labels:  # declared by the model (Model.takes_labels)
        able = ", ".join(name for name, model in MODELS.items() if model.takes_labels)
        raise UserError(f"--conditional does not apply to --model {config.model}, which takes no label; drop it or "
                        f"choose a model that can be conditional: {able}")
    check_likelihood_options(config)


def check_likelihood_options(config: RunConfig) -> None:
    """Refuse --likelihood-scale for a likelihood without a scale (declared: ``Likelihood.takes_scale``), one line
    naming it, before its constructor would refuse it naming none."""
    if config.likelihood_scale is not None and not LIKELIHOODS.get(config.likelihood).takes_scale:
        scaled = [name for name, family in LIKELIHOODS.items() if family.takes_scale]
        raise UserError(f"--likelihood-scale does not apply to --likelihood {config.likelihood}, which has no scale; "
                        f"drop it, or choose a likelihood with one: {', '.join(scaled)}")
