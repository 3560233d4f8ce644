"""Relative error of masked evidence estimates against the number of data points, in one run.

A PPCA model with fixed parameters (D = 20, rank 5) and N data points drawn from it; the
evidence :math:`\\log p(X) = \\sum_n \\log p(x_n)` is known exactly. One draw of
:func:`pyro_masked.estimate_log_marginal` (cumulative masking, one permutation per draw) is an
unbiased estimate of it; the table gives the standard deviation of a draw relative to
:math:`|\\log p(X)|`, estimated from independent draws, for three ways the N vectors share
permutations inside a draw (``mask_groups``):

- ``None``: every vector shares the permutation (what training uses): the masking errors of
  the vectors are correlated and the relative error does not shrink with N;
- ``"vector"``: every vector has its own (the evidence estimators' default): the errors are
  independent and the relative error falls like :math:`1/\\sqrt{N}`;
- an int G: G groups with their own, relative error falling like :math:`1/\\sqrt{G}`.

The time of a draw is given relative to the shared draw, as the median of paired ratios
measured in alternation in the same run. Run ``python benchmarks/evidence_groups.py``
(``--quick`` for fewer draws); it prints one markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import pyro
import pyro.distributions as dist
import torch

from pyro_masked import estimate_log_marginal


def ppca_model(num_points: int, size: int = 20, rank: int = 5):
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(size, rank, generator=generator) / rank**0.5
    covariance = weights @ weights.T + 0.5 * torch.eye(size)
    loc = torch.zeros(size)
    data = dist.MultivariateNormal(loc, covariance).sample((num_points,))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.MultivariateNormal(loc, covariance), obs=x)

    return model, data


def measure(num_points: int, groupings: dict, num_draws: int, seed: int) -> dict:
    """Relative error of one draw and time per draw for each grouping, draws alternating."""
    model, data = ppca_model(num_points)
    draws = {name: [] for name in groupings}
    times = {name: [] for name in groupings}
    exact = None
    for draw in range(num_draws):
        for name, mask_groups in groupings.items():
            start = time.perf_counter()
            # Two draws: the smallest number estimate_log_marginal takes; both are kept.
            result = estimate_log_marginal(
                model,
                model_args=(data,),
                num_draws=2,
                mask_groups=mask_groups,
                seed=seed + draw,
            )
            times[name].append(time.perf_counter() - start)
            draws[name].extend(result.draws.tolist())
            exact = result.exact
    rows = {}
    for name in groupings:
        spread = statistics.stdev(draws[name])
        ratios = [a / b for a, b in zip(times[name], times["shared"])]
        rows[name] = (spread / abs(exact), statistics.median(ratios))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer draws, smaller N")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    sizes = [100, 300] if args.quick else [100, 300, 1000]
    repeats = 8 if args.quick else 32  # pairs of draws per grouping and N
    groupings = {"shared": None, "32 groups": 32, "per vector": "vector"}
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, ")
    print(f"{torch.get_num_threads()} threads, D = 20, {2 * repeats} draws per cell\n")
    print("| N | " + " | ".join(f"rel. error, {name}" for name in groupings) + " | ", end="")
    print(" | ".join(f"time ×, {name}" for name in groupings if name != "shared") + " |")
    print("|---" * (2 * len(groupings)) + "|")
    for num_points in sizes:
        rows = measure(num_points, groupings, repeats, seed=1000 * num_points)
        errors = " | ".join(f"{100 * rows[name][0]:.2f}%" for name in groupings)
        costs = " | ".join(f"{rows[name][1]:.1f}" for name in groupings if name != "shared")
        print(f"| {num_points} | {errors} | {costs} |")


if __name__ == "__main__":
    main()
