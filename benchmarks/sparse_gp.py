"""Speed of masking a sparse GP (``pyro.contrib.gp``'s SparseGPRegression) against Trace_ELBO.

SparseGPRegression (VFE approximation, M = 20 inducing points, RBF kernel, 1-d inputs) observes
its N targets through a ``LowRankMultivariateNormal``; ``MaskedELBO`` scores it with the
low-rank engine (:mod:`pyro_masked.conditionals.lowrank`): one :math:`M \\times M` Cholesky
factor per data point, :math:`O(N M^3)`, against the :math:`O(N M^2)` of the exact low-rank
log density and :math:`O(N^3)` for a dense covariance. One SVI step (loss + gradient + Adam
update) each, N = 1000 and 10,000, float64, median ratio of alternating runs. A second table
gives the price of the speed: the spread over mask draws of the masked log density of the
targets (at the initial parameters), against the dense engine's at N = 1000.

Run ``python benchmarks/sparse_gp.py`` (``--quick`` for N = 1000 only, fewer repeats). It prints
the two markdown tables; the machine and thread count are printed above them. A full run also
writes them to ``benchmarks/results/sparse_gp.json`` (speed) and
``benchmarks/results/sparse_gp_spread.json`` (spread) with ``benchmarks/report.py``, which the
documentation's performance page renders; a ``--quick`` run writes nothing.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import pyro
import pyro.contrib.gp as gp
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from report import command_line, describe_machine, median_ratio, paired_times, write_results

from pyro_masked import MaskedELBO, masked_log_prob
from pyro_masked.conditionals import lowrank


def sparse_gp(num_points: int, num_inducing: int) -> gp.models.SparseGPRegression:
    """SparseGPRegression (VFE) on noisy sine data, seeded."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(num_points, generator=generator) * 10
    targets = torch.sin(inputs) + 0.1 * torch.randn(num_points, generator=generator)
    inducing = torch.linspace(0, 10, num_inducing)
    kernel = gp.kernels.RBF(input_dim=1)
    return gp.models.SparseGPRegression(inputs, targets, kernel, inducing, approx="VFE")


def spreads(num_points: int, num_inducing: int, draws: int = 20, dense: bool = False) -> tuple:
    """Standard deviation over mask draws of the masked log density of the targets, and the
    exact log density; ``dense`` also gives the dense engine's spread (one permutation)."""
    model = sparse_gp(num_points, num_inducing)
    with torch.no_grad():
        site = poutine.trace(model.model).get_trace().nodes["y"]
        low_rank, targets = site["fn"], site["value"]
        masked = torch.stack([masked_log_prob(low_rank, targets) for _ in range(draws)])
        result = (float(low_rank.log_prob(targets)), float(masked.std()))
        if dense:
            full = dist.MultivariateNormal(low_rank.loc, low_rank.covariance_matrix)
            dense_draws = torch.stack([masked_log_prob(full, targets) for _ in range(draws)])
            result += (float(dense_draws.std()),)
    return result


def sparse_gp_step(num_points: int, num_inducing: int, loss):
    """One SVI step of a fresh SparseGPRegression (its own parameters) under ``loss``."""
    model = sparse_gp(num_points, num_inducing)
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
    parser.add_argument(
        "--context-sizes",
        type=int,
        default=lowrank.CONTEXT_SIZES_PER_PERMUTATION,
        help="context sizes R drawn per permutation (speed against spread)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lowrank.CONTEXT_SIZES_PER_PERMUTATION = args.context_sizes
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    sizes = [1000] if args.quick else [1000, 10_000]
    repeats = 5 if args.quick else 15
    num_inducing = 20

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,")
    print(f"# torch {torch.__version__}, pyro {pyro.__version__}, float64, median ratios of")
    print(f"# alternating runs; {args.context_sizes} context sizes per permutation\n")
    print("| SVI step, SparseGPRegression (VFE), M = 20 | ratio | goal |")
    print("|---|---|---|")
    speed_rows, medians = [], []
    for num_points in sizes:
        steps = {
            "trace_elbo": sparse_gp_step(num_points, num_inducing, Trace_ELBO()),
            "masked_elbo": sparse_gp_step(num_points, num_inducing, MaskedELBO(sites=["y"])),
        }
        times = paired_times(steps, repeats)
        ratio = median_ratio(times["masked_elbo"], times["trace_elbo"])
        print(f"| N = {num_points}: MaskedELBO / Trace_ELBO | {ratio:.2f} | <= 3 |")
        speed_rows.append([f"N = {num_points}: MaskedELBO / Trace_ELBO", round(ratio, 2), "<= 3"])
        medians.append((num_points, *(statistics.median(t) for t in times.values())))
    print()
    lines = []
    for num_points, trace, masked in medians:
        lines.append(
            f"N = {num_points}: Trace_ELBO {trace * 1e3:.1f} ms, MaskedELBO {masked * 1e3:.1f} ms"
        )
        print(f"(medians, {lines[-1]})")
    spread_rows = []
    print("\n| spread over mask draws, SparseGPRegression (VFE), M = 20 | log p(y) | sd |")
    print("|---|---|---|")
    for num_points in sizes:
        dense = num_points <= 1000
        exact, low_rank, *dense_spread = spreads(num_points, num_inducing, dense=dense)
        case = f"N = {num_points}: low-rank engine (sampled context sizes)"
        print(f"| {case} | {exact:.1f} | {low_rank:.2f} |")
        spread_rows.append([case, round(exact, 1), round(low_rank, 2)])
        if dense:
            case = f"N = {num_points}: dense engine, one permutation"
            print(f"| {case} | {exact:.1f} | {dense_spread[0]:.2f} |")
            spread_rows.append([case, round(exact, 1), round(dense_spread[0], 2)])
    if args.quick:
        return  # quick runs are smoke tests, not results
    machine = f"{describe_machine('cpu')}, pyro {pyro.__version__}"
    write_results(
        "sparse_gp",
        title="SVI step, SparseGPRegression (VFE), M = 20, float64: MaskedELBO / Trace_ELBO "
        f"(median ratio of {repeats} alternating runs; {args.context_sizes} context sizes per "
        "permutation)",
        columns=["SVI step, SparseGPRegression (VFE), M = 20", "ratio", "goal"],
        rows=speed_rows,
        notes="Median times: " + "; ".join(lines) + ".",
        command=command_line(),
        machine=machine,
    )
    write_results(
        "sparse_gp_spread",
        title="Spread over 20 mask draws of the masked log density of the targets, "
        "SparseGPRegression (VFE), M = 20, float64, at the initial parameters",
        columns=["spread over mask draws, SparseGPRegression (VFE), M = 20", "log p(y)", "sd"],
        rows=spread_rows,
        notes=f"{args.context_sizes} context sizes per permutation for the low-rank engine; "
        "log p(y) is the exact log density, sd the standard deviation over mask draws.",
        command=command_line(),
        machine=machine,
    )


if __name__ == "__main__":
    main()
