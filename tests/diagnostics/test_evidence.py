"""Tests of the diagnostics: the evidence estimate and its per-data-point view."""

import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from diagnostic_models import (
    exact_log_marginal,
    latent_bernoulli_guide,
    latent_bernoulli_model,
    make_bernoulli_mixture,
    make_ppca,
)
from oracles import permutation_score
from pyro import poutine

from pyro_masked import (
    Cumulative,
    estimate_log_marginal,
    fixed_rate_bias,
    mask_rate_curve,
    pointwise_masked_log_prob,
)


def test_cumulative_estimate_is_within_four_stderr_of_exact():
    model, data, loc, covariance = make_ppca(num_data=40, size=8)
    result = estimate_log_marginal(model, model_args=(data,), num_draws=32)
    assert result.exact == pytest.approx(exact_log_marginal(loc, covariance, data), abs=1e-9)
    assert result.num_draws == 32 and result.num_masks == 1 and result.draws.shape == (32,)
    assert result.stderr > 0
    assert abs(result.estimate - result.exact) < 4 * result.stderr
    # The standard error is that of the mean of the draws.
    assert result.stderr == pytest.approx(float(result.draws.std() / 32**0.5), rel=1e-12)


def permutation_scores(loc, covariance, data):
    """Every permutation's cumulative score of every vector, one conditioning per term."""
    size = data.shape[-1]
    context_weights = Cumulative().context_weights(size)
    return torch.stack(
        [
            torch.stack(
                [
                    permutation_score(covariance, vector - loc, perm, context_weights)
                    for perm in itertools.permutations(range(size))
                ]
            )
            for vector in data
        ]
    )  # (N, D!)


def test_each_draw_scores_one_random_permutation_per_point_or_shared():
    model, data, loc, covariance = make_ppca(num_data=4, size=3)
    oracle = permutation_scores(loc, covariance, data)
    shared_used, mixed = set(), False
    for mask_groups in ("vector", None):
        pointwise = pointwise_masked_log_prob(
            model, model_args=(data,), num_draws=12, mask_groups=mask_groups, seed=1
        )
        for draw in pointwise.draws["x"]:
            # Each point scored one of its D! permutations (oracle: one conditioning per term).
            matches = (oracle - draw[:, None]).abs() < 1e-9
            assert torch.all(matches.any(-1))
            common = matches.all(0).nonzero().flatten().tolist()
            if mask_groups is None:
                assert common  # one permutation for every point of the draw
                shared_used.add(common[0])
            else:
                mixed = mixed or not common
    assert len(shared_used) > 1  # different draws, different permutations
    assert mixed  # per point: some draw scored its points with different permutations


def test_num_masks_averages_permutations_inside_each_draw():
    model, data, loc, covariance = make_ppca(num_data=3, size=3)
    oracle = permutation_scores(loc, covariance, data)
    pairs = (oracle[:, :, None] + oracle[:, None, :]) / 2  # (N, D!, D!)
    pointwise = pointwise_masked_log_prob(
        model, model_args=(data,), num_draws=6, num_masks=2, mask_groups=None, seed=2
    )
    assert pointwise.num_masks == 2 and pointwise.num_draws == 6
    for draw in pointwise.draws["x"]:
        matches = (pairs - draw[:, None, None]).abs() < 1e-9
        assert torch.all(matches.flatten(1).any(-1))


def test_all_masks_estimate_is_exact_with_zero_stderr():
    model, data, loc, covariance = make_ppca(size=5)
    result = estimate_log_marginal(model, model_args=(data,), num_masks="all")
    assert result.stderr == 0.0
    assert result.estimate == pytest.approx(exact_log_marginal(loc, covariance, data), abs=1e-8)


def test_fixed_rate_estimate_differs_from_exact():
    model, data, _, _ = make_ppca(size=6)
    result = estimate_log_marginal(model, model_args=(data,), num_masks="all", mask=1)
    # Leave-one-out over coordinates is not the evidence.
    assert abs(result.estimate - result.exact) > 1.0


def test_factorizing_site_has_exact_equal_to_its_log_prob():
    data = torch.randn(10, 4)

    def model(x):
        with pyro.plate("data", 10):
            pyro.sample("x", dist.Normal(0.5, 2.0).expand([4]).to_event(1), obs=x)

    result = estimate_log_marginal(model, model_args=(data,), num_draws=2)
    expected = float(dist.Normal(0.5, 2.0).log_prob(data).sum())
    assert result.exact == pytest.approx(expected, abs=1e-10)
    assert result.estimate == pytest.approx(expected, abs=1e-10)
    assert result.stderr == pytest.approx(0.0, abs=1e-10)


def test_exact_is_none_for_a_non_gaussian_latent_model():
    data = torch.bernoulli(torch.full((12, 5), 0.4))
    result = estimate_log_marginal(
        latent_bernoulli_model, latent_bernoulli_guide, model_args=(data,), num_draws=16
    )
    assert result.exact is None
    assert result.stderr > 0  # guide draws vary
    # The site factorizes given z, so the masked draws equal the ordinary ELBO draws.
    assert result.estimate == pytest.approx(result.unmasked, abs=1e-9)


def test_a_draw_with_latents_is_the_masked_elbo_of_the_guide_sample():
    data = torch.bernoulli(torch.full((6, 3), 0.5))
    z = torch.linspace(-1.0, 1.0, 6)

    def point_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(z))

    result = estimate_log_marginal(
        latent_bernoulli_model, point_guide, model_args=(data,), num_draws=2
    )
    weight = torch.linspace(-1.0, 1.0, 3)
    # log p(x | z) + log p(z) - log q(z), with log q(z) = 0 for the point mass.
    elbo = (
        dist.Bernoulli(logits=z[:, None] * weight).log_prob(data).sum()
        + dist.Normal(0.0, 1.0).log_prob(z).sum()
    )
    assert result.draws.tolist() == pytest.approx([float(elbo)] * 2, abs=1e-10)


def test_pointwise_values_sum_to_the_total():
    model, data, _, _ = make_ppca(num_data=12, size=5)
    pyro.set_rng_seed(2)
    pointwise = pointwise_masked_log_prob(model, model_args=(data,), num_draws=5)
    pyro.set_rng_seed(2)
    total = estimate_log_marginal(model, model_args=(data,), num_draws=5)
    assert pointwise.values["x"].shape == (12,)
    assert pointwise.draws["x"].shape == (5, 12)
    assert pointwise.total().estimate == pytest.approx(total.estimate, abs=1e-9)
    assert float(pointwise.unmasked["x"].sum()) == pytest.approx(total.exact, abs=1e-9)
    assert torch.all(pointwise.stderrs["x"] > 0)


def test_pointwise_values_respect_poutine_mask_and_scale():
    model, data, loc, covariance = make_ppca(num_data=6, size=4)
    keep = torch.tensor([True, False, True, True, False, True])

    def masked_model(x):
        with poutine.scale(scale=2.0), poutine.mask(mask=keep):
            model(x)

    pointwise = pointwise_masked_log_prob(masked_model, model_args=(data,), num_masks="all")
    expected = 2.0 * dist.MultivariateNormal(loc, covariance).log_prob(data) * keep
    assert torch.all(pointwise.values["x"][~keep] == 0)
    assert pointwise.unmasked["x"] == pytest.approx(expected, abs=1e-10)


def test_sites_not_masked_are_scored_by_their_log_prob():
    model, data, loc, covariance = make_ppca(num_data=6, size=4)
    extra = torch.randn(6)

    def two_site_model(x):
        model(x)
        with pyro.plate("other", 6):
            pyro.sample("y", dist.Normal(0.0, 1.0), obs=extra)

    result = estimate_log_marginal(two_site_model, model_args=(data,), num_masks="all", sites=["x"])
    expected = exact_log_marginal(loc, covariance, data) + float(
        dist.Normal(0.0, 1.0).log_prob(extra).sum()
    )
    assert result.estimate == pytest.approx(expected, abs=1e-8)


def test_enumerated_latent_gives_the_exact_evidence_with_every_mask():
    model, data, exact = make_bernoulli_mixture()
    result = estimate_log_marginal(model, model_args=(data,), num_masks="all", integrate=("z",))
    assert result.exact == pytest.approx(exact, abs=1e-10)
    assert result.estimate == pytest.approx(exact, abs=1e-10)
    assert result.stderr == 0.0
    curve = mask_rate_curve(model, model_args=(data,), num_masks="all", integrate=("z",))
    assert curve.area == pytest.approx(exact, abs=1e-10)
    # Not Gaussian, yet the evidence is exact: the fixed-rate bias is available too.
    bias = fixed_rate_bias(model, model_args=(data,), rates=[0.25, 1.0], integrate=("z",))
    assert bias.bias[0] > 0 > bias.bias[1]


def test_enumerated_latent_random_masks_agree_with_the_evidence():
    model, data, exact = make_bernoulli_mixture(num_data=20, size=6)
    result = estimate_log_marginal(model, model_args=(data,), num_draws=64, integrate=("z",))
    assert result.exact == pytest.approx(exact, abs=1e-10)
    assert abs(result.estimate - exact) < 4 * result.stderr


def test_sampled_latent_has_no_exact_value_and_tracks_the_importance_weighted_bound():
    data = torch.bernoulli(torch.full((10, 5), 0.4))
    result = estimate_log_marginal(
        latent_bernoulli_model,
        model_args=(data,),
        num_draws=32,
        integrate=("z",),
        num_samples=64,
    )
    assert result.exact is None
    # Over masks, cumulative masking with fixed samples averages to the bound log sum_k w_k
    # p(x | z_k) on the same samples, which ``unmasked`` holds.
    assert abs(result.estimate - result.unmasked) < 4 * result.stderr


def relative_error_of_block_sums(pointwise, block_size):
    """Standard deviation of a draw's sum over ``block_size`` points, relative to the sum."""
    draws, unmasked = pointwise.draws["x"], pointwise.unmasked["x"]
    sums = draws.reshape(draws.shape[0], -1, block_size).sum(-1)  # (draws, blocks)
    scale = unmasked.reshape(-1, block_size).sum(-1).abs().mean()
    return float(sums.var(0).mean().sqrt() / scale)


def test_default_relative_error_of_a_sum_falls_like_one_over_sqrt_n():
    model, data, _, _ = make_ppca(num_data=64, size=4)
    ratios = {}
    for mask_groups in ("vector", None):
        pointwise = pointwise_masked_log_prob(
            model, model_args=(data,), num_draws=32, mask_groups=mask_groups, seed=0
        )
        ratios[mask_groups] = relative_error_of_block_sums(
            pointwise, 4
        ) / relative_error_of_block_sums(pointwise, 64)
    # 16 times the points: sqrt(16) = 4 times smaller relative error with independent masks
    # (the estimate of the ratio has a spread of about 15% here)...
    assert 2.5 < ratios["vector"] < 6.5
    # ...and hardly smaller when every point shares the permutations.
    assert ratios[None] < 1.6


def test_total_gives_the_error_of_a_sum_from_the_joint_draws():
    model, data, _, _ = make_ppca(num_data=80, size=6)
    for mask_groups in (None, "vector"):
        pointwise = pointwise_masked_log_prob(
            model, model_args=(data,), num_draws=24, mask_groups=mask_groups, seed=3
        )
        total = pointwise.total()
        per_draw = pointwise.draws["x"].sum(-1)
        assert total.estimate == pytest.approx(float(per_draw.mean()), abs=1e-9)
        assert total.stderr == pytest.approx(float(per_draw.std() / 24**0.5), rel=1e-12)
        independent = float(pointwise.stderrs["x"].square().sum().sqrt())
        if mask_groups is None:
            # Shared permutations: adding the points' errors as independent understates it.
            assert total.stderr > 2.5 * independent
        else:
            assert total.stderr == pytest.approx(independent, rel=0.4)
    with pytest.raises(ValueError, match="'y'"):
        pointwise.total(sites=["y"])
