"""Tests of the diagnostics: leave-one-coordinate-out predictives."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from diagnostic_models import make_ppca, univariate_model
from oracles import conditional_log_density, random_spd
from pyro import poutine

from pyro_masked import coordinate_log_predictive, masked_log_prob


def test_coordinate_log_predictive_matches_one_conditioning_per_coordinate():
    model, data, loc, covariance = make_ppca(num_data=4, size=5)
    values = coordinate_log_predictive(model, model_args=(data,))["x"]
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

    values = coordinate_log_predictive(model, model_args=(data,))["x"]
    expected = dist.Normal(0.0, 2.0).log_prob(data)
    expected[1] = 0.0
    assert values == pytest.approx(expected, abs=1e-12)


def test_coordinate_log_predictive_rejects_unknown_sites_and_univariate_models():
    model, data, _, _ = make_ppca(num_data=3, size=3)
    with pytest.raises(ValueError, match="'y'"):
        coordinate_log_predictive(model, model_args=(data,), sites=["y"])
    with pytest.raises(ValueError, match="no maskable observed site"):
        coordinate_log_predictive(univariate_model, model_args=(torch.randn(4),))


def leave_one_out_oracle(covariance, residual):
    """log p(x_j | x_{-j}) of one vector, one explicit conditioning per coordinate."""
    size = residual.shape[-1]
    return torch.stack(
        [
            conditional_log_density(covariance, residual, j, [i for i in range(size) if i != j])
            for j in range(size)
        ]
    )


@pytest.mark.parametrize("shared_covariance", [True, False])
def test_independent_copies_of_a_gaussian_are_conditioned_within_each_copy(shared_covariance):
    generator = torch.Generator().manual_seed(3)
    copies, size = 3, 4
    covariances = torch.stack([random_spd(size, generator) for _ in range(copies)])
    data = torch.randn(2, copies, size, generator=generator)
    if shared_covariance:
        covariances = covariances[:1].expand(copies, size, size)
        base = dist.MultivariateNormal(torch.zeros(size), covariances[0]).expand([copies])
    else:
        base = dist.MultivariateNormal(torch.zeros(size), covariances)

    def model(x):
        with pyro.plate("data", 2):
            pyro.sample("x", base.to_event(1), obs=x)

    values = coordinate_log_predictive(model, model_args=(data,))["x"]
    assert values.shape == (2, copies, size)
    for n in range(2):
        for c in range(copies):
            expected = leave_one_out_oracle(covariances[c], data[n, c])
            assert values[n, c] == pytest.approx(expected, abs=1e-10)


def test_multi_output_contrib_gp_model_gets_each_outputs_leave_one_out():
    from pyro.contrib.gp.kernels import RBF
    from pyro.contrib.gp.models import GPRegression

    generator = torch.Generator().manual_seed(5)
    inputs = torch.linspace(0.0, 3.0, 6)
    outputs = torch.randn(2, 6, generator=generator)
    kernel = RBF(input_dim=1, variance=torch.tensor(1.5), lengthscale=torch.tensor(0.8))
    gp = GPRegression(inputs, outputs, kernel, noise=torch.tensor(0.2))
    values = coordinate_log_predictive(gp.model)["y"]
    covariance = kernel(inputs).detach() + (0.2 + gp.jitter) * torch.eye(6)
    for output in range(2):
        expected = leave_one_out_oracle(covariance, outputs[output])
        assert values[output] == pytest.approx(expected, abs=1e-8)


def test_a_masked_gaussian_scores_zero_where_its_mask_is_off():
    model, data, loc, covariance = make_ppca(num_data=4, size=3)
    keep = torch.tensor([True, False, True, False])

    def masked_model(x):
        with pyro.plate("data", 4):
            pyro.sample("x", dist.MultivariateNormal(loc, covariance).mask(keep), obs=x)

    values = coordinate_log_predictive(masked_model, model_args=(data,))["x"]
    full = coordinate_log_predictive(model, model_args=(data,))["x"]
    assert torch.all(values[~keep] == 0)
    assert values[keep] == pytest.approx(full[keep], abs=1e-12)
