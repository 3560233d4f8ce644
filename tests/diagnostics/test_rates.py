"""Tests of the diagnostics: the masking-rate curve, its area and the fixed-rate bias."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from diagnostic_models import (
    exact_log_marginal,
    latent_bernoulli_guide,
    latent_bernoulli_model,
    make_ppca,
)
from oracles import expected_masked_score, random_spd

from pyro_masked import estimate_log_marginal, fixed_rate_bias, mask_rate_curve, masked_log_prob
from pyro_masked.masks import RateSize


def test_full_grid_area_equals_the_cumulative_estimate_with_the_same_masks():
    model, data, _, _ = make_ppca(size=7)
    pyro.set_rng_seed(11)
    curve = mask_rate_curve(model, model_args=(data,), num_draws=6)
    pyro.set_rng_seed(11)
    estimate = estimate_log_marginal(model, model_args=(data,), num_draws=6)
    assert curve.rates.tolist() == pytest.approx([m / 7 for m in range(1, 8)])
    assert curve.mask_sizes["x"]["sizes"] == list(range(1, 8))
    assert curve.area == pytest.approx(estimate.estimate, abs=1e-9)
    assert curve.area_stderr == pytest.approx(estimate.stderr, abs=1e-9)
    assert curve.scores.sum() == pytest.approx(curve.area, abs=1e-9)
    assert curve.estimates == pytest.approx(7 * curve.scores, abs=1e-9)


def test_all_masks_area_equals_exact_log_marginal():
    model, data, loc, covariance = make_ppca(size=6)
    curve = mask_rate_curve(model, model_args=(data,), num_masks="all")
    exact = exact_log_marginal(loc, covariance, data)
    assert curve.exact == pytest.approx(exact, abs=1e-9)
    assert curve.area == pytest.approx(exact, abs=1e-8)
    assert torch.all(curve.stderrs == 0)
    # The score falls as more coordinates are hidden: less context, worse predictions.
    assert torch.all(curve.scores[1:] < curve.scores[:-1])


def test_all_masks_area_is_exact_for_two_sites_of_different_sizes():
    generator = torch.Generator().manual_seed(4)
    cov_small, cov_large = random_spd(3, generator), random_spd(5, generator)
    small, large = torch.randn(4, 3, generator=generator), torch.randn(4, 5, generator=generator)

    def model():
        with pyro.plate("data", 4):
            pyro.sample("small", dist.MultivariateNormal(torch.zeros(3), cov_small), obs=small)
            pyro.sample("large", dist.MultivariateNormal(torch.zeros(5), cov_large), obs=large)

    curve = mask_rate_curve(model, None, num_masks="all")
    exact = float(
        dist.MultivariateNormal(torch.zeros(3), cov_small).log_prob(small).sum()
        + dist.MultivariateNormal(torch.zeros(5), cov_large).log_prob(large).sum()
    )
    assert curve.mask_sizes["large"]["sizes"] == [1, 2, 3, 4, 5]
    assert curve.mask_sizes["small"]["sizes"] == [1, 1, 2, 2, 3]
    assert curve.area == pytest.approx(exact, abs=1e-8)


def test_coarse_grid_gives_each_rate_the_sizes_up_to_it():
    model, data, _, _ = make_ppca(size=6)
    coarse = mask_rate_curve(model, model_args=(data,), rates=[0.5, 1.0], num_masks="all")
    full = mask_rate_curve(model, model_args=(data,), num_masks="all")
    # Sizes 1..3 take S(3), sizes 4..6 take S(6).
    expected = 3 * float(full.scores[2]) + 3 * float(full.scores[5])
    assert coarse.area == pytest.approx(expected, abs=1e-9)
    assert coarse.scores == pytest.approx(full.scores[[2, 5]], abs=1e-9)


def test_fixed_rate_bias_matches_the_enumeration_oracle():
    model, data, loc, covariance = make_ppca(num_data=3, size=5)
    result = fixed_rate_bias(model, model_args=(data,), rates=[0.2, 0.6, 1.0], num_masks="all")
    exact = exact_log_marginal(loc, covariance, data)
    assert torch.all(result.exact_rates) and torch.all(result.stderr == 0)
    for rate, bias in zip([0.2, 0.6, 1.0], result.bias.tolist()):
        mask_size = round(rate * 5)
        oracle = sum(
            float(expected_masked_score(covariance, vector - loc, mask_size)) for vector in data
        )
        assert bias == pytest.approx(oracle - exact, abs=1e-8)


def test_fixed_rate_bias_exact_and_monte_carlo_agree():
    model, data, _, _ = make_ppca(size=5)
    exact = fixed_rate_bias(model, model_args=(data,), num_masks="all")
    # Shared permutations keep the draws cheap; the estimate is unbiased either way.
    monte_carlo = fixed_rate_bias(
        model, model_args=(data,), num_masks=1, num_draws=60, mask_groups=None
    )
    assert not torch.any(monte_carlo.exact_rates)
    # Size 1 is leave-one-out and size D the marginals: no randomness there.
    assert monte_carlo.stderr[1:-1].min() > 0
    difference = (exact.bias - monte_carlo.bias).abs()
    assert torch.all(difference <= 4 * monte_carlo.stderr + 1e-8)
    # The bias changes sign: small masks over-estimate the evidence, large ones under-estimate.
    assert exact.bias[0] > 0 > exact.bias[-1]


def test_fixed_rate_bias_auto_enumerates_where_it_can():
    model, data, _, _ = make_ppca(num_data=5, size=18)
    result = fixed_rate_bias(
        model, model_args=(data,), rates=[1 / 18, 0.5, 1.0], num_masks="auto", num_draws=8
    )
    # C(18, 9) = 48620 masks is past the enumeration limit: Monte Carlo there.
    assert result.exact_rates.tolist() == [True, False, True]
    assert result.stderr[0] == 0 and result.stderr[1] > 0 and result.stderr[2] == 0


def test_fixed_rate_bias_needs_a_known_evidence():
    data = torch.bernoulli(torch.full((5, 4), 0.5))
    with pytest.raises(ValueError, match="latent sites"):
        fixed_rate_bias(latent_bernoulli_model, latent_bernoulli_guide, model_args=(data,))


@pytest.mark.parametrize("rates", [[0.0, 0.5], [0.5, 1.5], [-0.1], [math.nan], [0.5, 0.3]])
def test_rates_outside_the_unit_interval_or_unordered_are_rejected(rates):
    model, data, _, _ = make_ppca(num_data=3, size=3)
    with pytest.raises(ValueError, match="rates"):
        mask_rate_curve(model, model_args=(data,), rates=rates, num_draws=2)
    with pytest.raises(ValueError, match="rates"):
        fixed_rate_bias(model, model_args=(data,), rates=rates)


def test_empty_grid_is_rejected():
    model, data, _, _ = make_ppca(num_data=3, size=3)
    with pytest.raises(ValueError, match="rates is empty"):
        mask_rate_curve(model, model_args=(data,), rates=[], num_draws=2)
    with pytest.raises(TypeError, match="rates"):
        mask_rate_curve(model, model_args=(data,), rates=0.5, num_draws=2)


def test_rate_one_hides_every_coordinate_and_rates_outside_are_refused():
    # Rates below one follow FixedRate's rule: test_curve_points_equal_fixed_rate_estimates
    # checks the curve against what MaskedELBO(mask=rate) scores.
    for size in (1, 5, 13):
        assert RateSize(1.0).mask_size(size) == size
    for rate in (0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="mask rate"):
            RateSize(rate)
    with pytest.raises(TypeError, match="mask rate"):
        RateSize("0.5")


def test_curve_points_equal_fixed_rate_estimates():
    model, data, loc, covariance = make_ppca(size=6)
    rates = [0.15, 0.3, 0.5, 0.8, 0.95]
    curve = mask_rate_curve(model, model_args=(data,), rates=rates, num_masks="all")
    d = dist.MultivariateNormal(loc, covariance)
    for rate, value in zip(rates, curve.estimates.tolist()):
        # What MaskedELBO(mask=rate) scores, through the loss's own path.
        fixed = float(masked_log_prob(d, data, mask=rate, num_masks="all").sum())
        assert value == pytest.approx(fixed, abs=1e-9)
    # The rates above hit distinct sizes, so a different size rule would fail.
    assert len(set(curve.mask_sizes["x"]["sizes"])) == len(rates)
