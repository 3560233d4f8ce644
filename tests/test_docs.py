"""The documentation's contracts that need no Sphinx build: docstrings, annotations, the API
pages, the version source, ``py.typed`` and the benchmark result files."""

import importlib.util
import inspect
import json
import pathlib
import re
import sys

import pytest

import pyro_masked

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


api_check = _load(ROOT / "docs" / "_ext" / "public_api_check.py")
benchmark_tables = _load(ROOT / "docs" / "_ext" / "benchmark_tables.py")
report = _load(ROOT / "benchmarks" / "report.py")


def _docstring(dotted: str, obj) -> str:
    """The docstring a reader sees, inherited from a base class where the override has none."""
    owner_name, _, attribute = dotted.rpartition(".")
    module_name, _, class_name = owner_name.rpartition(".")
    owner = getattr(sys.modules.get(module_name), class_name, None)
    if inspect.isclass(owner) and attribute in vars(owner):
        member = vars(owner)[attribute]
        obj = member if isinstance(member, property) else getattr(owner, attribute)
    return inspect.getdoc(obj) or ""


def test_every_public_name_and_method_has_a_docstring():
    undocumented = [
        dotted
        for module in api_check.public_modules()
        for dotted, obj in [*api_check.public_names(module), *api_check.public_callables(module)]
        if (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj))
        and not dotted.endswith(".__init__")  # the class docstring documents the constructor
        and not _docstring(dotted, obj).strip()
    ]
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_every_public_function_and_method_is_fully_annotated():
    incomplete = []
    for module in api_check.public_modules():
        for dotted, function in api_check.public_callables(module):
            signature = inspect.signature(function)
            missing = [
                name
                for name, parameter in signature.parameters.items()
                if name not in {"self", "cls"} and parameter.annotation is inspect.Parameter.empty
            ]
            # ``__init__`` may leave out ``-> None``, as PEP 484 allows.
            if signature.return_annotation is inspect.Signature.empty and not dotted.endswith(
                ".__init__"
            ):
                missing.append("return")
            if missing:
                incomplete.append(f"{dotted}: {', '.join(missing)}")
    assert not incomplete, "public functions without annotations:\n" + "\n".join(incomplete)


def _automodules(text: str) -> set:
    """Modules documented (not ``:no-index:``) by automodule directives in reST or MyST."""
    found = set()
    pattern = r"^\s*(?:\.\. automodule::|```\{automodule\})\s*(\S+)((?:\n[ \t]*:[^\n]*)*)"
    for name, options in re.findall(pattern, text, flags=re.M):
        if ":no-index:" not in options:
            found.add(name)
    return found


def test_every_public_module_has_an_automodule_on_a_page():
    documented = set()
    for path in (ROOT / "docs").rglob("*"):
        if path.suffix in {".rst", ".md"} and "_build" not in path.parts:
            documented |= _automodules(path.read_text())
    public = {module.__name__ for module in api_check.public_modules()}
    assert public - documented == set(), "add these modules to a page in docs/api/"
    assert "pyro_masked.conditionals.gaussian" in _automodules(
        (ROOT / "docs" / "api" / "engines.rst").read_text()
    )
    # the mathematics page shows module docstrings without indexing them
    assert _automodules((ROOT / "docs" / "mathematics.md").read_text()) == set()


def test_the_api_check_sees_a_missing_name():
    # negative control: with one public name left out of the documented set, it is reported
    documented = {"pyro_masked"}
    for module in api_check.public_modules():
        documented.add(module.__name__)
        documented.update(dotted for dotted, _ in api_check.public_names(module))
    message = "public name pyro_masked.infer.MaskedELBO is not documented"
    assert message not in api_check.missing_documentation(documented)
    documented.discard("pyro_masked.infer.MaskedELBO")
    assert message in api_check.missing_documentation(documented)


def test_the_version_is_written_once_and_read_by_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text()
    project = pyproject.split("[project]", 1)[1].split("\n[", 1)[0]
    assert re.search(r"^version\s*=", project, flags=re.M) is None
    assert 'dynamic = ["version"]' in project
    assert 'version = { attr = "pyro_masked.__version__" }' in pyproject
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", pyro_masked.__version__)
    assert f"## [{pyro_masked.__version__}]" in (ROOT / "CHANGELOG.md").read_text()


def test_the_package_ships_py_typed():
    assert (ROOT / "pyro_masked" / "py.typed").is_file()
    assert '"pyro_masked" = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()


def test_benchmark_results_render_as_a_table(tmp_path):
    path = report.write_results(
        "speed",
        title="masked / exact",
        columns=["case", "ratio", "target"],
        rows=[["N = 2000", 1.19237, "<= 1.25x"], ["N = 4000", 1.2, None]],
        command="python benchmarks/speed.py",
        machine="a test machine",
        directory=tmp_path,
    )
    assert json.loads(path.read_text())["rows"][0] == ["N = 2000", 1.19237, "<= 1.25x"]
    text, problems = benchmark_tables.render_results(tmp_path)
    assert problems == []
    assert "### masked / exact" in text
    assert "`python benchmarks/speed.py` on a test machine" in text
    assert "| case | ratio | target |" in text
    assert "| N = 2000 | 1.19 | <= 1.25x |" in text
    assert "| N = 4000 | 1.2 |  |" in text


def test_malformed_benchmark_results_are_reported_by_file(tmp_path):
    (tmp_path / "short_row.json").write_text(
        json.dumps(
            {
                "benchmark": "short_row",
                "title": "t",
                "command": "c",
                "machine": "m",
                "date": "d",
                "columns": ["a", "b"],
                "rows": [["only one"]],
            }
        )
    )
    (tmp_path / "no_rows.json").write_text(json.dumps({"benchmark": "no_rows"}))
    (tmp_path / "broken.json").write_text("{")
    _, problems = benchmark_tables.render_results(tmp_path)
    assert any("short_row.json: row 0 has 1 cells for 2 columns" in p for p in problems)
    assert any("no_rows.json: missing key 'rows'" in p for p in problems)
    assert any("broken.json: not readable as JSON" in p for p in problems)


def test_write_results_rejects_a_row_of_the_wrong_length(tmp_path):
    with pytest.raises(ValueError, match=r"rows\[1\] has 1 cells for 2 columns"):
        report.write_results(
            "x", title="t", columns=["a", "b"], rows=[[1, 2], [3]], directory=tmp_path
        )
    assert list(tmp_path.iterdir()) == []


def _example_blocks(text: str):
    """The literal blocks after a paragraph that starts with "Example" and ends with "::"."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if not line.rstrip().endswith("::"):
            continue
        start = index
        while start > 0 and lines[start - 1].strip():
            start -= 1
        if not re.match(r"\s*Examples?\b", lines[start]):
            continue
        indent = len(lines[start]) - len(lines[start].lstrip())
        block = []
        for following in lines[index + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        yield lines[start].strip(), [entry for entry in block if entry]


def _package_docstrings():
    import ast

    for path in sorted((ROOT / "pyro_masked").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node, clean=False)
                if docstring:
                    name = getattr(node, "name", path.stem)
                    yield f"{path.relative_to(ROOT)}:{name}", docstring


def test_example_blocks_are_doctests_with_outputs():
    # pytest --doctest-modules runs only ">>>" lines and checks only the lines that follow them
    not_doctests = []
    for where, docstring in _package_docstrings():
        for header, block in _example_blocks(docstring):
            prompts = [entry for entry in block if entry.startswith((">>>", "..."))]
            outputs = [entry for entry in block if not entry.startswith((">>>", "..."))]
            if not block or not block[0].startswith(">>>") or not outputs:
                not_doctests.append(f"{where}: {header} {block[:1]}")
            elif not prompts:
                not_doctests.append(f"{where}: {header} has no >>> lines")
    assert not not_doctests, "examples that do not run as doctests:\n" + "\n".join(not_doctests)


def test_the_example_check_rejects_plain_code_and_missing_outputs():
    # negative control for the check above
    plain = "Do this.\n\nExample::\n\n    svi = SVI(model)\n\nMore text."
    silent = "Example::\n\n    >>> x = 1\n"
    good = "Example::\n\n    >>> 1 + 1\n    2\n"
    assert list(_example_blocks(plain)) == [("Example::", ["svi = SVI(model)"])]
    assert list(_example_blocks(silent)) == [("Example::", [">>> x = 1"])]
    assert list(_example_blocks(good)) == [("Example::", [">>> 1 + 1", "2"])]
    wrapped = "Example, on two\nlines::\n\n    f(x)\n"
    assert list(_example_blocks(wrapped)) == [("Example, on two", ["f(x)"])]


def test_references_to_reexported_names_resolve_where_they_are_defined():
    assert api_check.canonical_name("pyro_masked.MaskedELBO") == "pyro_masked.infer.MaskedELBO"
    assert (
        api_check.canonical_name("pyro_masked.masked_log_prob")
        == "pyro_masked.scoring.masked_log_prob"
    )
    assert (
        api_check.canonical_name("pyro_masked.masks.MaskSchedule.context_weights")
        == "pyro_masked.masks.MaskSchedule.context_weights"
    )
    assert api_check.canonical_name("pyro_masked.no_such_name") is None
    assert api_check.canonical_name("torch.Tensor") is None
