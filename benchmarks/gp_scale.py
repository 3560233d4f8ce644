"""Large GPs: local masked pre-training against GPyTorch's exact GP, SVGP and VNNGP.

Every method fits a GP with a ScaleKernel(Matérn-5/2) kernel, a constant mean and Gaussian
noise to the same training split from the same initial hyperparameters, and predicts the same
test split. The local fit, SVGP and VNNGP share one wall-clock budget that covers their setup
(neighbour searches) and training:

- ``local``: an ``ExactGP`` trained with :class:`pyro_masked.MaskedMarginalLogLikelihood`
  (``context_size=c``, ``batch_size=B``, cumulative schedule) by Adam, its learning rate
  decaying exponentially to ``--lr-decay`` times ``--lr`` over the budget and its iterates
  averaged over the budget's last part (``--average-from``), since minibatch gradients stay
  noisy to the end (at ``N = 10^4`` both this and a constant rate reach the exact fit's test
  MLPD under the exact predictive; the averaged iterates land closer to its outputscale and
  mean);
  predictions by local kriging from the ``--predict-context-size`` nearest training points
  (default ``2c``; :func:`pyro_masked.local.local_predict`). At ``N = 10^4`` and the exact
  fit's hyperparameters, kriging from 32, 64, 128 and 256 neighbours gives test MLPD 0.688,
  0.709, 0.711 and 0.7115 against 0.7116 for the exact predictive.
- ``exact`` (``N <= 10^4`` only): the reference, GPyTorch's exact GP with its evidence
  maximised by L-BFGS to convergence (gradients from one Cholesky factor and its inverse),
  outside the budget.
- ``svgp``: :class:`gpytorch.variational.VariationalStrategy` with 1024 inducing points
  (initialised on a random subset, learned), minibatches of ``B``, Adam at ``--lr``.
- ``vnngp``: :class:`gpytorch.variational.NNVariationalStrategy` with ``k = c`` neighbours,
  every training point an inducing point, minibatches of ``B``, Adam at ``--vnngp-lr`` (at
  0.05 its lengthscale collapses at ``N = 10^4``). GPyTorch builds its sequential neighbour
  structure with faiss when it is installed (the ``faiss`` extra of this package); without it,
  with one scikit-learn tree per training point, which alone outlasts the budget at
  ``N = 10^5``. The header says which one ran.

Data (random 90/10 splits, fixed seeds; inputs in the unit cube, targets standardised):

- ``synthetic``: a 2-D field drawn from a Matérn-5/2 GP (lengthscale 0.1, outputscale 1) plus
  noise of variance 0.01; sampled exactly up to ``N = 10^4`` points, above by 4096 random
  Fourier features (spectral sampling of the same kernel); at most 10^5 test points.
- ``diamonds``: log price from the six numeric columns (carat, depth, table, x, y, z) of the
  diamonds table shipped with plotnine (53 940 rows; repeated inputs kept).

Reported per method: test RMSE, test mean log predictive density (MLPD, nats per point, noise
included) under the method's own predictive and, for ``N <= 10^4``, under the exact GP
predictive at the method's hyperparameters (which separates the hyperparameters from the
predictive), learned hyperparameters, wall time (setup, training and prediction), median time
per training step, and peak memory (CUDA: peak allocated by the method; CPU: the process's
peak resident memory so far, monotone over the run). With ``--evidence`` (synthetic,
``N <= 10^4``) it also compares, at the exact fit's hyperparameters, the exact log marginal
likelihood with the local evidence estimate (contexts of ``c``) and the multilevel one
(:func:`pyro_masked.local.estimate_multilevel_log_marginal` over ``--evidence-levels``, for a
standard error of ``--evidence-stderr``).

Usage::

    python benchmarks/gp_scale.py --dataset synthetic --size 10000 --budget 60 --evidence
    python benchmarks/gp_scale.py --dataset diamonds --budget 60 --methods local,svgp,vnngp
    python benchmarks/gp_scale.py --quick          # a small, fast run of everything

A run also writes the final table to ``benchmarks/results/gp_scale_<dataset>_<N>.json``
(``gp_scale_diamonds.json`` for diamonds) with ``benchmarks/report.py``, which the
documentation's performance page renders; a ``--quick`` run writes nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import resource
import statistics
import sys
import time

import gpytorch
import numpy as np
import torch
from report import command_line, describe_machine, write_results

from pyro_masked import MaskedMarginalLogLikelihood
from pyro_masked.local import (
    estimate_local_log_marginal,
    estimate_multilevel_log_marginal,
    local_predict,
)

LOG_2PI = math.log(2 * math.pi)
# The local fit's schedule: Adam's learning rate decays exponentially to LOCAL_LR_DECAY times
# its initial value over the budget, and the iterates are averaged over the budget's last half.
LOCAL_LR_DECAY = 0.1
LOCAL_AVERAGE_FROM = 0.5


# -- data -----------------------------------------------------------------------------------


def matern_field(num_points: int, dim: int, seed: int, dtype, exact_up_to: int = 10_000):
    """Inputs in the unit cube and a Matérn-5/2 GP draw plus noise at them."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.rand(num_points, dim, generator=generator, dtype=torch.float64)
    lengthscale, noise = 0.1, 0.01
    if num_points <= exact_up_to:
        kernel = gpytorch.kernels.MaternKernel(nu=2.5).double()
        kernel.lengthscale = lengthscale
        with torch.no_grad():
            covariance = kernel(X).to_dense() + 1e-6 * torch.eye(num_points, dtype=X.dtype)
            f = torch.linalg.cholesky(covariance) @ torch.randn(
                num_points, generator=generator, dtype=X.dtype
            )
    else:
        # Random Fourier features: omega ~ multivariate t with 2 nu degrees of freedom and
        # scale 1/lengthscale is the Matérn-nu spectral density.
        num_features, nu = 4096, 2.5
        gaussian = torch.randn(num_features, dim, generator=generator, dtype=X.dtype)
        chi2 = torch.distributions.Chi2(torch.tensor(2 * nu, dtype=X.dtype))
        torch.manual_seed(seed)
        omega = gaussian * (2 * nu / chi2.sample((num_features, 1))).sqrt() / lengthscale
        phase = 2 * math.pi * torch.rand(num_features, generator=generator, dtype=X.dtype)
        weights = torch.randn(num_features, generator=generator, dtype=X.dtype)
        f = torch.empty(num_points, dtype=X.dtype)
        for start in range(0, num_points, 20_000):
            block = X[start : start + 20_000]
            f[start : start + 20_000] = torch.cos(block @ omega.T + phase) @ weights
        f *= math.sqrt(2.0 / num_features)
    y = f + math.sqrt(noise) * torch.randn(num_points, generator=generator, dtype=X.dtype)
    return X.to(dtype), y.to(dtype)


def diamonds(dtype, csv_path=None):
    if csv_path is None:
        from plotnine.data import diamonds as table
    else:  # the same table exported to CSV, for machines without plotnine
        import pandas

        table = pandas.read_csv(csv_path)

    columns = ["carat", "depth", "table", "x", "y", "z"]
    X = torch.tensor(table[columns].to_numpy(dtype=np.float64))
    y = torch.tensor(np.log(table["price"].to_numpy(dtype=np.float64)))
    return X.to(dtype), y.to(dtype)


def split(X, y, test_fraction: float, max_test: int, seed: int):
    generator = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(X.shape[0], generator=generator)
    num_test = min(max_test, int(test_fraction * X.shape[0]))
    test, train = order[:num_test], order[num_test:]
    low, high = X[train].amin(0), X[train].amax(0)
    scale = torch.where(high > low, high - low, torch.ones_like(high))
    center, spread = y[train].mean(), y[train].std()
    standard_X = (X - low) / scale
    standard_y = (y - center) / spread
    return standard_X[train], standard_y[train], standard_X[test], standard_y[test]


# -- models ---------------------------------------------------------------------------------


def matern_kernel(dim: int):
    kernel = gpytorch.kernels.ScaleKernel(
        gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=dim if dim > 2 else None)
    )
    kernel.base_kernel.lengthscale = 0.3
    kernel.outputscale = 1.0
    return kernel


class ExactModel(gpytorch.models.ExactGP):
    def __init__(self, X, y, likelihood):
        super().__init__(X, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = matern_kernel(X.shape[-1])

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class ApproximateModel(gpytorch.models.ApproximateGP):
    def __init__(self, strategy_factory, dim):
        super().__init__(strategy_factory(self))
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = matern_kernel(dim)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    def __call__(self, x, prior: bool = False, **kwargs):
        # VNNGP trains with x=None (the strategy draws its own minibatch), which
        # ApproximateGP.__call__ does not accept.
        return self.variational_strategy(x=x, prior=prior, **kwargs)


def new_likelihood():
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = 0.1
    return likelihood


def hyperparameters(kernel, likelihood) -> dict:
    lengthscale = kernel.base_kernel.lengthscale.detach().flatten().tolist()
    return {
        "lengthscale": [round(value, 4) for value in lengthscale],
        "outputscale": round(kernel.outputscale.item(), 4),
        "noise": round(likelihood.noise.item(), 5),
    }


def gaussian_metrics(mean, variance, y) -> dict:
    mean, variance, y = mean.double(), variance.double(), y.double()
    log_density = -0.5 * ((y - mean).square() / variance + variance.log() + LOG_2PI)
    return {
        "rmse": (y - mean).square().mean().sqrt().item(),
        "mlpd": log_density.mean().item(),
    }


def exact_predictive_metrics(model, likelihood, X, y, Xtest, ytest) -> dict:
    """Test metrics of the exact GP predictive at a method's hyperparameters (small ``N``).

    Separates the hyperparameters from the predictive a method uses (local kriging,
    variational): every fit is scored by the same exact conditional.
    """
    with torch.no_grad():
        kernel, mean = model.covar_module, model.mean_module
        covariance = kernel(X).to_dense()
        covariance.diagonal().add_(likelihood.noise.squeeze())
        factor = torch.linalg.cholesky(covariance)
        del covariance
        residual = (y - mean(X)).unsqueeze(-1)
        cross = kernel(X, Xtest).to_dense()
        whitened_cross = torch.linalg.solve_triangular(factor, cross, upper=False)
        whitened_residual = torch.linalg.solve_triangular(factor, residual, upper=False)
        predictive_mean = mean(Xtest) + (whitened_cross * whitened_residual).sum(0)
        prior_variance = kernel(Xtest, diag=True) + likelihood.noise.squeeze()
        predictive_variance = prior_variance - whitened_cross.square().sum(0)
    return gaussian_metrics(predictive_mean, predictive_variance, ytest)


def exact_predictive_mlpd(row) -> str:
    return f"{row['exact_predictive']['mlpd']:.4f}" if "exact_predictive" in row else "-"


def train_for(budget: float, step, start: float) -> list[float]:
    """Call ``step(fraction)`` until ``budget`` seconds after ``start`` (the method's start, so
    its setup counts against the budget); ``fraction`` is the part of the budget spent. The
    time of each step."""
    times = []
    while (elapsed := time.perf_counter() - start) < budget:
        tick = time.perf_counter()
        step(elapsed / budget)
        times.append(time.perf_counter() - tick)
    return times


class IterateAverage:
    """Running mean of a model's parameters over the steps it is fed (Polyak–Ruppert)."""

    def __init__(self, parameters):
        self.parameters = list(parameters)
        self.mean = None
        self.count = 0

    def update(self) -> None:
        vector = torch.nn.utils.parameters_to_vector(self.parameters).detach()
        self.count += 1
        if self.mean is None:
            self.mean = vector.clone()
        else:
            self.mean += (vector - self.mean) / self.count

    def load(self) -> None:
        if self.mean is not None:
            torch.nn.utils.vector_to_parameters(self.mean, self.parameters)


def run_local(data, args):
    X, y, Xtest, ytest = data
    start = time.perf_counter()
    likelihood = new_likelihood().to(X)
    model = ExactModel(X, y, likelihood).to(X)
    model.train()
    mll = MaskedMarginalLogLikelihood(
        likelihood,
        model,
        context_size=args.context_size,
        batch_size=args.batch_size,
        allow_duplicates=True,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    average = IterateAverage(model.parameters())
    mll(model(X), y)  # neighbour search, inside the timed run but outside the step times

    def step(fraction):
        # Exponential decay to lr * lr_decay over the budget, then the mean of the iterates
        # over its last part: minibatch gradients are noisy to the end.
        for group in optimizer.param_groups:
            group["lr"] = args.lr * args.lr_decay**fraction
        optimizer.zero_grad()
        (-mll(model(X), y)).backward()
        optimizer.step()
        if fraction >= args.average_from:
            average.update()

    times = train_for(args.budget, step, start)
    average.load()
    with torch.no_grad():
        predictive = local_predict(
            model.covar_module,
            X,
            y,
            Xtest,
            likelihood.noise,
            args.predict_context_size,
            mean=model.mean_module,
            noiseless=False,
            index=mll._local_cache.objective.index,
        )
    return model, likelihood, times, gaussian_metrics(predictive.mean, predictive.variance, ytest)


def exact_log_marginal_and_surrogate(model, likelihood, X, y):
    """The exact log marginal likelihood per point, and a surrogate with the same gradient.

    With K = LL^T, alpha = K^{-1}(y - mu) and W = alpha alpha^T - K^{-1}, the gradient is
    d log p / d theta = tr(W dK/dtheta) / 2 for the kernel and the noise, and alpha for the
    mean. The surrogate <W, K(theta)> / 2 + <alpha, mu(theta)>, with W and alpha held fixed,
    has that gradient and backpropagates through the kernel evaluation only: one Cholesky
    factor and its inverse per evaluation instead of autograd through the factorisation.
    """
    num_points = X.shape[0]
    with torch.no_grad():
        covariance = model.covar_module(X).to_dense()
        covariance.diagonal().add_(likelihood.noise)
        factor = torch.linalg.cholesky(covariance)
        del covariance
        residual = y - model.mean_module(X)
        alpha = torch.cholesky_solve(residual.unsqueeze(-1), factor).squeeze(-1)
        value = (
            -0.5 * (residual * alpha).sum()
            - factor.diagonal().log().sum()
            - 0.5 * num_points * LOG_2PI
        )
        weight = torch.cholesky_inverse(factor)
        del factor
        weight.mul_(-1.0).add_(alpha.unsqueeze(-1) * alpha.unsqueeze(-2))
    surrogate = (
        0.5 * (weight * model.covar_module(X).to_dense()).sum()
        + 0.5 * weight.diagonal().sum() * likelihood.noise.squeeze()
        + (alpha * model.mean_module(X)).sum()
    )
    return value / num_points, surrogate / num_points


def run_exact(data, args):
    """The exact evidence maximised by L-BFGS (strong Wolfe line search) to convergence.

    Adam at the other methods' learning rate takes one step per minute at ``N = 10^4`` on one
    thread, far from the optimum the local fit is compared with; L-BFGS converges in tens of
    evaluations. ``--exact-evaluations`` caps them.
    """
    X, y, Xtest, ytest = data
    likelihood = new_likelihood().to(X)
    model = ExactModel(X, y, likelihood).to(X)
    model.train()
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=args.exact_evaluations,
        max_eval=args.exact_evaluations,
        tolerance_grad=1e-6,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )
    times = []

    def closure():
        tick = time.perf_counter()
        optimizer.zero_grad()
        value, surrogate = exact_log_marginal_and_surrogate(model, likelihood, X, y)
        (-surrogate).backward()
        times.append(time.perf_counter() - tick)
        return -value

    optimizer.step(closure)
    model.eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**7):
        predictive = likelihood(model(Xtest))
    return model, likelihood, times, gaussian_metrics(predictive.mean, predictive.variance, ytest)


def run_variational(data, args, kind: str):
    X, y, Xtest, ytest = data
    start = time.perf_counter()
    likelihood = new_likelihood().to(X)
    generator = torch.Generator().manual_seed(0)
    if kind == "svgp":
        inducing = X[torch.randperm(X.shape[0], generator=generator)[: args.inducing]].clone()

        def factory(model):
            distribution = gpytorch.variational.CholeskyVariationalDistribution(inducing.shape[0])
            return gpytorch.variational.VariationalStrategy(
                model, inducing, distribution, learn_inducing_locations=True
            )

    else:

        def factory(model):
            distribution = gpytorch.variational.MeanFieldVariationalDistribution(X.shape[0])
            return gpytorch.variational.NNVariationalStrategy(
                model,
                X.clone(),
                distribution,
                k=args.context_size,
                training_batch_size=args.batch_size,
            )

    model = ApproximateModel(factory, X.shape[-1]).to(X)
    model.train()
    likelihood.train()
    mll = gpytorch.mlls.VariationalELBO(likelihood, model, num_data=X.shape[0])
    lr = args.vnngp_lr if kind == "vnngp" else args.lr
    optimizer = torch.optim.Adam([*model.parameters(), *likelihood.parameters()], lr=lr)

    def step(fraction):
        optimizer.zero_grad()
        if kind == "svgp":
            batch = torch.randint(X.shape[0], (args.batch_size,), generator=generator)
            loss = -mll(model(X[batch]), y[batch])
        else:
            output = model(x=None)
            batch = model.variational_strategy.current_training_indices
            loss = -mll(output, y[batch])
        loss.backward()
        optimizer.step()

    times = train_for(args.budget, step, start)
    model.eval()
    likelihood.eval()
    means, variances = [], []
    with torch.no_grad():
        for start in range(0, Xtest.shape[0], 4096):
            predictive = likelihood(model(Xtest[start : start + 4096]))
            means.append(predictive.mean)
            variances.append(predictive.variance)
    metrics = gaussian_metrics(torch.cat(means), torch.cat(variances), ytest)
    return model, likelihood, times, metrics


def evidence_check(model, likelihood, X, y, args) -> dict:
    """Local evidence estimates at the exact fit's hyperparameters against the exact value.

    Single level (contexts of ``c``, 16 batches of 4096 triples) and multilevel over the nested
    context sizes ``--evidence-levels`` (Giles' allocation for ``--evidence-stderr``).
    """
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**7):
        model.train()
        exact = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        exact_value = exact(model(X), y).item() * X.shape[0]
        training_means = model.mean_module(X)
        tick = time.perf_counter()
        single = estimate_local_log_marginal(
            model.covar_module,
            X,
            y,
            likelihood.noise,
            args.context_size,
            mean=training_means,
            num_batches=16,
            batch_size=4096,
            seed=0,
        )
        single_s = time.perf_counter() - tick
        tick = time.perf_counter()
        multilevel = estimate_multilevel_log_marginal(
            model.covar_module,
            X,
            y,
            likelihood.noise,
            [int(size) for size in args.evidence_levels.split(",")],
            mean=training_means,
            target_stderr=args.evidence_stderr,
            seed=0,
        )
        multilevel_s = time.perf_counter() - tick
    return {
        "exact": exact_value,
        "local_estimate": single.estimate,
        "stderr": single.stderr,
        "relative_error": abs(single.estimate - exact_value) / abs(exact_value),
        "local_wall_s": round(single_s, 1),
        "multilevel_estimate": multilevel.estimate,
        "multilevel_stderr": multilevel.stderr,
        "multilevel_relative_error": abs(multilevel.estimate - exact_value) / abs(exact_value),
        "multilevel_wall_s": round(multilevel_s, 1),
        "levels": [
            {
                "context_size": level.context_size,
                "estimate": round(level.estimate, 2),
                "stderr": round(level.stderr, 2),
                "triples": level.num_triples,
                "ms_per_triple": round(1000 * level.seconds_per_triple, 3),
            }
            for level in multilevel.levels
        ],
    }


# -- driver ---------------------------------------------------------------------------------


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=["synthetic", "diamonds"], default="synthetic")
    parser.add_argument("--size", type=int, default=10_000, help="N (synthetic)")
    parser.add_argument("--dim", type=int, default=2, help="input dimension (synthetic)")
    parser.add_argument("--methods", default="local,exact,svgp,vnngp")
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds per method")
    parser.add_argument("--context-size", type=int, default=32)
    parser.add_argument(
        "--predict-context-size",
        type=int,
        default=None,
        help="nearest training points of the local fit's predictions (default: 2 c)",
    )
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--inducing", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=0.05, help="Adam (local, SVGP)")
    parser.add_argument("--vnngp-lr", type=float, default=0.01, help="Adam (VNNGP)")
    parser.add_argument(
        "--lr-decay", type=float, default=LOCAL_LR_DECAY, help="local: final lr / initial lr"
    )
    parser.add_argument(
        "--average-from",
        type=float,
        default=LOCAL_AVERAGE_FROM,
        help="local: average the iterates from this fraction of the budget on (1: none)",
    )
    parser.add_argument(
        "--exact-evaluations", type=int, default=40, help="L-BFGS evaluations of the exact fit"
    )
    parser.add_argument("--evidence", action="store_true", help="evidence check (N <= 10^4)")
    parser.add_argument(
        "--evidence-levels", default="32,128,512", help="nested context sizes (multilevel)"
    )
    parser.add_argument(
        "--evidence-stderr", type=float, default=10.0, help="multilevel target standard error"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--diamonds-csv", help="the diamonds table as CSV (without plotnine)")
    parser.add_argument("--quick", action="store_true", help="N = 2000, 10 s budgets")
    args = parser.parse_args()
    if args.quick:
        args.size, args.budget = min(args.size, 2000), min(args.budget, 10.0)
        args.batch_size, args.inducing = min(args.batch_size, 256), min(args.inducing, 256)
    if args.predict_context_size is None:
        args.predict_context_size = 2 * args.context_size
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.dataset == "synthetic":
        X, y = matern_field(args.size + min(100_000, args.size // 9), args.dim, args.seed, dtype)
    else:
        X, y = diamonds(dtype, args.diamonds_csv)
    data = [t.to(device) for t in split(X, y, 0.1, 100_000, args.seed)]
    header = {
        "dataset": args.dataset,
        "num_train": data[0].shape[0],
        "num_test": data[2].shape[0],
        "dim": data[0].shape[1],
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "budget_s": args.budget,
        "context_size": args.context_size,
        "predict_context_size": args.predict_context_size,
        "vnngp_neighbours": "faiss" if importlib.util.find_spec("faiss") else "sklearn",
        "batch_size": args.batch_size,
    }
    print(json.dumps(header), flush=True)
    runners = {
        "local": run_local,
        "exact": run_exact,
        "svgp": lambda d, a: run_variational(d, a, "svgp"),
        "vnngp": lambda d, a: run_variational(d, a, "vnngp"),
    }
    rows = []
    for method in args.methods.split(","):
        if method == "exact" and data[0].shape[0] > 10_000:
            continue
        torch.manual_seed(args.seed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        model, likelihood, times, metrics = runners[method](data, args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row = {
            "method": method,
            **{key: round(value, 4) for key, value in metrics.items()},
            **hyperparameters(model.covar_module, likelihood),
            "wall_s": round(time.perf_counter() - start, 1),
            "steps": len(times),
            "median_step_ms": round(1000 * statistics.median(times), 2) if times else None,
            "peak_mib": round(peak_memory_mib(device)),
        }
        if data[0].shape[0] <= 10_000:
            row["exact_predictive"] = {
                key: round(value, 4)
                for key, value in exact_predictive_metrics(model, likelihood, *data).items()
            }
        if method == "exact" and args.evidence:
            row["evidence"] = evidence_check(model, likelihood, data[0], data[1], args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| method | test RMSE | test MLPD | MLPD, exact predictive | lengthscale | outputscale "
        "| noise | wall s | steps | step ms | peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['method']} | {row['rmse']:.4f} | {row['mlpd']:.4f} | "
            f"{exact_predictive_mlpd(row)} | {row['lengthscale']} | {row['outputscale']} | "
            f"{row['noise']} | {row['wall_s']} | {row['steps']} | {row['median_step_ms']} | "
            f"{row['peak_mib']} |"
        )
    sys.stdout.flush()
    if args.quick:
        return  # quick runs are smoke tests, not results
    name = "gp_scale_diamonds" if args.dataset == "diamonds" else f"gp_scale_synthetic_{args.size}"
    notes = [
        "Same training split and initial hyperparameters for every method, and the same "
        "wall-clock budget for setup (neighbour searches) and training of the local fit, SVGP "
        "and VNNGP; wall s adds the test predictions. The exact fit is L-BFGS on the exact "
        f"evidence (at most {args.exact_evaluations} evaluations), not budgeted: it is the "
        f"reference. Adam at lr {args.lr} (local, SVGP) and {args.vnngp_lr} (VNNGP); the local "
        f"fit's lr decays to {args.lr_decay:g} times that over the budget and its iterates are "
        f"averaged from {args.average_from:g} of the budget on. Test MLPD uses each method's "
        "own predictive (local kriging from the "
        f"{args.predict_context_size} nearest training points for the local fit); "
        "MLPD, exact predictive, scores every method's hyperparameters by the exact GP "
        f"predictive (N <= 10^4). VNNGP's neighbour structure: {header['vnngp_neighbours']}. "
        "Peak MiB is "
        + (
            "the peak allocated by the method."
            if device.type == "cuda"
            else "the process's peak resident memory so far (monotone over the run)."
        )
    ]
    for row in rows:
        if "evidence" in row:
            evidence = row["evidence"]
            levels = ", ".join(
                f"c={level['context_size']}: {level['estimate']:.1f} +- {level['stderr']:.1f} "
                f"({level['triples']} triples)"
                for level in evidence["levels"]
            )
            notes.append(
                f"Evidence at the exact fit: exact {evidence['exact']:.1f}; local estimate "
                f"(c={args.context_size}) {evidence['local_estimate']:.1f} +- "
                f"{evidence['stderr']:.1f} (relative error {evidence['relative_error']:.2g}, "
                f"{evidence['local_wall_s']} s); multilevel estimate "
                f"{evidence['multilevel_estimate']:.1f} +- {evidence['multilevel_stderr']:.1f} "
                f"(relative error {evidence['multilevel_relative_error']:.2g}, "
                f"{evidence['multilevel_wall_s']} s; levels {levels})."
            )
    write_results(
        name,
        title=f"GP at scale, {args.dataset}, {header['num_train']} training / "
        f"{header['num_test']} test points, dim {header['dim']}, {args.dtype}, "
        f"{args.budget:g} s budget per method, context {args.context_size}, "
        f"batch {args.batch_size}",
        columns=[
            "method",
            "test RMSE",
            "test MLPD",
            "MLPD, exact predictive",
            "lengthscale",
            "outputscale",
            "noise",
            "wall s",
            "steps",
            "step ms",
            "peak MiB",
        ],
        rows=[
            [
                row["method"],
                row["rmse"],
                row["mlpd"],
                exact_predictive_mlpd(row),
                str(row["lengthscale"]),
                row["outputscale"],
                row["noise"],
                row["wall_s"],
                row["steps"],
                row["median_step_ms"],
                row["peak_mib"],
            ]
            for row in rows
        ],
        notes=" ".join(notes),
        command=command_line(),
        machine=describe_machine(str(device)),
    )


if __name__ == "__main__":
    main()
