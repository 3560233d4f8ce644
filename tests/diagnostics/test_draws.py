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
    estimate_log_marginal,
    fixed_rate_bias,
    mask_rate_curve,
    pointwise_masked_log_prob,
)


def test_estimate_does_not_disturb_or_depend_on_more_than_the_global_seed():
    model, data, _, _ = make_ppca()
    pyro.set_rng_seed(3)
    first = estimate_log_marginal(model, None, data, num_masks=4)
    pyro.set_rng_seed(3)
    second = estimate_log_marginal(model, None, data, num_masks=4)
    assert torch.equal(first.draws, second.draws)
    assert len(set(first.draws.tolist())) == 4  # independent masks per draw


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


def test_num_samples_without_integrate_is_rejected():
    model, data, _, _ = make_ppca(num_data=3, size=3)
    with pytest.raises(ValueError, match="integrate"):
        estimate_log_marginal(model, None, data, num_masks=2, num_samples=8)
