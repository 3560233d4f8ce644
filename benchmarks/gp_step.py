"""A masked GP training step against a GPyTorch exact-marginal-likelihood step.

One training step (objective, backward) of an ``ExactGP`` with a ScaleKernel(RBF) on N points
(2000 by default) in float64 or float32, on the CPU or a CUDA device, with the objective:

- ``exact``: :class:`gpytorch.mlls.ExactMarginalLogLikelihood` on GPyTorch's Cholesky path
  (``max_cholesky_size`` raised above N, so no iterative solver);
- ``masked``: :class:`pyro_masked.MaskedMarginalLogLikelihood` (cumulative, one permutation);
- ``pyro-masked``: the same estimate through :class:`pyro_masked.gp.GPRegression` and
  :class:`pyro_masked.MaskedELBO` (the Pyro path);
- ``pyro-exact``: :class:`~pyro.infer.Trace_ELBO` on the same Pyro model.

Prints the median time of several repeats per method (the methods alternate within one process,
so changes in machine load hit all of them alike), its ratio to ``exact``, and the peak
memory two steps add above the set-up model: on the CPU the resident memory of each method in
its own subprocess (the peak resident memory, reset after the set-up), on CUDA the peak of
``torch.cuda.max_memory_allocated``.

Usage::

    python benchmarks/gp_step.py [--size 2000 [4000 ...]] [--repeats 7] [--threads N]
        [--dtype float64|float32] [--device cpu|cuda] [--methods exact masked ...]

Every run also writes the printed numbers, one row per size and method, to
``benchmarks/results/gp_step_<device>_<dtype>_<sizes>.json`` (``benchmarks/report.py``), which
the documentation's performance page renders; a later run with the same device, dtype and sizes
replaces it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from report import command_line, describe_machine, write_results

METHODS = ("exact", "masked", "pyro-masked", "pyro-exact")


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(field: str) -> float:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset the peak resident memory to the current one (Linux 4.0+); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _make_step(method: str, size: int, device: str = "cpu"):
    """Build the GP for ``method`` and return a function doing one training step."""
    import gpytorch
    import torch
    from pyro.infer import Trace_ELBO

    from pyro_masked import MaskedELBO, MaskedMarginalLogLikelihood
    from pyro_masked.gp import GPRegression

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(size, 1, generator=generator) * 10
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(size, generator=generator)
    x, y = x.to(device), y.to(device)

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

        model = Model().to(device)
        likelihood.to(device)
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

    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).to(device)
    gp = GPRegression(x[:, 0], y, kernel, noise=0.1)
    elbo = MaskedELBO(num_masks=1) if method == "pyro-masked" else Trace_ELBO()

    def step():
        gp.zero_grad()
        loss = elbo.differentiable_loss(gp.model, gp.guide)
        loss.backward()

    gp.to(device)
    return step


def _setup(threads: int, dtype: str):
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.set_default_dtype(getattr(torch, dtype))
    return torch.get_num_threads()


def _synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _memory_worker(method: str, size: int, threads: int, dtype: str, device: str) -> dict:
    """Peak memory that two training steps add above the set-up model."""
    import torch

    _setup(threads, dtype)
    step = _make_step(method, size, device)
    if device == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        setup = torch.cuda.memory_allocated()
        step()
        step()
        _synchronize(device)
        return {"peak_extra_mib": (torch.cuda.max_memory_allocated() - setup) / 2**20}
    if _reset_peak_rss():
        # The peak over the steps above the resident memory they start from; the set-up's own
        # transient peak (imports, model building) is forgotten.
        before = _status_mib("VmRSS")
        step()
        step()
        return {"peak_extra_mib": _status_mib("VmHWM") - before}
    setup_peak = _peak_rss_mib()
    step()
    step()
    return {"peak_extra_mib": max(0.0, _peak_rss_mib() - setup_peak)}


def _timings(
    size: int, repeats: int, threads: int, dtype: str, device: str, methods=METHODS
) -> tuple[dict, int]:
    """Median step time per method; methods alternate so load changes hit all alike."""
    threads = _setup(threads, dtype)
    steps = {method: _make_step(method, size, device) for method in methods}
    for step in steps.values():
        step()  # warm-up: lazy imports, allocator, kernels
    _synchronize(device)
    times: dict = {method: [] for method in methods}
    for _ in range(repeats):
        for method, step in steps.items():
            start = time.perf_counter()
            step()
            _synchronize(device)
            times[method].append(time.perf_counter() - start)
    return {method: statistics.median(values) for method, values in times.items()}, threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size", type=int, nargs="+", default=[2000], help="numbers of data points N"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per method")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="methods to time (exact is always included: it is the baseline)",
    )
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = _memory_worker(args.worker, args.size[0], args.threads, args.dtype, args.device)
        print(json.dumps(result))
        return
    rows, threads = [], 0
    for size in args.size:
        size_rows, threads = _report(size, args)
        rows += size_rows
    where = "CPU" if args.device == "cpu" else _device_name()
    write_results(
        f"gp_step_{args.device}_{args.dtype}_" + "_".join(map(str, args.size)),
        title=(
            f"GP training step (objective + backward), {args.dtype}, {where}, "
            f"{threads} torch thread(s): median of {args.repeats} steps, against GPyTorch exact"
        ),
        columns=["N", "method", "median (ms)", "x exact", "peak extra (MiB)", "x exact (memory)"],
        rows=rows,
        notes=(
            "Methods alternate within one process; peak extra memory is what two steps add "
            "above the set-up model ("
            + (
                "resident memory of each method in its own subprocess)."
                if args.device == "cpu"
                else "peak of torch.cuda.max_memory_allocated)."
            )
        ),
        command=command_line(),
        machine=describe_machine(args.device),
    )


def _report(size: int, args: argparse.Namespace) -> tuple[list, int]:
    """Measure and print the table for ``size``; its rows for the result file, and the
    torch thread count."""
    methods = ["exact"] + [method for method in args.methods if method != "exact"]
    memory = {}
    for method in methods:
        command = [sys.executable, __file__, "--worker", method, "--size", str(size)]
        command += ["--threads", str(args.threads), "--dtype", args.dtype, "--device", args.device]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        memory[method] = json.loads(output.strip().splitlines()[-1])["peak_extra_mib"]
    medians, threads = _timings(size, args.repeats, args.threads, args.dtype, args.device, methods)
    baseline = medians["exact"]
    where = "CPU" if args.device == "cpu" else _device_name()
    print(
        f"GP training step (objective + backward), N = {size}, {args.dtype}, {where}, "
        f"{threads} torch thread(s), median of {args.repeats}"
    )
    print(
        f"{'method':<14}{'median (ms)':>13}{'x exact':>10}{'peak extra (MiB)':>19}{'x exact':>10}"
    )
    rows = []
    for method, median in medians.items():
        memory_ratio = memory[method] / max(memory["exact"], 1e-9)
        print(
            f"{method:<14}{1000 * median:>13.1f}{median / baseline:>10.2f}"
            f"{memory[method]:>19.1f}{memory_ratio:>10.2f}"
        )
        rows.append(
            [
                size,
                method,
                round(1000 * median, 1),
                round(median / baseline, 2),
                round(memory[method], 1),
                round(memory_ratio, 2),
            ]
        )
    return rows, threads


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name()


if __name__ == "__main__":
    main()
