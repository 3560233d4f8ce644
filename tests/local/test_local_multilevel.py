import math

import gpytorch
import pytest
import torch
from test_local_estimator import local_oracle_score, matern_problem

from pyro_masked.local import LocalMaskedObjective, estimate_multilevel_log_marginal
from pyro_masked.masks import SizeWeights


def exact_evidence(y, covariance):
    return torch.distributions.MultivariateNormal(torch.zeros_like(y), covariance).log_prob(y)


def poorly_screened_problem(num_points=10, seed=0):
    """A long lengthscale and heavy noise: every point informs every other, so the nearest
    member alone screens badly."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.rand(num_points, 2, generator=generator)
    kernel = gpytorch.kernels.MaternKernel(nu=2.5)
    kernel.lengthscale = 1.0
    noise = torch.tensor(0.3)
    covariance = kernel(X).to_dense().detach() + noise * torch.eye(num_points)
    y = torch.linalg.cholesky(covariance) @ torch.randn(num_points, generator=generator)
    return X, y, kernel, noise, covariance


def test_levels_up_to_whole_contexts_are_unbiased_for_the_exact_evidence():
    X, y, kernel, noise, covariance = poorly_screened_problem()
    result = estimate_multilevel_log_marginal(
        kernel, X, y, noise, (1, 3, 9), num_triples=(3000, 1500, 750), seed=0
    )
    assert result.context_sizes == (1, 3, 9)
    assert abs(result.estimate - exact_evidence(y, covariance).item()) < 4 * result.stderr
    assert result.stderr == pytest.approx(math.sqrt(sum(lv.stderr**2 for lv in result.levels)))


def test_the_first_level_alone_fails_the_same_tolerance():
    """Negative control: with the same triples at c_0 = 1 only, the screening bias shows."""
    X, y, kernel, noise, covariance = poorly_screened_problem()
    result = estimate_multilevel_log_marginal(
        kernel, X, y, noise, (1,), num_triples=(5250,), seed=0
    )
    assert abs(result.estimate - exact_evidence(y, covariance).item()) > 6 * result.stderr


def test_partial_sums_are_unbiased_for_the_enumerated_local_scores():
    X, y, kernel, noise, covariance = matern_problem(7, seed=2)
    mask = SizeWeights(torch.tensor([1.0, 2, 1, 1, 0, 1, 1]))
    objective = LocalMaskedObjective(X, 2, mask=mask)
    result = estimate_multilevel_log_marginal(
        kernel, X, y, noise, (1, 2), num_triples=(4000, 4000), seed=5, objective=objective
    )
    coarse, coarse_stderr = result.up_to(0)
    assert abs(coarse - local_oracle_score(X, y, covariance, mask, width=1)) < 4 * coarse_stderr
    fine = local_oracle_score(X, y, covariance, mask, width=2)
    assert abs(result.estimate - fine) < 4 * result.stderr


def test_coupled_differences_vary_far_less_than_independent_ones():
    """Both conditionals of a difference share the triple; independent draws would add the
    variances of the two context sizes instead (about 14 times this one here)."""
    X, y, kernel, noise, _ = matern_problem(300, seed=1)
    result = estimate_multilevel_log_marginal(
        kernel, X, y, noise, (8, 32), num_triples=(2048, 2048), seed=0
    )
    fine = estimate_multilevel_log_marginal(kernel, X, y, noise, (32,), num_triples=(2048,), seed=1)
    coarse, difference = result.levels
    assert difference.coarser_context_size == 8
    independent = coarse.variance_per_triple + fine.levels[0].variance_per_triple
    assert difference.variance_per_triple < 0.25 * independent


def test_the_allocation_reaches_the_target_with_fewer_fine_triples():
    X, y, kernel, noise, _ = matern_problem(300, seed=1)
    result = estimate_multilevel_log_marginal(
        kernel, X, y, noise, (4, 16, 64), target_stderr=2.0, pilot_triples=128, seed=0
    )
    counts = [level.num_triples for level in result.levels]
    assert counts[0] > counts[1] > counts[2]
    assert result.stderr < 1.5 * 2.0


def test_context_sizes_past_the_other_points_are_clipped():
    X, y, kernel, noise, _ = matern_problem(10)
    result = estimate_multilevel_log_marginal(
        kernel, X, y, noise, (3, 20, 50), num_triples=(32, 32), seed=0
    )
    assert result.context_sizes == (3, 9)


def test_bad_multilevel_arguments_are_named():
    X, y, kernel, noise, _ = matern_problem(10)
    with pytest.raises(ValueError, match="context_sizes must increase strictly"):
        estimate_multilevel_log_marginal(kernel, X, y, noise, (4, 4))
    with pytest.raises(ValueError, match="context_sizes must be a non-empty sequence"):
        estimate_multilevel_log_marginal(kernel, X, y, noise, 4)
    with pytest.raises(ValueError, match="context_sizes entry must be positive"):
        estimate_multilevel_log_marginal(kernel, X, y, noise, (0, 4))
    with pytest.raises(ValueError, match="num_triples needs one count per context size"):
        estimate_multilevel_log_marginal(kernel, X, y, noise, (2, 4), num_triples=(64,))
    with pytest.raises(ValueError, match="give target_stderr or num_triples, not both"):
        estimate_multilevel_log_marginal(
            kernel, X, y, noise, (2, 4), num_triples=(64, 64), target_stderr=1.0
        )
    with pytest.raises(ValueError, match="target_stderr must be positive"):
        estimate_multilevel_log_marginal(kernel, X, y, noise, (2, 4), target_stderr=0.0)
    with pytest.raises(ValueError, match="y must have shape \\(10,\\)"):
        estimate_multilevel_log_marginal(kernel, X, y[:-1], noise, (2, 4))
    with pytest.raises(ValueError, match="objective was built on other inputs"):
        estimate_multilevel_log_marginal(
            kernel, X, y, noise, (2, 4), objective=LocalMaskedObjective(X.clone(), 2)
        )
    with pytest.raises(IndexError, match="level 2 out of range"):
        estimate_multilevel_log_marginal(
            kernel, X, y, noise, (2, 4), num_triples=(16, 16), seed=0
        ).up_to(2)
