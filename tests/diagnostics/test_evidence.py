"""Tests of the diagnostics: the evidence estimate and its per-data-point view."""

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
from pyro import poutine

from pyro_masked import (
    estimate_log_marginal,
    fixed_rate_bias,
    mask_rate_curve,
    masked_log_prob,
    pointwise_masked_log_prob,
)


def test_cumulative_estimate_is_within_four_stderr_of_exact():
    model, data, loc, covariance = make_ppca(num_data=40, size=8)
    result = estimate_log_marginal(model, None, data, num_masks=64)
    assert result.exact == pytest.approx(exact_log_marginal(loc, covariance, data), abs=1e-9)
    assert result.num_masks == 64 and result.draws.shape == (64,)
    assert result.stderr > 0
    assert abs(result.estimate - result.exact) < 4 * result.stderr
    # The standard error is that of the mean of the draws.
    assert result.stderr == pytest.approx(float(result.draws.std() / 8), rel=1e-12)


def test_each_draw_scores_one_random_permutation():
    model, data, loc, covariance = make_ppca(num_data=20, size=6)
    pyro.set_rng_seed(7)
    result = estimate_log_marginal(model, None, data, num_masks=3)
    pyro.set_rng_seed(7)
    seeds = torch.randint(0, 2**32, (3,), dtype=torch.int64).tolist()
    for seed, draw in zip(seeds, result.draws.tolist()):
        torch.manual_seed(seed)
        single = masked_log_prob(dist.MultivariateNormal(loc, covariance), data, num_masks=1)
        assert draw == pytest.approx(float(single.sum()), abs=1e-9)


def test_all_masks_estimate_is_exact_with_zero_stderr():
    model, data, loc, covariance = make_ppca(size=5)
    result = estimate_log_marginal(model, None, data, num_masks="all")
    assert result.stderr == 0.0
    assert result.estimate == pytest.approx(exact_log_marginal(loc, covariance, data), abs=1e-8)


def test_fixed_rate_estimate_differs_from_exact():
    model, data, _, _ = make_ppca(size=6)
    result = estimate_log_marginal(model, None, data, num_masks="all", mask=1)
    # Leave-one-out over coordinates is not the evidence.
    assert abs(result.estimate - result.exact) > 1.0


def test_factorizing_site_has_exact_equal_to_its_log_prob():
    data = torch.randn(10, 4)

    def model(x):
        with pyro.plate("data", 10):
            pyro.sample("x", dist.Normal(0.5, 2.0).expand([4]).to_event(1), obs=x)

    result = estimate_log_marginal(model, None, data, num_masks=2)
    expected = float(dist.Normal(0.5, 2.0).log_prob(data).sum())
    assert result.exact == pytest.approx(expected, abs=1e-10)
    assert result.estimate == pytest.approx(expected, abs=1e-10)
    assert result.stderr == pytest.approx(0.0, abs=1e-10)


def test_exact_is_none_for_a_non_gaussian_latent_model():
    data = torch.bernoulli(torch.full((12, 5), 0.4))
    result = estimate_log_marginal(
        latent_bernoulli_model, latent_bernoulli_guide, data, num_masks=16
    )
    assert result.exact is None
    assert result.stderr > 0  # guide draws vary
    # The site factorizes given z, so the masked draws equal the ordinary ELBO draws.
    assert result.estimate == pytest.approx(result.unmasked, abs=1e-9)


def test_estimate_with_latents_matches_a_hand_computed_elbo_draw():
    data = torch.bernoulli(torch.full((6, 3), 0.5))
    pyro.set_rng_seed(5)
    result = estimate_log_marginal(
        latent_bernoulli_model, latent_bernoulli_guide, data, num_masks=2
    )
    pyro.set_rng_seed(5)
    seeds = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
    torch.manual_seed(seeds[0])
    z = dist.Normal(0.1, 0.9).sample((6,))
    weight = torch.linspace(-1.0, 1.0, 3)
    elbo = (
        dist.Bernoulli(logits=z[:, None] * weight).log_prob(data).sum()
        + dist.Normal(0.0, 1.0).log_prob(z).sum()
        - dist.Normal(0.1, 0.9).log_prob(z).sum()
    )
    assert float(result.draws[0]) == pytest.approx(float(elbo), abs=1e-10)


def test_pointwise_values_sum_to_the_total():
    model, data, _, _ = make_ppca(num_data=12, size=5)
    pyro.set_rng_seed(2)
    pointwise = pointwise_masked_log_prob(model, None, data, num_masks=5)
    pyro.set_rng_seed(2)
    total = estimate_log_marginal(model, None, data, num_masks=5)
    assert pointwise.values["x"].shape == (12,)
    assert pointwise.draws["x"].shape == (5, 12)
    assert pointwise.total() == pytest.approx(total.estimate, abs=1e-9)
    assert float(pointwise.unmasked["x"].sum()) == pytest.approx(total.exact, abs=1e-9)
    assert torch.all(pointwise.stderrs["x"] > 0)


def test_pointwise_values_respect_poutine_mask_and_scale():
    model, data, loc, covariance = make_ppca(num_data=6, size=4)
    keep = torch.tensor([True, False, True, True, False, True])

    def masked_model(x):
        with poutine.scale(scale=2.0), poutine.mask(mask=keep):
            model(x)

    pointwise = pointwise_masked_log_prob(masked_model, None, data, num_masks="all")
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

    result = estimate_log_marginal(two_site_model, None, data, num_masks="all", sites=["x"])
    expected = exact_log_marginal(loc, covariance, data) + float(
        dist.Normal(0.0, 1.0).log_prob(extra).sum()
    )
    assert result.estimate == pytest.approx(expected, abs=1e-8)


def test_enumerated_latent_gives_the_exact_evidence_with_every_mask():
    model, data, exact = make_bernoulli_mixture()
    result = estimate_log_marginal(model, None, data, num_masks="all", integrate=("z",))
    assert result.exact == pytest.approx(exact, abs=1e-10)
    assert result.estimate == pytest.approx(exact, abs=1e-10)
    assert result.stderr == 0.0
    curve = mask_rate_curve(model, None, data, num_masks="all", integrate=("z",))
    assert curve.area == pytest.approx(exact, abs=1e-10)
    # Not Gaussian, yet the evidence is exact: the fixed-rate bias is available too.
    bias = fixed_rate_bias(model, None, data, rates=[0.25, 1.0], integrate=("z",))
    assert bias.bias[0] > 0 > bias.bias[1]


def test_enumerated_latent_random_masks_agree_with_the_evidence():
    model, data, exact = make_bernoulli_mixture(num_data=20, size=6)
    result = estimate_log_marginal(model, None, data, num_masks=64, integrate=("z",))
    assert result.exact == pytest.approx(exact, abs=1e-10)
    assert abs(result.estimate - exact) < 4 * result.stderr


def test_sampled_latent_has_no_exact_value_and_tracks_the_importance_weighted_bound():
    data = torch.bernoulli(torch.full((10, 5), 0.4))
    result = estimate_log_marginal(
        latent_bernoulli_model,
        None,
        data,
        num_masks=32,
        integrate=("z",),
        num_samples=64,
    )
    assert result.exact is None
    # Over masks, cumulative masking with fixed samples averages to the bound log sum_k w_k
    # p(x | z_k) on the same samples, which ``unmasked`` holds.
    assert abs(result.estimate - result.unmasked) < 4 * result.stderr
    with pytest.raises(ValueError, match="latent sites"):
        estimate_log_marginal(
            latent_bernoulli_model, None, data, num_masks="all", integrate=("z",), num_samples=8
        )
