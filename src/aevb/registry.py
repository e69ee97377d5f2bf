"""Name → object registries for likelihoods, posteriors, networks, models, data sets and figures.

Entries are registered where they are defined (``@LIKELIHOODS.register("bernoulli")``),
so a new likelihood, network or model is one decorated definition in one file.
The name stored in a ``config.json`` makes loading a lookup, and the command
line takes its choices from here.

The modules that define entries import torch, which costs seconds.  So that
``aevb --help`` stays fast, :meth:`Registry.names` reads the entry names from
the defining module's source (the decorator calls) when that module has not
been imported yet; :meth:`Registry.get` always imports it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from typing import Any, Callable, Iterator

from aevb.errors import UserError


class Registry:
    def __init__(self, kind: str, module: str | tuple[str, ...], variable: str):
        self.kind = kind  # what an entry is, for messages: "likelihood"
        # where entries are defined: "aevb.model.distributions", or several modules in order
        self.modules = (module,) if isinstance(module, str) else tuple(module)
        self.variable = variable  # the registry's name in that module: "LIKELIHOODS"
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def decorator(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def _load(self) -> None:
        for module in self.modules:
            importlib.import_module(module)

    def get(self, name: str) -> Any:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._entries)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self):
        self._load()
        return self._entries.items()

    def names(self) -> list[str]:
        """Registered names, in definition order, without importing torch if avoidable."""
        if all(module in sys.modules for module in self.modules):
            return list(self._entries)
        names = []
        for module in self.modules:
            spec = importlib.util.find_spec(module)
            if spec is None or spec.origin is None:
                self._load()
                return list(self._entries)
            names += self._scan(spec.origin)
        return names

    def _scan(self, origin: str) -> list[str]:
        """The names registered by decorator calls in one source file, in line order."""
        with open(origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        found = []  # (line, name): ast.walk is breadth-first, so sort by line
        for node in ast.walk(tree):
            for decorator in getattr(node, "decorator_list", []):
                if (
                    isinstance(decorator, ast.Call)
                    and isinstance(decorator.func, ast.Attribute)
                    and decorator.func.attr == "register"
                    and isinstance(decorator.func.value, ast.Name)
                    and decorator.func.value.id == self.variable
                    and decorator.args
                    and isinstance(decorator.args[0], ast.Constant)
                ):
                    found.append((decorator.lineno, decorator.args[0].value))
        return [name for _, name in sorted(found)]


LIKELIHOODS = Registry("likelihood", "aevb.model.distributions", "LIKELIHOODS")
POSTERIORS = Registry("posterior", "aevb.model.distributions", "POSTERIORS")
NETWORKS = Registry("network", "aevb.model.networks", "NETWORKS")
MODELS = Registry("model", ("aevb.model.autoencoders", "aevb.model.vae", "aevb.model.hierarchical"), "MODELS")
DATASETS = Registry("data set", "aevb.data.datasets", "DATASETS")
SCHEDULES = Registry("beta schedule", "aevb.training.schedules", "SCHEDULES")
PRIORS = Registry("prior", "aevb.model.priors", "PRIORS")
FIGURES = Registry("figure", "aevb.analysis.gallery", "FIGURES")  # by file name in RUN/images/, in report order
