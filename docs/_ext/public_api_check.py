"""Fail the documentation build when a public name of pyro_masked is not documented.

The public modules are the modules and packages under ``pyro_masked`` whose dotted names have
no component starting with an underscore; a module's public names are its ``__all__``. After
every page is read, each public module and each of its public names must have an entry in the
Python domain (an ``automodule``/``autoclass``/... directive documented it) and, for classes
and functions, a docstring. Names re-exported by ``pyro_masked`` itself must be documented
where they are defined. Every omission is a warning naming the object, so ``sphinx-build -W``
stops on it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # the checks themselves need no Sphinx, so the tests can import them
    from sphinx.application import Sphinx
    from sphinx.environment import BuildEnvironment

PACKAGE = "pyro_masked"


def public_modules(package: str = PACKAGE) -> list[ModuleType]:
    """The package and every submodule without a private component in its dotted name."""
    root = importlib.import_module(package)
    modules = [root]
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        modules.append(importlib.import_module(info.name))
    return modules


def public_names(module: ModuleType) -> Iterator[tuple[str, Any]]:
    """``(dotted name where documented, object)`` for every public name of ``module``."""
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name)
        if inspect.ismodule(obj):
            yield obj.__name__, obj
        elif module.__name__ == PACKAGE and hasattr(obj, "__module__"):
            # re-exported: documented at its definition
            yield f"{obj.__module__}.{obj.__qualname__}", obj
        else:
            yield f"{module.__name__}.{name}", obj


def public_callables(module: ModuleType) -> Iterator[tuple[str, Any]]:
    """Every public function of ``module`` and every method its public classes define.

    A method is public when its name has no leading underscore, or is ``__init__`` or
    ``__call__``; properties count by their getter. Inherited methods are left to the class
    that defines them, and names a module only re-exports to the class or module defining them.
    """
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name)
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield f"{module.__name__}.{name}", obj
        elif inspect.isclass(obj):
            for attribute, value in vars(obj).items():
                if attribute.startswith("_") and attribute not in {"__init__", "__call__"}:
                    continue
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                elif isinstance(value, property):
                    value = value.fget
                if inspect.isfunction(value):
                    yield f"{module.__name__}.{name}.{attribute}", value


def missing_documentation(documented: set[str]) -> list[str]:
    """Messages for every public module or name absent from ``documented`` or without docs."""
    problems = []
    for module in public_modules():
        if module.__name__ not in documented:
            problems.append(f"public module {module.__name__} is on no page (add an automodule)")
        if not inspect.getdoc(module):
            problems.append(f"public module {module.__name__} has no docstring")
        for dotted, obj in public_names(module):
            if dotted not in documented:
                problems.append(f"public name {dotted} is not documented")
            elif (inspect.isclass(obj) or inspect.isfunction(obj)) and not inspect.getdoc(obj):
                problems.append(f"public name {dotted} has no docstring")
    return sorted(set(problems))


def _check(app: Sphinx, env: BuildEnvironment) -> None:
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    if app.builder.name not in {"html", "dirhtml", "singlehtml"}:
        return
    documented = set(env.get_domain("py").objects)
    documented |= set(env.get_domain("py").modules)
    for problem in missing_documentation(documented):
        logger.warning(problem)


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("env-check-consistency", _check)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
