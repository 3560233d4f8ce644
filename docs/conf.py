"""Sphinx configuration of the pyro_masked documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html`` from the repository root.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document this checkout, not an installed copy
sys.path.insert(0, str(DOCS / "_ext"))

import pyro_masked  # noqa: E402

project = "pyro_masked"
author = "The pyro_masked developers"
copyright = "the pyro_masked developers"  # noqa: A001 (Sphinx's name for it)
release = pyro_masked.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",
    "benchmark_tables",
    "public_api_check",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "_inventories", "_generated", "**.ipynb_checkpoints", "README.md"]
templates_path = ["_templates"]

# A broken reference to this package's own API is an error (references into other packages
# resolve only where their inventories are available, see intersphinx below, and are not checked).
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!pyro_masked\.).*"), (r"py:.*", r"pyro_masked\.\w+Like")]

# --- autodoc: the docstrings are reST with Sphinx field lists -------------------------------
autodoc_member_order = "bysource"
# Overrides of torch/Pyro methods without a docstring of their own (support, log_prob, ...) are
# left out: their contract is the base class's, documented there.
autodoc_inherit_docstrings = False
autodoc_typehints = "description"  # signatures stay readable; types go next to each parameter
autodoc_typehints_description_target = "documented"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True  # show `mask="cumulative"`, not the evaluated object
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_mock_imports: list[str] = []
autosummary_generate = False
napoleon_google_docstring = False
napoleon_numpy_docstring = False
add_module_names = False
python_display_short_literal_types = True

# --- notebooks: rendered from their committed outputs, never re-executed ----------------------
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3


def _write_if_changed(path: pathlib.Path, text: str) -> None:
    """Write a generated source file only when its text changes (keeps builds incremental)."""
    path.parent.mkdir(exist_ok=True)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


# The tutorials live in tutorials/ at the repository root, outside the Sphinx source tree;
# copy them in (only when changed, so incremental builds stay incremental).
_TUTORIALS_SRC = ROOT / "tutorials"
_TUTORIALS_DST = DOCS / "tutorials"
_TUTORIALS_DST.mkdir(exist_ok=True)
for _notebook in sorted(_TUTORIALS_SRC.glob("*.ipynb")):
    _copy = _TUTORIALS_DST / _notebook.name
    if not _copy.exists() or _copy.read_bytes() != _notebook.read_bytes():
        shutil.copyfile(_notebook, _copy)
for _stale in _TUTORIALS_DST.glob("*.ipynb"):
    if not (_TUTORIALS_SRC / _stale.name).exists():
        _stale.unlink()

# The front page's first toctree lists docs/distributed.md only where the tree has it (the page is
# written with pyro_masked.distributed), so that the site builds from any checkout.
_GUIDE_PAGES = ["installation", "guide", "tutorials", "distributed"]
_guide_toctree = "\n".join(
    ["```{toctree}", ":maxdepth: 2", ":caption: Using pyro_masked", ""]
    + [page for page in _GUIDE_PAGES if (DOCS / f"{page}.md").exists()]
    + ["```", ""]
)
_write_if_changed(DOCS / "_generated" / "guide_toctree.md", _guide_toctree)

# The tutorials page lists the notebooks in reading order, then any others alphabetically.
_TUTORIAL_ORDER = [
    "start_here",
    "ppca_convergence",
    "training_curves",
    "mask_rate_curve",
    "gp_regression",
    "large_gp",
    "binary_digits",
]
_notebooks = sorted(path.stem for path in _TUTORIALS_DST.glob("*.ipynb"))
_ordered = [name for name in _TUTORIAL_ORDER if name in _notebooks]
_ordered += [name for name in _notebooks if name not in _ordered]
_write_if_changed(
    DOCS / "_generated" / "tutorials_toctree.md",
    "\n".join(["```{toctree}", ":maxdepth: 1", ""] + [f"tutorials/{n}" for n in _ordered])
    + "\n```\n",
)

# --- intersphinx: links into torch, Pyro, GPyTorch and linear_operator ------------------------
# The build must pass offline (CI has no network) and must not depend on another site being up,
# so inventories are read from docs/_inventories/<name>.inv when that file is committed; a name
# without a local inventory is fetched from the web only with PYRO_MASKED_DOCS_ONLINE=1 and is
# otherwise left out (its references render as plain code, without a warning).
# docs/_inventories/README.md says how to store or refresh the local copies.
_INTERSPHINX_SITES = {
    "python": "https://docs.python.org/3/",
    "torch": "https://docs.pytorch.org/docs/stable/",
    "pyro": "https://docs.pyro.ai/en/stable/",
    "gpytorch": "https://docs.gpytorch.ai/en/stable/",
    "linear_operator": "https://linear-operator.readthedocs.io/en/stable/",
}
_ONLINE = os.environ.get("PYRO_MASKED_DOCS_ONLINE", "") == "1"
intersphinx_mapping = {}
for _name, _url in _INTERSPHINX_SITES.items():
    _local = DOCS / "_inventories" / f"{_name}.inv"
    if _local.exists():
        intersphinx_mapping[_name] = (_url, str(_local))
    elif _ONLINE:
        intersphinx_mapping[_name] = (_url, None)
intersphinx_timeout = 10

# --- HTML ---------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"pyro_masked {release}"
html_static_path: list[str] = []
html_show_sourcelink = False

# Benchmark result files rendered on the performance page (see docs/_ext/benchmark_tables.py).
benchmark_results_dir = str(ROOT / "benchmarks" / "results")


# A reference list item that starts with an initial ("- E. Fong, ...") would be read by docutils
# as an alphabetic enumerated list and lose the initial; escape the period so it stays text.
_INITIAL_AT_ITEM_START = re.compile(r"^(\s*[-*+] )([A-Z])\. ")


def _keep_initials_in_lists(app, what, name, obj, options, lines: list[str]) -> None:
    lines[:] = [_INITIAL_AT_ITEM_START.sub(r"\1\2\\. ", line) for line in lines]


def setup(app):
    app.connect("autodoc-process-docstring", _keep_initials_in_lists)
