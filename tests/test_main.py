import os
import re
import sys

import pytest

import pyro_masked.__main__ as main_module
from pyro_masked.__main__ import DEFAULT_OUTPUT_NAME, main, resolve_output, write_atomically

METRICS = (
    "trend lengthscale (yr)",
    "seasonal period (yr)",
    "noise std (ppm)",
    "exact log marginal likelihood",
    "test RMSE (ppm)",
    "test mean log pred. density",
    "wall time (s)",
    "Adam steps",
    "L-BFGS iterations",
    "largest gradient entry",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A run of a few steps: the tests check the job's plumbing, not its fits.
TINY = ["--steps", "3", "--num-masks", "1", "--polish-iterations", "2", "--polish-masks", "1"]


def test_main_prints_the_table_and_the_differences_and_writes_the_plot(tmp_path, capsys):
    output = tmp_path / "forecast.png"
    status = main([*TINY, "--mask", "0.15", "--output", str(output), "--progress"])
    captured = capsys.readouterr()
    printed = captured.out
    assert status == 0
    assert "masked (0.15)" in printed and "exact evidence" in printed
    for metric in METRICS:
        row = next(line for line in printed.splitlines() if line.startswith(metric))
        assert len(row.split()) - len(metric.split()) == 2  # one value per fit
    # Differences in nats, not percentages of a log-likelihood; unfinished fits are said so.
    assert "exact log marginal likelihood" in printed and "nats" in printed and "%" not in printed
    assert "L-BFGS stopped by" in printed and "between unfinished fits" in printed
    assert "Measured wall time" in printed
    assert f"wrote the forecast plot to {output}" in printed
    assert output.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(os.listdir(tmp_path)) == ["forecast.png"]  # no temporary file left behind
    # The progress bars show the log evidence in the table's units (ppm), not the loss in
    # standardised units: the exact fit's last value is the table's number.
    shown = re.findall(
        r"exact fit, L-BFGS.*?objective = (-?[0-9.]+) nats \(ppm units\)", captured.err
    )
    row = next(line for line in printed.splitlines() if line.startswith("exact log marg"))
    assert float(shown[-1]) == pytest.approx(float(row.split()[-1]), abs=1e-3)


@pytest.mark.parametrize("where", ["empty", "directory", "trailing separator"])
def test_output_naming_a_directory_writes_the_default_name_there_and_prints_it(
    where, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    argument = {"empty": "", "directory": str(tmp_path), "trailing separator": "plots/"}[where]
    if where == "trailing separator":
        (tmp_path / "plots").mkdir()
    expected = resolve_output(argument)
    assert os.path.dirname(expected) == str(
        tmp_path / "plots" if argument == "plots/" else tmp_path
    )
    assert os.path.basename(expected) == DEFAULT_OUTPUT_NAME
    monkeypatch.setattr(main_module, "_run", _fake_run)
    assert main(["--output", argument]) == 0
    assert f"wrote the forecast plot to {expected}" in capsys.readouterr().out
    with open(expected, "rb") as written:
        assert written.read()[:8] == PNG_SIGNATURE


def _fake_run(args):
    """The job's last step alone: write a plot atomically to the resolved path, print it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure()
    write_atomically(args.output, lambda temporary: figure.savefig(temporary, format="png"))
    plt.close(figure)
    print(f"wrote the forecast plot to {args.output}")
    return 0


def _fail_if_fitted(*args, **kwargs):
    raise AssertionError("the fits started before the output path was checked")


def test_an_unwritable_output_directory_stops_the_job_before_the_fits(
    tmp_path, monkeypatch, capsys
):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(main_module, "_fit", _fail_if_fitted)
    monkeypatch.setattr(main_module.tempfile, "mkstemp", refuse)
    with pytest.raises(SystemExit) as exit_info:
        main(["--output", str(tmp_path / "forecast.png")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--output" in error and "Permission denied" in error


def test_an_output_path_under_a_file_stops_the_job_before_the_fits(tmp_path, monkeypatch, capsys):
    (tmp_path / "file.txt").write_text("not a directory")
    monkeypatch.setattr(main_module, "_fit", _fail_if_fitted)
    with pytest.raises(SystemExit) as exit_info:
        main(["--output", str(tmp_path / "file.txt" / "forecast.png")])
    assert exit_info.value.code == 2
    assert "--output" in capsys.readouterr().err


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError])
def test_an_interrupted_write_leaves_the_previous_plot_whole(tmp_path, interruption):
    target = tmp_path / "forecast.png"
    target.write_bytes(b"the previous plot")

    def write_half_then_stop(temporary):
        with open(temporary, "wb") as half:
            half.write(PNG_SIGNATURE)
        raise interruption()

    with pytest.raises(interruption):
        write_atomically(str(target), write_half_then_stop)
    assert target.read_bytes() == b"the previous plot"
    assert os.listdir(tmp_path) == ["forecast.png"]


def test_progress_bars_are_off_without_a_terminal_and_on_when_asked(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(main_module, "_run", lambda args: seen.append(args.progress) or 0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    main(["--output", str(tmp_path)])
    main(["--output", str(tmp_path), "--progress"])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    main(["--output", str(tmp_path)])
    main(["--output", str(tmp_path), "--no-progress"])
    assert seen == [False, True, True, False]


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for option in (
        "--steps",
        "--mask",
        "--num-masks",
        "--polish-iterations",
        "--polish-masks",
        "--seed",
        "--output",
        "--lr",
        "--progress",
        "--no-progress",
    ):
        assert option in printed


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--steps", "-1"], "--steps"),
        (["--steps", "many"], "--steps"),
        (["--mask", "half"], "--mask"),
        (["--mask", "1.5"], "--mask"),
        (["--mask", "0"], "--mask"),
        (["--num-masks", "0"], "--num-masks"),
        (["--polish-iterations", "-1"], "--polish-iterations"),
        (["--polish-masks", "0"], "--polish-masks"),
        (["--lr", "-0.1"], "--lr"),
        (["--lr-decay", "2"], "--lr-decay"),
        (["--mask", "1000"], "--mask"),
        (["--seed", "x"], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--threads", "0"], "--threads"),
        (["--output", "/no/such/directory/plot.png"], "--output"),
        (["--progress", "--no-progress"], "not allowed with"),
        (["--unknown"], "unrecognized"),
    ],
)
def test_bad_options_get_argparse_errors(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_plotting_package_stops_the_job_before_the_fits(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(main_module, "_fit", _fail_if_fitted)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise
    with pytest.raises(SystemExit) as exit_info:
        main(["--output", str(tmp_path / "forecast.png")])
    assert exit_info.value.code == 2
    assert 'pip install "pyro_masked[plot]"' in capsys.readouterr().err


def test_a_line_search_trial_that_fails_the_cholesky_stops_the_polish_at_the_best_point():
    import argparse

    import torch

    from pyro_masked.linalg import NonFiniteMatrixError

    param = torch.zeros(1, requires_grad=True)
    evaluated = []

    def loss_fn():
        if param.item() > 3.0:  # as Pyro re-raises a failed factorization at a site
            try:
                raise NonFiniteMatrixError("the covariance matrix contains NaN entries")
            except NonFiniteMatrixError as error:
                raise ValueError("Error while computing log_prob at site 'y'") from error
        evaluated.append(param.item())
        return (param - 5.0).square().sum()

    args = argparse.Namespace(polish_iterations=50)
    _, stopped_by, _ = main_module._polish([param], loss_fn, args, False, "polish", 0.0)
    assert stopped_by == "failed line search"
    assert param.item() == max(evaluated) and param.item() <= 3.0

    def broken():
        raise ValueError("a bug, not a failed factorization")

    with pytest.raises(ValueError, match="a bug"):
        main_module._polish([param], broken, args, False, "polish", 0.0)
