"""One option of a run, declared once: its name, default, help and the rule its values follow.

An :class:`Option` is a ``--flag`` of ``aevb train`` and a key of config files
and ``RUN/config.json`` (``noise_level`` → ``--noise-level``).  The run's own
options are the fields of :class:`aevb.config.RunConfig`; a model declares its
own beside its class (``options = (NOISE_LEVEL, …)``) and its constructor takes
them as arguments of the same names.  The one check of a value is
:meth:`Option.check`, called by the run configuration (the message names
``--noise-level``) and by the model's constructor (``noise_level``).

Declarations are plain calls with literal arguments, so that
:mod:`aevb.registry` can read a model's options from its source for
``aevb train --help`` without importing torch.  This module imports neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Collection

from aevb.errors import UserError

KINDS = ("str", "int", "float", "bool", "list[int]", "list[float]")
# the upper bound of a count that multiplies memory (samples, components, batch rows): torch counts elements in
# 64-bit integers, and beyond this its errors name no option; a request that does not fit memory below it is
# a "not enough memory" naming the option (aevb.cli)
COUNTS = 2147483648  # 2^31, written out: the models' declarations are read from their source as literals


@dataclass(frozen=True)
class Option:
    """An option: ``Option("noise_level", 0.3, "dae: corruption level (σ or probability)", low=0)``.

    Args:
        name: the keyword of config files and constructors; the flag is ``--`` and the name with dashes.
        default: the value when the option is not given; None makes the option optional.
        help: one line for ``aevb train --help``.
        kind: ``str``, ``int``, ``float``, ``bool``, ``list[int]`` or ``list[float]``; the default's type when
            not given (it must be given for a default of None).
        choices: the allowed values: a tuple of strings, or a registry of :mod:`aevb.registry` (its names).
        low, above, high, below: the allowed range of a number (of each number of a list):
            ≥ low, > above, ≤ high, < below.
        hint: what to do instead, appended to the message of a value out of range.
        requires: the option applies only to models that take this other option (the β schedules need β).
        group: data, model or training: where ``--help`` lists it.
        metavar: the value's name in ``--help`` (``LEVEL``).
        memory: the option multiplies the memory a step asks for (``--k``, ``--batch-size``): a command that runs
            out of memory names it, and its range has an upper bound.
    """

    name: str
    default: Any
    help: str
    kind: str = ""
    choices: Collection[str] | None = None
    low: float | None = None
    above: float | None = None
    high: float | None = None
    below: float | None = None
    hint: str | None = None
    requires: str | None = None
    group: str = "model"
    metavar: str | None = None
    memory: bool = False

    def __post_init__(self):
        if not self.kind:
            if self.default is None:
                raise ValueError(f"option {self.name!r}: a default of None needs kind= (what its values are)")
            kind = {bool: "bool", int: "int", float: "float", str: "str"}.get(type(self.default))
            object.__setattr__(self, "kind", kind or "")
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.memory and self.high is None and self.below is None:
            raise ValueError(f"option {self.name!r} multiplies memory: give it an upper bound (high= or below=)")

    @property
    def flag(self) -> str:
        """``--noise-level``."""
        return as_flag(self.name)

    @property
    def optional(self) -> bool:
        return self.default is None

    def check(self, value: Any, spelled: str | None = None) -> Any:
        """``value`` if it is allowed (a whole number as int, a number as float), else a UserError.

        ``spelled``: the option as the user wrote it, for the message (``--noise-level``); the name by default.
        Text or another object where a number belongs is a ValueError: only code passes one (a flag's or a
        config file's value is read by :meth:`parse` first), as does a hand-edited ``model/config.json``.
        """
        spelled = spelled or self.name
        if value is None:
            if self.optional:
                return None
            raise UserError(f"{spelled} needs a value")
        if _empty(value):
            raise UserError(f"{spelled} is empty; give it a value, or leave it out for its default")
        if self.choices is not None:
            if value not in self.choices:
                raise UserError(f"unknown {spelled} {shown(value)}; choose one of: {', '.join(self.choices)}")
            return value
        if self.kind in ("int", "float"):
            return self._number(value, spelled, value)
        if self.kind.startswith("list["):
            numbers = value if isinstance(value, (list, tuple)) else [value]
            return [self._number(number, spelled, value) for number in numbers]
        return value

    def _number(self, number: Any, spelled: str, value: Any) -> int | float:
        """One number of ``value`` checked: whole for an int option, finite, in range."""
        whole = self.kind in ("int", "list[int]")
        if isinstance(number, bool):
            raise UserError(f"{spelled} must be a {'whole ' if whole else ''}number, got {shown(value)}")
        not_a_number = ValueError(f"{spelled} must be a {'whole ' if whole else ''}number, got {shown(value)}")
        if isinstance(number, str):  # text, or an object below: only code passes them (flags are parsed first)
            raise not_a_number
        try:
            as_float = float(number)
        except (TypeError, ValueError):
            raise not_a_number from None
        if not math.isfinite(as_float):  # NaN passes every comparison below; ±inf is no setting either
            raise UserError(f"{spelled} must be a finite number, got {value}")
        if whole and not as_float.is_integer():
            raise UserError(f"{spelled} must be a whole number, got {value!r}")
        number = int(number) if whole else as_float
        if not ((self.low is None or number >= self.low) and (self.above is None or number > self.above)
                and (self.high is None or number <= self.high) and (self.below is None or number < self.below)):
            hint = f"; {self.hint}" if self.hint else ""
            raise UserError(f"{spelled} must be {self.range_text()}, got {value}{hint}")
        return number

    def range_text(self) -> str:
        """The allowed range in words: ``≥ 0``, ``in (0, 1]``, ``in [1, 2^31)``."""
        low, above, high, below = map(_number_text, (self.low, self.above, self.high, self.below))
        lower = f"[{low}" if low is not None else f"({above}" if above is not None else None
        upper = f"{high}]" if high is not None else f"{below})" if below is not None else None
        if lower and upper:
            return f"in {lower}, {upper}"
        for bound, sign in ((low, "≥"), (above, ">"), (high, "≤"), (below, "<")):
            if bound is not None:
                return f"{sign} {bound}"
        return "any number"

    def parse(self, value: Any) -> Any:
        """A value from the command line or a config file converted to the option's kind (not yet checked).

        An empty value (``--data ''``, ``out = ""``) is an error naming the option, never a default in disguise:
        an empty path is the current folder to the file system, an empty list no layers.
        """
        if value is None:
            if self.optional:
                return None
            raise UserError(f"{self.flag} needs a value")
        if _empty(value):
            raise UserError(f"{self.flag} is empty; give it a value, or leave it out for its default")
        try:
            if self.kind.startswith("list["):
                return _list(value, int if self.kind == "list[int]" else float)
            if self.kind == "bool":
                if isinstance(value, str):
                    if value.lower() in ("true", "1", "yes"):
                        return True
                    if value.lower() in ("false", "0", "no"):
                        return False
                    raise ValueError(value)
                return bool(value)
            if self.kind == "int":
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError(value)
                return int(value)
            if self.kind == "float":
                number = float(value)
                if self.name.endswith("_split") and number >= 1:  # a count of examples, else a fraction
                    if not number.is_integer():
                        raise UserError(f"{self.flag} {value}: a count of examples must be whole, and a "
                                        f"fraction below 1")
                    return int(number)
                return number
            return str(value)
        except (TypeError, ValueError):
            raise UserError(f"{self.flag}: cannot read {shown(value)} as {self.kind}") from None


def _empty(value: Any) -> bool:
    """A string of nothing but spaces, or an empty list: no value at all."""
    return (isinstance(value, str) and not value.strip()) or (isinstance(value, (list, tuple)) and not value)


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for a message, cut to ``limit`` characters: a value read from a file may be of any size."""
    try:
        text = repr(value)
    except RecursionError:  # nested deeper than repr goes
        text = f"<{type(value).__name__} nested too deeply to show>"
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _number_text(bound: float | None) -> str | None:
    """A bound as a message shows it: a large power of two as ``2^31``, so that it reads as the limit it is."""
    if isinstance(bound, int) and abs(bound) >= 2**16 and abs(bound) & (abs(bound) - 1) == 0:
        return f"{'-' if bound < 0 else ''}2^{abs(bound).bit_length() - 1}"
    return None if bound is None else str(bound)


def as_argument(name: str) -> str:
    """An option as a constructor's argument names it: ``noise_level``."""
    return name


def as_flag(name: str) -> str:
    """An option as the command line names it: ``--noise-level``."""
    return "--" + name.replace("_", "-")


def _list(value: Any, kind: type) -> list:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    return [kind(v) for v in value]
