"""How far the deterministic mode's fit falls short of the exact fit, per number of permutations.

BoTorch's ``SingleTaskGP`` (its default kernel, priors and outcome standardisation) on
noisy Hartmann-6 data is fitted with ``fit_gpytorch_mll`` (L-BFGS) three ways: with GPyTorch's
:class:`~gpytorch.mlls.ExactMarginalLogLikelihood`, and with
:class:`pyro_masked.MaskedMarginalLogLikelihood` in the deterministic mode (``seed`` set) at its
default number of permutations (:func:`pyro_masked.gpytorch.deterministic_num_masks`) and at
each ``--num-masks`` given. Every fit is scored by the exact log marginal likelihood per data
point at its hyperparameters; the table shows the exact fit's value and each masked fit's
shortfall below it (mean and maximum over data sets and mask seeds), and the fit's time over
the exact fit's (median over the same runs). The rule's promise is a shortfall of at most
about 0.02 nats per point.

Usage::

    python benchmarks/gp_deterministic.py [--sizes 20,60,120,240] [--num-masks 1,4,16]
        [--datasets 2] [--seeds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings

import gpytorch
import torch


def hartmann_data(num_points: int, dataset: int) -> tuple[torch.Tensor, torch.Tensor]:
    from botorch.test_functions import Hartmann

    generator = torch.Generator().manual_seed(1000 + dataset)
    x = torch.rand(num_points, 6, generator=generator)
    y = Hartmann(dim=6)(x).unsqueeze(-1) + 0.05 * torch.randn(num_points, 1, generator=generator)
    return x, y


def fitted_exact_log_likelihood(x, y, make_mll) -> tuple[float, float]:
    """(exact log marginal likelihood per point after the fit, seconds the fit took)."""
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP

    torch.manual_seed(0)  # BoTorch's restarts sample from the priors
    model = SingleTaskGP(x, y)
    start = time.perf_counter()
    fit_gpytorch_mll(make_mll(model))
    seconds = time.perf_counter() - start
    model.train()
    exact = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    inputs = [model.transform_inputs(t) for t in model.train_inputs]
    with torch.no_grad():
        value = exact(model(*model.train_inputs), model.train_targets, *inputs).item()
    return value, seconds


def masked_mll(model, num_masks, seed):
    from pyro_masked.gpytorch import MaskedMarginalLogLikelihood

    return MaskedMarginalLogLikelihood(model.likelihood, model, num_masks=num_masks, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="20,60,120,240", help="numbers of data points N")
    parser.add_argument("--num-masks", default="1,4,16", help="fixed permutation counts to try")
    parser.add_argument("--datasets", type=int, default=2, help="data sets per size")
    parser.add_argument("--seeds", type=int, default=2, help="mask seeds per data set")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    from pyro_masked.gpytorch import deterministic_num_masks

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # BoTorch's and linear_operator's optimisation notices
    sizes = [int(value) for value in args.sizes.split(",")]
    settings = [None] + [int(value) for value in args.num_masks.split(",")]
    print(
        f"{'N':>5} {'exact':>8}  "
        + "  ".join(f"{('default' if k is None else f'K={k}'):>24}" for k in settings)
    )
    for num_points in sizes:
        exact_values, shortfalls, ratios = [], {k: [] for k in settings}, {k: [] for k in settings}
        for dataset in range(args.datasets):
            x, y = hartmann_data(num_points, dataset)
            exact, exact_seconds = fitted_exact_log_likelihood(
                x, y, lambda m: gpytorch.mlls.ExactMarginalLogLikelihood(m.likelihood, m)
            )
            exact_values.append(exact)
            for num_masks in settings:
                for seed in range(args.seeds):
                    make_mll = functools.partial(masked_mll, num_masks=num_masks, seed=seed)
                    value, seconds = fitted_exact_log_likelihood(x, y, make_mll)
                    shortfalls[num_masks].append(exact - value)
                    ratios[num_masks].append(seconds / exact_seconds)
        cells = []
        for num_masks in settings:
            label = f"K={deterministic_num_masks(num_points)}: " if num_masks is None else ""
            cells.append(
                f"{label}{statistics.mean(shortfalls[num_masks]):.3f}/"
                f"{max(shortfalls[num_masks]):.3f} x{statistics.median(ratios[num_masks]):.1f}"
            )
        print(
            f"{num_points:>5} {statistics.mean(exact_values):>8.3f}  "
            + "  ".join(f"{cell:>24}" for cell in cells),
            flush=True,
        )
    print("cells: mean/max shortfall in nats per point below the exact fit, x time ratio")


if __name__ == "__main__":
    main()
