"""Tests of the diagnostics: the figures."""

import matplotlib
from diagnostic_models import make_ppca

from pyro_masked import fixed_rate_bias, mask_rate_curve

matplotlib.use("Agg")


def test_plots_return_axes():
    import matplotlib.pyplot as plt

    model, data, _, _ = make_ppca(num_data=5, size=4)
    curve = mask_rate_curve(model, model_args=(data,), num_masks="all")
    bias = fixed_rate_bias(model, model_args=(data,))
    for result in (curve, bias):
        ax = result.plot()
        assert isinstance(ax, matplotlib.axes.Axes)
        assert ax.get_xlabel() == "masking rate"
    _, ax = plt.subplots()
    assert curve.plot(ax=ax) is ax
    plt.close("all")
