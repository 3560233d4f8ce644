"""Tests of the diagnostics: the ArviZ export."""

import sys
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from diagnostic_models import make_ppca

from pyro_masked import pointwise_masked_log_prob, to_inference_data


def import_arviz_or_skip():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ArviZ is undergoing", category=FutureWarning)
        return pytest.importorskip("arviz")


def test_masked_draws_go_to_their_own_group_and_loo_refuses_without_a_posterior():
    arviz = import_arviz_or_skip()
    model, data, _, _ = make_ppca(num_data=7, size=4)
    pointwise = pointwise_masked_log_prob(model, model_args=(data,), num_draws=3)
    idata = pointwise.as_inference_data()
    assert isinstance(idata, arviz.InferenceData)
    masked = idata.masked_log_predictive["x"]
    assert masked.shape == (1, 3, 7)
    assert masked.values[0] == pytest.approx(pointwise.draws["x"].numpy())
    assert idata.observed_data["x"].values == pytest.approx(data.numpy())
    # Mask draws are not posterior draws: no log_likelihood group, so loo cannot misread them.
    assert "log_likelihood" not in idata.groups()
    with pytest.raises(TypeError, match="log likelihood not found"):
        arviz.loo(idata)
    summary = arviz.summary(idata, group="masked_log_predictive", kind="stats")
    assert summary["mean"].to_numpy() == pytest.approx(pointwise.values["x"].numpy(), abs=1e-3)


def test_loo_on_guide_draws_matches_the_exact_leave_one_out_predictive():
    arviz = import_arviz_or_skip()
    generator = torch.Generator().manual_seed(0)
    size, num_data = 2, 8
    noise = torch.tensor([[1.0, 0.3], [0.3, 0.5]])
    data = torch.randn(num_data, size, generator=generator) + 1.0

    def model(x):
        mean = pyro.sample("mean", dist.MultivariateNormal(torch.zeros(size), torch.eye(size)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.MultivariateNormal(mean, noise), obs=x)

    def posterior(x):
        """The conjugate posterior of the mean given the vectors x."""
        precision = torch.eye(size) + x.shape[0] * torch.linalg.inv(noise)
        covariance = torch.linalg.inv(precision)
        return covariance @ torch.linalg.solve(noise, x.sum(0)), covariance

    def guide(x):
        loc, covariance = posterior(x)
        pyro.sample("mean", dist.MultivariateNormal(loc, covariance))

    # The guide is the exact posterior, so PSIS-LOO over its draws estimates the exact
    # leave-one-out predictive log p(x_n | x_-n) = log N(x_n; m_-n, noise + S_-n).
    pointwise = pointwise_masked_log_prob(
        model, guide, model_args=(data,), num_draws=200, mask_groups=None, seed=0
    )
    assert pointwise.posterior_draws
    idata = to_inference_data(pointwise)
    assert idata.log_likelihood["x"].shape == (1, 200, num_data)
    assert idata.posterior["mean"].shape == (1, 200, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's notes on a single chain
        elpd = float(arviz.loo(idata).elpd_loo)
    exact = 0.0
    for n in range(num_data):
        rest = torch.cat([data[:n], data[n + 1 :]])
        loc, covariance = posterior(rest)
        exact += float(dist.MultivariateNormal(loc, noise + covariance).log_prob(data[n]))
    # Within a few Monte Carlo errors; the in-sample lppd would be about p_loo = 2 nats higher.
    assert elpd == pytest.approx(exact, abs=0.3)


def test_inference_data_export_without_arviz_says_how_to_install(monkeypatch):
    model, data, _, _ = make_ppca(num_data=3, size=3)
    pointwise = pointwise_masked_log_prob(model, model_args=(data,), num_draws=2)
    monkeypatch.setitem(sys.modules, "arviz", None)  # makes `import arviz` raise ImportError
    with pytest.raises(ImportError, match="pip install arviz"):
        to_inference_data(pointwise)
