"""The masking-rate curve :math:`m \\mapsto S(x; m)`, its area, and the bias of a fixed rate."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence, Union

import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes

from pyro_masked.conditionals.gaussian import enumeration_fits
from pyro_masked.diagnostics.draws import (
    DEFAULT_NUM_DRAWS,
    EVERY_VECTOR,
    DrawOptions,
    MaskGroups,
    ModelCall,
    check_num_draws,
    check_seed,
    draw_seeds,
    mean_and_stderr,
    run_draws,
)
from pyro_masked.masks import RateSize
from pyro_masked.scoring import NumMasks, check_num_masks

__all__ = ["FixedRateBias", "MaskRateCurve", "fixed_rate_bias", "mask_rate_curve"]

#: Monte Carlo draws per rate where :func:`fixed_rate_bias` cannot enumerate the masks.
DEFAULT_BIAS_DRAWS = 64


@dataclass(frozen=True)
class MaskRateCurve:
    """The result of :func:`mask_rate_curve`: the masked score against the masking rate.

    :ivar rates: the masking rates, shape ``(R,)``.
    :ivar dict mask_sizes: for each masked observed site, the mask size used at each rate.
    :ivar scores: :math:`S(x; m)` at each rate: the mean log predictive density of one hidden
        coordinate, summed over data points and over masked sites, shape ``(R,)``.
    :ivar stderrs: Monte Carlo standard errors of ``scores`` (zeros when nothing is random:
        ``num_masks="all"`` without sampled latent sites).
    :ivar estimates: the fixed-rate estimate at each rate,
        :math:`\\sum_s D_s S_s(x_s; m_s) + c` with :math:`c` the terms that are not masked
        (unmasked sites, and :math:`\\log p(z) - \\log q(z)` of latent sites), shape ``(R,)``.
    :ivar estimate_stderrs: Monte Carlo standard errors of ``estimates``.
    :ivar float area: the area under ``estimates`` over the rate interval ``(0, 1]``, an
        estimate of :math:`\\log p(x)`; with every mask size in the grid it is the cumulative
        estimate :math:`\\sum_m S(x; m)`.
    :ivar float area_stderr: its Monte Carlo standard error.
    :ivar exact: :math:`\\log p(x)` when it is known in closed form, else ``None``.
    :ivar int num_draws: independent draws per rate (the same random numbers at every rate).
    :ivar num_masks: the permutations averaged inside each draw, or ``"all"``.
    """

    rates: torch.Tensor
    mask_sizes: dict
    scores: torch.Tensor
    stderrs: torch.Tensor
    estimates: torch.Tensor
    estimate_stderrs: torch.Tensor
    area: float
    area_stderr: float
    exact: Optional[float]
    num_draws: int
    num_masks: NumMasks

    def plot(self, ax: Optional[Axes] = None) -> Axes:
        """Draw the fixed-rate estimate :math:`D\\,S(x; m)` against the rate, area shaded.

        See :func:`pyro_masked.diagnostics.plotting.plot_mask_rate_curve`.

        :param ax: a matplotlib Axes; a new figure's Axes when omitted.
        :returns: the Axes.
        """
        from pyro_masked.diagnostics.plotting import plot_mask_rate_curve

        return plot_mask_rate_curve(self, ax)


@dataclass(frozen=True)
class FixedRateBias:
    """The result of :func:`fixed_rate_bias`.

    :ivar rates: the masking rates, shape ``(R,)``.
    :ivar dict mask_sizes: for each masked observed site, the mask size used at each rate.
    :ivar bias: :math:`\\sum_s D_s S_s(x_s; m_s) - \\log p(x)` at each rate, shape ``(R,)``.
    :ivar stderr: Monte Carlo standard errors, ``0`` where the bias is exact.
    :ivar exact_rates: ``True`` where every mask was enumerated (the bias is exact).
    :ivar float exact: :math:`\\log p(x)`.
    :ivar num_draws: independent draws at each rate, shape ``(R,)`` (1 where the bias is exact).
    """

    rates: torch.Tensor
    mask_sizes: dict
    bias: torch.Tensor
    stderr: torch.Tensor
    exact_rates: torch.Tensor
    exact: float
    num_draws: torch.Tensor

    def plot(self, ax: Optional[Axes] = None) -> Axes:
        """Draw the bias against the masking rate, with two-standard-error bars.

        See :func:`pyro_masked.diagnostics.plotting.plot_fixed_rate_bias`.

        :param ax: a matplotlib Axes; a new figure's Axes when omitted.
        :returns: the Axes.
        """
        from pyro_masked.diagnostics.plotting import plot_fixed_rate_bias

        return plot_fixed_rate_bias(self, ax)


def _check_rate(rate, name: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise TypeError(f"{name} must be a float in (0, 1], got {rate!r}")
    rate = float(rate)
    if math.isnan(rate) or not 0.0 < rate <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1], got {rate}")
    return rate


def _check_rates(rates) -> list[float]:
    if isinstance(rates, torch.Tensor):
        if rates.dim() != 1:
            raise ValueError(f"rates must be one-dimensional, got shape {tuple(rates.shape)}")
        rates = rates.tolist()
    if isinstance(rates, (str, bytes)) or not isinstance(rates, Sequence):
        raise TypeError(f"rates must be a sequence of floats in (0, 1], got {rates!r}")
    if len(rates) == 0:
        raise ValueError("rates is empty: give at least one masking rate in (0, 1]")
    checked = [_check_rate(rate, f"rates[{i}]") for i, rate in enumerate(rates)]
    if any(b <= a for a, b in zip(checked, checked[1:])):
        raise ValueError(f"rates must be strictly increasing, got {checked}")
    return checked


def _probe(call: ModelCall, options: DrawOptions):
    """One cheap draw (every coordinate hidden: the marginals) to learn the sites' sizes."""
    probe_options = options.replace(num_masks=1)
    return run_draws(call, RateSize(1.0), probe_options, [0])[0]


def _every_size_rates(probe) -> list[float]:
    """Every mask size of the largest masked site: ``m / D`` for ``m = 1..D``."""
    largest = max(probe.event_sizes.values())
    return [size / largest for size in range(1, largest + 1)]


def _size_weights(sizes: list[int], event_size: int) -> list[int]:
    """How many mask sizes ``1..D`` each grid point stands for (the rest go to the last).

    Size ``k`` is assigned to the first grid point whose size is at least ``k``, and sizes
    above the largest grid size to the last grid point, so the weights sum to ``D`` and the
    weighted sum of :math:`S(x; m)` is :math:`\\sum_k S(x; k)` when every size is on the grid.
    """
    weights, previous = [], 0
    for size in sizes:
        weights.append(max(0, size - previous))
        previous = max(previous, size)
    weights[-1] += event_size - previous
    return weights


def mask_rate_curve(
    model: Callable,
    guide: Optional[Callable] = None,
    *,
    model_args: tuple = (),
    model_kwargs: Optional[dict] = None,
    rates: Optional[Sequence[float]] = None,
    num_draws: int = DEFAULT_NUM_DRAWS,
    num_masks: NumMasks = 1,
    mask_groups: MaskGroups = EVERY_VECTOR,
    sites: Optional[Iterable[str]] = None,
    integrate: Optional[Iterable[str]] = None,
    num_samples: int = 1,
    seed: Optional[int] = None,
) -> MaskRateCurve:
    """The masked score :math:`S(x; m)` against the masking rate, and the area under it.

    A rate :math:`r` hides :math:`m_s = \\min(D_s, \\max(1, \\mathrm{round}(r D_s)))` of the
    :math:`D_s` coordinates of each masked observed site :math:`s`
    (:class:`~pyro_masked.masks.RateSize`). The score at a rate is
    :math:`\\sum_s S_s(x_s; m_s)`, summed over data points as the model's log density is. Its
    area,

    .. math::

        A = \\sum_s \\sum_i n_{s,i}\\, S_s(x_s; m_{s,i}) + c \\approx
            \\sum_s \\sum_{k=1}^{D_s} S_s(x_s; k) + c = \\log p(x),

    gives each grid point the :math:`n_{s,i}` mask sizes from the previous grid size (or 0)
    up to its own (sizes above the largest go to the last point), with :math:`c` the terms
    that are not masked (latent sites' :math:`\\log p(z) - \\log q(z)`, sites left out by
    ``sites=``). The default grid is every mask size of the largest site, rates
    :math:`m / D` for :math:`m = 1..D`; for one site its area is exactly the cumulative
    estimate with the same masks. All rates share the same random numbers (common random
    numbers), so the draw-to-draw noise of the curve is smooth across rates.

    Cost: ``len(rates) * num_draws`` runs of the guide and model.

    :param rates: strictly increasing masking rates in ``(0, 1]``; default every mask size.
    :param int num_draws: independent draws per rate (>= 2).
    :param num_masks: permutations averaged inside each draw, or ``"all"`` for the exact
        expectation over masks (small events only; without sampled latents, one draw).
    :param mask_groups: ``"vector"`` (default: independent permutations per data point),
        ``None`` (shared, as in training) or an int number of groups; see
        :func:`~pyro_masked.estimate_log_marginal`.

    The other arguments are those of :func:`~pyro_masked.estimate_log_marginal`.
    """
    call = ModelCall.of(model, guide, model_args, model_kwargs)
    options = DrawOptions.of(num_masks, sites, integrate, num_samples, mask_groups)
    num_draws = check_num_draws(num_draws)
    seed = check_seed(seed)
    rates = _every_size_rates(_probe(call, options)) if rates is None else _check_rates(rates)
    # The same seeds at every rate: common random numbers.
    seeds = draw_seeds(num_draws, seed)
    grid = [run_draws(call, RateSize(rate), options, seeds) for rate in rates]
    event_sizes = grid[0][0].event_sizes
    mask_sizes = {
        name: {"event_size": size, "sizes": [RateSize(rate).mask_size(size) for rate in rates]}
        for name, size in event_sizes.items()
    }
    drawn = len(grid[0])
    scores = torch.zeros(drawn, len(rates), dtype=torch.float64)
    estimates = torch.zeros(drawn, len(rates), dtype=torch.float64)
    areas = torch.zeros(drawn, dtype=torch.float64)
    for i, draws in enumerate(grid):
        for d, draw in enumerate(draws):
            # Everything that is not a masked site with event dims, identical across rates.
            rest = draw.masked_total() - sum(
                float(draw.masked_scores[name].sum()) for name in event_sizes
            )
            estimates[d, i] = draw.masked_total()
            for name, size in event_sizes.items():
                scores[d, i] += float(draw.masked_scores[name].sum()) / size
            if i == 0:
                areas[d] += rest
    for name, info in mask_sizes.items():
        weights = _size_weights(info["sizes"], info["event_size"])
        for i, draws in enumerate(grid):
            for d, draw in enumerate(draws):
                areas[d] += weights[i] * float(draw.masked_scores[name].sum()) / info["event_size"]
    score_means, score_stderrs = mean_and_stderr(scores)
    estimate_means, estimate_stderrs = mean_and_stderr(estimates)
    area, area_stderr = mean_and_stderr(areas)
    return MaskRateCurve(
        rates=torch.tensor(rates, dtype=torch.float64),
        mask_sizes=mask_sizes,
        scores=score_means,
        stderrs=score_stderrs,
        estimates=estimate_means,
        estimate_stderrs=estimate_stderrs,
        area=float(area),
        area_stderr=float(area_stderr),
        exact=grid[0][0].exact_value(),
        num_draws=drawn,
        num_masks=options.num_masks,
    )


def _enumeration_fits(event_sizes: dict, rate: float) -> bool:
    """Whether ``num_masks="all"`` fits the engine's limits at this rate, for every site."""
    schedule = RateSize(rate)
    return all(enumeration_fits(size, schedule.sizes(size)) for size in event_sizes.values())


def fixed_rate_bias(
    model: Callable,
    guide: Optional[Callable] = None,
    *,
    model_args: tuple = (),
    model_kwargs: Optional[dict] = None,
    rates: Optional[Sequence[float]] = None,
    num_masks: Union[NumMasks, str] = "auto",
    mask_groups: MaskGroups = EVERY_VECTOR,
    num_draws: int = DEFAULT_BIAS_DRAWS,
    sites: Optional[Iterable[str]] = None,
    integrate: Optional[Iterable[str]] = None,
    num_samples: int = 1,
    seed: Optional[int] = None,
) -> FixedRateBias:
    """The bias of fixed-rate masking, :math:`D\\,S(x; m) - \\log p(x)`, against the rate.

    For models whose masked observed sites are closed-form Gaussian (or factorize) and that
    have no latent sites, :math:`\\log p(x)` is known, and the expected fixed-rate estimate
    :math:`\\sum_s D_s S_s(x_s; m_s)` is computed exactly by enumerating every mask
    (``num_masks="all"``; sizes 1 and :math:`D` are closed form) or by Monte Carlo. By the
    identity :math:`\\log p(x) = \\sum_k S(x; k)`, the bias at size :math:`m` is
    :math:`\\sum_k (S(x; m) - S(x; k))`: a fixed rate scores every context as if it had
    :math:`D - m` visible coordinates.

    :param guide: ``None`` (or a guide that samples nothing).
    :param rates: strictly increasing masking rates in ``(0, 1]``; default every mask size of
        the largest site.
    :param num_masks: ``"all"`` (exact; fails when a rate needs more than
        :data:`~pyro_masked.conditionals.gaussian.MAX_ENUMERATED_MASKS` masks), an int
        (permutations averaged in each of ``num_draws`` Monte Carlo draws), or ``"auto"``:
        exact where enumeration fits the limit, and ``num_draws`` draws of one permutation
        elsewhere.
    :param int num_draws: independent draws per rate where the bias is estimated (>= 2).
    :param mask_groups: ``"vector"`` (default: independent permutations per data point),
        ``None`` (shared, as in training) or an int number of groups; see
        :func:`~pyro_masked.estimate_log_marginal`.

    The other arguments are those of :func:`~pyro_masked.estimate_log_marginal`.
    """
    call = ModelCall.of(model, guide, model_args, model_kwargs)
    if num_masks != "auto":
        check_num_masks(num_masks)
    options = DrawOptions.of(
        1 if num_masks == "auto" else num_masks, sites, integrate, num_samples, mask_groups
    )
    num_draws = check_num_draws(num_draws)
    seed = check_seed(seed)
    probe = _probe(call, options)
    exact = probe.exact_value()
    if exact is None:
        reason = (
            "the guide or model samples latent sites"
            if probe.has_latents
            else "an observed site is not closed-form Gaussian"
        )
        raise ValueError(
            f"fixed_rate_bias needs the exact log p(x), which is unknown here: {reason}"
        )
    rates = _every_size_rates(probe) if rates is None else _check_rates(rates)
    bias, stderr, drawn = [], [], []
    for rate in rates:
        rate_options = options
        if num_masks == "auto":
            fits = _enumeration_fits(probe.event_sizes, rate)
            rate_options = options.replace(num_masks="all" if fits else 1)
        seeds = draw_seeds(num_draws, seed)
        draws = run_draws(call, RateSize(rate), rate_options, seeds)
        values = torch.tensor([draw.masked_total() for draw in draws], dtype=torch.float64)
        mean, error = mean_and_stderr(values)
        bias.append(float(mean) - exact)
        stderr.append(float(error))
        drawn.append(len(draws))
    return FixedRateBias(
        rates=torch.tensor(rates, dtype=torch.float64),
        mask_sizes={
            name: {"event_size": size, "sizes": [RateSize(rate).mask_size(size) for rate in rates]}
            for name, size in probe.event_sizes.items()
        },
        bias=torch.tensor(bias, dtype=torch.float64),
        stderr=torch.tensor(stderr, dtype=torch.float64),
        exact_rates=torch.tensor([count == 1 for count in drawn]),
        exact=exact,
        num_draws=torch.tensor(drawn),
    )
