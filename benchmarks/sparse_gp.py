"""Speed of masking a sparse GP (``pyro.contrib.gp``'s SparseGPRegression) against Trace_ELBO.

SparseGPRegression (VFE approximation, M = 20 inducing points, RBF kernel, 1-d inputs) observes
its N targets through a ``LowRankMultivariateNormal``; ``MaskedELBO`` scores it with the
low-rank engine (:mod:`pyro_masked.conditionals.lowrank`): one :math:`M \\times M` Cholesky
factor per data point, :math:`O(N M^3)`, against the :math:`O(N M^2)` of the exact low-rank
log density and :math:`O(N^3)` for a dense covariance. One SVI step (loss + gradient + Adam
update) each, N = 1000 and 10,000, float64, median ratio of alternating runs.

Run ``python benchmarks/sparse_gp.py`` (``--quick`` for N = 1000 only, fewer repeats). It prints
one markdown table; the machine and thread count are printed above it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import pyro
import pyro.contrib.gp as gp
import torch
from pyro.infer import Trace_ELBO

from pyro_masked import MaskedELBO


def paired_times(steps: dict, repeats: int) -> dict:
    """Wall times of ``repeats`` rounds in which every step runs once, in turn."""
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
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def sparse_gp_step(num_points: int, num_inducing: int, loss):
    """One SVI step of a fresh SparseGPRegression (its own parameters) under ``loss``."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(num_points, generator=generator) * 10
    targets = torch.sin(inputs) + 0.1 * torch.randn(num_points, generator=generator)
    inducing = torch.linspace(0, 10, num_inducing)
    kernel = gp.kernels.RBF(input_dim=1)
    model = gp.models.SparseGPRegression(inputs, targets, kernel, inducing, approx="VFE")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = loss.differentiable_loss

    def step():
        optimizer.zero_grad()
        loss_fn(model.model, model.guide).backward()
        optimizer.step()

    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1000 only, fewer repeats")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    sizes = [1000] if args.quick else [1000, 10_000]
    repeats = 5 if args.quick else 15
    num_inducing = 20

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,")
    print(f"# torch {torch.__version__}, pyro {pyro.__version__}, float64, median ratios of")
    print("# alternating runs\n")
    print("| SVI step, SparseGPRegression (VFE), M = 20 | ratio | goal |")
    print("|---|---|---|")
    medians = []
    for num_points in sizes:
        steps = {
            "trace_elbo": sparse_gp_step(num_points, num_inducing, Trace_ELBO()),
            "masked_elbo": sparse_gp_step(num_points, num_inducing, MaskedELBO(sites=["y"])),
        }
        times = paired_times(steps, repeats)
        ratio = median_ratio(times["masked_elbo"], times["trace_elbo"])
        print(f"| N = {num_points}: MaskedELBO / Trace_ELBO | {ratio:.2f} | <= 3 |")
        medians.append((num_points, *(statistics.median(t) for t in times.values())))
    print()
    for num_points, trace, masked in medians:
        print(
            f"(medians, N = {num_points}: Trace_ELBO {trace * 1e3:.1f} ms, "
            f"MaskedELBO {masked * 1e3:.1f} ms)"
        )


if __name__ == "__main__":
    main()
