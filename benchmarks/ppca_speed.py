"""Speed of the one-factorization masked score on PPCA against its peers, in one run.

Probabilistic PCA with its latent integrated out, x_n ~ MVN(0, W W^T + s I), rank 10, float64
(or float32), loss + gradient (or one SVI step), median ratio of wall times of runs that
alternate with the peer's. Cases:

- unexpanded: one ``MultivariateNormal`` with batch shape ``()`` scores the N x D data
  (N = 1000; D = 100, 200 and 400 by default, ``--sizes``), against torch's exact
  ``MultivariateNormal.log_prob``;
- plate-expanded, the README's pattern: the covariance built inside ``pyro.plate``, so the
  distribution is ``expand``-ed over the plate (exactly what ``pyro.plate`` does to it), the
  masked score of the expanded distribution against the exact ``log_prob`` of the same one
  (N = 1000, D = 100);
- SVI steps of the README's model (empty guide, Adam): ``MaskedELBO()`` against
  ``Trace_ELBO()`` on the same model and data (N = 1000, D = 100);
- the per-mask-size algorithm of Moreno-Muñoz et al. (2023): for every mask size, one random
  mask and the inverse of the visible block (the speed-up of the masked score over it).

Run ``python benchmarks/ppca_speed.py`` (``--quick`` for smaller sizes, ``--dtype float32``
for single precision). It prints one markdown table; the machine and thread count are printed
above it. A full run also writes the table to ``benchmarks/results/ppca_speed.json``
(``ppca_speed_float32.json`` in single precision; ``benchmarks/report.py``), which the
documentation's performance page renders; a ``--quick`` run writes nothing. The GP case
(against GPyTorch's exact marginal log likelihood, time and memory) is
``benchmarks/gp_step.py``.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from report import command_line, describe_machine, median_ratio, paired_times, write_results

from pyro_masked import MaskedELBO, masked_log_prob


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


def ppca_steps(num_points: int, size: int, expanded: bool = False):
    """Loss + gradient steps: exact, masked, and the per-mask-size algorithm.

    ``expanded``: the distribution is expanded over the data as ``pyro.plate`` expands a
    distribution built inside it (the README's pattern).
    """
    weights, log_noise, data = ppca_problem(num_points, size)

    def distribution():
        covariance = weights @ weights.T + log_noise.exp() * torch.eye(size)
        d = dist.MultivariateNormal(torch.zeros(size), covariance)
        return d.expand([num_points]) if expanded else d

    def exact_step():
        weights.grad = log_noise.grad = None
        (-distribution().log_prob(data).sum()).backward()

    def masked_step():
        weights.grad = log_noise.grad = None
        (-masked_log_prob(distribution(), data).sum()).backward()

    def seed_step():
        weights.grad = log_noise.grad = None
        covariance = weights @ weights.T + log_noise.exp() * torch.eye(size)
        (-seed_per_mask_score(torch.zeros(size), covariance, data).sum()).backward()

    return {"exact": exact_step, "masked": masked_step, "seed": seed_step}


def readme_model(data: torch.Tensor) -> None:
    """The README's PPCA model: parameters outside the plate, covariance built inside it."""
    size = data.shape[1]
    weights = pyro.param("W", 0.1 * torch.randn(size, 10))
    noise = pyro.param("s", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("data", data.shape[0]):
        covariance = weights @ weights.T + noise * torch.eye(size)
        pyro.sample("x", dist.MultivariateNormal(torch.zeros(size), covariance), obs=data)


def svi_steps(num_points: int, size: int):
    """One SVI step of the README model under ``Trace_ELBO`` and under ``MaskedELBO``."""
    _, _, data = ppca_problem(num_points, size)

    def empty_guide(data):
        pass

    def make_step(loss):
        svi = SVI(readme_model, empty_guide, pyro.optim.Adam({"lr": 1e-3}), loss=loss)
        svi.step(data)  # creates the parameters
        return lambda: svi.step(data)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    # Both steps share the param store; the tiny learning rate keeps the model comparable.
    return {"trace_elbo": make_step(Trace_ELBO()), "masked_elbo": make_step(MaskedELBO())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problems, fewer repeats")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--skip-seed", action="store_true", help="skip the slow per-mask-size algorithm"
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[100, 200, 400],
        help="event sizes D of the unexpanded case",
    )
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(getattr(torch, args.dtype))
    num_points, large, small = (200, 50, 30) if args.quick else (1000, 200, 100)
    sizes = [large, small] if args.quick else args.sizes
    repeats = 3 if args.quick else 7

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,")
    print(f"# torch {torch.__version__}, {args.dtype}, median ratios of alternating runs\n")
    print("| loss + gradient | ratio | target |")
    print("|---|---|---|")
    rows, medians = [], []
    for size, expanded in [(size, False) for size in sizes] + [(small, True)]:
        steps = ppca_steps(num_points, size, expanded)
        del steps["seed"]
        times = paired_times(steps, 5 * repeats)
        pattern = "plate-expanded (README pattern)" if expanded else "unexpanded"
        case = f"PPCA, N = {num_points}, D = {size}, {pattern}"
        ratio = median_ratio(times["masked"], times["exact"])
        print(f"| {case}: masked / torch MultivariateNormal.log_prob | {ratio:.2f} | <= 1.3 |")
        rows.append(
            [f"{case}: masked / torch MultivariateNormal.log_prob", round(ratio, 2), "<= 1.3"]
        )
        medians.append(
            (case, statistics.median(times["exact"]), statistics.median(times["masked"]))
        )
    svi = svi_steps(num_points, small)
    times = paired_times(svi, 5 * repeats)
    case = f"PPCA, N = {num_points}, D = {small}, README model"
    ratio = median_ratio(times["masked_elbo"], times["trace_elbo"])
    print(f"| {case}: SVI step, MaskedELBO / Trace_ELBO | {ratio:.2f} | <= 1.3 |")
    rows.append([f"{case}: SVI step, MaskedELBO / Trace_ELBO", round(ratio, 2), "<= 1.3"])
    medians.append((case + " (SVI)", *map(statistics.median, times.values())))
    if not args.skip_seed:
        steps = ppca_steps(num_points, large)
        seed_times = paired_times({"seed": steps["seed"], "masked": steps["masked"]}, repeats)
        ratio = median_ratio(seed_times["seed"], seed_times["masked"])
        case = f"PPCA, N = {num_points}, D = {large}: per-mask-size algorithm / masked"
        print(f"| {case} | {ratio:.1f} | >= 100 |")
        rows.append([case, round(ratio, 1), ">= 100"])
    print()
    lines = []
    for case, peer, masked in medians:
        lines.append(f"{case}: peer {peer * 1e3:.1f} ms, masked {masked * 1e3:.1f} ms")
        print(f"(medians, {lines[-1]})")
    if args.quick:
        return  # quick runs are smoke tests, not results
    write_results(
        "ppca_speed" if args.dtype == "float64" else f"ppca_speed_{args.dtype}",
        title=f"PPCA loss + gradient and SVI step, {args.dtype}: masked against its peers "
        f"(median ratio of {5 * repeats} alternating runs"
        + ("" if args.skip_seed else f"; {repeats} for the per-mask-size algorithm")
        + ")",
        columns=["loss + gradient", "ratio", "target"],
        rows=rows,
        notes="Median times: " + "; ".join(lines) + ".",
        command=command_line(),
        machine=describe_machine("cpu"),
    )


if __name__ == "__main__":
    main()
