"""A masked GP training step against a GPyTorch exact-marginal-likelihood step.

One training step (objective, backward) of an ``ExactGP`` with a ScaleKernel(RBF) on N = 2000
points in float64, with the objective:

- ``exact``: :class:`gpytorch.mlls.ExactMarginalLogLikelihood` on GPyTorch's Cholesky path
  (``max_cholesky_size`` raised above N, so no iterative solver);
- ``masked``: :class:`pyro_masked.MaskedMarginalLogLikelihood` (cumulative, one permutation);
- ``pyro-masked``: the same estimate through :class:`pyro_masked.gp.GPRegression` and
  :class:`pyro_masked.MaskedELBO` (the Pyro path);
- ``pyro-exact``: :class:`~pyro.infer.Trace_ELBO` on the same Pyro model.

Prints the median time of several repeats per method (the methods alternate within one process,
so changes in machine load hit all of them alike), its ratio to ``exact``, and the peak
resident memory two steps add above the set-up model (each method in its own subprocess,
measured with ``resource.getrusage``).

Usage::

    python benchmarks/gp_step.py [--size 2000] [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("exact", "masked", "pyro-masked", "pyro-exact")


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _make_step(method: str, size: int):
    """Build the GP for ``method`` and return a function doing one training step."""
    import gpytorch
    import torch
    from pyro.infer import Trace_ELBO

    from pyro_masked import MaskedELBO, MaskedMarginalLogLikelihood
    from pyro_masked.gp import GPRegression

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(size, 1, generator=generator) * 10
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(size, generator=generator)

    if method in ("exact", "masked"):
        likelihood = gpytorch.likelihoods.GaussianLikelihood()

        class Model(gpytorch.models.ExactGP):
            def __init__(self):
                super().__init__(x, y, likelihood)
                self.mean_module = gpytorch.means.ZeroMean()
                self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

            def forward(self, inputs):
                return gpytorch.distributions.MultivariateNormal(
                    self.mean_module(inputs), self.covar_module(inputs)
                )

        model = Model()
        model.train()
        if method == "exact":
            mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        else:
            mll = MaskedMarginalLogLikelihood(likelihood, model, mask="cumulative", num_masks=1)

        def step():
            model.zero_grad()
            with gpytorch.settings.max_cholesky_size(10**7):
                loss = -mll(model(x), y)
                loss.backward()

        return step

    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
    gp = GPRegression(x[:, 0], y, kernel, noise=0.1)
    elbo = MaskedELBO(num_masks=1) if method == "pyro-masked" else Trace_ELBO()

    def step():
        gp.zero_grad()
        loss = elbo.differentiable_loss(gp.model, gp.guide)
        loss.backward()

    return step


def _setup(threads: int):
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.set_default_dtype(torch.float64)
    return torch.get_num_threads()


def _memory_worker(method: str, size: int, threads: int) -> dict:
    """Peak resident memory that two training steps add above the set-up model."""
    _setup(threads)
    step = _make_step(method, size)
    setup_peak = _peak_rss_mib()
    step()
    step()
    return {"peak_extra_mib": max(0.0, _peak_rss_mib() - setup_peak)}


def _timings(size: int, repeats: int, threads: int) -> tuple[dict, int]:
    """Median step time per method; methods alternate so load changes hit all alike."""
    threads = _setup(threads)
    steps = {method: _make_step(method, size) for method in METHODS}
    for step in steps.values():
        step()  # warm-up: lazy imports, allocator
    times: dict = {method: [] for method in METHODS}
    for _ in range(repeats):
        for method, step in steps.items():
            start = time.perf_counter()
            step()
            times[method].append(time.perf_counter() - start)
    return {method: statistics.median(values) for method, values in times.items()}, threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=2000, help="number of data points N")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per method")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_memory_worker(args.worker, args.size, args.threads)))
        return
    memory = {}
    for method in METHODS:
        command = [sys.executable, __file__, "--worker", method, "--size", str(args.size)]
        command += ["--threads", str(args.threads)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        memory[method] = json.loads(output.strip().splitlines()[-1])["peak_extra_mib"]
    medians, threads = _timings(args.size, args.repeats, args.threads)
    baseline = medians["exact"]
    print(
        f"GP training step (objective + backward), N = {args.size}, float64, CPU, "
        f"{threads} torch thread(s), median of {args.repeats}"
    )
    print(f"{'method':<14}{'median (ms)':>13}{'x exact':>10}{'peak extra (MiB)':>19}")
    for method, median in medians.items():
        print(
            f"{method:<14}{1000 * median:>13.1f}{median / baseline:>10.2f}{memory[method]:>19.1f}"
        )


if __name__ == "__main__":
    main()
