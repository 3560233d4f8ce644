"""Imports of optional dependencies, with an error that says which extra installs them.

As in Pyro, what only some users need is an extra rather than a core dependency: matplotlib
(the ``plot`` extra) draws the diagnostics' figures and the main job's forecast, ArviZ
(``arviz``) receives pointwise log predictives, and PyTorch Lightning (``distributed``) runs the
data-parallel training plan. tqdm is a core dependency, as it is Pyro's, and so is scikit-learn,
the default nearest-neighbour search of local contexts.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["DISTRIBUTION_NAMES", "OPTIONAL_EXTRAS", "import_optional"]

#: The extra of this package that installs each optional top-level module.
OPTIONAL_EXTRAS: dict[str, str] = {
    "matplotlib": "plot",
    "arviz": "arviz",
    "lightning": "distributed",
}

#: The distribution (pip) name of each optional top-level module, where it differs.
DISTRIBUTION_NAMES: dict[str, str] = {}


def import_optional(name: str, purpose: str) -> ModuleType:
    """Import the optional module ``name`` (e.g. ``"matplotlib.pyplot"``) or say how to get it.

    :param name: the dotted module name to import; its top-level package must be listed in
        :data:`OPTIONAL_EXTRAS`.
    :param purpose: what needs it, for the message, e.g. ``"MaskRateCurve.plot"``.
    :returns: the imported module.
    :raises ImportError: when the module is not installed, naming the extra that installs it.
    """
    package = name.partition(".")[0]
    if package not in OPTIONAL_EXTRAS:
        raise ValueError(f"{package!r} is not an optional dependency of pyro_masked")
    try:
        return importlib.import_module(name)
    except ImportError as error:
        if error.name is not None and error.name.partition(".")[0] != package:
            raise  # the package is there but something it imports is broken: say that instead
        extra = OPTIONAL_EXTRAS[package]
        distribution = DISTRIBUTION_NAMES.get(package, package)
        raise ImportError(
            f"{purpose} needs {package}, which is not installed; install it with "
            f'pip install "pyro_masked[{extra}]" (or pip install {distribution})'
        ) from error
