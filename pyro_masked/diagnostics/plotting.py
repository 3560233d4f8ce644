"""Figures of the masking-rate curve and of the fixed-rate bias (matplotlib, imported lazily)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from pyro_masked.diagnostics.rates import FixedRateBias, MaskRateCurve

__all__ = ["plot_fixed_rate_bias", "plot_mask_rate_curve"]


def _new_axes(ax):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=(6, 3.5))
    return ax


def plot_mask_rate_curve(curve: MaskRateCurve, ax=None):
    """Draw the fixed-rate estimate :math:`D\\,S(x; m)` against the rate, area shaded.

    Each rate stands for the rates from the previous grid point (or 0) up to it, so the
    shaded steps have area ``area`` (exactly so for one masked site); a horizontal line
    marks the exact :math:`\\log p(x)` when known — the height of the rectangle on
    ``(0, 1]`` with that area.

    :param curve: the result of :func:`~pyro_masked.mask_rate_curve`.
    :param ax: a matplotlib Axes; a new figure's Axes when omitted.
    :returns: the Axes.
    """
    ax = _new_axes(ax)
    rates = curve.rates.tolist()
    edges = [0.0] + rates[:-1] + [1.0]
    heights = curve.estimates.tolist()
    ax.stairs(heights, edges, fill=True, alpha=0.3, label=f"area = {curve.area:.3f}")
    ax.errorbar(
        rates, heights, yerr=(2 * curve.estimate_stderrs).tolist(), fmt="o", ms=3, color="C0"
    )
    if curve.exact is not None:
        ax.axhline(
            curve.exact, color="k", ls="--", lw=1, label=f"exact log p(x) = {curve.exact:.3f}"
        )
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(*_padded_limits(heights, curve.exact))
    ax.set_xlabel("masking rate")
    ax.set_ylabel("fixed-rate estimate  D·S(x; m)")
    ax.legend(loc="best", fontsize="small")
    return ax


def _padded_limits(heights: list, exact: Optional[float]) -> tuple[float, float]:
    """Y limits around the curve (and the exact value): the shading runs to zero off-screen."""
    values = heights + ([exact] if exact is not None else [])
    low, high = min(values), max(values)
    pad = 0.08 * (high - low) if high > low else 0.05 * abs(high) + 1.0
    return low - pad, high + pad


def plot_fixed_rate_bias(bias: FixedRateBias, ax=None):
    """Draw the bias against the masking rate, with two-standard-error bars.

    :param bias: the result of :func:`~pyro_masked.fixed_rate_bias`.
    :param ax: a matplotlib Axes; a new figure's Axes when omitted.
    :returns: the Axes.
    """
    ax = _new_axes(ax)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.errorbar(
        bias.rates.tolist(),
        bias.bias.tolist(),
        yerr=(2 * bias.stderr).tolist(),
        fmt="o-",
        ms=3,
        capsize=2,
    )
    ax.set_xlabel("masking rate")
    ax.set_ylabel("bias  D·S(x; m) − log p(x)")
    return ax
