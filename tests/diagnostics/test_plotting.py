"""Tests of the diagnostics: the figures."""

import matplotlib
import pytest
from diagnostic_models import make_ppca

from pyro_masked import fixed_rate_bias, mask_rate_curve

matplotlib.use("Agg")


@pytest.fixture
def plt():
    import matplotlib.pyplot as pyplot

    yield pyplot
    pyplot.close("all")


def legend_labels(ax):
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_curve_figure_says_what_it_shows(plt):
    model, data, _, _ = make_ppca(num_data=5, size=4)
    exact = mask_rate_curve(model, model_args=(data,), num_masks="all")
    ax = exact.plot()
    assert ax.get_xlabel() == "masking rate (share of coordinates hidden)"
    assert "nats" in ax.get_ylabel()
    assert ax.get_xlim() == (0.0, 1.0)
    labels = legend_labels(ax)
    assert labels[0].startswith("D·S(x; m), area = −")  # typographic minus, as on the ticks
    assert any(label.startswith("exact log p(x)") for label in labels)
    assert {"over-estimates log p(x)", "under-estimates log p(x)"} <= set(labels)
    ax.figure.canvas.draw()
    assert ax.yaxis.get_offset_text().get_text() == ""  # ticks read as plain log densities
    assert ax.xaxis.get_ticklabels()[-1].get_text() == "100%"
    random = mask_rate_curve(model, model_args=(data,), num_draws=3, seed=0)
    _, axes = plt.subplots(1, 2)
    assert random.plot(ax=axes[1]) is axes[1]
    labels = legend_labels(axes[1])
    assert "± 2 standard errors" in labels and "(2 s.e.)" in labels[0]


def test_bias_figure_marks_exact_and_monte_carlo_rates(plt):
    model, data, _, _ = make_ppca(num_data=5, size=18)
    # C(18, 9) masks at rate 0.5 is past the enumeration limit: Monte Carlo there only.
    bias = fixed_rate_bias(
        model, model_args=(data,), rates=[1 / 18, 0.5, 1.0], num_masks="auto", num_draws=3
    )
    assert bias.exact_rates.tolist() == [True, False, True]
    ax = bias.plot()
    assert ax.get_xlabel() == "masking rate (share of coordinates hidden)"
    assert "nats" in ax.get_ylabel()
    assert legend_labels(ax) == [
        "no bias",
        "exact (every mask enumerated)",
        "Monte Carlo ± 2 standard errors",
    ]
