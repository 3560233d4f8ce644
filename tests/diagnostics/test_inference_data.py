"""Tests of the diagnostics: the ArviZ export."""

import sys
import warnings

import pytest
from diagnostic_models import make_ppca

from pyro_masked import pointwise_masked_log_prob, to_inference_data


def import_arviz_or_skip():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ArviZ is undergoing", category=FutureWarning)
        return pytest.importorskip("arviz")


def test_inference_data_export_has_a_log_likelihood_group():
    arviz = import_arviz_or_skip()
    model, data, _, _ = make_ppca(num_data=7, size=4)
    pointwise = pointwise_masked_log_prob(model, model_args=(data,), num_draws=3)
    idata = pointwise.as_inference_data()
    assert isinstance(idata, arviz.InferenceData)
    log_likelihood = idata.log_likelihood["x"]
    assert log_likelihood.shape == (1, 3, 7)
    assert log_likelihood.values[0] == pytest.approx(pointwise.draws["x"].numpy())
    assert idata.observed_data["x"].values == pytest.approx(data.numpy())


def test_inference_data_export_without_arviz_says_how_to_install(monkeypatch):
    model, data, _, _ = make_ppca(num_data=3, size=3)
    pointwise = pointwise_masked_log_prob(model, model_args=(data,), num_draws=2)
    monkeypatch.setitem(sys.modules, "arviz", None)  # makes `import arviz` raise ImportError
    with pytest.raises(ImportError, match="pip install arviz"):
        to_inference_data(pointwise)
