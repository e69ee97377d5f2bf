"""Name → object registries for likelihoods, posteriors, networks, models, data sets, figures and samplers.

Entries are registered where they are defined (``@LIKELIHOODS.register("bernoulli")``),
so a new likelihood, network or model is one decorated definition in one file.
The name stored in a ``config.json`` makes loading a lookup, and the command
line takes its choices from here.

The modules that define entries import torch, which costs seconds.  So that
``aevb --help`` stays fast, :meth:`Registry.names` reads the entry names from
the defining module's source (the decorator calls) when that module has not
been imported yet, and :meth:`Registry.options` reads the options an entry
declares (:class:`~aevb.options.Option`) the same way (:class:`_Source`);
:meth:`Registry.get` always imports it.

A registry may also take an import path, ``package.module:function`` (the
networks do: ``--arch my_package.nets:build``): the user's own object, found
by importing its module, so that a name stored in ``config.json`` rebuilds
the same thing in a new process without unpickling anything.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from aevb.errors import UserError
from aevb.options import Option


# package.module:attribute (the form of entry points and of uvicorn's "main:app")
IMPORT_PATH = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


def is_import_path(name: object) -> bool:
    """Whether ``name`` is an import path ``package.module:attribute`` rather than a registered name."""
    return isinstance(name, str) and IMPORT_PATH.fullmatch(name) is not None


class Registry:
    def __init__(self, kind: str, module: str | tuple[str, ...], variable: str, import_paths: bool = False):
        self.kind = kind  # what an entry is, for messages: "likelihood"
        # where entries are defined: "aevb.model.likelihoods", or several modules in order
        self.modules = (module,) if isinstance(module, str) else tuple(module)
        self.variable = variable  # the registry's name in that module: "LIKELIHOODS"
        self.import_paths = import_paths  # whether "package.module:attribute" names a user's entry
        self._entries: dict[str, Any] = {}
        self._order: dict[str, tuple[int, int]] = {}  # name → (module's rank, registration count)

    def register(self, name: str) -> Callable[[Any], Any]:
        def decorator(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            self._order[name] = (self._rank(getattr(obj, "__module__", None)), len(self._order))
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        """Remove entry ``name`` (one registered at run time, by a test or a notebook that redefines it)."""
        self._entries.pop(name, None)
        self._order.pop(name, None)

    def _rank(self, module: str | None) -> int:
        """Where entries of ``module`` come: in the order of ``self.modules``, then those registered elsewhere."""
        return self.modules.index(module) if module in self.modules else len(self.modules)

    def _names(self) -> list[str]:
        """The entries' names in the declared order of their modules, each module's in definition order:
        the same whatever order the modules were imported in."""
        return sorted(self._entries, key=self._order.__getitem__)

    def _load(self) -> None:
        for module in self.modules:
            importlib.import_module(module)

    def _loaded(self) -> bool:
        return all(module in sys.modules for module in self.modules)

    def get(self, name: str) -> Any:
        if self.import_paths and is_import_path(name):
            return import_object(name, self.kind)
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._names())}"
            ) from None

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is registered; an import path (where this registry takes them) is in it if it imports,
        and one that does not raises the UserError saying why (a choice checked with ``in`` names the cause)."""
        if self.import_paths and is_import_path(name):
            self.get(name)
            return True
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self):
        self._load()
        return [(name, self._entries[name]) for name in self._names()]

    def names(self) -> list[str]:
        """Registered names, in definition order, without importing torch if avoidable."""
        if self._loaded():
            return self._names()
        try:
            names = [name for module in self.modules for name in _SOURCE.registered(module, self.variable)]
        except _Unreadable:
            self._load()
            return self._names()
        # and entries registered from elsewhere (a user's model), which exist once their module has run
        return names + [name for name in self._entries if name not in names]

    def options(self, name: str) -> tuple[Option, ...]:
        """The options that entry ``name`` declares (its ``options``), without importing torch if avoidable.

        An entry not imported yet has them read from its module's source
        (:class:`_Source`); a declaration in a form that reader does not
        evaluate imports the module instead (right, only slower).
        """
        if name not in self._entries and not self._loaded():
            try:
                return _SOURCE.options(self.modules, self.variable, name)
            except _Unreadable:
                pass
        return tuple(self.get(name).options)


def import_object(path: str, kind: str) -> Any:
    """The object that the import path ``package.module:attribute`` names, by importing its module.

    A module not found on ``sys.path`` is looked for in the working folder too,
    as ``python -m`` would find it (a project's own ``nets.py``).
    """
    module_name, _, attribute = path.partition(":")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name.partition(".")[0] or os.getcwd() in sys.path:
                raise
            sys.path.append(os.getcwd())
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"cannot import the {kind} {path!r}: {e}; install its package or put the folder holding it "
                        f"on PYTHONPATH") from None
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise UserError(f"the {kind} {path!r}: module {module_name} has no {attribute}; name a function of "
                            f"it") from None
    return value


class _Unreadable(Exception):
    """Source the reader does not evaluate: the caller imports the module instead."""


@dataclass
class _Module:
    """What the reader needs of one module's source: its top-level definitions by name."""

    tree: ast.Module
    classes: dict[str, ast.ClassDef] = field(default_factory=dict)
    constants: dict[str, ast.expr] = field(default_factory=dict)  # NAME = expression
    imports: dict[str, tuple[str, str]] = field(default_factory=dict)  # name → (module, its name there)


class _Source:
    """Modules' source, parsed once and read without running it (which would import torch).

    Reads the names registered by decorators of top-level definitions
    (``@MODELS.register("vae")``) and what a registered class declares in
    ``options``, in the forms declarations take::

        options = (Option("name", default, "help", low=0, …), NAME, *NAME, *Class.options)

    where NAME is a constant of these forms, defined in the module or imported
    from another aevb module; a keyword's value is a literal or a registry of
    this module (``choices=PRIORS``); and a class without ``options`` has those
    of its first base.  Anything else raises :class:`_Unreadable`.
    """

    def __init__(self):
        self._modules: dict[str, _Module] = {}

    def _module(self, module: str) -> _Module:
        if module not in self._modules:
            spec = importlib.util.find_spec(module)
            if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
                raise _Unreadable(module)
            with open(spec.origin, encoding="utf-8") as f:
                parsed = _Module(ast.parse(f.read()))
            for node in parsed.tree.body:
                if isinstance(node, ast.ClassDef):
                    parsed.classes[node.name] = node
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    parsed.imports.update({a.asname or a.name: (node.module, a.name) for a in node.names})
                elif (target := _assigned_name(node)) is not None:
                    parsed.constants[target] = node.value
            self._modules[module] = parsed
        return self._modules[module]

    def registered(self, module: str, variable: str) -> list[str]:
        """The names registered by ``@variable.register("name")`` on the top-level definitions of ``module``."""
        definitions = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        return [name for node in self._module(module).tree.body if isinstance(node, definitions)
                for decorator in node.decorator_list if (name := _registered_name(decorator, variable)) is not None]

    def options(self, modules: tuple[str, ...], variable: str, name: str) -> tuple[Option, ...]:
        """The options of the class registered as ``name`` in one of ``modules``."""
        for module in modules:
            for node in self._module(module).classes.values():
                if any(_registered_name(d, variable) == name for d in node.decorator_list):
                    return self._class_options(module, node)
        raise _Unreadable(name)

    def _class_options(self, module: str, node: ast.ClassDef) -> tuple[Option, ...]:
        for statement in node.body:
            if _assigned_name(statement) == "options":
                return self._evaluate(statement.value, module)
        if not node.bases or not isinstance(node.bases[0], ast.Name):
            raise _Unreadable(node.name)
        base_module, base = self._definition(node.bases[0].id, module)
        if not isinstance(base, ast.ClassDef):
            raise _Unreadable(node.name)
        return self._class_options(base_module, base)

    def _definition(self, name: str, module: str) -> tuple[str, ast.AST]:
        """Where ``name``, as ``module`` sees it, is defined: (module, its ClassDef or assigned expression)."""
        parsed = self._module(module)
        if name in parsed.classes:
            return module, parsed.classes[name]
        if name in parsed.constants:
            return module, parsed.constants[name]
        source, original = parsed.imports.get(name, ("", ""))
        if source.startswith("aevb.") and source != __name__:
            return self._definition(original, source)
        raise _Unreadable(f"{name} in {module}")

    def _evaluate(self, node: ast.AST, module: str) -> Any:
        if isinstance(node, (ast.Tuple, ast.List)):
            values = []
            for element in node.elts:
                if isinstance(element, ast.Starred):
                    values.extend(self._evaluate(element.value, module))
                else:
                    values.append(self._evaluate(element, module))
            return tuple(values)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                self._module(module).imports.get(node.func.id) == ("aevb.options", "Option"):
            if any(keyword.arg is None for keyword in node.keywords):
                raise _Unreadable(ast.unparse(node))
            return Option(*(self._evaluate(a, module) for a in node.args),
                          **{k.arg: self._evaluate(k.value, module) for k in node.keywords})
        if isinstance(node, ast.Name):
            if self._module(module).imports.get(node.id) == (__name__, node.id) and \
                    isinstance(globals().get(node.id), Registry):
                return globals()[node.id]  # choices=PRIORS: the registry itself, whose names are read as needed
            defining, definition = self._definition(node.id, module)
            if isinstance(definition, ast.ClassDef):
                raise _Unreadable(node.id)
            return self._evaluate(definition, defining)
        if isinstance(node, ast.Attribute) and node.attr == "options" and isinstance(node.value, ast.Name):
            defining, definition = self._definition(node.value.id, module)
            if not isinstance(definition, ast.ClassDef):
                raise _Unreadable(ast.unparse(node))
            return self._class_options(defining, definition)
        try:
            return ast.literal_eval(node)
        except ValueError:
            raise _Unreadable(ast.unparse(node)) from None


def _assigned_name(node: ast.AST) -> str | None:
    """``NAME`` of a statement ``NAME = …`` or ``NAME: type = …``, else None."""
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    if isinstance(node, ast.AnnAssign) and node.value is not None and isinstance(node.target, ast.Name):
        return node.target.id
    return None


def _registered_name(decorator: ast.AST, variable: str) -> str | None:
    """``name`` of a decorator ``@variable.register("name")``, else None."""
    if (
        isinstance(decorator, ast.Call)
        and isinstance(decorator.func, ast.Attribute)
        and decorator.func.attr == "register"
        and isinstance(decorator.func.value, ast.Name)
        and decorator.func.value.id == variable
        and decorator.args
        and isinstance(decorator.args[0], ast.Constant)
    ):
        return decorator.args[0].value
    return None


_SOURCE = _Source()

LIKELIHOODS = Registry("likelihood", "aevb.model.likelihoods", "LIKELIHOODS")
POSTERIORS = Registry("posterior", ("aevb.model.posteriors", "aevb.model.flows"), "POSTERIORS")
NETWORKS = Registry("network", "aevb.model.networks", "NETWORKS", import_paths=True)
MODELS = Registry("model", ("aevb.model.autoencoders", "aevb.model.vae", "aevb.model.hierarchical",
                            "aevb.model.disentangling", "aevb.model.divergences",
                            "aevb.model.vq"), "MODELS")
DATASETS = Registry("data set", ("aevb.data.named", "aevb.data.shapes"), "DATASETS")
SCHEDULES = Registry("beta schedule", "aevb.training.schedules", "SCHEDULES")
PRIORS = Registry("prior", "aevb.model.priors", "PRIORS")
FIGURES = Registry("figure", "aevb.analysis.gallery", "FIGURES")  # by file name in RUN/images/, in report order
SAMPLERS = Registry("sampler", ("aevb.sampling.samplers", "aevb.sampling.flow", "aevb.sampling.autoregressive"),
                    "SAMPLERS")  # of codes z, for sample
