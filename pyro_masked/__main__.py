"""The main job: ``python -m pyro_masked`` fits the Mauna Loa CO2 record by masking and exactly.

A Gaussian process with a composite GPyTorch kernel (Rasmussen & Williams, 2006, section
5.4.3: long-term trend + seasonal periodic x decay + medium-term irregularities + noise) is
fitted to the monthly CO2 means up to and including 1990, twice: by cumulative masked
pre-training (:class:`~pyro_masked.MaskedELBO`) and by the exact marginal likelihood. Both
forecast 1991-2001.

Each fit runs to convergence in two phases: Adam steps (the masked fit draws new random masks
every step), then an L-BFGS polish of a deterministic objective until L-BFGS's own stopping
rule holds: the exact negative log evidence for the exact fit, and for the masked fit the
cumulative masked estimate with ``--polish-masks`` permutations drawn once from ``--seed`` and
kept fixed. Stopping both after a fixed number of Adam steps compares two unfinished fits
(whichever happens to be closer to its optimum wins), not the two objectives.

The job prints a side-by-side table (fitted hyperparameters, the exact log marginal likelihood
at the fitted values, test RMSE and mean log predictive density, measured wall times), the
differences in nats, and writes a PNG plot of both forecasts with 95% predictive bands.
Every log density is in the data's units (ppm), the units of the table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from typing import Callable, NamedTuple, Optional, Sequence

import gpytorch
import pyro
import torch
from tqdm import tqdm

from pyro_masked._optional import import_optional
from pyro_masked.datasets import load_mauna_loa_co2
from pyro_masked.gp import GPRegression
from pyro_masked.gpytorch import deterministic_num_masks
from pyro_masked.infer import MaskedELBO
from pyro_masked.linalg import NonFiniteMatrixError, NotPositiveDefiniteError
from pyro_masked.masks import MaskLike, as_schedule
from pyro_masked.util import private_generator

__all__ = ["main"]

#: The last training year; the forecast covers the years after it.
LAST_TRAINING_YEAR = 1990
#: Inputs are years since this one.
YEAR_ORIGIN = 1958.0
#: The polish stops when no gradient entry of the loss (nats, over raw hyperparameters)
#: exceeds this ...
GRADIENT_TOLERANCE = 1e-3
#: ... or when a fresh L-BFGS run, restarted where the last one stopped, improves the loss by
#: less than this many nats: the optimiser can make no further progress there.
PROGRESS_TOLERANCE = 1e-6
#: The file name written when ``--output`` names a directory (or is empty: the current one).
DEFAULT_OUTPUT_NAME = "mauna_loa_co2_forecast.png"


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
            "and by the exact marginal likelihood, each to convergence (Adam, then L-BFGS); "
            "compare the 1991-2001 forecasts in a table and a PNG plot. Log densities are in "
            "the data's units (ppm)."
        ),
    )
    parser.add_argument(
        "--steps", type=_non_negative_int, default=200, help="Adam steps of each fit (default 200)"
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
        help="random permutations averaged per Adam step of the masked fit (default 2)",
    )
    parser.add_argument(
        "--polish-iterations",
        type=_non_negative_int,
        default=400,
        help="most L-BFGS iterations after Adam; it stops earlier when converged "
        "(default 400; 0 skips the polish and leaves a fixed-budget fit)",
    )
    parser.add_argument(
        "--polish-masks",
        type=_positive_int,
        default=None,
        help="permutations of the masked objective L-BFGS polishes, drawn once from --seed and "
        "kept fixed (default: pyro_masked.gpytorch.deterministic_num_masks of the number of "
        "training months, 7; a single fixed permutation is a noticeably biased objective)",
    )
    parser.add_argument(
        "--lr", type=_positive_float, default=0.05, help="Adam learning rate (default 0.05)"
    )
    parser.add_argument(
        "--lr-decay",
        type=_decay_factor,
        default=0.1,
        help="final over initial Adam learning rate, exponential decay (default 0.1)",
    )
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--output",
        default=DEFAULT_OUTPUT_NAME,
        help=f"the PNG plot to write, or a directory to write {DEFAULT_OUTPUT_NAME} into "
        f"(default ./{DEFAULT_OUTPUT_NAME}); checked before the fits start",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (default 1: the matrices are small, and one thread keeps the "
        "job fast on a busy machine)",
    )
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show progress bars (the default only when stderr is a terminal)",
    )
    progress.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="hide the progress bars (the default when stderr is not a terminal, e.g. a log)",
    )
    return parser


# -- output path ------------------------------------------------------------------------------


def resolve_output(path: str) -> str:
    """The absolute path of the PNG file ``--output`` asks for.

    An empty path means the current directory; a directory (existing, or written with a
    trailing separator) gets :data:`DEFAULT_OUTPUT_NAME` inside it.
    """
    path = os.path.expanduser(path) or os.curdir
    if os.path.isdir(path) or path.endswith((os.sep, "/")):
        path = os.path.join(path, DEFAULT_OUTPUT_NAME)
    return os.path.abspath(path)


def check_writable(path: str) -> None:
    """Raise ``OSError`` unless a file can be created next to ``path`` and moved onto it.

    This is exactly what :func:`write_atomically` does later, so a run that passes this check
    does not lose its work to a bad ``--output``.
    """
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"the directory {directory} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory")
    handle, probe = tempfile.mkstemp(dir=directory, prefix=".pyro_masked-", suffix=".probe")
    os.close(handle)
    os.remove(probe)


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)``, then move the file onto ``path`` in one step.

    The temporary file lies in ``path``'s directory (so :func:`os.replace` is atomic); an
    interrupted or failed write removes it and leaves any earlier ``path`` as it was.
    """
    directory, name = os.path.split(path)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


# -- data and model ---------------------------------------------------------------------------


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
    """The composite kernel in float64, initialised for years and standardised CO2.

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
    # float64 like the data: L-BFGS's convergence test needs more than float32's 7 digits.
    return (trend + seasonal + medium).double()


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
        "noise std (ppm)": ppm * gp.noise.sqrt().item(),  # type: ignore[attr-defined]
    }


# -- fitting ----------------------------------------------------------------------------------


class FitResult(NamedTuple):
    gp: GPRegression
    adam_losses: list
    polish_iterations: int
    stopped_by: str
    max_gradient: float
    seconds: float
    metrics: dict


def _objective(gp: GPRegression, objective: str, args: argparse.Namespace, fixed_masks: bool):
    """The loss of one fit, a sum over months in standardised units (Pyro's convention).

    ``fixed_masks``: the masked loss draws the same ``--polish-masks`` permutations at every
    call, from a private generator seeded by ``--seed`` (the global generators are untouched),
    so that it is a deterministic function of the hyperparameters for L-BFGS.
    """
    if objective == "exact":
        return lambda: -gp.log_marginal_likelihood()
    if not fixed_masks:
        elbo = MaskedELBO(mask=args.mask, num_masks=args.num_masks)
        return lambda: elbo.differentiable_loss(gp.model, gp.guide)

    def seeded_masked_loss() -> torch.Tensor:
        generator = private_generator(args.seed, gp.X.device)
        elbo = MaskedELBO(mask=args.mask, num_masks=args.polish_masks, generator=generator)
        return elbo.differentiable_loss(gp.model, gp.guide)

    return seeded_masked_loss


def _fit(
    data: _Standardised, objective: str, args: argparse.Namespace, progress: bool
) -> FitResult:
    gp = GPRegression(data.x_train, data.y_train, build_kernel(), noise=0.01)
    # -loss in standardised units minus N log(scale) is the log evidence in ppm units.
    to_ppm = data.y_train.shape[0] * math.log(data.y_scale)
    label = "masked" if objective == "masked" else "exact"
    shown = "masked estimate of log p(y)" if objective == "masked" else "log p(y)"
    start = time.perf_counter()
    with pyro.get_param_store().scope():
        params = [p for p in gp.parameters() if p.requires_grad]
        pyro.set_rng_seed(args.seed)
        adam_losses = _adam(
            params,
            _objective(gp, objective, args, False),
            args,
            progress,
            f"{label} fit, Adam",
            shown,
            to_ppm,
        )
        iterations, stopped_by, max_gradient = _polish(
            params,
            _objective(gp, objective, args, True),
            args,
            progress,
            f"{label} fit, L-BFGS",
            to_ppm,
        )
    seconds = time.perf_counter() - start
    metrics = {**_hyperparameters(gp, data.y_scale), **_evaluate(gp, data)}
    metrics["wall time (s)"] = seconds
    return FitResult(gp, adam_losses, iterations, stopped_by, max_gradient, seconds, metrics)


def _adam(
    params: list,
    loss_fn: Callable[[], torch.Tensor],
    args: argparse.Namespace,
    progress: bool,
    description: str,
    shown: str,
    to_ppm: float,
) -> list:
    """``--steps`` Adam steps with an exponentially decaying learning rate; the losses."""
    optimizer = torch.optim.Adam(params, lr=args.lr)
    losses = []
    bar = tqdm(range(args.steps), desc=description, disable=not progress, file=sys.stderr)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * args.lr_decay ** (step / max(1, args.steps - 1))
        optimizer.zero_grad()
        loss = loss_fn()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{description}, step {step}: the loss is {loss.item()}")
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix_str(f"{shown} = {-losses[-1] - to_ppm:.2f} nats (ppm units)")
    return losses


def _polish(
    params: list,
    loss_fn: Callable[[], torch.Tensor],
    args: argparse.Namespace,
    progress: bool,
    description: str,
    to_ppm: float,
) -> tuple[int, str, float]:
    """L-BFGS on a deterministic loss until it converges or the budget is spent.

    L-BFGS stops by itself when a line search makes no headway, which on these objectives can
    happen far from the optimum (long, flat ridges, e.g. towards a vanishing RQ ``alpha``). It
    is then restarted with a fresh curvature memory; the fit has converged when the gradient
    vanishes (:data:`GRADIENT_TOLERANCE`) or when a restart no longer improves the loss by
    :data:`PROGRESS_TOLERANCE`.

    A line-search trial can step to hyperparameters whose covariance cannot be factored; the
    parameters then go back to the best point evaluated so far and the polish stops there,
    reported as ``"failed line search"`` rather than as converged.

    :returns: ``(iterations, stopped by, max |gradient|)``, with ``stopped by`` one of
        ``"gradient"``, ``"no progress"`` (both converged), ``"budget"``,
        ``"failed line search"`` or ``"no polish"``.
    """
    if args.polish_iterations == 0:
        return 0, "no polish", math.nan
    bar = tqdm(desc=description, unit=" evaluations", disable=not progress, file=sys.stderr)
    best = math.inf

    best_params = [p.detach().clone() for p in params]

    def closure() -> torch.Tensor:
        nonlocal best, best_params
        for p in params:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        # Line-search trials can be far worse; the best value is the one L-BFGS has accepted.
        if loss.item() < best:
            best = loss.item()
            best_params = [p.detach().clone() for p in params]
        bar.update()
        bar.set_postfix_str(f"objective = {-best - to_ppm:.3f} nats (ppm units)")
        return loss

    iterations, stopped_by = 0, "budget"
    while iterations < args.polish_iterations:
        before = best
        lbfgs = torch.optim.LBFGS(
            params,
            max_iter=args.polish_iterations - iterations,
            max_eval=2 * (args.polish_iterations - iterations),
            tolerance_grad=GRADIENT_TOLERANCE,
            tolerance_change=1e-9,
            history_size=20,
            line_search_fn="strong_wolfe",
        )
        try:
            lbfgs.step(closure)
        except ValueError as error:
            if not _factorization_failed(error):
                raise
            with torch.no_grad():
                for p, value in zip(params, best_params):
                    p.copy_(value)
            stopped_by = "failed line search"
            closure()
            max_gradient = max(p.grad.abs().max().item() for p in params if p.grad is not None)
            break
        iterations += int(lbfgs.state[params[0]]["n_iter"])
        closure()  # the value and gradient where L-BFGS stopped
        max_gradient = max(p.grad.abs().max().item() for p in params if p.grad is not None)
        if max_gradient < GRADIENT_TOLERANCE:
            stopped_by = "gradient"
            break
        if not best < before - PROGRESS_TOLERANCE:
            stopped_by = "no progress"
            break
    bar.close()
    return iterations, stopped_by, max_gradient


def _factorization_failed(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from, e.g. by Pyro's trace) is a failed Cholesky."""
    cause: Optional[BaseException] = error
    while cause is not None:
        if isinstance(cause, (NotPositiveDefiniteError, NonFiniteMatrixError)):
            return True
        cause = cause.__cause__
    return False


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


# -- report -----------------------------------------------------------------------------------


def format_table(masked: FitResult, exact: FitResult, mask_label: str) -> str:
    """The side-by-side table of both fits."""
    left, right = f"masked ({mask_label})", "exact evidence"
    width = max(len(name) for name in masked.metrics) + 2
    lines = [f"{'':<{width}}{left:>22}{right:>18}"]
    for name, value in masked.metrics.items():
        lines.append(f"{name:<{width}}{value:>22.4f}{exact.metrics[name]:>18.4f}")
    for name, value in (
        ("Adam steps", lambda r: len(r.adam_losses)),
        ("L-BFGS iterations", lambda r: r.polish_iterations),
    ):
        lines.append(f"{name:<{width}}{value(masked):>22d}{value(exact):>18d}")
    name = "largest gradient entry"
    lines.append(f"{name:<{width}}{masked.max_gradient:>22.1e}{exact.max_gradient:>18.1e}")
    name = "L-BFGS stopped by"
    lines.append(f"{name:<{width}}{masked.stopped_by:>22}{exact.stopped_by:>18}")
    return "\n".join(lines)


def _converged(result: FitResult) -> bool:
    return result.stopped_by in ("gradient", "no progress")


def format_summary(masked: FitResult, exact: FitResult, total_seconds: float) -> str:
    """What the two fits' numbers say, as differences in the table's units."""

    def difference(name: str) -> float:
        return masked.metrics[name] - exact.metrics[name]

    lml = "exact log marginal likelihood"
    lines = [
        "Differences, masked fit minus exact fit:",
        f"  exact log marginal likelihood {difference(lml):+.3f} nats "
        f"({masked.metrics[lml]:.3f} against {exact.metrics[lml]:.3f}, the exact fit's optimum)",
        f"  test mean log predictive density {difference('test mean log pred. density'):+.4f} "
        "nats per month",
        f"  test RMSE {difference('test RMSE (ppm)'):+.4f} ppm",
    ]
    if _converged(masked) and _converged(exact):
        lines.append(
            "Both fits converged (L-BFGS stopped by a vanishing gradient or because a restart "
            "made no progress), so these are differences between optima of the two objectives, "
            "not between unfinished fits."
        )
    else:
        lines.append(
            "At least one fit did not converge (see 'L-BFGS stopped by': its budget, or a line "
            "search that stepped to a covariance it could not factor): these are differences "
            "between unfinished fits; raise --polish-iterations, or change --seed or "
            "--polish-masks, for converged ones."
        )
    lines.append(
        f"Measured wall time: masked fit {masked.seconds:.1f} s, exact fit {exact.seconds:.1f} s, "
        f"whole job {total_seconds:.1f} s on {torch.get_num_threads()} torch thread(s)."
    )
    return "\n".join(lines)


def _plot(masked: FitResult, exact: FitResult, data: _Standardised, path: str) -> None:
    matplotlib = import_optional("matplotlib", "the main job's forecast plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_all = torch.cat([data.x_train, data.x_test])
    grid = torch.linspace(x_all.min().item(), x_all.max().item() + 1.0, 800, dtype=x_all.dtype)
    years = grid + YEAR_ORIGIN
    split = LAST_TRAINING_YEAR + 1

    def in_ppm(t):
        return t * data.y_scale + data.y_mean

    predictions = {}
    for name, result in (("exact", exact), ("masked", masked)):
        with torch.no_grad():
            mean, var = result.gp(grid, noiseless=False)
        band = 1.96 * var.sqrt()
        predictions[name] = (in_ppm(mean), in_ppm(mean - band), in_ppm(mean + band))

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    for ax, zoom in zip(axes, (False, True)):
        # The exact fit's band is shaded, the masked fit's drawn as dashed edges: two shaded
        # bands on top of each other mix into a third colour that belongs to neither.
        mean, lower, upper = predictions["exact"]
        ax.fill_between(
            years, lower, upper, color="C3", alpha=0.2, lw=0, label="exact fit: 95% band"
        )
        ax.plot(years, mean, color="C3", lw=1.2, label="exact fit: mean")
        mean, lower, upper = predictions["masked"]
        ax.plot(years, mean, color="C0", ls="--", lw=1.2, label="masked fit: mean")
        ax.plot(years, lower, color="C0", ls=":", lw=1, label="masked fit: 95% band")
        ax.plot(years, upper, color="C0", ls=":", lw=1)
        ax.plot(data.x_train + YEAR_ORIGIN, in_ppm(data.y_train), "k.", ms=2, label="training")
        ax.plot(data.x_test + YEAR_ORIGIN, in_ppm(data.y_test), "g.", ms=3, label="held out")
        ax.axvline(split, color="gray", ls="--", lw=0.8, label=f"end of training ({split})")
        ax.set_xlabel("year")
        ax.set_ylabel("CO2 (ppm)")
        if zoom:
            start = LAST_TRAINING_YEAR - 2
            ax.set_xlim(start, years[-1].item())
            shown = years >= start
            low = min(p[1][shown].min().item() for p in predictions.values())
            high = max(p[2][shown].max().item() for p in predictions.values())
            ax.set_ylim(low - 1.0, high + 1.0)
            ax.set_title(f"forecast {split}-2001 (zoom)")
        else:
            ax.set_title("Mauna Loa CO2: GP fitted by masking and by the exact evidence")
            ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    write_atomically(path, lambda temporary: fig.savefig(temporary, dpi=120, format="png"))
    plt.close(fig)


# -- entry point ------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the main job; ``argv`` defaults to the command line. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.output = resolve_output(args.output)
    try:  # before the fits, so that a missing plotting package costs no work
        import_optional("matplotlib", "the main job's forecast plot")
    except ImportError as error:
        parser.error(str(error))
    try:
        check_writable(args.output)
    except OSError as error:
        parser.error(f"--output: cannot write {args.output}: {error}")
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    num_train = int((load_mauna_loa_co2().year < LAST_TRAINING_YEAR + 1).sum())
    if args.polish_masks is None:
        args.polish_masks = deterministic_num_masks(num_train)
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
    start = time.perf_counter()
    data = _load_data()
    print(
        f"Mauna Loa CO2, monthly means: {data.x_train.shape[0]} months up to "
        f"{LAST_TRAINING_YEAR} for training, {data.x_test.shape[0]} months of 1991-2001 held out"
    )
    masked = _fit(data, "masked", args, args.progress)
    exact = _fit(data, "exact", args, args.progress)
    print()
    print(format_table(masked, exact, str(args.mask)))
    print()
    print(format_summary(masked, exact, time.perf_counter() - start))
    _plot(masked, exact, data, args.output)
    print(f"wrote the forecast plot to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
