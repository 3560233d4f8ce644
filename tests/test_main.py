import pytest

from pyro_masked.__main__ import main

METRICS = (
    "trend lengthscale (yr)",
    "seasonal period (yr)",
    "noise std (ppm)",
    "exact log marginal likelihood",
    "test RMSE (ppm)",
    "test mean log pred. density",
    "wall time (s)",
)


def test_main_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    output = tmp_path / "forecast.png"
    status = main(
        [
            "--steps",
            "3",
            "--num-masks",
            "1",
            "--mask",
            "0.15",
            "--output",
            str(output),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert status == 0
    assert "masked (0.15)" in printed and "exact evidence" in printed
    for metric in METRICS:
        row = next(line for line in printed.splitlines() if line.startswith(metric))
        assert len(row.split()) - len(metric.split()) == 2  # one value per fit
    assert f"wrote the forecast plot to {output}" in printed
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for option in ("--steps", "--mask", "--num-masks", "--seed", "--output", "--lr"):
        assert option in printed


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--steps", "0"], "--steps"),
        (["--steps", "many"], "--steps"),
        (["--mask", "half"], "--mask"),
        (["--mask", "1.5"], "--mask"),
        (["--mask", "0"], "--mask"),
        (["--num-masks", "0"], "--num-masks"),
        (["--lr", "-0.1"], "--lr"),
        (["--lr-decay", "2"], "--lr-decay"),
        (["--mask", "1000"], "--mask"),
        (["--seed", "x"], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--threads", "0"], "--threads"),
        (["--output", "/no/such/directory/plot.png"], "--output"),
        (["--unknown"], "unrecognized"),
    ],
)
def test_bad_options_get_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
