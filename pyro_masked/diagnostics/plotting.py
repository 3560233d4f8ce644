"""Figures of the masking-rate curve and of the fixed-rate bias (matplotlib, imported lazily).

Both figures share their x axis: the masking rate as a percentage of the coordinates hidden,
with the mask size on a secondary axis when one site is masked, and log densities in nats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from pyro_masked._optional import import_optional

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from pyro_masked.diagnostics.rates import FixedRateBias, MaskRateCurve

__all__ = ["plot_fixed_rate_bias", "plot_mask_rate_curve"]

RATE_LABEL = "masking rate (share of coordinates hidden)"


def _new_axes(ax):
    if ax is not None:
        return ax
    plt = import_optional("matplotlib.pyplot", "plotting a diagnostic")
    _, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    return ax


def _nats(value: float) -> str:
    """A log density for a legend, with the typographic minus the tick labels use."""
    return f"{value:.2f}".replace("-", "\u2212")


def _rate_axis(ax, mask_sizes: dict) -> None:
    """Rates as percentages on (0, 1]; the mask size on top when a single site is masked."""
    from matplotlib.ticker import PercentFormatter

    ax.set_xlim(0.0, 1.0)
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax.set_xlabel(RATE_LABEL)
    # No offset or scientific notation: a reader should read a log density off a tick.
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    if len(mask_sizes) == 1:
        (info,) = mask_sizes.values()
        size = info["event_size"]
        top = ax.secondary_xaxis(
            "top", functions=(lambda rate: rate * size, lambda mask: mask / size)
        )
        top.set_xlabel(f"mask size m (of D = {size} coordinates)")


def plot_mask_rate_curve(curve: MaskRateCurve, ax: Optional[Axes] = None) -> Axes:
    """Draw the fixed-rate estimate :math:`D\\,S(x; m)` against the rate, as steps.

    Each rate stands for the rates from the previous grid point (or 0) up to it, so the area
    under the steps is ``area`` (exactly so for one masked site). When the exact
    :math:`\\log p(x)` is known it is drawn as a dashed line, and the steps are shaded
    against it: above it where the fixed rate over-estimates the evidence, below where it
    under-estimates; the two shaded areas balance when ``area`` equals :math:`\\log p(x)`.
    Random draws add two-standard-error bars.

    :param curve: the result of :func:`~pyro_masked.mask_rate_curve`.
    :param ax: a matplotlib Axes; a new figure's Axes when omitted.
    :returns: the Axes.
    """
    ax = _new_axes(ax)
    rates = curve.rates.tolist()
    edges = [0.0] + rates[:-1] + [1.0]
    heights = curve.estimates.tolist()
    errors = (2 * curve.estimate_stderrs).tolist()
    random = any(error > 0 for error in errors)
    area = f"area = {_nats(curve.area)}"
    if random:
        area += f" \u00b1 {_nats(2 * curve.area_stderr)} (2 s.e.)"
    # No baseline: the outline alone, without drops to zero at the ends.
    ax.stairs(heights, edges, baseline=None, color="C0", lw=1.5, label=f"D\u00b7S(x; m), {area}")
    if curve.exact is not None:
        exact = curve.exact
        ax.axhline(exact, color="k", ls="--", lw=1, label=f"exact log p(x) = {_nats(exact)}")
        over = [max(height, exact) for height in heights]
        under = [min(height, exact) for height in heights]
        ax.stairs(
            over, edges, baseline=exact, fill=True, color="C1", alpha=0.3, lw=0,
            label="over-estimates log p(x)",
        )  # fmt: skip
        ax.stairs(
            under, edges, baseline=exact, fill=True, color="C2", alpha=0.3, lw=0,
            label="under-estimates log p(x)",
        )  # fmt: skip
    if random:
        ax.errorbar(
            rates, heights, yerr=errors, fmt="o", ms=3, color="C0", capsize=2, clip_on=False,
            label="\u00b1 2 standard errors",
        )  # fmt: skip
    else:
        ax.plot(rates, heights, "o", ms=3, color="C0", clip_on=False)
    ax.set_ylim(*_padded_limits(heights, errors, curve.exact))
    ax.set_ylabel("D\u00b7S(x; m)  (nats)")
    _rate_axis(ax, curve.mask_sizes)
    ax.legend(loc="lower left", fontsize="small")
    return ax


def _padded_limits(heights: list, errors: list, exact: Optional[float]) -> tuple[float, float]:
    """Y limits around the curve, its error bars and the exact value."""
    values = [h - e for h, e in zip(heights, errors)] + [h + e for h, e in zip(heights, errors)]
    values += [exact] if exact is not None else []
    low, high = min(values), max(values)
    pad = 0.08 * (high - low) if high > low else 0.05 * abs(high) + 1.0
    return low - pad, high + pad


def plot_fixed_rate_bias(bias: FixedRateBias, ax: Optional[Axes] = None) -> Axes:
    """Draw the bias against the masking rate.

    Rates where every mask was enumerated (exact) are filled markers; Monte Carlo rates are
    open markers with two-standard-error bars.

    :param bias: the result of :func:`~pyro_masked.fixed_rate_bias`.
    :param ax: a matplotlib Axes; a new figure's Axes when omitted.
    :returns: the Axes.
    """
    ax = _new_axes(ax)
    rates, values = bias.rates.tolist(), bias.bias.tolist()
    errors = (2 * bias.stderr).tolist()
    exact = bias.exact_rates.tolist()
    ax.axhline(0.0, color="k", lw=0.8, label="no bias")
    ax.plot(rates, values, "-", color="C0", lw=1)
    if any(exact):
        ax.plot(
            [r for r, e in zip(rates, exact) if e],
            [v for v, e in zip(values, exact) if e],
            "o", ms=4, color="C0", clip_on=False, label="exact (every mask enumerated)",
        )  # fmt: skip
    if not all(exact):
        ax.errorbar(
            [r for r, e in zip(rates, exact) if not e],
            [v for v, e in zip(values, exact) if not e],
            yerr=[s for s, e in zip(errors, exact) if not e],
            fmt="o", ms=4, color="C0", mfc="white", capsize=2, clip_on=False,
            label="Monte Carlo \u00b1 2 standard errors",
        )  # fmt: skip
    ax.set_ylabel("bias  D\u00b7S(x; m) \u2212 log p(x)  (nats)")
    _rate_axis(ax, bias.mask_sizes)
    ax.legend(loc="lower left", fontsize="small")
    return ax
