"""Tests of the diagnostics: leave-one-coordinate-out predictives."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from diagnostic_models import make_ppca, univariate_model
from oracles import conditional_log_density
from pyro import poutine

from pyro_masked import coordinate_log_predictive, masked_log_prob


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
