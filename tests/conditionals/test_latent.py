"""The importance-sampling and enumeration engine against plain oracles (loops over masks)."""

import itertools
import math

import pytest
import torch
import torch.distributions as tdist

from pyro_masked.conditionals.gaussian import random_permutations
from pyro_masked.conditionals.latent import latent_masked_score
from pyro_masked.masks import Cumulative, FixedRate, FixedSize, SizeWeights
from pyro_masked.scoring import masked_log_prob


def oracle_log_predictive(loglik, log_weights, hidden, visible):
    """log p^(x_hidden | x_visible) for one data point, by explicit log-sum-exp over samples."""
    context = log_weights + loglik[:, visible].sum(-1)
    numerator = torch.logsumexp(context + loglik[:, hidden], 0)
    denominator = torch.logsumexp(context, 0) if visible else 0.0
    return numerator - denominator


def oracle_permutation_score(loglik, log_weights, perms, context_weights):
    """(1/S) sum_s sum_t c_t sum_{j >= t} log p^(x_{pi_j} | x_{pi_<t}), loops over everything.

    ``perms`` is ``(S, D)`` (shared) or ``(B, S, D)`` (per data point).
    """
    num_samples, batch, size = loglik.shape
    scores = torch.zeros(batch)
    for b in range(batch):
        point_perms = perms if perms.dim() == 2 else perms[b]
        for perm in point_perms.tolist():
            for t in range(size):
                for j in range(t, size):
                    term = oracle_log_predictive(loglik[:, b], log_weights[:, b], perm[j], perm[:t])
                    scores[b] += context_weights[t] * term / len(point_perms)
    return scores


def oracle_expected_score(loglik, log_weights, size_weights):
    """sum_m w_m S(x; m), every mask of every size enumerated."""
    num_samples, batch, size = loglik.shape
    scores = torch.zeros(batch)
    for b in range(batch):
        for index, weight in enumerate(size_weights.tolist()):
            mask_size = index + 1
            if weight == 0:
                continue
            masks = list(itertools.combinations(range(size), mask_size))
            for hidden_set in masks:
                visible = [i for i in range(size) if i not in hidden_set]
                for hidden in hidden_set:
                    term = oracle_log_predictive(loglik[:, b], log_weights[:, b], hidden, visible)
                    scores[b] += weight * term / (mask_size * len(masks))
    return scores


def random_problem(num_samples=5, batch=3, size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    loglik = -torch.rand(num_samples, batch, size, generator=generator) * 3
    log_weights = torch.randn(num_samples, batch, generator=generator) - math.log(num_samples)
    return loglik, log_weights


@pytest.mark.parametrize(
    "schedule", [Cumulative(), FixedSize(2), FixedRate(0.3), SizeWeights([1.0, 0.0, 2.0, 1.0])]
)
@pytest.mark.parametrize("per_point", [False, True])
def test_random_permutations_match_oracle(schedule, per_point):
    loglik, log_weights = random_problem()
    batch, size = loglik.shape[1:]
    perms = random_permutations(3 * batch, size).reshape(batch, 3, size)
    perms = perms if per_point else perms[0]
    fast = latent_masked_score(loglik, log_weights, schedule.size_weights(size), perms=perms)
    expected = oracle_permutation_score(loglik, log_weights, perms, schedule.context_weights(size))
    torch.testing.assert_close(fast, expected, rtol=1e-12, atol=1e-12)


def test_num_masks_draws_from_global_generator():
    loglik, log_weights = random_problem()
    weights = Cumulative().size_weights(4)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        drawn = latent_masked_score(loglik, log_weights, weights, num_masks=2)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        perms = random_permutations(3 * 2, 4).reshape(3, 2, 4)  # independent per data point
    given = latent_masked_score(loglik, log_weights, weights, perms=perms)
    torch.testing.assert_close(drawn, given, rtol=0, atol=0)


@pytest.mark.parametrize("schedule", [Cumulative(), FixedSize(1), FixedSize(3), FixedRate(0.5)])
def test_all_masks_match_oracle(schedule):
    loglik, log_weights = random_problem(size=5)
    weights = schedule.size_weights(5)
    fast = latent_masked_score(loglik, log_weights, weights, num_masks="all")
    torch.testing.assert_close(fast, oracle_expected_score(loglik, log_weights, weights))


def test_random_permutations_average_to_all_masks():
    # Many permutations: the Monte Carlo average over masks approaches the enumeration.
    loglik, log_weights = random_problem(size=4)
    weights = FixedRate(0.5).size_weights(4)
    exact = latent_masked_score(loglik, log_weights, weights, num_masks="all")
    draws = torch.stack([latent_masked_score(loglik, log_weights, weights, 1) for _ in range(2000)])
    standard_error = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - exact).abs() < 4 * standard_error + 1e-12).all()


def test_cumulative_all_masks_telescope_to_importance_weighted_estimate():
    # For fixed samples, the average over every ordering of the chain rule telescopes to
    # log sum_k omega_k p(x | z_k).
    loglik, log_weights = random_problem(num_samples=7, size=5)
    score = latent_masked_score(loglik, log_weights, Cumulative().size_weights(5), "all")
    expected = torch.logsumexp(log_weights + loglik.sum(-1), 0)
    torch.testing.assert_close(score, expected, rtol=1e-12, atol=1e-12)


def mixture_problem(batch=3, size=4, components=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    locs = torch.randn(components, size, generator=generator) * 2
    scales = 0.5 + torch.rand(components, size, generator=generator)
    logits = torch.randn(components, generator=generator)
    component = tdist.Categorical(logits=logits).sample((batch,))
    data = locs[component] + scales[component] * torch.randn(batch, size, generator=generator)
    return locs, scales, logits, data


def mixture_marginal_log_density(locs, scales, logits, data, coords):
    """log p(x_S) of a mixture of factorized Gaussians, from its definition."""
    log_probs = torch.log_softmax(logits, 0)
    if not coords:
        return torch.zeros(data.shape[0])
    per_component = tdist.Normal(locs[:, coords], scales[:, coords]).log_prob(
        data[:, None, coords]
    )  # (B, C, |S|)
    return torch.logsumexp(log_probs + per_component.sum(-1), -1)


def enumerated_inputs(locs, scales, logits, data):
    loglik = tdist.Normal(locs[:, None, :], scales[:, None, :]).log_prob(data)  # (C, B, D)
    log_weights = torch.log_softmax(logits, 0)[:, None].expand(-1, data.shape[0])
    return loglik, log_weights


@pytest.mark.parametrize("schedule", [Cumulative(), FixedSize(2), FixedRate(0.25)])
def test_enumerated_mixture_equals_brute_force(schedule):
    locs, scales, logits, data = mixture_problem()
    size = data.shape[-1]
    loglik, log_weights = enumerated_inputs(locs, scales, logits, data)
    score = latent_masked_score(loglik, log_weights, schedule.size_weights(size), "all")
    expected = torch.zeros(data.shape[0])
    size_weights = schedule.size_weights(size)
    for index, weight in enumerate(size_weights.tolist()):
        mask_size = index + 1
        if weight == 0:
            continue
        masks = list(itertools.combinations(range(size), mask_size))
        for hidden_set in masks:
            visible = [i for i in range(size) if i not in hidden_set]
            context = mixture_marginal_log_density(locs, scales, logits, data, visible)
            for hidden in hidden_set:
                joint = mixture_marginal_log_density(
                    locs, scales, logits, data, sorted(visible + [hidden])
                )
                expected += weight * (joint - context) / (mask_size * len(masks))
    torch.testing.assert_close(score, expected, rtol=1e-13, atol=1e-13)


def test_enumerated_mixture_mask_sizes_sum_to_log_marginal():
    locs, scales, logits, data = mixture_problem(size=5)
    loglik, log_weights = enumerated_inputs(locs, scales, logits, data)
    per_size = [
        latent_masked_score(loglik, log_weights, FixedSize(m).size_weights(5), "all")
        for m in range(1, 6)
    ]
    exact = mixture_marginal_log_density(locs, scales, logits, data, list(range(5)))
    torch.testing.assert_close(sum(per_size) / 5, exact, rtol=1e-13, atol=1e-13)
    # One random permutation with the cumulative schedule is exact too, for an enumerated latent.
    one_perm = latent_masked_score(loglik, log_weights, Cumulative().size_weights(5), 1)
    cumulative = latent_masked_score(loglik, log_weights, Cumulative().size_weights(5), "all")
    torch.testing.assert_close(cumulative, exact, rtol=1e-13, atol=1e-13)
    assert not torch.allclose(one_perm, exact)  # but a single permutation is only unbiased


def linear_gaussian(size=4, latent=2, seed=2):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(size, latent, generator=generator)
    bias = torch.randn(size, generator=generator)
    noise = 0.7
    covariance = weight @ weight.T + noise**2 * torch.eye(size)
    data = tdist.MultivariateNormal(bias, covariance).sample((3,))
    return weight, bias, noise, covariance, data


@pytest.mark.parametrize("schedule", [Cumulative(), FixedSize(2)])
def test_sampled_linear_gaussian_approaches_closed_form(schedule):
    weight, bias, noise, covariance, data = linear_gaussian()
    size, latent = weight.shape
    exact = masked_log_prob(tdist.MultivariateNormal(bias, covariance), data, schedule, "all")
    size_weights = schedule.size_weights(size)

    def errors(num_samples, replicates=8):
        out = []
        for _ in range(replicates):
            z = torch.randn(num_samples, data.shape[0], latent)
            loglik = tdist.Normal(z @ weight.T + bias, noise).log_prob(data)
            log_weights = torch.full((num_samples, 1), -math.log(num_samples))
            out.append(latent_masked_score(loglik, log_weights, size_weights, "all") - exact)
        return torch.stack(out)

    small, large = errors(200), errors(12800)
    rms_small, rms_large = small.square().mean().sqrt(), large.square().mean().sqrt()
    # Error ~ 1/sqrt(K): 64 times the samples should give about an eighth of the error.
    assert rms_large < rms_small / 4
    # At large K the estimate agrees with the closed form within a few standard errors.
    standard_error = large.std(0) / math.sqrt(large.shape[0])
    assert (large.mean(0).abs() < 4 * standard_error + large.var(0)).all()


def test_proposal_weights_are_used():
    # Sampling z from a shifted proposal with weights p/q gives the same limit as the prior.
    weight, bias, noise, covariance, data = linear_gaussian(size=3)
    latent = weight.shape[1]
    exact = masked_log_prob(tdist.MultivariateNormal(bias, covariance), data, "cumulative", "all")
    proposal = tdist.Normal(0.3 * torch.ones(latent), 1.3 * torch.ones(latent))
    num_samples = 50000
    z = proposal.sample((num_samples, data.shape[0]))
    prior = tdist.Normal(torch.zeros(latent), torch.ones(latent))
    log_weights = (prior.log_prob(z) - proposal.log_prob(z)).sum(-1) - math.log(num_samples)
    loglik = tdist.Normal(z @ weight.T + bias, noise).log_prob(data)
    score = latent_masked_score(loglik, log_weights, Cumulative().size_weights(3), "all")
    torch.testing.assert_close(score, exact, rtol=0, atol=0.05)


def test_underflow_is_recomputed_exactly():
    # Log-likelihoods thousands of nats apart underflow exp(); those entries use log-sum-exp.
    loglik, log_weights = random_problem(num_samples=4, batch=2, size=4)
    loglik = loglik.clone()
    loglik[0, :, 1] = -5000.0  # the only sample that explains coordinate 0 cannot explain 1
    loglik[1:, :, 0] = -3000.0
    perms = random_permutations(2 * 2, 4).reshape(2, 2, 4)
    weights = Cumulative().size_weights(4)
    fast = latent_masked_score(loglik, log_weights, weights, perms=perms)
    expected = oracle_permutation_score(loglik, log_weights, perms, Cumulative().context_weights(4))
    torch.testing.assert_close(fast, expected, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("masks", ["permutations", "all", "underflow"])
def test_gradients_match_oracle(masks):
    loglik, log_weights = random_problem(num_samples=4, batch=2, size=4)
    if masks == "underflow":
        loglik = loglik.clone()
        loglik[0, :, 1] = -5000.0
        loglik[1:, :, 0] = -3000.0
    weights = FixedRate(0.5).size_weights(4) if masks == "all" else Cumulative().size_weights(4)
    args = (loglik.requires_grad_(), log_weights.requires_grad_())
    if masks == "all":
        fast = latent_masked_score(*args, weights, "all")
        slow = oracle_expected_score(*args, weights)
    else:
        perms = random_permutations(2, 4)
        fast = latent_masked_score(*args, weights, perms=perms)
        slow = oracle_permutation_score(*args, perms, Cumulative().context_weights(4))
    for a, b in zip(torch.autograd.grad(fast.sum(), args), torch.autograd.grad(slow.sum(), args)):
        torch.testing.assert_close(a, b)


def test_blocked_contraction_matches_unblocked_for_long_events():
    # D = 40 spans several row blocks; compare with the plain autograd formula.
    loglik, log_weights = random_problem(num_samples=6, batch=3, size=40)
    perms = random_permutations(2, 40)
    weights = Cumulative().size_weights(40)
    args = (loglik.requires_grad_(), log_weights.requires_grad_())
    fast = latent_masked_score(*args, weights, perms=perms)
    slow = oracle_permutation_score(*args, perms, Cumulative().context_weights(40))
    torch.testing.assert_close(fast, slow)
    for a, b in zip(torch.autograd.grad(fast.sum(), args), torch.autograd.grad(slow.sum(), args)):
        torch.testing.assert_close(a, b)


def test_float32_runs_in_float32():
    loglik, log_weights = random_problem()
    score = latent_masked_score(
        loglik.float(), log_weights.float(), Cumulative().size_weights(4), 2
    )
    assert score.dtype == torch.float32 and torch.isfinite(score).all()


def test_bad_input():
    loglik, log_weights = random_problem()
    weights = Cumulative().size_weights(4)
    with pytest.raises(ValueError, match="loglik"):
        latent_masked_score(loglik[0], log_weights, weights)
    with pytest.raises(ValueError, match="NaN"):
        latent_masked_score(loglik.clone().fill_(math.nan), log_weights, weights)
    with pytest.raises(ValueError, match="size_weights"):
        latent_masked_score(loglik, log_weights, weights[:3])
    with pytest.raises(ValueError, match="perms"):
        latent_masked_score(loglik, log_weights, weights, perms=torch.zeros(2, 2, 4).long())
    with pytest.raises(ValueError, match="zero weight"):
        latent_masked_score(torch.full_like(loglik, -math.inf), log_weights, weights)
    with pytest.raises(ValueError, match="num_masks='all'"):
        big = torch.zeros(2, 1, 20)
        latent_masked_score(big, torch.zeros(2, 1), Cumulative().size_weights(20), "all")


def test_impossible_sample_with_every_mask_gives_the_finite_exact_value():
    # Component 0 cannot produce x_0 = 1 (log-likelihood -inf); component 1 can, so
    # log p(x) is finite and the cumulative average over every mask equals it exactly.
    loglik = torch.tensor([[[0.0, 0.5, 0.5]], [[0.7, 0.4, 0.6]]], dtype=torch.float64).log()
    log_weights = torch.tensor([[0.3], [0.7]], dtype=torch.float64).log()
    exact = torch.logsumexp(log_weights + loglik.sum(-1), 0)
    score = latent_masked_score(loglik, log_weights, torch.ones(3, dtype=torch.float64), "all")
    assert torch.allclose(score, exact, rtol=0, atol=1e-12)
    fixed = latent_masked_score(loglik, log_weights, torch.tensor([3.0, 0.0, 0.0]), "all")
    assert torch.isfinite(fixed).all()
