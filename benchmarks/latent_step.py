"""Time one masked-loss step of a Bernoulli latent model against one Trace_ELBO step.

The model is the seed paper's binary experiment: binarised 8x8 digits (scikit-learn's bundled
copy), ``x_n | z_n ~ Bernoulli(logits = W z_n + b)`` with a 2-D standard normal latent. A step
is the loss and its backward pass:

- masked: ``MaskedELBO(integrate=("z",), num_samples=K)``, the cumulative schedule, ``K``
  samples per data point from the prior (empty guide) or from an amortised Gaussian guide;
- peer: ``Trace_ELBO(num_particles=K, vectorize_particles=True)`` with the same amortised guide.

The masked step scores every mask size of all 64 pixels (``O(K D^2)`` per data point) where the
peer evaluates ``K`` likelihoods (``O(K D)``); the printed ratios are masked time over peer time,
measured in the same run. Run::

    python benchmarks/latent_step.py --batch 256 --samples 16

Every run also writes the printed numbers as a table to
``benchmarks/results/latent_step.json`` (``benchmarks/report.py``), which the documentation's
performance page renders; a later run replaces it.
"""

from __future__ import annotations

import argparse
import platform
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from report import command_line, describe_machine, write_results
from sklearn.datasets import load_digits

from pyro_masked import MaskedELBO

LATENT = 2


def binary_digits(batch: int) -> torch.Tensor:
    images = torch.as_tensor(load_digits().data, dtype=torch.get_default_dtype())
    return (images[:batch] > 8).to(images.dtype)


def model(x):
    weight = pyro.param("weight", 0.1 * torch.randn(x.shape[-1], LATENT))
    bias = pyro.param("bias", torch.zeros(x.shape[-1]))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([LATENT]).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=z @ weight.T + bias).to_event(1), obs=x)


def amortised_guide(x):
    encoder = pyro.param("encoder", 0.01 * torch.randn(x.shape[-1], 2 * LATENT))
    offset = pyro.param("offset", torch.zeros(2 * LATENT))
    loc, log_scale = (x @ encoder + offset).split(LATENT, -1)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def empty_guide(x):
    pass


def time_step(loss_fn, guide, data, repeats: int) -> float:
    """Median seconds of ``differentiable_loss(...).backward()`` (after two warm-up steps)."""
    times = []
    for index in range(repeats + 2):
        for param in pyro.get_param_store().values():
            param.grad = None
        start = time.perf_counter()
        loss_fn.differentiable_loss(model, guide, data).backward()
        if index >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="data points per step")
    parser.add_argument("--samples", type=int, default=16, help="K: samples / particles")
    parser.add_argument("--num-masks", type=int, default=1, help="permutations per step")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--float64", action="store_true", help="run in float64")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.float64:
        torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    data = binary_digits(args.batch)
    size = data.shape[-1]
    peer = Trace_ELBO(num_particles=args.samples, vectorize_particles=True, max_plate_nesting=1)
    masked = MaskedELBO(
        num_masks=args.num_masks,
        integrate=("z",),
        num_samples=args.samples,
        max_plate_nesting=1,
    )
    peer_time = time_step(peer, amortised_guide, data, args.repeats)
    prior_time = time_step(masked, empty_guide, data, args.repeats)
    guide_time = time_step(masked, amortised_guide, data, args.repeats)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch threads "
        f"{torch.get_num_threads()}, dtype {torch.get_default_dtype()}"
    )
    print(f"batch {args.batch} x {size} pixels, K = {args.samples}, num_masks = {args.num_masks}")
    print(f"Trace_ELBO step (amortised guide, vectorised particles): {1e3 * peer_time:8.2f} ms")
    print(f"masked step, prior proposal:                            {1e3 * prior_time:8.2f} ms")
    print(f"masked step, amortised-guide proposal:                  {1e3 * guide_time:8.2f} ms")
    print(f"ratio masked/Trace_ELBO, prior proposal: {prior_time / peer_time:.2f}x (goal <= 3x)")
    print(f"ratio masked/Trace_ELBO, guide proposal: {guide_time / peer_time:.2f}x (goal <= 3x)")
    dtype = str(torch.get_default_dtype()).removeprefix("torch.")
    write_results(
        "latent_step",
        title=f"Bernoulli latent model, binarised 8x8 digits, batch {args.batch} x {size} "
        f"pixels, K = {args.samples}, num_masks = {args.num_masks}, {dtype}: one masked step "
        f"against one Trace_ELBO step (loss + backward, median of {args.repeats})",
        columns=["step", "median (ms)", "x Trace_ELBO", "goal"],
        rows=[
            [
                "Trace_ELBO step (amortised guide, vectorised particles)",
                round(1e3 * peer_time, 2),
                None,
                None,
            ],
            [
                "masked step, prior proposal",
                round(1e3 * prior_time, 2),
                round(prior_time / peer_time, 2),
                "<= 3x",
            ],
            [
                "masked step, amortised-guide proposal",
                round(1e3 * guide_time, 2),
                round(guide_time / peer_time, 2),
                "<= 3x",
            ],
        ],
        notes="The three steps are timed one after the other in the same run, not alternated.",
        command=command_line(),
        machine=describe_machine("cpu"),
    )


if __name__ == "__main__":
    main()
