import itertools
import math

import gpytorch
import numpy as np
import pytest
import torch
from oracles import conditional_log_density, expected_masked_score

from pyro_masked.local import (
    ContextBatch,
    LocalMaskedObjective,
    conditional_given_context,
    estimate_local_log_marginal,
    local_log_predictive,
)
from pyro_masked.masks import Cumulative, FixedRate, SizeWeights


def matern_problem(num_points, dim=2, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    X = torch.rand(num_points, dim, generator=generator, dtype=dtype)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=2.5)).to(dtype)
    kernel.base_kernel.lengthscale = 0.3
    kernel.outputscale = 1.5
    noise = torch.tensor(0.05, dtype=dtype)
    covariance = kernel(X).to_dense().detach() + noise * torch.eye(num_points, dtype=dtype)
    factor = torch.linalg.cholesky(covariance)
    y = factor @ torch.randn(num_points, generator=generator, dtype=dtype)
    return X, y, kernel, noise, covariance


def local_oracle_score(X, y, covariance, schedule, width):
    """N * E_k[T_k] with T_k enumerated over every target and every k-subset of the others,
    each scored from its `width` nearest members by an explicit solve."""
    num_points = X.shape[0]
    probs = schedule.size_probs(num_points)
    total = 0.0
    for size, prob in enumerate(probs.flip(0).tolist()):  # size = k visible points
        if prob == 0:
            continue
        terms = []
        for target in range(num_points):
            others = [i for i in range(num_points) if i != target]
            distance = (X - X[target]).square().sum(-1)
            for subset in itertools.combinations(others, size):
                nearest = sorted(subset, key=lambda i: distance[i].item())[:width]
                terms.append(conditional_log_density(covariance, y, target, nearest).item())
        total += prob * num_points * float(np.mean(terms))
    return total


def test_local_conditional_equals_the_exact_conditional_when_the_context_is_whole():
    X, y, kernel, noise, covariance = matern_problem(9)
    context = torch.tensor([[1, 2, 3, 0], [4, 0, 0, 0], [0, 0, 0, 0]])
    valid = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    targets = torch.tensor([5, 7, 8])
    context = torch.where(valid, context, targets[:, None])
    batch = ContextBatch(targets, valid.sum(-1), context, valid)
    got = local_log_predictive(kernel, X, y, batch, noise)
    want = torch.stack(
        [
            conditional_log_density(covariance, y, 5, [1, 2, 3]),
            conditional_log_density(covariance, y, 7, [4]),
            conditional_log_density(covariance, y, 8, []),
        ]
    )
    torch.testing.assert_close(got, want)


def test_local_conditional_uses_the_mean_module_and_per_point_noise():
    X, y, kernel, _, _ = matern_problem(6)
    noise = torch.linspace(0.05, 0.3, 6)
    mean = gpytorch.means.LinearMean(2)
    covariance = kernel(X).to_dense().detach() + torch.diag(noise)
    residual = y - mean(X).detach()
    batch = ContextBatch(
        torch.tensor([0]), torch.tensor([3]), torch.tensor([[3, 1, 4]]), torch.ones(1, 3) > 0
    )
    got = local_log_predictive(kernel, X, y, batch, noise, mean)
    want = conditional_log_density(covariance, residual, 0, [3, 1, 4])
    torch.testing.assert_close(got, want.reshape(1))
    moments = conditional_given_context(kernel, X, y, batch, noise, mean(X).detach())
    torch.testing.assert_close(moments.log_prob(y[:1]), want.reshape(1))


def test_gradients_pass_gradcheck_on_small_blocks():
    X, y, kernel, _, _ = matern_problem(7)
    batch = ContextBatch(
        torch.tensor([0, 6]),
        torch.tensor([3, 2]),
        torch.tensor([[3, 1, 4], [2, 5, 6]]),
        torch.tensor([[1, 1, 1], [1, 1, 0]]) > 0,
    )

    def objective(inputs, targets, noise):
        return local_log_predictive(kernel, inputs, targets, batch, noise)

    inputs = X.clone().requires_grad_()
    targets = y.clone().requires_grad_()
    noise = torch.tensor(0.1, requires_grad=True)
    assert torch.autograd.gradcheck(objective, (inputs, targets, noise))


def test_hyperparameter_gradients_agree_with_a_dense_oracle():
    X, y, kernel, noise, _ = matern_problem(10)
    objective = LocalMaskedObjective(X, 3)
    batch = objective.sample(16, np.random.default_rng(0))
    raw_noise = noise.log().clone().requires_grad_()
    local = objective.log_predictive(kernel, X, y, raw_noise.exp(), batch).sum()
    local_grads = torch.autograd.grad(local, [*kernel.parameters(), raw_noise])
    # Dense oracle: the full N x N covariance, one explicit solve per triple.
    covariance = kernel(X).to_dense() + raw_noise.exp() * torch.eye(10)
    dense = sum(
        conditional_log_density(
            covariance, y, int(j), [int(i) for i, v in zip(context, valid) if v]
        )
        for j, context, valid in zip(batch.targets, batch.context, batch.valid)
    )
    dense_grads = torch.autograd.grad(dense, [*kernel.parameters(), raw_noise])
    torch.testing.assert_close(local, dense)
    for got, want in zip(local_grads, dense_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "mask",
    [Cumulative(), FixedRate(0.25), SizeWeights(torch.tensor([3.0, 0, 1, 0, 2, 1, 0, 1]))],
    ids=["cumulative", "fixed-rate", "custom-weights"],
)
@pytest.mark.parametrize("brute_force_below", [0, None], ids=["ranks", "explicit"])
def test_whole_contexts_give_an_unbiased_estimate_of_the_exact_masked_score(
    mask, brute_force_below
):
    X, y, kernel, noise, covariance = matern_problem(8)
    probs = mask.size_probs(8)
    exact = sum(
        prob * expected_masked_score(covariance, y, size + 1).item()
        for size, prob in enumerate(probs.tolist())
        if prob > 0
    )
    if isinstance(mask, Cumulative):
        exact_evidence = torch.distributions.MultivariateNormal(torch.zeros(8), covariance)
        assert exact == pytest.approx(exact_evidence.log_prob(y).item(), abs=1e-8)
    objective = LocalMaskedObjective(
        X, 7, mask=mask, num_neighbors=3, brute_force_below=brute_force_below
    )
    result = estimate_local_log_marginal(
        kernel, X, y, noise, 7, num_batches=400, batch_size=32, seed=1, objective=objective
    )
    assert abs(result.estimate - exact) < 4 * result.stderr


def test_local_contexts_are_unbiased_for_the_enumerated_local_score():
    X, y, kernel, noise, covariance = matern_problem(7, seed=2)
    mask = SizeWeights(torch.tensor([1.0, 2, 1, 1, 0, 1, 1]))
    want = local_oracle_score(X, y, covariance, mask, width=2)
    objective = LocalMaskedObjective(X, 2, mask=mask, num_neighbors=2, brute_force_below=0)
    result = estimate_local_log_marginal(
        kernel, X, y, noise, 2, num_batches=400, batch_size=32, seed=3, objective=objective
    )
    assert abs(result.estimate - want) < 4 * result.stderr


def test_a_fixed_rate_estimate_fails_the_cumulative_tolerance():
    """Negative control: the test above can tell a biased schedule from the evidence."""
    X, y, kernel, noise, covariance = matern_problem(8)
    evidence = torch.distributions.MultivariateNormal(torch.zeros(8), covariance).log_prob(y)
    result = estimate_local_log_marginal(
        kernel, X, y, noise, 7, mask=FixedRate(0.125), num_batches=400, batch_size=32, seed=1
    )
    assert abs(result.estimate - evidence.item()) > 6 * result.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_estimate_keeps_the_dtype_and_backpropagates(dtype):
    X, y, kernel, noise, covariance = matern_problem(60, dtype=dtype)
    objective = LocalMaskedObjective(X, 8)
    value = objective.estimate(kernel, X, y, noise, 32, rng=np.random.default_rng(0))
    assert value.dtype == dtype and value.shape == ()
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in kernel.parameters())
    evidence = torch.distributions.MultivariateNormal(
        torch.zeros(60, dtype=torch.float64), covariance.double()
    ).log_prob(y.double())
    result = estimate_local_log_marginal(
        kernel, X, y, noise, 8, num_batches=50, batch_size=60, seed=0, objective=objective
    )
    assert abs(result.estimate - evidence.item()) < 4 * result.stderr + 0.02 * abs(evidence)


def test_bad_inputs_are_named():
    X, y, kernel, noise, _ = matern_problem(10)
    with pytest.raises(ValueError, match="context_size=10 exceeds the 9 other"):
        LocalMaskedObjective(X, 10)
    with pytest.raises(ValueError, match="context_size must be positive"):
        LocalMaskedObjective(X, 0)
    with pytest.raises(TypeError, match="context_size must be an int"):
        LocalMaskedObjective(X, 2.5)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        LocalMaskedObjective(X, 3).sample(0)
    bad = X.clone()
    bad[4, 1] = math.nan
    with pytest.raises(ValueError, match="X contains NaN or infinite entries \\(first in row 4"):
        LocalMaskedObjective(bad, 3)
    with pytest.raises(ValueError, match="y must have shape \\(10,\\)"):
        estimate_local_log_marginal(kernel, X, y[:-1], noise, 3)
    with pytest.raises(ValueError, match="noise must hold one variance or one per training"):
        estimate_local_log_marginal(kernel, X, y, torch.ones(3), 3)
    with pytest.raises(ValueError, match="num_batches must be an int >= 2"):
        estimate_local_log_marginal(kernel, X, y, noise, 3, num_batches=1)
