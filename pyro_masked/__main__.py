"""The main job: ``python -m pyro_masked`` fits the Mauna Loa CO2 record by masking and exactly.

A Gaussian process with a composite GPyTorch kernel (Rasmussen & Williams, 2006, section
5.4.3: long-term trend + seasonal periodic x decay + medium-term irregularities + noise) is
fitted to the monthly CO2 means up to and including 1990, twice: by cumulative masked
pre-training (:class:`~pyro_masked.MaskedELBO`) and by the exact marginal likelihood. Both
forecast 1991-2001. The job prints a side-by-side table (fitted hyperparameters, the exact log
marginal likelihood at the fitted values, test RMSE and mean log predictive density, wall
time) and writes a PNG plot of both forecasts with 95% bands.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import NamedTuple, Optional, Sequence

import gpytorch
import torch

from pyro_masked.datasets import load_mauna_loa_co2
from pyro_masked.gp import GPRegression, fit
from pyro_masked.masks import MaskLike, as_schedule

__all__ = ["main"]

#: The last training year; the forecast covers the years after it.
LAST_TRAINING_YEAR = 1990
#: Inputs are years since this one.
YEAR_ORIGIN = 1958.0


def _mask_argument(text: str) -> MaskLike:
    """``--mask``: ``cumulative``, an int mask size or a float rate in (0, 1)."""
    mask: MaskLike
    if text == "cumulative":
        mask = text
    else:
        try:
            mask = int(text)
        except ValueError:
            try:
                mask = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{text!r} is not 'cumulative', an int mask size or a float rate"
                ) from None
    try:
        as_schedule(mask)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return mask


def _int_at_least(minimum: int):
    """An argparse type: an integer no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _decay_factor(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pyro_masked",
        description=(
            "Fit a Gaussian process with a composite GPyTorch kernel to the Mauna Loa CO2 "
            f"record (monthly means up to {LAST_TRAINING_YEAR}) twice, by masked pre-training "
            "and by the exact marginal likelihood; compare the 1991-2001 forecasts in a table "
            "and a PNG plot."
        ),
    )
    parser.add_argument(
        "--steps", type=_positive_int, default=600, help="Adam steps of each fit (default 600)"
    )
    parser.add_argument(
        "--mask",
        type=_mask_argument,
        default="cumulative",
        help="mask schedule of the masked fit: 'cumulative' (every mask size, an unbiased "
        "estimate of the log evidence), an int mask size, or a float masking rate in (0, 1) "
        "(default cumulative)",
    )
    parser.add_argument(
        "--num-masks",
        type=_positive_int,
        default=2,
        help="random permutations averaged per step of the masked fit (default 2)",
    )
    parser.add_argument(
        "--lr", type=_positive_float, default=0.05, help="Adam learning rate (default 0.05)"
    )
    parser.add_argument(
        "--lr-decay",
        type=_decay_factor,
        default=0.02,
        help="final over initial learning rate, exponential decay (default 0.02)",
    )
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--output",
        default="mauna_loa_co2_forecast.png",
        help="where to write the PNG plot (default ./mauna_loa_co2_forecast.png)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (default 1: the matrices are small, and one thread keeps the "
        "job fast on a busy machine)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


class _Standardised(NamedTuple):
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    y_mean: float
    y_scale: float


def _load_data() -> _Standardised:
    data = load_mauna_loa_co2(dtype=torch.float64)
    train = data.year < LAST_TRAINING_YEAR + 1
    x = data.year - YEAR_ORIGIN
    y_mean = data.co2[train].mean().item()
    y_scale = data.co2[train].std().item()
    y = (data.co2 - y_mean) / y_scale
    return _Standardised(x[train], y[train], x[~train], y[~train], y_mean, y_scale)


def build_kernel() -> gpytorch.kernels.Kernel:
    """The composite kernel, initialised for years and standardised CO2.

    ``trend``: a smooth rising level (RBF, decades); ``seasonal``: a yearly cycle whose shape
    drifts slowly (periodic x RBF decay); ``medium``: irregularities over months to years
    (rational quadratic). The Gaussian noise is the model's.
    """
    from gpytorch.kernels import PeriodicKernel, RBFKernel, RQKernel, ScaleKernel

    trend = ScaleKernel(RBFKernel())
    trend.base_kernel.lengthscale = 30.0
    trend.outputscale = 4.0
    periodic, decay = PeriodicKernel(), RBFKernel()
    periodic.period_length = 1.0
    periodic.lengthscale = 1.0
    decay.lengthscale = 50.0
    seasonal = ScaleKernel(periodic * decay)
    seasonal.outputscale = 0.05
    medium = ScaleKernel(RQKernel())
    medium.base_kernel.lengthscale = 1.0
    medium.base_kernel.alpha = 1.0
    medium.outputscale = 0.01
    return trend + seasonal + medium


def _hyperparameters(gp: GPRegression, y_scale: float) -> dict[str, float]:
    """The fitted hyperparameters in the data's units (ppm and years)."""
    trend, seasonal, medium = gp.kernel.kernels
    periodic, decay = seasonal.base_kernel.kernels
    ppm = y_scale
    return {
        "trend amplitude (ppm)": ppm * trend.outputscale.sqrt().item(),
        "trend lengthscale (yr)": trend.base_kernel.lengthscale.item(),
        "seasonal amplitude (ppm)": ppm * seasonal.outputscale.sqrt().item(),
        "seasonal period (yr)": periodic.period_length.item(),
        "seasonal smoothness": periodic.lengthscale.item(),
        "seasonal decay (yr)": decay.lengthscale.item(),
        "medium amplitude (ppm)": ppm * medium.outputscale.sqrt().item(),
        "medium lengthscale (yr)": medium.base_kernel.lengthscale.item(),
        "medium RQ alpha": medium.base_kernel.alpha.item(),
        "noise std (ppm)": ppm * gp.noise.sqrt().item(),
    }


class FitResult(NamedTuple):
    gp: GPRegression
    losses: list
    seconds: float
    metrics: dict


def _evaluate(gp: GPRegression, data: _Standardised) -> dict[str, float]:
    """Exact log evidence of the training data, test RMSE and mean log predictive density.

    All in the original units (ppm): a density in standardised units is divided by the scale.
    """
    with torch.no_grad():
        log_evidence = gp.log_marginal_likelihood().item()
        mean, var = gp(data.x_test, noiseless=False)
    num_train = data.y_train.shape[0]
    residual = (mean - data.y_test) * data.y_scale
    log_scale = math.log(data.y_scale)
    log_density = -0.5 * (math.log(2 * math.pi) + var.log() + (mean - data.y_test).square() / var)
    return {
        "exact log marginal likelihood": log_evidence - num_train * log_scale,
        "test RMSE (ppm)": residual.square().mean().sqrt().item(),
        "test mean log pred. density": log_density.mean().item() - log_scale,
    }


def _fit(data: _Standardised, objective: str, args: argparse.Namespace) -> FitResult:
    gp = GPRegression(data.x_train, data.y_train, build_kernel(), noise=0.01)
    start = time.perf_counter()
    losses = fit(
        gp,
        objective=objective,
        mask=args.mask,
        num_masks=args.num_masks,
        num_steps=args.steps,
        lr=args.lr,
        lr_decay=args.lr_decay,
        seed=args.seed,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    metrics = {**_hyperparameters(gp, data.y_scale), **_evaluate(gp, data)}
    metrics["wall time (s)"] = seconds
    return FitResult(gp, losses, seconds, metrics)


def format_table(masked: FitResult, exact: FitResult, mask_label: str) -> str:
    """The side-by-side table of both fits."""
    left, right = f"masked ({mask_label})", "exact evidence"
    width = max(len(name) for name in masked.metrics) + 2
    lines = [f"{'':<{width}}{left:>22}{right:>18}"]
    for name, value in masked.metrics.items():
        lines.append(f"{name:<{width}}{value:>22.4f}{exact.metrics[name]:>18.4f}")
    return "\n".join(lines)


def _plot(masked: FitResult, exact: FitResult, data: _Standardised, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_all = torch.cat([data.x_train, data.x_test])
    grid = torch.linspace(x_all.min().item(), x_all.max().item() + 1.0, 800, dtype=x_all.dtype)
    years = grid + YEAR_ORIGIN

    def in_ppm(t):
        return t * data.y_scale + data.y_mean

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for ax, zoom in zip(axes, (False, True)):
        for result, label, color, style in (
            (exact, "exact", "C3", "-"),
            (masked, "masked", "C0", "--"),
        ):
            with torch.no_grad():
                mean, var = result.gp(grid, noiseless=False)
            band = 1.96 * var.sqrt()
            ax.plot(years, in_ppm(mean), color=color, ls=style, lw=1, label=f"{label} fit")
            ax.fill_between(
                years, in_ppm(mean - band), in_ppm(mean + band), color=color, alpha=0.2, lw=0
            )
        ax.plot(data.x_train + YEAR_ORIGIN, in_ppm(data.y_train), "k.", ms=2, label="training")
        ax.plot(data.x_test + YEAR_ORIGIN, in_ppm(data.y_test), "g.", ms=2, label="held out")
        ax.axvline(LAST_TRAINING_YEAR + 1, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("year")
        if zoom:
            ax.set_xlim(LAST_TRAINING_YEAR - 2, years[-1].item())
            ax.set_ylim(345, 380)
            ax.set_title("forecast 1991-2001, 95% bands")
        else:
            ax.set_ylabel("CO2 (ppm)")
            ax.set_title("Mauna Loa CO2: GP fitted by masking and by the exact evidence")
            ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the main job; ``argv`` defaults to the command line. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    output_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(output_dir):
        parser.error(f"--output: the directory {output_dir} does not exist")
    num_train = int((load_mauna_loa_co2().year < LAST_TRAINING_YEAR + 1).sum())
    try:
        as_schedule(args.mask).validate(num_train)
    except ValueError as error:
        parser.error(f"--mask: {error}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    data = _load_data()
    print(
        f"Mauna Loa CO2, monthly means: {data.x_train.shape[0]} months up to "
        f"{LAST_TRAINING_YEAR} for training, {data.x_test.shape[0]} months of 1991-2001 held out"
    )
    masked = _fit(data, "masked", args)
    exact = _fit(data, "exact", args)
    mask_label = str(args.mask)
    print()
    print(format_table(masked, exact, mask_label))
    lml_masked = masked.metrics["exact log marginal likelihood"]
    lml_exact = exact.metrics["exact log marginal likelihood"]
    mlpd_gap = (
        exact.metrics["test mean log pred. density"] - masked.metrics["test mean log pred. density"]
    )
    print(
        f"\nmasked vs exact: log marginal likelihood differs by "
        f"{100 * abs(lml_masked - lml_exact) / abs(lml_exact):.2f}%, test mean log predictive "
        f"density by {mlpd_gap:+.3f} nats/point (exact minus masked)"
    )
    _plot(masked, exact, data, args.output)
    print(f"wrote the forecast plot to {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
