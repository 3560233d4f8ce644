"""Tests of the diagnostics: draws: seeding, argument checks and what the traces give."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from diagnostic_models import (
    latent_bernoulli_guide,
    latent_bernoulli_model,
    make_ppca,
    univariate_model,
)

from pyro_masked import (
    coordinate_log_predictive,
    estimate_log_marginal,
    fixed_rate_bias,
    mask_rate_curve,
    pointwise_masked_log_prob,
)


def test_a_seed_leaves_the_global_random_state_untouched():
    model, data, _, _ = make_ppca(num_data=10, size=4)
    guide_model, guide_data = latent_bernoulli_model, torch.ones(4, 3)
    before = torch.get_rng_state()
    first = estimate_log_marginal(model, model_args=(data,), num_draws=4, seed=3)
    with_latents = estimate_log_marginal(
        guide_model, latent_bernoulli_guide, model_args=(guide_data,), num_draws=3, seed=3
    )
    assert torch.equal(torch.get_rng_state(), before)
    # The result depends on the seed alone, not on the global state.
    torch.manual_seed(12345)
    second = estimate_log_marginal(model, model_args=(data,), num_draws=4, seed=3)
    again = estimate_log_marginal(
        guide_model, latent_bernoulli_guide, model_args=(guide_data,), num_draws=3, seed=3
    )
    assert torch.equal(first.draws, second.draws)
    assert torch.equal(with_latents.draws, again.draws)
    assert len(set(first.draws.tolist())) == 4  # independent masks per draw
    other = estimate_log_marginal(model, model_args=(data,), num_draws=4, seed=4)
    assert not torch.equal(first.draws, other.draws)


def test_without_a_seed_the_global_seed_makes_results_reproducible():
    model, data, _, _ = make_ppca(num_data=10, size=4)
    pyro.set_rng_seed(3)
    first = estimate_log_marginal(model, model_args=(data,), num_draws=4)
    pyro.set_rng_seed(3)
    second = estimate_log_marginal(model, model_args=(data,), num_draws=4)
    assert torch.equal(first.draws, second.draws)


def keyword_recording_model(received):
    """A model whose keyword arguments share names with the diagnostics' options."""
    _, data, loc, covariance = make_ppca(num_data=5, size=3)

    def model(x=None, mask=None, sites=None, num_samples=None, num_masks=None, seed=None):
        received.append((mask, sites, num_samples, num_masks, seed))
        with pyro.plate("data", 5):
            pyro.sample("x", dist.MultivariateNormal(loc, covariance), obs=x)

    return model, data


@pytest.mark.parametrize(
    "diagnostic",
    [
        estimate_log_marginal,
        pointwise_masked_log_prob,
        mask_rate_curve,
        fixed_rate_bias,
        coordinate_log_predictive,
    ],
)
def test_model_keywords_named_like_options_reach_the_model(diagnostic):
    received = []
    model, data = keyword_recording_model(received)
    keywords = {"x": data, "mask": "m", "sites": "s", "num_samples": 7, "num_masks": 5, "seed": 1}
    options = {} if diagnostic is coordinate_log_predictive else {"num_draws": 2}
    diagnostic(model, model_kwargs=keywords, **options)
    assert received and set(received) == {("m", "s", 7, 5, 1)}


def test_model_arguments_must_be_a_tuple_and_a_dict():
    model, data, _, _ = make_ppca(num_data=3, size=3)
    with pytest.raises(TypeError, match=r"model_args must be a tuple.*model_args=\(data,\)"):
        estimate_log_marginal(model, model_args=data)
    with pytest.raises(TypeError, match="model_kwargs must be a dict"):
        mask_rate_curve(model, model_args=(data,), model_kwargs=[data])
    with pytest.raises(TypeError, match="positional"):
        estimate_log_marginal(model, None, data)


def subsampled_model(x):
    with pyro.plate("data", x.shape[0], subsample_size=4) as index:
        pyro.sample("x", dist.MultivariateNormal(torch.zeros(3), torch.eye(3)), obs=x[index])


@pytest.mark.parametrize(
    "diagnostic, options",
    [
        (estimate_log_marginal, {"num_masks": "all"}),
        (estimate_log_marginal, {"num_draws": 4}),
        (pointwise_masked_log_prob, {"num_draws": 4}),
        (mask_rate_curve, {"num_masks": "all"}),
        (fixed_rate_bias, {}),
        (coordinate_log_predictive, {}),
    ],
)
def test_a_subsampled_plate_is_refused_naming_it(diagnostic, options):
    data = torch.randn(10, 3)
    with pytest.raises(ValueError, match="'x'.*plate 'data'.*subsamples 4 of its 10"):
        diagnostic(subsampled_model, model_args=(data,), **options)


def test_model_without_a_maskable_site_is_rejected():
    data = torch.randn(5)
    for call in (estimate_log_marginal, mask_rate_curve, pointwise_masked_log_prob):
        with pytest.raises(ValueError, match="no maskable observed site"):
            call(univariate_model, model_args=(data,), num_draws=2)
    with pytest.raises(ValueError, match="no maskable observed site"):
        fixed_rate_bias(univariate_model, model_args=(data,))


def test_nan_data_is_rejected_naming_the_site():
    model, data, _, _ = make_ppca(num_data=3, size=3)
    data[1, 2] = math.nan
    with pytest.raises(ValueError, match="'x'.*NaN"):
        estimate_log_marginal(model, model_args=(data,), num_draws=2)


def test_bad_num_draws_and_num_masks_are_rejected_by_name():
    model, data, _, _ = make_ppca(num_data=3, size=3)
    with pytest.raises(ValueError, match="num_draws must be >= 2"):
        estimate_log_marginal(model, model_args=(data,), num_draws=1)
    with pytest.raises(TypeError, match="num_draws"):
        mask_rate_curve(model, model_args=(data,), num_draws=2.5)
    with pytest.raises(ValueError, match="num_masks"):
        pointwise_masked_log_prob(model, model_args=(data,), num_masks=0)
    with pytest.raises(ValueError, match="num_masks"):
        fixed_rate_bias(model, model_args=(data,), num_masks="some")


def test_every_mask_with_sampled_latents_still_draws_the_guide():
    data = torch.ones(3, 2)
    result = estimate_log_marginal(
        latent_bernoulli_model,
        latent_bernoulli_guide,
        model_args=(data,),
        num_masks="all",
        num_draws=3,
    )
    # The masks are averaged exactly inside a draw; the guide's samples remain random.
    assert result.num_draws == 3 and result.stderr > 0


def test_learnable_parameters_and_autoguide_leave_no_graphs_or_warnings():
    from pyro.infer.autoguide import AutoNormal

    data = torch.randn(8, 3)

    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        scale = pyro.param("scale", torch.ones(3), constraint=dist.constraints.positive)
        with pyro.plate("data", 8):
            pyro.sample("x", dist.MultivariateNormal(loc, torch.diag(scale**2) + 0.5), obs=x)

    guide = AutoNormal(model)
    result = estimate_log_marginal(model, guide, model_args=(data,), num_draws=4)
    assert result.exact is None and math.isfinite(result.estimate)
    assert not result.draws.requires_grad
    pointwise = pointwise_masked_log_prob(model, guide, model_args=(data,), num_draws=2)
    assert not pointwise.values["x"].requires_grad
    assert not pointwise.unmasked["x"].requires_grad


def test_num_samples_without_integrate_is_rejected():
    model, data, _, _ = make_ppca(num_data=3, size=3)
    with pytest.raises(ValueError, match="integrate"):
        estimate_log_marginal(model, model_args=(data,), num_draws=2, num_samples=8)
