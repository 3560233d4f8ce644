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


def test_every_optional_package_has_its_extra_in_pyproject():
    import pathlib
    import re

    from pyro_masked._optional import DISTRIBUTION_NAMES

    pyproject = (pathlib.Path(__file__).parent.parent / "pyproject.toml").read_text()
    extras = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    for package, extra in OPTIONAL_EXTRAS.items():
        distribution = DISTRIBUTION_NAMES.get(package, package)
        listed = re.search(rf"^{extra} = \[(.*?)\]", extras, flags=re.M | re.S)
        assert listed, f"no extra {extra!r} in pyproject.toml"
        assert f'"{distribution}' in listed.group(1), f"{extra!r} does not install {distribution}"
