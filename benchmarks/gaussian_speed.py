"""Speed and memory of the one-factorization masked score against its peers, in one run.

Cases (float64, loss + gradient, median wall time of several repeats):

- GP: one vector of N = 2000 points under a GPyTorch ScaleKernel(RBF) + noise. Peer: GPyTorch's
  ``ExactMarginalLogLikelihood`` on the same ExactGP, Cholesky path. Also the peak resident
  memory of each step, each measured in a fresh process.
- PPCA: N = 1000 vectors of D = 200 under MVN(0, W W^T + s I). Peers: torch's exact
  ``MultivariateNormal.log_prob``, and the per-mask-size algorithm of Moreno-Muñoz et al.
  (2023): for every mask size, one random mask and one conditioning (an O(D^3) solve).

Run ``python benchmarks/gaussian_speed.py`` (``--quick`` for smaller sizes). It prints one
markdown table of ratios; the machine and thread count are printed above it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time

import gpytorch
import torch

from pyro_masked import masked_log_prob


def median_time(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class ExactGP(gpytorch.models.ExactGP):
    def __init__(self, train_x, train_y, likelihood):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def gp_problem(num_points: int):
    torch.manual_seed(0)
    train_x = torch.rand(num_points, 1) * 10
    train_y = torch.sin(train_x[:, 0]) + 0.1 * torch.randn(num_points)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ExactGP(train_x, train_y, likelihood)
    model.train()
    likelihood.train()
    return model, likelihood, train_x, train_y


def gp_steps(num_points: int):
    model, likelihood, train_x, train_y = gp_problem(num_points)
    exact_mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)

    def exact_step():
        model.zero_grad()
        with gpytorch.settings.max_cholesky_size(10**6):
            loss = -exact_mll(model(train_x), train_y)
        loss.backward()

    def masked_step():
        model.zero_grad()
        marginal = likelihood(model(train_x))
        loss = -masked_log_prob(marginal, train_y) / num_points
        loss.backward()

    return {"exact": exact_step, "masked": masked_step}


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


def peak_memory_child(case: str, num_points: int) -> None:
    """Build the GP problem in this fresh process, run one step of ``case``, print the peak RSS.

    ``case == "none"`` builds the problem without stepping: the baseline to subtract.
    """
    steps = gp_steps(num_points)
    if case != "none":
        steps[case]()
    print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def peak_memory(case: str, num_points: int) -> float:
    """Peak resident memory in MiB of one step in a fresh process, less the baseline's."""

    def child(name: str) -> float:
        output = subprocess.run(
            [sys.executable, __file__, "--memory-child", name, "--gp-points", str(num_points)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return json.loads(output.strip().splitlines()[-1])["peak_kib"] / 1024

    return child(case) - child("none")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problems, fewer repeats")
    parser.add_argument("--gp-points", type=int, default=None)
    parser.add_argument(
        "--memory-child", choices=["none", "exact", "masked"], help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    gp_points = args.gp_points or (500 if args.quick else 2000)
    if args.memory_child:
        peak_memory_child(args.memory_child, gp_points)
        return
    ppca_points, ppca_size = (200, 50) if args.quick else (1000, 200)
    repeats = 3 if args.quick else 7

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,")
    print(f"# torch {torch.__version__}, gpytorch {gpytorch.__version__}, float64\n")
    rows = []
    gp = {name: median_time(step, repeats) for name, step in gp_steps(gp_points).items()}
    rows.append(
        (
            f"GP, N = {gp_points}: masked / GPyTorch ExactMarginalLogLikelihood",
            gp["masked"] / gp["exact"],
            "<= 1.25",
        )
    )
    memory = {case: peak_memory(case, gp_points) for case in ("exact", "masked")}
    rows.append(
        (
            f"GP, N = {gp_points}: peak memory, masked / exact",
            memory["masked"] / memory["exact"] if memory["exact"] > 1 else float("nan"),
            "<= 2",
        )
    )
    ppca = {
        name: median_time(step, repeats)
        for name, step in ppca_steps(ppca_points, ppca_size).items()
    }
    rows.append(
        (
            f"PPCA, N = {ppca_points}, D = {ppca_size}: masked / torch MultivariateNormal.log_prob",
            ppca["masked"] / ppca["exact"],
            "<= 1.3",
        )
    )
    rows.append(
        (
            f"PPCA, N = {ppca_points}, D = {ppca_size}: speed-up over per-mask-size",
            ppca["seed"] / ppca["masked"],
            ">= 100",
        )
    )
    print("| loss + gradient | ratio | target |")
    print("|---|---|---|")
    for name, ratio, target in rows:
        print(f"| {name} | {ratio:.2f} | {target} |")
    print(
        f"\n(medians of {repeats}: GP exact {gp['exact'] * 1e3:.0f} ms, masked "
        f"{gp['masked'] * 1e3:.0f} ms; PPCA exact {ppca['exact'] * 1e3:.1f} ms, masked "
        f"{ppca['masked'] * 1e3:.1f} ms, per-mask {ppca['seed'] * 1e3:.0f} ms; GP peak memory "
        f"exact {memory['exact']:.0f} MiB, masked {memory['masked']:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
