"""Speed of the one-factorization masked score on PPCA against its peers, in one run.

N = 1000 vectors of D = 200 under MVN(0, W W^T + s I), float64, loss + gradient, median ratio
of wall times of runs that alternate with the peer's. Peers:

- torch's exact ``MultivariateNormal.log_prob`` (the ratio masked / exact);
- the per-mask-size algorithm of Moreno-Muñoz et al. (2023): for every mask size, one random
  mask and the inverse of the visible block (the speed-up of the masked score over it).

Run ``python benchmarks/ppca_speed.py`` (``--quick`` for smaller sizes). It prints one markdown
table; the machine and thread count are printed above it. The GP case (N = 2000 against
GPyTorch's exact marginal log likelihood, time and memory) is ``benchmarks/gp_step.py``.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch

from pyro_masked import masked_log_prob


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
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def ppca_problem(num_points: int, size: int, rank: int = 10):
    torch.manual_seed(0)
    weights = (0.3 * torch.randn(size, rank)).requires_grad_()
    log_noise = torch.tensor(0.0, requires_grad=True)
    data = torch.randn(num_points, rank) @ weights.detach().T + torch.randn(num_points, size)
    return weights, log_noise, data


def seed_per_mask_score(loc, covariance, data):
    """The per-mask-size algorithm of Moreno-Muñoz et al. (2023), as in their PPCA experiments.

    For every mask size m: a random permutation, the first m coordinates hidden, the inverse
    of the visible block, and the conditional mean and variance of each hidden coordinate.
    One O(D^3) inverse per size: O(D^4 + N D^3) for one cumulative estimate.
    """
    size = data.shape[-1]
    total = 0.0
    for mask_size in range(1, size + 1):
        perm = torch.randperm(size)
        permuted = covariance[perm][:, perm]
        residual = (data - loc)[:, perm]
        hidden, visible = slice(0, mask_size), slice(mask_size, size)
        cov_hidden = permuted[hidden, hidden]
        if mask_size < size:
            cross = permuted[hidden, visible]
            gain = cross @ torch.inverse(permuted[visible, visible])
            mean = (gain @ residual[:, visible].T).T
            variance = torch.diagonal(cov_hidden - gain @ cross.T)
        else:
            mean = torch.zeros_like(residual)
            variance = torch.diagonal(cov_hidden)
        log_density = -0.5 * (
            math.log(2 * math.pi) + variance.log() + (residual[:, hidden] - mean) ** 2 / variance
        )
        total = total + log_density.sum(-1) / mask_size  # S(x; m) for each vector
    return total


def ppca_steps(num_points: int, size: int):
    weights, log_noise, data = ppca_problem(num_points, size)

    def covariance():
        return weights @ weights.T + log_noise.exp() * torch.eye(size)

    def exact_step():
        weights.grad = log_noise.grad = None
        d = torch.distributions.MultivariateNormal(torch.zeros(size), covariance())
        (-d.log_prob(data).sum()).backward()

    def masked_step():
        weights.grad = log_noise.grad = None
        d = torch.distributions.MultivariateNormal(torch.zeros(size), covariance())
        (-masked_log_prob(d, data).sum()).backward()

    def seed_step():
        weights.grad = log_noise.grad = None
        (-seed_per_mask_score(torch.zeros(size), covariance(), data).sum()).backward()

    return {"exact": exact_step, "masked": masked_step, "seed": seed_step}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problems, fewer repeats")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    num_points, size = (200, 50) if args.quick else (1000, 200)
    repeats = 3 if args.quick else 7

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,")
    print(f"# torch {torch.__version__}, float64, median ratios of alternating runs\n")
    steps = ppca_steps(num_points, size)
    seed_step = steps.pop("seed")
    times = paired_times(steps, 5 * repeats)
    seed_times = paired_times({"seed": seed_step, "masked": steps["masked"]}, repeats)
    case = f"PPCA, N = {num_points}, D = {size}"
    print("| loss + gradient | ratio | target |")
    print("|---|---|---|")
    print(
        f"| {case}: masked / torch MultivariateNormal.log_prob | "
        f"{median_ratio(times['masked'], times['exact']):.2f} | <= 1.3 |"
    )
    print(
        f"| {case}: per-mask-size algorithm / masked | "
        f"{median_ratio(seed_times['seed'], seed_times['masked']):.1f} | >= 100 |"
    )
    exact, masked = statistics.median(times["exact"]), statistics.median(times["masked"])
    seed = statistics.median(seed_times["seed"])
    print(
        f"\n(medians: exact {exact * 1e3:.1f} ms, masked {masked * 1e3:.1f} ms, "
        f"per-mask-size {seed * 1e3:.0f} ms)"
    )


if __name__ == "__main__":
    main()
