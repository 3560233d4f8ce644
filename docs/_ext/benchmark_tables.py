"""Render the benchmark scripts' result files as tables on the performance page.

Every benchmark script writes one JSON file into ``benchmarks/results/`` (see
``benchmarks/report.py``, which writes them, and ``benchmarks/results/README.md`` for the
format). When the builder starts, this extension turns every such file into a Markdown section
with a pipe table in ``docs/_generated/benchmark_tables.md``, which ``performance.md``
includes; numbers are therefore never typed into the documentation. A malformed file is a
warning naming the file and the problem, which fails a ``sphinx-build -W`` build.
"""

from __future__ import annotations

import json
import pathlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the rendering itself needs no Sphinx, so the tests can import it
    from sphinx.application import Sphinx

REQUIRED_KEYS = ("benchmark", "title", "command", "machine", "date", "columns", "rows")


def _format_cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        text = "" if value is None else str(value)
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        # Three significant digits, but never an exponent for the sizes benchmarks print.
        text = f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _problems(result: Any) -> list[str]:
    if not isinstance(result, dict):
        return ["the file must hold one JSON object"]
    problems = [f"missing key {key!r}" for key in REQUIRED_KEYS if key not in result]
    if problems:
        return problems
    columns, rows = result["columns"], result["rows"]
    if not isinstance(columns, list) or not columns:
        problems.append("'columns' must be a non-empty list of headers")
    elif not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        problems.append("'rows' must be a list of lists")
    else:
        for index, row in enumerate(rows):
            if len(row) != len(columns):
                problems.append(f"row {index} has {len(row)} cells for {len(columns)} columns")
    return problems


def render_results(directory: pathlib.Path) -> tuple[str, list[str]]:
    """Markdown for every result file in ``directory``, and the problems found in them."""
    sections, problems = [], []
    files = sorted(directory.glob("*.json")) if directory.is_dir() else []
    for path in files:
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            problems.append(f"{path}: not readable as JSON ({error})")
            continue
        found = _problems(result)
        if found:
            problems.extend(f"{path}: {problem}" for problem in found)
            continue
        lines = [
            f"### {result['title']}",
            "",
            f"`{result['command']}` on {result['machine']}, {result['date']}.",
            "",
            "| " + " | ".join(_format_cell(column) for column in result["columns"]) + " |",
            "|" + "---|" * len(result["columns"]),
        ]
        lines += [
            "| " + " | ".join(_format_cell(cell) for cell in row) + " |" for row in result["rows"]
        ]
        if result.get("notes"):
            lines += ["", str(result["notes"])]
        sections.append("\n".join(lines))
    if not sections:
        sections.append(
            "No result files are stored yet: run the scripts in `benchmarks/` "
            "(each writes `benchmarks/results/<name>.json`) and rebuild."
        )
    return "\n\n".join(sections) + "\n", problems


def _write_tables(app: Sphinx) -> None:
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    directory = pathlib.Path(app.config.benchmark_results_dir)
    text, problems = render_results(directory)
    for problem in problems:
        logger.warning("benchmark result %s", problem)
    target = pathlib.Path(app.srcdir) / "_generated" / "benchmark_tables.md"
    target.parent.mkdir(exist_ok=True)
    if not target.exists() or target.read_text(encoding="utf-8") != text:
        target.write_text(text, encoding="utf-8")


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("benchmark_results_dir", "", "env")
    app.connect("builder-inited", _write_tables)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
