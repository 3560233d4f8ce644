"""Write a benchmark's table to ``benchmarks/results/<name>.json`` for the documentation.

The documentation's performance page is generated from these files (``docs/_ext/
benchmark_tables.py``), so its numbers always come from a script run. Call
:func:`write_results` at the end of a benchmark script, next to printing the same table::

    from report import write_results  # benchmarks/ is the script's directory

    write_results(
        "gp_step",
        title="GP step, N = 2000, float64: masked / GPyTorch exact",
        columns=["objective", "median (ms)", "x exact"],
        rows=[["exact", 101.2, 1.0], ["masked", 120.4, 1.19]],
    )

The format (one JSON object) is described in ``benchmarks/results/README.md``. The module also
holds the alternating timer the scripts share (:func:`paired_times`, :func:`median_ratio`).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time
from typing import Optional, Sequence, Union

Cell = Union[str, int, float, None]

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
REPO_ROOT = RESULTS_DIR.parent.parent


def _processor() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: Optional[str] = None) -> str:
    """Processor, core count, thread count, accelerator and torch version, in one line.

    :param device: the device the benchmark ran on (``"cpu"``, ``"cuda"``, ``"cuda:1"``); the
        line then names it (the GPU's name for a CUDA device). By default it names the CUDA
        device where one is available.
    """
    import torch

    parts = [f"{_processor()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"]
    if device is None:
        if torch.cuda.is_available():
            parts.append(torch.cuda.get_device_name())
    elif torch.device(device).type == "cuda":
        parts.append(f"device {torch.cuda.get_device_name(torch.device(device))}")
    else:
        parts.append(f"device {torch.device(device).type}")
    parts.append(f"torch {torch.__version__}")
    return ", ".join(parts)


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """This process's command line as ``python <script> <arguments>``, the script's path
    relative to the repository root (``benchmarks/<name>.py``) where it lies inside it."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or not argv[0]:
        return "python"
    script = os.path.abspath(argv[0])
    try:
        script = os.path.relpath(script, REPO_ROOT)
    except ValueError:  # another drive on Windows
        pass
    if script.startswith(os.pardir):
        script = os.path.abspath(argv[0])
    return shlex.join(["python", script, *argv[1:]])


def write_results(
    benchmark: str,
    *,
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    notes: Optional[str] = None,
    command: Optional[str] = None,
    machine: Optional[str] = None,
    directory: Optional[pathlib.Path] = None,
) -> pathlib.Path:
    """Write one benchmark table as ``<directory>/<benchmark>.json`` and return its path.

    :param benchmark: the script's name, e.g. ``"gp_step"``; also the file's name.
    :param title: one line saying what is compared.
    :param columns: the table's headers.
    :param rows: the rows, each with one cell per column (strings, ints or floats).
    :param notes: an optional sentence shown under the table.
    :param command: the command that produced the table; defaults to this process's command
        line, as ``python <script> <arguments>`` (:func:`command_line`).
    :param machine: where it ran; defaults to :func:`describe_machine`.
    :param directory: defaults to ``benchmarks/results``.
    """
    for index, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(f"rows[{index}] has {len(row)} cells for {len(columns)} columns")
    if command is None:
        command = command_line()
    result = {
        "benchmark": benchmark,
        "title": title,
        "command": command,
        "machine": machine if machine is not None else describe_machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "columns": list(columns),
        "rows": [list(row) for row in rows],
    }
    if notes:
        result["notes"] = notes
    directory = RESULTS_DIR if directory is None else pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{benchmark}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def paired_times(steps: dict, repeats: int) -> dict:
    """Wall times of ``repeats`` rounds in which every step runs once, in turn.

    Alternating the steps makes a change in machine load hit all of them alike, so ratios are
    taken round by round.
    """
    for step in steps.values():
        step()  # warm-up
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(numerator: list, denominator: list) -> float:
    """The median of the round-by-round ratios of two lists of times."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))
