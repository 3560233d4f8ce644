from importlib import resources

import torch

from pyro_masked.datasets import load_mauna_loa_co2


def test_mauna_loa_co2_is_the_monthly_record_1958_to_2001():
    data = load_mauna_loa_co2()
    assert data.year.shape == data.co2.shape == (521,)
    assert data.year.dtype == torch.float64  # the default dtype in the tests
    assert 1958 < data.year.min() < 1958.5 and 2001.9 < data.year.max() < 2002
    assert (data.year.diff() > 0).all()
    assert (data.year < 1991).sum() == 389  # training months of the main job
    # CO2 rose from about 315 ppm to about 370 ppm, with a seasonal swing of a few ppm.
    assert 312 < data.co2.min() < 318 and 368 < data.co2.max() < 375
    yearly_rise = (data.co2[-12:].mean() - data.co2[12:24].mean()) / 42
    assert 0.8 < yearly_rise < 1.8


def test_dtype_option():
    assert load_mauna_loa_co2(dtype=torch.float32).co2.dtype == torch.float32


def test_the_source_and_licence_ship_with_the_data():
    readme = resources.files("pyro_masked.datasets").joinpath("README.md").read_text()
    assert "mauna_loa_co2_monthly.csv" in readme
    assert "Public domain" in readme and "Keeling" in readme
