import importlib
import sys

import pytest

from pyro_masked._optional import OPTIONAL_EXTRAS, import_optional


def test_an_installed_optional_module_is_returned():
    pyplot = import_optional("matplotlib.pyplot", "plotting")
    assert pyplot is sys.modules["matplotlib.pyplot"]


def test_a_missing_optional_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(
        ImportError, match=r'MaskRateCurve.plot needs matplotlib.*"pyro_masked\[plot\]"'
    ):
        import_optional("matplotlib.pyplot", "MaskRateCurve.plot")
    assert OPTIONAL_EXTRAS["matplotlib"] == "plot"


def test_a_broken_dependency_of_an_installed_package_is_not_blamed_on_the_extra(monkeypatch):
    def import_module(name):
        raise ImportError("No module named 'kiwisolver'", name="kiwisolver")

    monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(ImportError, match="No module named 'kiwisolver'"):
        import_optional("matplotlib.pyplot", "plotting")


def test_only_declared_optional_packages_are_accepted():
    with pytest.raises(ValueError, match="'numpy' is not an optional dependency"):
        import_optional("numpy", "anything")
