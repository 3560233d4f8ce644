"""Tests of the evidence diagnostics: estimates, the masking-rate curve, fixed-rate bias,
pointwise output and the ArviZ export."""

import math
import sys
import warnings

import matplotlib
import pyro
import pyro.distributions as dist
import pytest
import torch
from oracles import conditional_log_density, expected_masked_score, random_spd
from pyro import poutine

from pyro_masked import (
    coordinate_log_predictive,
    estimate_log_marginal,
    fixed_rate_bias,
    mask_rate_curve,
    masked_log_prob,
    pointwise_masked_log_prob,
    to_inference_data,
)

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def one_thread():
    """The matrices here are tiny: several threads only add synchronisation overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_ppca(num_data=30, size=6, rank=2, seed=1):
    """A PPCA model with fixed parameters, its data, and its covariance."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(size, rank, generator=generator)
    covariance = weight @ weight.T + 0.3 * torch.eye(size)
    loc = torch.randn(size, generator=generator)
    data = torch.distributions.MultivariateNormal(loc, covariance).sample((num_data,))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.MultivariateNormal(loc, covariance), obs=x)

    return model, data, loc, covariance


def exact_log_marginal(loc, covariance, data):
    return float(dist.MultivariateNormal(loc, covariance).log_prob(data).sum())


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


def test_estimate_does_not_disturb_or_depend_on_more_than_the_global_seed():
    model, data, _, _ = make_ppca()
    pyro.set_rng_seed(3)
    first = estimate_log_marginal(model, None, data, num_masks=4)
    pyro.set_rng_seed(3)
    second = estimate_log_marginal(model, None, data, num_masks=4)
    assert torch.equal(first.draws, second.draws)
    assert len(set(first.draws.tolist())) == 4  # independent masks per draw


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


def latent_bernoulli_model(x):
    """Local latents with Bernoulli observations: log p(x) has no closed form."""
    weight = torch.linspace(-1.0, 1.0, x.shape[-1])
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        logits = z.unsqueeze(-1) * weight
        pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def latent_bernoulli_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.1, 0.9))


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


def test_full_grid_area_equals_the_cumulative_estimate_with_the_same_masks():
    model, data, _, _ = make_ppca(size=7)
    pyro.set_rng_seed(11)
    curve = mask_rate_curve(model, None, data, num_masks=6)
    pyro.set_rng_seed(11)
    estimate = estimate_log_marginal(model, None, data, num_masks=6)
    assert curve.rates.tolist() == pytest.approx([m / 7 for m in range(1, 8)])
    assert curve.mask_sizes["x"]["sizes"] == list(range(1, 8))
    assert curve.area == pytest.approx(estimate.estimate, abs=1e-9)
    assert curve.area_stderr == pytest.approx(estimate.stderr, abs=1e-9)
    assert curve.scores.sum() == pytest.approx(curve.area, abs=1e-9)
    assert curve.estimates == pytest.approx(7 * curve.scores, abs=1e-9)


def test_all_masks_area_equals_exact_log_marginal():
    model, data, loc, covariance = make_ppca(size=6)
    curve = mask_rate_curve(model, None, data, num_masks="all")
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
    coarse = mask_rate_curve(model, None, data, rates=[0.5, 1.0], num_masks="all")
    full = mask_rate_curve(model, None, data, num_masks="all")
    # Sizes 1..3 take S(3), sizes 4..6 take S(6).
    expected = 3 * float(full.scores[2]) + 3 * float(full.scores[5])
    assert coarse.area == pytest.approx(expected, abs=1e-9)
    assert coarse.scores == pytest.approx(full.scores[[2, 5]], abs=1e-9)


def test_fixed_rate_bias_matches_the_enumeration_oracle():
    model, data, loc, covariance = make_ppca(num_data=3, size=5)
    result = fixed_rate_bias(model, None, data, rates=[0.2, 0.6, 1.0], num_masks="all")
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
    exact = fixed_rate_bias(model, None, data, num_masks="all")
    monte_carlo = fixed_rate_bias(model, None, data, num_masks=100)
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
        model, None, data, rates=[1 / 18, 0.5, 1.0], num_masks="auto", monte_carlo_masks=8
    )
    # C(18, 9) = 48620 masks is past the enumeration limit: Monte Carlo there.
    assert result.exact_rates.tolist() == [True, False, True]
    assert result.stderr[0] == 0 and result.stderr[1] > 0 and result.stderr[2] == 0


def test_fixed_rate_bias_needs_a_known_evidence():
    data = torch.bernoulli(torch.full((5, 4), 0.5))
    with pytest.raises(ValueError, match="latent sites"):
        fixed_rate_bias(latent_bernoulli_model, latent_bernoulli_guide, data)


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


def import_arviz_or_skip():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ArviZ is undergoing", category=FutureWarning)
        return pytest.importorskip("arviz")


def test_inference_data_export_has_a_log_likelihood_group():
    arviz = import_arviz_or_skip()
    model, data, _, _ = make_ppca(num_data=7, size=4)
    pointwise = pointwise_masked_log_prob(model, None, data, num_masks=3)
    idata = pointwise.as_inference_data()
    assert isinstance(idata, arviz.InferenceData)
    log_likelihood = idata.log_likelihood["x"]
    assert log_likelihood.shape == (1, 3, 7)
    assert log_likelihood.values[0] == pytest.approx(pointwise.draws["x"].numpy())
    assert idata.observed_data["x"].values == pytest.approx(data.numpy())


def test_inference_data_export_without_arviz_says_how_to_install(monkeypatch):
    model, data, _, _ = make_ppca(num_data=3, size=3)
    pointwise = pointwise_masked_log_prob(model, None, data, num_masks=2)
    monkeypatch.setitem(sys.modules, "arviz", None)  # makes `import arviz` raise ImportError
    with pytest.raises(ImportError, match="pip install arviz"):
        to_inference_data(pointwise)


def univariate_model(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)


@pytest.mark.parametrize("rates", [[0.0, 0.5], [0.5, 1.5], [-0.1], [math.nan], [0.5, 0.3]])
def test_rates_outside_the_unit_interval_or_unordered_are_rejected(rates):
    model, data, _, _ = make_ppca(num_data=3, size=3)
    with pytest.raises(ValueError, match="rates"):
        mask_rate_curve(model, None, data, rates=rates, num_masks=2)
    with pytest.raises(ValueError, match="rates"):
        fixed_rate_bias(model, None, data, rates=rates)


def test_empty_grid_is_rejected():
    model, data, _, _ = make_ppca(num_data=3, size=3)
    with pytest.raises(ValueError, match="rates is empty"):
        mask_rate_curve(model, None, data, rates=[], num_masks=2)
    with pytest.raises(TypeError, match="rates"):
        mask_rate_curve(model, None, data, rates=0.5, num_masks=2)


def test_model_without_a_maskable_site_is_rejected():
    data = torch.randn(5)
    for call in (estimate_log_marginal, mask_rate_curve, pointwise_masked_log_prob):
        with pytest.raises(ValueError, match="no maskable observed site"):
            call(univariate_model, None, data, num_masks=2)
    with pytest.raises(ValueError, match="no maskable observed site"):
        fixed_rate_bias(univariate_model, None, data)


def test_nan_data_is_rejected_naming_the_site():
    model, data, _, _ = make_ppca(num_data=3, size=3)
    data[1, 2] = math.nan
    with pytest.raises(ValueError, match="'x'.*NaN"):
        estimate_log_marginal(model, None, data, num_masks=2)


def test_bad_num_masks_is_rejected():
    model, data, _, _ = make_ppca(num_data=3, size=3)
    with pytest.raises(ValueError, match="num_masks must be >= 2"):
        estimate_log_marginal(model, None, data, num_masks=1)
    with pytest.raises(TypeError, match="num_masks"):
        mask_rate_curve(model, None, data, num_masks=2.5)
    with pytest.raises(ValueError, match="latent sites"):
        estimate_log_marginal(
            latent_bernoulli_model,
            latent_bernoulli_guide,
            torch.ones(3, 2),
            num_masks="all",
        )


def test_plots_return_axes():
    import matplotlib.pyplot as plt

    model, data, _, _ = make_ppca(num_data=5, size=4)
    curve = mask_rate_curve(model, None, data, num_masks="all")
    bias = fixed_rate_bias(model, None, data)
    for result in (curve, bias):
        ax = result.plot()
        assert isinstance(ax, matplotlib.axes.Axes)
        assert ax.get_xlabel() == "masking rate"
    _, ax = plt.subplots()
    assert curve.plot(ax=ax) is ax
    plt.close("all")


def test_learnable_parameters_and_autoguide_leave_no_graphs_or_warnings():
    from pyro.infer.autoguide import AutoNormal

    data = torch.randn(8, 3)

    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        scale = pyro.param("scale", torch.ones(3), constraint=dist.constraints.positive)
        with pyro.plate("data", 8):
            pyro.sample("x", dist.MultivariateNormal(loc, torch.diag(scale**2) + 0.5), obs=x)

    guide = AutoNormal(model)
    result = estimate_log_marginal(model, guide, data, num_masks=4)
    assert result.exact is None and math.isfinite(result.estimate)
    assert not result.draws.requires_grad
    pointwise = pointwise_masked_log_prob(model, guide, data, num_masks=2)
    assert not pointwise.values["x"].requires_grad
    assert not pointwise.unmasked["x"].requires_grad


def test_coordinate_log_predictive_matches_one_conditioning_per_coordinate():
    model, data, loc, covariance = make_ppca(num_data=4, size=5)
    values = coordinate_log_predictive(model, None, data)["x"]
    assert values.shape == (4, 5)
    for n in range(4):
        for j in range(5):
            others = [i for i in range(5) if i != j]
            oracle = conditional_log_density(covariance, data[n] - loc, j, others)
            assert float(values[n, j]) == pytest.approx(float(oracle), abs=1e-10)
    # Summed over coordinates: the masked score at size 1 (leave-one-out), D S(x; 1).
    size_one = masked_log_prob(
        dist.MultivariateNormal(loc, covariance), data, mask=1, num_masks="all"
    )
    assert values.sum(-1) == pytest.approx(size_one, abs=1e-10)


def test_coordinate_log_predictive_of_a_factorizing_site_is_its_marginal():
    data = torch.randn(3, 4)

    def model(x):
        with pyro.plate("data", 3), poutine.mask(mask=torch.tensor([True, False, True])):
            pyro.sample("x", dist.Normal(0.0, 2.0).expand([4]).to_event(1), obs=x)

    values = coordinate_log_predictive(model, None, data)["x"]
    expected = dist.Normal(0.0, 2.0).log_prob(data)
    expected[1] = 0.0
    assert values == pytest.approx(expected, abs=1e-12)


def test_coordinate_log_predictive_rejects_unknown_sites_and_univariate_models():
    model, data, _, _ = make_ppca(num_data=3, size=3)
    with pytest.raises(ValueError, match="'y'"):
        coordinate_log_predictive(model, None, data, sites=["y"])
    with pytest.raises(ValueError, match="no maskable observed site"):
        coordinate_log_predictive(univariate_model, None, torch.randn(4))


@pytest.mark.parametrize("size", [5, 13, 30])
def test_a_point_of_the_curve_is_what_a_fixed_rate_optimises(size):
    from pyro_masked import FixedRate
    from pyro_masked.diagnostics import RateSize

    for rate in [0.1, 0.15, 0.5, 0.8, 0.95]:
        assert RateSize(rate).mask_size(size) == FixedRate(rate).mask_size(size)
    assert RateSize(1.0).mask_size(size) == size


def test_curve_points_equal_fixed_rate_estimates():
    model, data, _, _ = make_ppca(size=6)
    curve = mask_rate_curve(model, None, data, rates=[0.15, 0.5, 0.8], num_masks="all")
    for rate, value in zip([0.15, 0.5, 0.8], curve.estimates.tolist()):
        fixed = estimate_log_marginal(model, None, data, num_masks="all", mask=rate)
        assert value == pytest.approx(fixed.estimate, abs=1e-9)


def make_bernoulli_mixture(num_data=6, size=4, seed=2):
    """Binary vectors from a 3-component Bernoulli mixture: log p(x) by summing over z."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.tensor([0.2, 0.5, 0.3])
    probs = torch.rand(3, size, generator=generator)
    data = torch.bernoulli(torch.full((num_data, size), 0.5), generator=generator)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(mixing))
            pyro.sample("x", dist.Bernoulli(probs[z]).to_event(1), obs=x)

    joint = dist.Bernoulli(probs).to_event(1).log_prob(data[:, None, :]) + mixing.log()
    return model, data, float(joint.logsumexp(-1).sum())


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


def test_num_samples_without_integrate_is_rejected():
    model, data, _, _ = make_ppca(num_data=3, size=3)
    with pytest.raises(ValueError, match="integrate"):
        estimate_log_marginal(model, None, data, num_masks=2, num_samples=8)
