"""The O(1/K) bias of latent integration, per data point, with the prior or a guide as proposal.

Model: linear-Gaussian factor analysis with an explicit latent,
``z_n ~ N(0, I_2)``, ``x_n | z_n ~ N(W z_n + b, sigma^2 I_D)``, whose marginal
``N(b, W W^T + sigma^2 I)`` gives the exact :math:`\\log p(x_n)`. The masked estimate is
``MaskedELBO(integrate=("z",), num_samples=K)`` (cumulative schedule) with

- the prior as proposal (an empty guide), and
- a guide as proposal: the exact posterior of each ``z_n`` with its scale inflated by
  ``--guide-inflation`` (a good but imperfect amortised guide).

Each row prints the mean over data points and repeats of (masked estimate - exact log p(x_n)),
in nats per data point, with its standard error. The bias is negative and shrinks like 1/K; a
guide close to the posterior shrinks its constant. Run::

    python benchmarks/latent_bias.py --size 12 --samples 64 256 1024
"""

from __future__ import annotations

import argparse
import math

import pyro
import pyro.distributions as dist
import torch

from pyro_masked import MaskedELBO

LATENT = 2


def make_problem(size: int, num_points: int, weight_scale: float, noise: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    weight = weight_scale * torch.randn(size, LATENT, generator=generator)
    bias = torch.randn(size, generator=generator)
    marginal = dist.MultivariateNormal(bias, weight @ weight.T + noise**2 * torch.eye(size))
    data = marginal.sample((num_points,))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([LATENT]).to_event(1))
            pyro.sample("x", dist.Normal(z @ weight.T + bias, noise).to_event(1), obs=x)

    # Exact posterior of z_n: precision I + W^T W / sigma^2.
    precision = torch.eye(LATENT) + weight.T @ weight / noise**2
    posterior_cov = torch.linalg.inv(precision)
    posterior_mean = (data - bias) @ weight @ posterior_cov.T / noise**2
    posterior_scale = posterior_cov.diagonal().sqrt()

    def guide_with(inflation: float):
        def guide(x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample(
                    "z", dist.Normal(posterior_mean, inflation * posterior_scale).to_event(1)
                )

        return guide

    return model, guide_with, data, marginal.log_prob(data)


def empty_guide(x):
    pass


def bias_per_point(model, guide, data, exact, samples: int, repeats: int) -> tuple[float, float]:
    elbo = MaskedELBO(integrate=("z",), num_samples=samples, max_plate_nesting=1)
    errors = []
    with torch.no_grad():
        for _ in range(repeats):
            estimate = -elbo.loss(model, guide, data)
            errors.append((estimate - float(exact.sum())) / data.shape[0])
    values = torch.tensor(errors)
    stderr = float(values.std() / math.sqrt(repeats)) if repeats > 1 else float("nan")
    return float(values.mean()), stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=12, help="D, coordinates per data point")
    parser.add_argument("--points", type=int, default=200, help="data points")
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 256, 1024], help="K")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weight-scale", type=float, default=1.5)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--guide-inflation", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(args.seed)
    model, guide_with, data, exact = make_problem(
        args.size, args.points, args.weight_scale, args.noise, args.seed
    )
    proposals = {
        "prior": empty_guide,
        f"guide (posterior, scale x{args.guide_inflation})": guide_with(args.guide_inflation),
    }
    print(
        f"D = {args.size}, N = {args.points}, latent dim {LATENT}, "
        f"mean exact log p(x_n) = {float(exact.mean()):.2f} nats"
    )
    print(f"{'proposal':<34} {'K':>6} {'bias (nats/point)':>18} {'stderr':>8}")
    for name, guide in proposals.items():
        for samples in args.samples:
            bias, stderr = bias_per_point(model, guide, data, exact, samples, args.repeats)
            print(f"{name:<34} {samples:>6} {bias:>18.3f} {stderr:>8.3f}")


if __name__ == "__main__":
    main()
