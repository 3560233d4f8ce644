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
from typing import TYPE_CHECKING, Any, Iterator, Optional

if TYPE_CHECKING:  # the checks themselves need no Sphinx, so the tests can import them
    from docutils.nodes import Element
    from sphinx.addnodes import pending_xref
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


def _is_public(module_name: str) -> bool:
    return not any(part.startswith("_") for part in module_name.split("."))


def public_names(module: ModuleType) -> Iterator[tuple[str, Any]]:
    """``(dotted name where documented, object)`` for every public name of ``module``.

    A name a module re-exports from another public module of the package (``pyro_masked``
    re-exports ``MaskedELBO`` from ``pyro_masked.infer``, a package its submodules' names) is
    documented where it is defined; references to the re-exported name resolve there.
    """
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name)
        if inspect.ismodule(obj):
            yield obj.__name__, obj
            continue
        home = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", None)
        if (
            isinstance(home, str)
            and isinstance(qualname, str)
            and home != module.__name__
            and home.startswith(f"{PACKAGE}.")
            and _is_public(home)
        ):
            yield f"{home}.{qualname}", obj
        else:
            yield f"{module.__name__}.{name}", obj


def canonical_name(dotted: str) -> Optional[str]:
    """Where the object a dotted ``pyro_masked`` name refers to is documented, or ``None``.

    ``pyro_masked.MaskedELBO`` gives ``pyro_masked.infer.MaskedELBO``; a method or attribute
    path keeps its tail (``pyro_masked.MaskRateCurve.plot`` gives the ``plot`` of the class
    where it is defined).
    """
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return None
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for index, part in enumerate(parts[split:]):
            if not hasattr(obj, part):
                return None
            obj = getattr(obj, part)
            home = getattr(obj, "__module__", None)
            qualname = getattr(obj, "__qualname__", None)
            if (
                (inspect.isclass(obj) or inspect.isfunction(obj))
                and isinstance(home, str)
                and home.startswith(PACKAGE)
                and isinstance(qualname, str)
            ):
                tail = parts[split + index + 1 :]
                return ".".join([home, qualname, *tail])
        return None
    return None


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


def _resolve_reexport(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: Element
) -> Optional[Element]:
    """Resolve a reference to a re-exported name (``pyro_masked.MaskedELBO``) to its page."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    module = node.get("py:module") or ""
    candidates = [target] if target.startswith(PACKAGE) else []
    if module and not target.startswith(PACKAGE):
        candidates.append(f"{module}.{target}")
    domain = env.get_domain("py")
    for candidate in candidates:
        canonical = canonical_name(candidate)
        if canonical and canonical != candidate:
            return domain.resolve_xref(
                env, node["refdoc"], app.builder, node["reftype"], canonical, node, contnode
            )
    return None


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("env-check-consistency", _check)
    app.connect("missing-reference", _resolve_reexport)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
