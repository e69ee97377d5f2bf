"""The parameters of ``aevb``'s commands: the click command classes, the run options' flags and their grouped
help, the value types and ranges, and the arguments every command on a run folder shares.

Nothing here imports torch: ``aevb --help`` reads the run options' and the
samplers' declarations from their source.
"""

from __future__ import annotations

import math

import click

from aevb.cli.text import memory_message, out_of_memory
from aevb.config import SEED_RANGE, flag, run_options
from aevb.errors import UserError
from aevb.options import Option
from aevb.registry import DATASETS, MODELS, SAMPLERS, Registry, is_import_path

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class SeedRange(click.IntRange):
    """A seed's range, which ``--help`` writes as powers of two rather than in twenty digits."""

    def _describe_range(self) -> str:
        return "-2^63 ≤ x ≤ 2^64 − 1"


SEED = SeedRange(*SEED_RANGE)  # train's --seed is checked in RunConfig, for config files too
# upper bounds of the options that multiply a command's memory: far above any use (a picture of 65,536 images,
# a million importance samples an example), below what would be killed by the system before any error is seen
PICTURES = click.IntRange(1, 2**16)  # images in one picture (-n): a 256 × 256 grid
PATH_POINTS = click.IntRange(2, 2**12)  # points on an interpolated path
SIDE = click.IntRange(2, 2**8)  # points on a side of the latent grid: 65,536 decoded images
IW_SAMPLE_COUNT = click.IntRange(1, 2**20)
BATCH = click.IntRange(1, 2**20)


class GivenPath(click.Path):
    """A path that must not be empty: '' is the current folder to the file system, never what was meant."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; give a path" + ("" if isinstance(param, click.Argument) else
                                                 ", or leave the option out"), param, ctx)
        return super().convert(value, param, ctx)


MEMORY = "aevb.memory"  # ctx.meta key: the options (with values) that asked for the memory of the running command


class Command(click.Command):
    """A command that, run out of memory, says so in one line naming its options that asked for the memory.

    ``memory``: the names of its parameters that multiply the memory it needs
    (``iw_samples``); a command whose memory comes from elsewhere (train's run
    options, from flags and config files) puts them, with their values, in
    ``ctx.meta[MEMORY]``.
    """

    def __init__(self, *args, memory: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.memory = memory

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (RuntimeError, MemoryError) as error:
            if not out_of_memory(error):
                raise
            asked = ctx.meta.get(MEMORY)
            if asked is None:
                asked = [f"{_spelled(param)} {ctx.params[param.name]}" for param in self.params
                         if param.name in self.memory and ctx.params.get(param.name) is not None]
            raise UserError(memory_message(error, asked)) from None


def _spelled(param: click.Parameter) -> str:
    """A parameter as the user types it: its long flag, else its short one."""
    return next((opt for opt in param.opts if opt.startswith("--")), param.opts[0])


class Group(click.Group):
    command_class = Command

    def list_commands(self, ctx):  # keep definition order, not alphabetical
        return list(self.commands)


class _ChoiceOrImportPath(click.Choice):
    """A registered name, or an import path ``package.module:function`` that the option's check imports."""

    def convert(self, value, param, ctx):
        if is_import_path(value):
            return value
        return super().convert(value, param, ctx)


def _click_type(option: Option):
    if isinstance(option.choices, Registry) and option.choices.import_paths:
        return _ChoiceOrImportPath([*option.choices, "MODULE:FUNCTION"])
    if option.choices is not None:
        return click.Choice(list(option.choices))
    if option.kind == "int":
        return int
    if option.kind == "float" and not option.name.endswith("_split"):
        return float
    return str


def click_option(option: Option) -> click.Option:
    """The flag of one run option; its value is None unless given, so config files and defaults fill in."""
    help_text = option.help
    if option.name == "data":
        help_text += f" [registered: {', '.join(DATASETS.names())}]"
    notes = []
    if option.default is not None and option.default is not False:
        default = option.default
        notes.append(f"default: {','.join(map(str, default)) if isinstance(default, (list, tuple)) else default}")
    if option.choices is None and option.kind in ("int", "float", "list[int]", "list[float]") \
            and option.range_text() != "any number":
        notes.append(option.range_text())  # ≥ 1, in [0, 1), in [-2^63, 2^64)
    if notes:
        help_text += f"  [{'; '.join(notes)}]"
    if option.kind == "bool":
        return click.Option([f"{option.flag}/--no-{flag(option.name)}", option.name], default=None, help=help_text)
    return click.Option([option.flag, option.name], type=_click_type(option), default=None, help=help_text,
                        metavar=option.metavar)


class RunCommand(Command):
    """A command that takes every run option as a flag besides its own.

    The flags are made when the command runs (or shows its help), from the
    options of the models registered by then, so that a model registered
    at run time brings its flags; reading them imports no torch.  ``--help``
    lists them in the groups the options declare (``Option.group``: data,
    model, training), the options of particular models apart, each saying
    which models take it.
    """

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = [*self.params, *map(click_option, run_options().values())]
        help_option = self.get_help_option(ctx)
        return params if help_option is None else [*params, help_option]

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        options = run_options()
        takers: dict[str, list[str]] = {}  # a model's option: the models that take it
        for model in MODELS.names():
            for option in MODELS.options(model):
                takers.setdefault(option.name, []).append(model)
        sections: dict[str, list[tuple[str, str]]] = {title: [] for title in HELP_SECTIONS.values()}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            option = options.get(param.name) if isinstance(param, click.Option) else None
            if option is None:
                sections[HELP_SECTIONS[None]].append(record)
            elif option.name in takers:
                sections[HELP_SECTIONS["models"]].append(
                    (record[0], f"{record[1]}  [--model {', '.join(takers[option.name])}]"))
            else:
                sections[HELP_SECTIONS[option.group]].append(record)
        for title, records in sections.items():
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


# the sections of `aevb train --help`, by Option.group (None: the command's own options; models: the options of
# particular models), in the order shown
HELP_SECTIONS = {None: "Options", "data": "Data", "model": "Model", "models": "Options of particular models",
                 "training": "Training"}


def run_argument(function):
    return click.argument("run", type=GivenPath(file_okay=False), metavar="RUN")(function)


def device_option(function):
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto",
                        show_default=True, help="where to compute")(function)


def finite(ctx, param, value):
    """click's FloatRange lets nan and inf through."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx=ctx, param=param)
    return value


class SamplerCommand(Command):
    """A command that takes every fitted sampler's options as flags (read from their source: no torch)."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        # an option two samplers share (the training's --epochs) is one flag
        options = {option.name: option for name in SAMPLERS.names() for option in SAMPLERS.options(name)}
        params = [*self.params, *map(click_option, options.values())]
        help_option = self.get_help_option(ctx)
        return params if help_option is None else [*params, help_option]
