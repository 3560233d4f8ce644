import pyro
import pyro.contrib.gp as gp
import pytest
import torch
from oracles import LargestAllocation, permutation_score

import pyro_masked.conditionals.gaussian as gaussian
import pyro_masked.conditionals.lowrank as lowrank
from pyro_masked import MaskedELBO, masked_log_prob
from pyro_masked.masks import Cumulative, FixedSize, SizeWeights


def _low_rank(batch=(), size=6, rank=2):
    factor = torch.randn(batch + (size, rank))
    diag = torch.rand(batch + (size,)) + 0.2
    return factor, diag, factor @ factor.mT + torch.diag_embed(diag)


def test_every_context_size_scored_equals_one_conditioning_per_mask():
    size = 6
    factor, diag, covariance = _low_rank((2,), size)
    residuals = torch.randn(2, 3, size)
    context_weights = torch.rand(size)
    perms = gaussian.random_permutations(2, size)
    every_size = torch.arange(size).expand(2, size)
    log_densities = lowrank.conditional_log_densities(factor, diag, residuals, perms, every_size)
    scored = torch.arange(size) >= torch.arange(size)[:, None]  # (k, j): j >= k
    scores = ((log_densities * scored).sum(-1) * context_weights).sum(-1)  # (B, S, n)
    for b in range(2):
        for s in range(2):
            for n in range(3):
                expected = permutation_score(
                    covariance[b], residuals[b, n], perms[s], context_weights
                )
                assert torch.allclose(scores[b, s, n], expected, atol=1e-10)


def test_systematic_context_sizes_draw_each_size_with_its_weight():
    # E[sum_r weight_r [k_r = k]] = c_k for every k: the estimator of sum_k c_k T_k is unbiased.
    size, num_draws = 9, 20_000
    context_weights = torch.rand(size)
    context_weights[3] = 0.0
    sizes, weights = lowrank.systematic_context_sizes(
        context_weights, num_draws, num_points=4, generator=torch.Generator().manual_seed(0)
    )
    assert sizes.shape == (num_draws, 4) and not (sizes == 3).any()
    per_size = torch.zeros(num_draws, size).scatter_add_(1, sizes, weights)
    mean, stderr = per_size.mean(0), per_size.std(0) / num_draws**0.5
    assert ((mean - context_weights).abs() <= 4 * stderr + 1e-12).all()


def test_fixed_mask_size_is_the_dense_engines_estimate():
    size, mask_size = 7, 3
    factor, diag, covariance = _low_rank((2,), size)
    residuals = torch.randn(2, 3, size)
    size_weights = FixedSize(mask_size).size_weights(size)
    context_weights = FixedSize(mask_size).context_weights(size)
    low_rank = lowrank.low_rank_masked_score(
        factor, diag, residuals, context_weights, 4, torch.Generator().manual_seed(1)
    )
    dense = gaussian.gaussian_masked_score(
        covariance, residuals, size_weights, 4, generator=torch.Generator().manual_seed(1)
    )
    assert torch.allclose(low_rank, dense, atol=1e-10)


@pytest.mark.parametrize(
    "schedule", [Cumulative(), SizeWeights(torch.tensor([3.0, 0, 1, 0, 2, 1]))]
)
def test_low_rank_score_is_unbiased_for_the_expectation_over_every_mask(monkeypatch, schedule):
    # Fewer context sizes than sizes, so the systematic draw is exercised.
    monkeypatch.setattr(lowrank, "CONTEXT_SIZES_PER_PERMUTATION", 3)
    size, num_draws = 6, 1000
    factor, diag, covariance = _low_rank((1,), size)
    residuals = torch.randn(1, 2, size)
    context_weights = schedule.context_weights(size)
    exact = gaussian.gaussian_masked_score(
        covariance, residuals, schedule.size_weights(size), "all"
    )
    generator = torch.Generator().manual_seed(3)
    draws = torch.stack(
        [
            lowrank.low_rank_masked_score(factor, diag, residuals, context_weights, 1, generator)
            for _ in range(num_draws)
        ]
    )
    stderr = draws.std(0) / num_draws**0.5
    assert ((draws.mean(0) - exact).abs() < 4 * stderr).all()


def test_conditional_log_densities_gradcheck():
    size = 5
    factor = torch.randn(size, 2, requires_grad=True)
    diag = (torch.rand(size) + 0.5).requires_grad_()
    residuals = torch.randn(1, 2, size, requires_grad=True)
    perms = gaussian.random_permutations(2, size)
    sizes = torch.tensor([[0, 2, 4], [1, 1, 3]])
    assert torch.autograd.gradcheck(
        lambda f, d, r: lowrank.conditional_log_densities(f[None], d[None], r, perms, sizes),
        (factor, diag, residuals),
    )


def test_low_rank_observations_are_masked_without_a_dense_covariance():
    size, rank = 400, 3
    factor = torch.randn(size, rank, requires_grad=True)
    d = torch.distributions.LowRankMultivariateNormal(torch.zeros(size), factor, torch.ones(size))
    value = d.sample()
    with LargestAllocation() as recorder:
        masked_log_prob(d, value).backward()
    assert recorder.largest_bytes < size * size * 8 / 4
    assert torch.isfinite(factor.grad).all()


def test_masked_log_prob_of_a_low_rank_gaussian_is_unbiased():
    size, rank, num_draws = 40, 3, 400
    factor, diag, _ = _low_rank((), size, rank)
    d = torch.distributions.LowRankMultivariateNormal(torch.zeros(size), factor, diag)
    value = d.sample()
    assert lowrank.low_rank_cost_is_lower(size, rank, 1, 1)  # the low-rank engine scores it
    generator = torch.Generator().manual_seed(4)
    draws = torch.stack([masked_log_prob(d, value, generator=generator) for _ in range(num_draws)])
    stderr = draws.std() / num_draws**0.5
    assert abs(draws.mean() - d.log_prob(value)) < 4 * stderr
    # Negative control: leave-one-out (a fixed mask size) is off by many standard errors.
    loo = masked_log_prob(d, value, mask=1, num_masks="all")
    assert abs(loo - d.log_prob(value)) > 10 * stderr


def test_sparse_gp_masked_elbo_averages_to_trace_elbo():
    # pyro.contrib.gp's SparseGPRegression observes its targets through a
    # LowRankMultivariateNormal; the masked loss is unbiased for Trace_ELBO's.
    num_points, num_draws = 120, 200
    inputs = torch.rand(num_points) * 10
    targets = torch.sin(inputs) + 0.2 * torch.randn(num_points)
    kernel = gp.kernels.RBF(input_dim=1)
    model = gp.models.SparseGPRegression(
        inputs, targets, kernel, torch.linspace(0, 10, 8), approx="VFE"
    )
    exact = pyro.infer.Trace_ELBO().loss(model.model, model.guide)
    loss = MaskedELBO(sites=["y"])
    draws = torch.tensor([loss.loss(model.model, model.guide) for _ in range(num_draws)])
    stderr = draws.std() / num_draws**0.5
    assert abs(draws.mean() - exact) < 4 * stderr
