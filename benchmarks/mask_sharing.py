"""Shared permutations (training) against independent ones per vector (evidence), measured.

The vectors of a plate that share a covariance share the random permutations of a step
(``mask_groups=None``, the default): one factorization per permutation serves every vector. Their
masking errors are then correlated. This script measures what that means, on a probabilistic
PCA model (rank 2, ``D`` coordinates, the data drawn from the model):

1. evidence: the relative error (standard deviation over repeats, over :math:`|\\log p(X)|`) of
   the masked estimate of :math:`\\sum_n \\log p(x_n)` with one permutation, shared or per
   vector (``mask_groups=N``), for two data sizes. Shared, it does not shrink with ``N``; per
   vector it falls like :math:`1/\\sqrt{N}`;
2. training: the exact log-likelihood gap to the closed-form maximum after a fixed SVI budget
   of ``MaskedELBO()`` with shared or per-vector permutations (mean over seeds).

Run::

    python benchmarks/mask_sharing.py
"""

from __future__ import annotations

import argparse
import statistics

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI

from pyro_masked import MaskedELBO, masked_log_prob

RANK = 2


def ppca_covariance(size: int, generator: torch.Generator) -> torch.Tensor:
    weight = torch.randn(size, RANK, generator=generator)
    return weight @ weight.T + 0.25 * torch.eye(size)


def evidence_errors(size: int, points: int, repeats: int, seed: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(seed)
    d = dist.MultivariateNormal(torch.zeros(size), ppca_covariance(size, generator))
    data = d.sample((points,))
    exact = float(d.log_prob(data).sum())
    errors = {}
    for name, groups in (("shared", None), ("per vector", points)):
        totals = [float(masked_log_prob(d, data, mask_groups=groups).sum()) for _ in range(repeats)]
        errors[name] = statistics.stdev(totals) / abs(exact)
    return errors


def ppca_model(data):
    size = data.shape[-1]
    weight = pyro.param("W", 0.1 * torch.randn(size, RANK))
    noise = pyro.param("noise", torch.tensor(1.0), constraint=dist.constraints.positive)
    covariance = weight @ weight.T + noise * torch.eye(size)
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.MultivariateNormal(torch.zeros(size), covariance), obs=data)


def maximum_log_likelihood(data: torch.Tensor) -> float:
    """Tipping & Bishop (1999): the PPCA maximum in closed form."""
    num_points, size = data.shape
    eigenvalues, eigenvectors = torch.linalg.eigh(data.T @ data / num_points)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    noise = eigenvalues[RANK:].mean()
    weight = eigenvectors[:, :RANK] * (eigenvalues[:RANK] - noise).sqrt()
    covariance = weight @ weight.T + noise * torch.eye(size)
    return float(dist.MultivariateNormal(torch.zeros(size), covariance).log_prob(data).sum())


def training_gap(data: torch.Tensor, groups, steps: int, seed: int) -> float:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    svi = SVI(
        ppca_model,
        lambda data: None,
        pyro.optim.Adam({"lr": 0.05}),
        loss=MaskedELBO(mask_groups=groups),
    )
    for _ in range(steps):
        svi.step(data)
    weight, noise = pyro.param("W").detach(), pyro.param("noise").detach()
    covariance = weight @ weight.T + noise * torch.eye(data.shape[-1])
    fitted = float(
        dist.MultivariateNormal(torch.zeros(data.shape[-1]), covariance).log_prob(data).sum()
    )
    return maximum_log_likelihood(data) - fitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20, help="D for the evidence part")
    parser.add_argument("--points", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--train-size", type=int, default=8, help="D for the training part")
    parser.add_argument("--train-points", type=int, default=50)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    print(f"evidence, D = {args.size}: relative error of the masked sum of log p(x_n)")
    print(f"{'N':>6} {'shared':>10} {'per vector':>11}")
    for points in args.points:
        errors = evidence_errors(args.size, points, args.repeats, seed=1)
        print(f"{points:>6} {errors['shared']:>10.2%} {errors['per vector']:>11.2%}")
    generator = torch.Generator().manual_seed(2)
    covariance = ppca_covariance(args.train_size, generator)
    data = dist.MultivariateNormal(torch.zeros(args.train_size), covariance).sample(
        (args.train_points,)
    )
    print(
        f"training, D = {args.train_size}, N = {args.train_points}, {args.steps} Adam steps: "
        "gap to the maximum log-likelihood (nats), mean over seeds"
    )
    for name, groups in (("shared", None), ("per vector", args.train_points)):
        gaps = [training_gap(data, groups, args.steps, seed) for seed in range(args.seeds)]
        per_seed = ", ".join(f"{gap:.3f}" for gap in gaps)
        print(f"{name:>11} {statistics.mean(gaps):8.3f}  (seeds: {per_seed})")


if __name__ == "__main__":
    main()
