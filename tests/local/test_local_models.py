import gpytorch
import numpy as np
import pyro
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyro_masked import MaskedELBO, MaskedMarginalLogLikelihood
from pyro_masked.gp import GPRegression
from pyro_masked.infer import NothingToMaskWarning
from pyro_masked.local import LocalMaskedObjective, estimate_local_log_marginal
from pyro_masked.local.models import local_observe


class ExactGPModel(gpytorch.models.ExactGP):
    def __init__(self, X, y, likelihood):
        super().__init__(X, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=2.5))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def small_problem(num_points=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    X = torch.rand(num_points, 2, generator=generator)
    y = torch.sin(5 * X).sum(-1) + 0.2 * torch.randn(num_points, generator=generator)
    return X, y


def test_mll_with_whole_contexts_is_unbiased_for_the_exact_marginal_log_likelihood():
    X, y = small_problem()
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ExactGPModel(X, y, likelihood)
    model.mean_module.constant.data.fill_(0.3)
    model.train()
    exact = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    masked = MaskedMarginalLogLikelihood(likelihood, model, context_size=11, batch_size=128)
    with torch.no_grad():
        want = exact(model(X), y).item()
        draws = torch.stack([masked(model(X), y) for _ in range(150)])
    stderr = draws.std() / draws.numel() ** 0.5
    assert abs(draws.mean().item() - want) < 4 * stderr


def test_mll_gradients_match_the_local_estimator_on_the_same_minibatch():
    X, y = small_problem(30)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ExactGPModel(X, y, likelihood)
    model.train()
    masked = MaskedMarginalLogLikelihood(likelihood, model, context_size=5, batch_size=16, seed=3)
    value = masked(model(X), y)
    assert value.item() == masked(model(X), y).item()  # deterministic mode: same minibatch
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    objective = LocalMaskedObjective(X, 5)
    batch = objective.sample(16, np.random.default_rng(3))
    with torch.no_grad():
        reference = objective.log_predictive(
            model.covar_module, X, y, likelihood.noise, batch, model.mean_module(X)
        ).mean()
    torch.testing.assert_close(value.detach(), reference)


def test_mll_with_fixed_noise_reads_the_per_point_noise():
    X, y = small_problem(10)
    noise = torch.linspace(0.05, 0.2, 10)
    likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise)
    model = ExactGPModel(X, y, likelihood)
    model.train()
    exact = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    masked = MaskedMarginalLogLikelihood(likelihood, model, context_size=9, batch_size=64)
    with torch.no_grad():
        want = exact(model(X), y).item()
        draws = torch.stack([masked(model(X), y) for _ in range(300)])
    assert abs(draws.mean().item() - want) < 4 * draws.std() / draws.numel() ** 0.5


class LargeAllocationGuard(TorchDispatchMode):
    """Fails on any tensor an operation creates with more than `limit` elements."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
                if tensor.numel() > self.limit:
                    raise AssertionError(f"{func} built a tensor of shape {tuple(tensor.shape)}")
        return out


@pytest.mark.slow
def test_a_training_step_at_n_200k_builds_nothing_of_size_n_squared_or_n_c_squared():
    num_points, context_size = 200_000, 8
    generator = torch.Generator().manual_seed(0)
    X = torch.rand(num_points, 2, generator=generator, dtype=torch.float32)
    y = torch.sin(6 * X).sum(-1) + 0.1 * torch.randn(num_points, generator=generator)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ExactGPModel(X, y, likelihood)
    model.train()
    masked = MaskedMarginalLogLikelihood(
        likelihood, model, context_size=context_size, batch_size=256
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    masked(model(X), y)  # the one-off neighbour search, outside the guard
    # Allowed: tensors the size of the data (N x d) and N-vectors; N x c^2 = 64 N is not.
    guard = LargeAllocationGuard(limit=4 * num_points)
    with guard:
        for _ in range(2):
            optimizer.zero_grad()
            loss = -masked(model(X), y)
            loss.backward()
            optimizer.step()
    assert torch.isfinite(loss)
    assert guard.largest <= 2 * num_points


def test_allocation_guard_catches_a_dense_covariance():
    """Negative control for the guard: the exact marginal log likelihood forms N x N."""
    X, y = small_problem(300)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ExactGPModel(X, y, likelihood)
    model.train()
    with pytest.raises(AssertionError, match="built a tensor of shape"):
        with LargeAllocationGuard(limit=4 * 300):
            gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(X), y)


def test_mll_context_size_bad_arguments_are_named():
    X, y = small_problem(10)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ExactGPModel(X, y, likelihood)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        MaskedMarginalLogLikelihood(likelihood, model, context_size=3, batch_size=0)
    with pytest.raises(ValueError, match="num_masks does not apply with context_size"):
        MaskedMarginalLogLikelihood(likelihood, model, context_size=3, num_masks=2)
    with pytest.raises(ValueError, match="context_size must be positive"):
        MaskedMarginalLogLikelihood(likelihood, model, context_size=0)
    masked = MaskedMarginalLogLikelihood(likelihood, model, context_size=10)
    model.train()
    with pytest.raises(ValueError, match="context_size=10 exceeds the 9 other training points"):
        masked(model(X), y)
    dense = gpytorch.distributions.MultivariateNormal(torch.zeros(10), torch.eye(10))
    masked = MaskedMarginalLogLikelihood(likelihood, model, context_size=3)
    with pytest.raises(TypeError, match="context_size needs the model's covariance"):
        masked(dense, y)


def test_pyro_gp_regression_with_context_size_trains_on_minibatches_and_predicts():
    X, y = small_problem(400, seed=1)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=2.5))
    gp = GPRegression(X, y, kernel, noise=torch.tensor(0.5), context_size=8, batch_size=64)
    trace = pyro.poutine.trace(gp.model).get_trace()
    site = trace.nodes["y"]
    assert site["fn"].batch_shape == (64,) and site["scale"] == pytest.approx(400 / 64)
    optimizer = torch.optim.Adam(gp.parameters(), lr=0.05)
    elbo = pyro.infer.Trace_ELBO()  # the masking happens inside the model
    for _ in range(100):
        optimizer.zero_grad()
        elbo.differentiable_loss(gp.model, gp.guide).backward()
        optimizer.step()
    assert gp.noise.item() < 0.2  # the truth is 0.04
    mean, variance = gp(X[:50], noiseless=False)
    assert mean.shape == (50,) and (variance > 0).all()
    assert (mean - y[:50]).square().mean() < 0.3
    with pytest.raises(ValueError, match="full_cov=True is not available with context_size"):
        gp(X[:5], full_cov=True)


def test_trace_elbo_and_masked_elbo_score_the_local_site_alike():
    X, y = small_problem(200, seed=2)
    objective = LocalMaskedObjective(X, 6)
    kernel = gpytorch.kernels.RBFKernel()

    def model():
        local_observe("y", objective, kernel, X, y, torch.tensor(0.1), 32)

    losses = []
    pyro.set_rng_seed(5)
    losses.append(pyro.infer.Trace_ELBO().loss(model, lambda: None))
    pyro.set_rng_seed(5)
    with pytest.warns(NothingToMaskWarning):
        losses.append(MaskedELBO().loss(model, lambda: None))
    assert losses[0] == pytest.approx(losses[1])
    pyro.set_rng_seed(5)
    trace = pyro.poutine.trace(model).get_trace()
    trace.compute_log_prob()
    # The subsampled plate scales the minibatch's sum to N * mean: the local estimate.
    site = trace.nodes["y"]
    assert (site["scale"] * site["unscaled_log_prob"].sum()).item() == pytest.approx(-losses[0])
    estimate = estimate_local_log_marginal(
        kernel, X, y, 0.1, 6, num_batches=50, batch_size=32, seed=0, objective=objective
    )
    assert abs(-losses[0] - estimate.estimate) < 6 * estimate.stderr * 50**0.5
