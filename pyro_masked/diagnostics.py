"""Reading the evidence by masking: estimates with standard errors, the masking-rate curve,
the bias of a fixed masking rate, and pointwise masked log predictives.

Everything here evaluates a model and a guide with the traces
:class:`~pyro_masked.MaskedELBO` builds — the guide is run, the model is replayed against it
under :func:`~pyro_masked.masked`, and Pyro's ``compute_log_prob`` applies plate scaling and
masks — and then reads the numbers off the traces. One *draw* is one such evaluation with
fresh random masks (one random permutation per observed site) and, if the guide samples latent
sites, a fresh guide sample. Draws are independent, so their spread gives a Monte Carlo
standard error.

With an empty guide (no latent sites) the cumulative draw is an unbiased estimate of the log
marginal likelihood :math:`\\log p(x)`, because

.. math::

    \\log p(x) = \\sum_{m=1}^{D} S(x; m), \\qquad
    S(x; m) = \\mathbb{E}_{|M| = m}\\Big[\\frac{1}{m} \\sum_{j \\in M}
    \\log p(x_j \\mid x_{-M})\\Big].

With latent sites it estimates the masked ELBO
:math:`\\mathbb{E}_q[\\sum_s \\widehat{\\log p}(x_s \\mid z) + \\log p(z) - \\log q(z)]`,
an unbiased estimate of the ordinary ELBO.

With ``integrate=("z",)`` the local latent ``z`` is integrated out of the masked score as in
:class:`~pyro_masked.MaskedELBO`: exactly when it is discrete and enumerable (then nothing is
random but the masks, and the exact :math:`\\log p(x)` is known), by ``num_samples`` importance
samples otherwise (then ``unmasked`` is the importance-weighted bound on the same samples).

Cost: every draw is one run of the guide and the model, and one factorization per Gaussian
observed site (every mask size of the draw's permutation comes from it). A curve over ``R``
rates with ``n`` draws costs ``R n`` runs; the draws are not batched, so that each one stays an
independent replicate. Within a draw, the data points of a site share its permutation (the
engine's one-factorization design), so their errors are correlated: the spread of a draw over
a whole data set is what the standard errors here measure, and it is what a training step
with ``MaskedELBO(num_masks=1)`` sees.

References:

- E. Fong, C. C. Holmes, "On the marginal likelihood and cross-validation", Biometrika 2020.
- P. Moreno-Muñoz, P. Garcia Recasens, S. Hauberg, "On Masked Pre-training and the Marginal
  Likelihood", NeurIPS 2023.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.distributions as tdist
from pyro import poutine
from pyro.distributions import ExpandedDistribution, MaskedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites

from pyro_masked.conditionals.gaussian import MAX_ENUMERATED_MASKS, leave_one_out_log_densities
from pyro_masked.handlers import MaskedScore
from pyro_masked.infer import MaskedELBO
from pyro_masked.integrate import IntegratedObservation
from pyro_masked.masks import FixedRate, MaskLike, MaskSchedule, as_schedule
from pyro_masked.scoring import (
    NumMasks,
    check_num_masks,
    gaussian_parts,
    is_supported,
    masked_event_size,
)

__all__ = [
    "FixedRateBias",
    "LogMarginalEstimate",
    "MaskRateCurve",
    "PointwiseMaskedLogProb",
    "RateSize",
    "coordinate_log_predictive",
    "estimate_log_marginal",
    "fixed_rate_bias",
    "mask_rate_curve",
    "pointwise_masked_log_prob",
    "to_inference_data",
]

DEFAULT_NUM_MASKS = 32


# --------------------------------------------------------------------------------------------
# Result objects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogMarginalEstimate:
    """The result of :func:`estimate_log_marginal`.

    :ivar float estimate: the mean of the draws.
    :ivar float stderr: the Monte Carlo standard error of ``estimate`` (``0.0`` for
        ``num_masks="all"`` without latent sites, where nothing is random).
    :ivar num_masks: the number of independent draws, or ``"all"``.
    :ivar exact: :math:`\\log p(x)` computed with the ordinary log densities, when every
        masked observed site is closed-form Gaussian (or factorizes) and no site is latent
        (or the only latents are enumerated by ``integrate``); else ``None``.
    :ivar float unmasked: the same quantity on the same guide draws with ordinary log
        densities (the ordinary ELBO estimate; equals ``exact`` when that is known).
    :ivar mask: the mask schedule.
    :ivar draws: the individual draws, shape ``(num_draws,)``.
    """

    estimate: float
    stderr: float
    num_masks: NumMasks
    exact: Optional[float]
    unmasked: float
    mask: MaskSchedule
    draws: torch.Tensor = field(repr=False)


@dataclass(frozen=True)
class MaskRateCurve:
    """The result of :func:`mask_rate_curve`: the masked score against the masking rate.

    :ivar rates: the masking rates, shape ``(R,)``.
    :ivar dict mask_sizes: for each masked observed site, the mask size used at each rate.
    :ivar scores: :math:`S(x; m)` at each rate: the mean log predictive density of one hidden
        coordinate, summed over data points and over masked sites, shape ``(R,)``.
    :ivar stderrs: Monte Carlo standard errors of ``scores`` (zeros for ``num_masks="all"``).
    :ivar estimates: the fixed-rate estimate at each rate,
        :math:`\\sum_s D_s S_s(x_s; m_s) + c` with :math:`c` the terms that are not masked
        (unmasked sites, and :math:`\\log p(z) - \\log q(z)` of latent sites), shape ``(R,)``.
    :ivar estimate_stderrs: Monte Carlo standard errors of ``estimates``.
    :ivar float area: the area under ``estimates`` over the rate interval ``(0, 1]``, an
        estimate of :math:`\\log p(x)`; with every mask size in the grid it is the cumulative
        estimate :math:`\\sum_m S(x; m)`.
    :ivar float area_stderr: its Monte Carlo standard error.
    :ivar exact: :math:`\\log p(x)` when it is known in closed form, else ``None``.
    :ivar num_masks: independent draws per rate (shared by all rates), or ``"all"``.
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
    num_masks: NumMasks

    def plot(self, ax=None):
        """Draw the fixed-rate estimate :math:`D\\,S(x; m)` against the rate, area shaded.

        Each rate stands for the rates from the previous grid point (or 0) up to it, so the
        shaded steps have area ``area`` (exactly so for one masked site); a horizontal line
        marks the exact :math:`\\log p(x)` when known — the height of the rectangle on
        ``(0, 1]`` with that area.

        :param ax: a matplotlib Axes; a new figure's Axes when omitted.
        :returns: the Axes.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        rates = self.rates.tolist()
        edges = [0.0] + rates[:-1] + [1.0]
        heights = self.estimates.tolist()
        ax.stairs(heights, edges, fill=True, alpha=0.3, label=f"area = {self.area:.3f}")
        ax.errorbar(
            rates, heights, yerr=(2 * self.estimate_stderrs).tolist(), fmt="o", ms=3, color="C0"
        )
        if self.exact is not None:
            ax.axhline(
                self.exact, color="k", ls="--", lw=1, label=f"exact log p(x) = {self.exact:.3f}"
            )
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(*_padded_limits(heights, self.exact))
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


@dataclass(frozen=True)
class FixedRateBias:
    """The result of :func:`fixed_rate_bias`.

    :ivar rates: the masking rates, shape ``(R,)``.
    :ivar dict mask_sizes: for each masked observed site, the mask size used at each rate.
    :ivar bias: :math:`\\sum_s D_s S_s(x_s; m_s) - \\log p(x)` at each rate, shape ``(R,)``.
    :ivar stderr: Monte Carlo standard errors, ``0`` where the bias is exact.
    :ivar exact_rates: ``True`` where every mask was enumerated (the bias is exact).
    :ivar float exact: :math:`\\log p(x)`.
    """

    rates: torch.Tensor
    mask_sizes: dict
    bias: torch.Tensor
    stderr: torch.Tensor
    exact_rates: torch.Tensor
    exact: float

    def plot(self, ax=None):
        """Draw the bias against the masking rate, with two-standard-error bars.

        :param ax: a matplotlib Axes; a new figure's Axes when omitted.
        :returns: the Axes.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        ax.axhline(0.0, color="k", lw=0.8)
        ax.errorbar(
            self.rates.tolist(),
            self.bias.tolist(),
            yerr=(2 * self.stderr).tolist(),
            fmt="o-",
            ms=3,
            capsize=2,
        )
        ax.set_xlabel("masking rate")
        ax.set_ylabel("bias  D·S(x; m) − log p(x)")
        return ax


@dataclass(frozen=True)
class PointwiseMaskedLogProb:
    """The result of :func:`pointwise_masked_log_prob`.

    :ivar dict values: for each observed site, the masked log predictive of each data point
        (the site's ``log_prob`` tensor, with plate scaling and masks as Pyro applies them),
        averaged over the draws.
    :ivar dict stderrs: their Monte Carlo standard errors.
    :ivar dict draws: the individual draws, shape ``(num_draws,) + batch_shape`` per site.
    :ivar dict unmasked: the ordinary ``log_prob`` of each data point, averaged over draws.
    :ivar dict observed: the observed values of each site.
    :ivar mask: the mask schedule.
    :ivar num_masks: the number of draws, or ``"all"``.
    """

    values: dict
    stderrs: dict
    draws: dict = field(repr=False)
    unmasked: dict = field(repr=False)
    observed: dict = field(repr=False)
    mask: MaskSchedule
    num_masks: NumMasks

    def total(self) -> float:
        """The sum of the pointwise values over data points and sites."""
        return float(sum(value.sum() for value in self.values.values()))

    def as_inference_data(self):
        """This result as an ArviZ ``InferenceData``; see :func:`to_inference_data`."""
        return to_inference_data(self)


# --------------------------------------------------------------------------------------------
# Mask schedules for a grid of rates
# --------------------------------------------------------------------------------------------


class RateSize(FixedRate):
    """A masking rate in ``(0, 1]`` as a single mask size per site.

    :class:`~pyro_masked.masks.FixedRate`'s rule, :math:`\\min(D, \\max(1,
    \\mathrm{round}(\\text{rate} \\cdot D)))`, so a point of the curve is what
    ``MaskedELBO(mask=rate)`` optimises, extended to ``rate = 1`` (every coordinate hidden:
    the product of the marginals).

    :param float rate: the fraction of coordinates hidden, in ``(0, 1]``.
    """

    def __init__(self, rate: float):
        self.rate = _check_rate(rate, "rate")

    def __repr__(self) -> str:
        return f"RateSize({self.rate})"


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


def _check_num_draws(num_masks: NumMasks) -> NumMasks:
    num_masks = check_num_masks(num_masks)
    if num_masks != "all" and num_masks < 2:
        raise ValueError(
            f"num_masks must be >= 2 (independent draws give the standard error), got {num_masks}"
        )
    return num_masks


# --------------------------------------------------------------------------------------------
# One draw: run the guide, replay the masked model, read the traces
# --------------------------------------------------------------------------------------------


@dataclass
class _Draw:
    masked_scores: dict  # observed site -> scaled, masked log_prob tensor (masked estimate)
    unmasked_scores: dict  # observed site -> the same with the ordinary log_prob
    observed: dict  # observed site -> value
    event_sizes: dict  # masked observed site with event dims -> number of coordinates
    offset: float  # log p(z) - log q(z) summed over latent sites
    has_latents: bool
    closed_form: bool  # every masked site closed-form Gaussian or factorizing

    def masked_total(self) -> float:
        return self.offset + sum(float(v.sum()) for v in self.masked_scores.values())

    def unmasked_total(self) -> float:
        return self.offset + sum(float(v.sum()) for v in self.unmasked_scores.values())


def _empty_guide(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def _seeded(seed: int):
    """Run under a fixed torch seed without disturbing the caller's generator state."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        # The default generator directly: torch.manual_seed also walks every device.
        torch.random.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        yield


def _draw_seeds(count: int) -> list[int]:
    # From the global generator, so that pyro.set_rng_seed makes every result reproducible;
    # 32 bits, since the CPU generator keeps only those of a seed.
    return torch.randint(0, 2**32, (count,), dtype=torch.int64).tolist()


@dataclass(frozen=True)
class _Options:
    """What selects and scores the sites, as for :class:`~pyro_masked.MaskedELBO`."""

    sites: Optional[tuple] = None
    integrate: Optional[tuple] = None
    num_samples: int = 1

    @classmethod
    def of(cls, sites, integrate, num_samples) -> _Options:
        if isinstance(sites, str):
            raise TypeError(f"sites must be a list of site names, got the string {sites!r}")
        if integrate is None and num_samples != 1:
            raise ValueError(
                f"num_samples={num_samples} is the number of samples of the integrated "
                "latents; name them with integrate=(...)"
            )
        return cls(
            None if sites is None else tuple(sites),
            None if integrate is None else tuple(integrate),
            num_samples,
        )

    def loss(self, schedule: MaskSchedule, num_masks: NumMasks) -> MaskedELBO:
        # Latent integration is passed only when asked for, so that its arguments stay optional.
        extra = {}
        if self.integrate:
            extra = {"integrate": self.integrate, "num_samples": self.num_samples}
        return MaskedELBO(mask=schedule, num_masks=num_masks, sites=self.sites, **extra)


def _run_draw(loss: MaskedELBO, model, guide, args, kwargs, seed) -> _Draw:
    # The traces MaskedELBO itself builds (guide, replayed masked model, integrated latents,
    # log densities); no gradients, so that parameters leave no graphs behind.
    with torch.no_grad():
        with _seeded(seed):
            # Permutations are drawn when the masked scores are computed, inside this call.
            model_trace, guide_trace = loss._get_trace(model, guide, args, kwargs)
        return _read_traces(model_trace, guide_trace)


def _read_traces(model_trace, guide_trace) -> _Draw:
    masked_scores, unmasked_scores, observed, event_sizes = {}, {}, {}, {}
    offset, has_latents, closed_form = 0.0, False, True
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        fn = site["fn"]
        if site["infer"].get("masked_integrated"):
            # A latent integrated into an observed site's score (its own log density is 0):
            # enumerated values are exact, samples are random.
            prior = getattr(fn, "prior", None)
            has_latents = has_latents or not (prior is not None and prior.has_enumerate_support)
            continue
        if not site["is_observed"]:
            has_latents = True
            offset += float(site["log_prob_sum"])
            continue
        masked_scores[name] = site["log_prob"].detach()
        observed[name] = site["value"].detach()
        unmasked = _unmasked_log_prob(fn, site)
        if unmasked is None:
            # A site left out by ``sites=``: scored by its ordinary log density.
            unmasked_scores[name] = masked_scores[name]
            closed_form = closed_form and is_supported(fn)
            continue
        unmasked_scores[name] = unmasked.detach().expand(site["log_prob"].shape)
        if isinstance(fn, MaskedScore):
            closed_form = closed_form and is_supported(fn.base_dist)
        event_size = masked_event_size(fn.base_dist if isinstance(fn, MaskedScore) else fn)
        if event_size > 0:
            event_sizes[name] = event_size
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and not site["is_observed"]:
            has_latents = True
            offset -= float(site["log_prob_sum"])
    return _Draw(
        masked_scores, unmasked_scores, observed, event_sizes, offset, has_latents, closed_form
    )


def _unmasked_log_prob(fn, site) -> Optional[torch.Tensor]:
    """The ordinary log density of a masked site (scaled and masked), or None if not masked."""
    if isinstance(fn, MaskedScore):
        log_prob = fn.base_dist.log_prob(site["value"])
    elif isinstance(fn, IntegratedObservation) and fn.schedule is not None:
        # The same importance samples without masking: log sum_k w_k p(x | z_k).
        unmasked = IntegratedObservation(fn.base_dist, fn.log_weights, None, 1, site["name"])
        log_prob = unmasked.log_prob(site["value"])
    else:
        return None
    return torch.as_tensor(scale_and_mask(log_prob, site["scale"], site["mask"]))


def _run_draws(model, guide, args, kwargs, schedule, num_masks, options, seeds) -> list[_Draw]:
    guide = _empty_guide if guide is None else guide
    # One permutation per site and draw: the draws, not the handler, do the averaging.
    loss = options.loss(schedule, "all" if num_masks == "all" else 1)
    draws = []
    for seed in seeds:
        draw = _run_draw(loss, model, guide, args, kwargs, seed)
        if not draw.event_sizes:
            raise ValueError(
                "the model has no maskable observed site (an observed site with event "
                "dimensions, e.g. a MultivariateNormal or Normal(...).to_event(1)); observed "
                f"sites: {sorted(draw.masked_scores) or 'none'}"
            )
        if num_masks == "all" and draw.has_latents:
            raise ValueError(
                "num_masks='all' averages over every mask, but the guide or model samples "
                "latent sites, whose randomness remains; use an int num_masks"
            )
        draws.append(draw)
    return draws


def _mean_and_stderr(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the first dimension and its standard error (zero for a single draw)."""
    mean = values.mean(0)
    if values.shape[0] < 2:
        return mean, torch.zeros_like(mean)
    return mean, values.std(0) / math.sqrt(values.shape[0])


def _num_seeds(num_masks: NumMasks) -> int:
    return 1 if num_masks == "all" else num_masks


def _exact_value(draw: _Draw) -> Optional[float]:
    return draw.unmasked_total() if draw.closed_form and not draw.has_latents else None


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def estimate_log_marginal(
    model: Callable,
    guide: Optional[Callable],
    *args,
    num_masks: NumMasks = DEFAULT_NUM_MASKS,
    mask: MaskLike = "cumulative",
    sites: Optional[Iterable[str]] = None,
    integrate: Optional[Iterable[str]] = None,
    num_samples: int = 1,
    **kwargs,
) -> LogMarginalEstimate:
    """Masked estimate of the log marginal likelihood, with a Monte Carlo standard error.

    Each of ``num_masks`` independent draws runs the guide, replays the model under
    :func:`~pyro_masked.masked` (one random permutation per observed site) and sums the
    trace's log densities as :class:`~pyro.infer.Trace_ELBO` does:

    .. math::

        \\widehat{\\mathcal{L}} = \\sum_{\\text{obs } s} \\widehat{\\log p}(x_s \\mid z)
            + \\log p(z) - \\log q(z),
        \\qquad z \\sim q.

    With ``mask="cumulative"`` and an empty guide (``guide=None``) the mean of the draws is an
    unbiased estimate of :math:`\\log p(x) = \\sum_m S(x; m)`; with a guide that samples
    latent sites it is an unbiased estimate of the ELBO; with a fixed size or rate it is the
    biased fixed-rate objective. ``stderr`` is the standard deviation of the draws over
    :math:`\\sqrt{n}`. Cost: ``num_masks`` runs of the guide and model, each one
    factorization per Gaussian observed site.

    :param model: the Pyro model.
    :param guide: the guide, or ``None`` for the empty guide (no latent sites).
    :param args: the model's and guide's positional arguments.
    :param num_masks: independent draws (an int >= 2), or ``"all"`` for the exact expectation
        over every mask (no latent sites, small events only; ``stderr`` is then 0).
    :param mask: ``"cumulative"``, an int mask size, a float rate or a
        :class:`~pyro_masked.masks.MaskSchedule`.
    :param sites: names of the observed sites to mask; ``None`` masks every observed site.
    :param integrate: names of local latent sites to integrate out of the masked score, with
        ``num_samples`` importance samples (or by enumeration), as in
        :class:`~pyro_masked.MaskedELBO`; an enumerated discrete latent leaves nothing random.
    :param int num_samples: importance samples per data point for ``integrate``.
    :param kwargs: the model's and guide's keyword arguments.

    Example::

        >>> result = estimate_log_marginal(ppca_model, None, data, num_masks=64)
        >>> result.estimate, result.stderr, result.exact
    """
    options = _Options.of(sites, integrate, num_samples)
    schedule = as_schedule(mask)
    num_masks = _check_num_draws(num_masks)
    seeds = _draw_seeds(_num_seeds(num_masks))
    draws = _run_draws(model, guide, args, kwargs, schedule, num_masks, options, seeds)
    values = torch.tensor([draw.masked_total() for draw in draws], dtype=torch.float64)
    estimate, stderr = _mean_and_stderr(values)
    unmasked = sum(draw.unmasked_total() for draw in draws) / len(draws)
    return LogMarginalEstimate(
        estimate=float(estimate),
        stderr=float(stderr),
        num_masks=num_masks,
        exact=_exact_value(draws[0]),
        unmasked=unmasked,
        mask=schedule,
        draws=values,
    )


def _default_rates(model, guide, args, kwargs, options) -> list[float]:
    """Every mask size of the largest masked site: ``m / D`` for ``m = 1..D``."""
    probe = _run_draws(model, guide, args, kwargs, RateSize(1.0), 1, options, [0])[0]
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


def _rate_grid_draws(model, guide, args, kwargs, rates, num_masks, options):
    """Draws at every rate, with the same seeds (common random numbers) at each rate."""
    seeds = _draw_seeds(_num_seeds(num_masks))
    return [
        _run_draws(model, guide, args, kwargs, RateSize(rate), num_masks, options, seeds)
        for rate in rates
    ]


def mask_rate_curve(
    model: Callable,
    guide: Optional[Callable],
    *args,
    rates: Optional[Sequence[float]] = None,
    num_masks: NumMasks = DEFAULT_NUM_MASKS,
    sites: Optional[Iterable[str]] = None,
    integrate: Optional[Iterable[str]] = None,
    num_samples: int = 1,
    **kwargs,
) -> MaskRateCurve:
    """The masked score :math:`S(x; m)` against the masking rate, and the area under it.

    A rate :math:`r` hides :math:`m_s = \\min(D_s, \\max(1, \\mathrm{round}(r D_s)))` of the
    :math:`D_s` coordinates of each masked observed site :math:`s` (:class:`RateSize`). The
    score at a rate is :math:`\\sum_s S_s(x_s; m_s)`, summed over data points as the model's
    log density is. Its area,

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

    Cost: ``len(rates) * num_masks`` runs of the guide and model.

    :param model: the Pyro model.
    :param guide: the guide, or ``None`` for the empty guide.
    :param rates: strictly increasing masking rates in ``(0, 1]``; default every mask size.
    :param num_masks: independent draws per rate (an int >= 2), or ``"all"`` for the exact
        expectation over masks (no latent sites, small events only).
    :param sites: names of the observed sites to mask; ``None`` masks every observed site.
    :param integrate: names of local latent sites to integrate out of the masked score, with
        ``num_samples`` importance samples (or by enumeration), as in
        :class:`~pyro_masked.MaskedELBO`; an enumerated discrete latent leaves nothing random.
    :param int num_samples: importance samples per data point for ``integrate``.
    """
    options = _Options.of(sites, integrate, num_samples)
    num_masks = _check_num_draws(num_masks)
    guide = _empty_guide if guide is None else guide
    if rates is None:
        rates = _default_rates(model, guide, args, kwargs, options)
    rates = _check_rates(rates)
    grid = _rate_grid_draws(model, guide, args, kwargs, rates, num_masks, options)
    event_sizes = grid[0][0].event_sizes
    mask_sizes = {
        name: {"event_size": size, "sizes": [RateSize(rate).mask_size(size) for rate in rates]}
        for name, size in event_sizes.items()
    }
    num_draws = len(grid[0])
    scores = torch.zeros(num_draws, len(rates), dtype=torch.float64)
    estimates = torch.zeros(num_draws, len(rates), dtype=torch.float64)
    areas = torch.zeros(num_draws, dtype=torch.float64)
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
    score_means, score_stderrs = _mean_and_stderr(scores)
    estimate_means, estimate_stderrs = _mean_and_stderr(estimates)
    area, area_stderr = _mean_and_stderr(areas)
    return MaskRateCurve(
        rates=torch.tensor(rates, dtype=torch.float64),
        mask_sizes=mask_sizes,
        scores=score_means,
        stderrs=score_stderrs,
        estimates=estimate_means,
        estimate_stderrs=estimate_stderrs,
        area=float(area),
        area_stderr=float(area_stderr),
        exact=_exact_value(grid[0][0]),
        num_masks=num_masks,
    )


def _enumerated_masks(event_sizes: dict, rate: float) -> int:
    """Masks ``num_masks="all"`` would condition on at this rate (sizes 1, D closed form)."""
    schedule = RateSize(rate)
    total = 0
    for size in event_sizes.values():
        mask_size = schedule.mask_size(size)
        if mask_size not in (1, size):
            total = max(total, math.comb(size, mask_size))
    return total


def fixed_rate_bias(
    model: Callable,
    guide: Optional[Callable],
    *args,
    rates: Optional[Sequence[float]] = None,
    num_masks: Union[NumMasks, str] = "auto",
    monte_carlo_masks: int = 64,
    sites: Optional[Iterable[str]] = None,
    integrate: Optional[Iterable[str]] = None,
    num_samples: int = 1,
    **kwargs,
) -> FixedRateBias:
    """The bias of fixed-rate masking, :math:`D\\,S(x; m) - \\log p(x)`, against the rate.

    For models whose masked observed sites are closed-form Gaussian (or factorize) and that
    have no latent sites, :math:`\\log p(x)` is known, and the expected fixed-rate estimate
    :math:`\\sum_s D_s S_s(x_s; m_s)` is computed exactly by enumerating every mask
    (``num_masks="all"``; sizes 1 and :math:`D` are closed form) or by Monte Carlo. By the
    identity :math:`\\log p(x) = \\sum_k S(x; k)`, the bias at size :math:`m` is
    :math:`\\sum_k (S(x; m) - S(x; k))`: a fixed rate scores every context as if it had
    :math:`D - m` visible coordinates.

    :param model: the Pyro model.
    :param guide: ``None`` (or a guide that samples nothing).
    :param rates: strictly increasing masking rates in ``(0, 1]``; default every mask size of
        the largest site.
    :param num_masks: ``"all"`` (exact; fails when a rate needs more than
        :data:`~pyro_masked.conditionals.gaussian.MAX_ENUMERATED_MASKS` masks), an int >= 2
        (Monte Carlo draws), or ``"auto"``: exact where enumeration fits the limit and
        ``monte_carlo_masks`` draws elsewhere.
    :param monte_carlo_masks: draws per rate where ``"auto"`` falls back to Monte Carlo.
    :param sites: names of the observed sites to mask; ``None`` masks every observed site.
    :param integrate: names of local latent sites to integrate out of the masked score, with
        ``num_samples`` importance samples (or by enumeration), as in
        :class:`~pyro_masked.MaskedELBO`; an enumerated discrete latent leaves nothing random.
    :param int num_samples: importance samples per data point for ``integrate``.
    """
    options = _Options.of(sites, integrate, num_samples)
    if num_masks != "auto":
        num_masks = _check_num_draws(num_masks)
    monte_carlo_masks = _check_num_draws(monte_carlo_masks)
    if monte_carlo_masks == "all":
        raise ValueError("monte_carlo_masks must be an int >= 2, got 'all'")
    guide = _empty_guide if guide is None else guide
    probe = _run_draws(model, guide, args, kwargs, RateSize(1.0), 1, options, [0])[0]
    exact = _exact_value(probe)
    if exact is None:
        reason = (
            "the guide or model samples latent sites"
            if probe.has_latents
            else "an observed site is not closed-form Gaussian"
        )
        raise ValueError(
            f"fixed_rate_bias needs the exact log p(x), which is unknown here: {reason}"
        )
    if rates is None:
        largest = max(probe.event_sizes.values())
        rates = [size / largest for size in range(1, largest + 1)]
    rates = _check_rates(rates)
    bias, stderr, exact_rates = [], [], []
    for rate in rates:
        rate_masks = num_masks
        if num_masks == "auto":
            fits = _enumerated_masks(probe.event_sizes, rate) <= MAX_ENUMERATED_MASKS
            rate_masks = "all" if fits else monte_carlo_masks
        seeds = _draw_seeds(_num_seeds(rate_masks))
        draws = _run_draws(model, guide, args, kwargs, RateSize(rate), rate_masks, options, seeds)
        values = torch.tensor([draw.masked_total() for draw in draws], dtype=torch.float64)
        mean, error = _mean_and_stderr(values)
        bias.append(float(mean) - exact)
        stderr.append(float(error))
        exact_rates.append(rate_masks == "all")
    return FixedRateBias(
        rates=torch.tensor(rates, dtype=torch.float64),
        mask_sizes={
            name: {"event_size": size, "sizes": [RateSize(rate).mask_size(size) for rate in rates]}
            for name, size in probe.event_sizes.items()
        },
        bias=torch.tensor(bias, dtype=torch.float64),
        stderr=torch.tensor(stderr, dtype=torch.float64),
        exact_rates=torch.tensor(exact_rates),
        exact=exact,
    )


def pointwise_masked_log_prob(
    model: Callable,
    guide: Optional[Callable],
    *args,
    num_masks: NumMasks = DEFAULT_NUM_MASKS,
    mask: MaskLike = "cumulative",
    sites: Optional[Iterable[str]] = None,
    integrate: Optional[Iterable[str]] = None,
    num_samples: int = 1,
    **kwargs,
) -> PointwiseMaskedLogProb:
    """The masked log predictive of every data point, for point-by-point model comparison.

    For each observed site, the value at a batch index is that data point's masked estimate
    :math:`\\sum_m w_m S(x_n; m)` (with ``mask="cumulative"``, an unbiased estimate of
    :math:`\\log p(x_n \\mid z)`, or of :math:`\\log p(x_n)` with an empty guide), averaged
    over ``num_masks`` independent draws; plate scaling and ``poutine.mask`` are applied as in
    the trace, so the values over all sites sum to :func:`estimate_log_marginal`'s estimate
    with the same draws when there are no latent sites.

    :param model: the Pyro model.
    :param guide: the guide, or ``None`` for the empty guide.
    :param num_masks: independent draws (an int >= 2) or ``"all"``.
    :param mask: ``"cumulative"``, an int mask size, a float rate or a
        :class:`~pyro_masked.masks.MaskSchedule`.
    :param sites: names of the observed sites to mask; ``None`` masks every observed site.
    :param integrate: names of local latent sites to integrate out of the masked score, with
        ``num_samples`` importance samples (or by enumeration), as in
        :class:`~pyro_masked.MaskedELBO`; an enumerated discrete latent leaves nothing random.
    :param int num_samples: importance samples per data point for ``integrate``.
    """
    options = _Options.of(sites, integrate, num_samples)
    schedule = as_schedule(mask)
    num_masks = _check_num_draws(num_masks)
    seeds = _draw_seeds(_num_seeds(num_masks))
    draws = _run_draws(model, guide, args, kwargs, schedule, num_masks, options, seeds)
    values, stderrs, stacked, unmasked = {}, {}, {}, {}
    for name in draws[0].masked_scores:
        shapes = {tuple(draw.masked_scores[name].shape) for draw in draws}
        if len(shapes) > 1:
            raise ValueError(
                f"observed site '{name}' changed its batch shape between draws ({sorted(shapes)}"
                "); pointwise values need the same data points in every draw (no subsampling)"
            )
        stacked[name] = torch.stack([draw.masked_scores[name] for draw in draws])
        values[name], stderrs[name] = _mean_and_stderr(stacked[name])
        unmasked[name] = torch.stack([draw.unmasked_scores[name] for draw in draws]).mean(0)
    return PointwiseMaskedLogProb(
        values=values,
        stderrs=stderrs,
        draws=stacked,
        unmasked=unmasked,
        observed=dict(draws[0].observed),
        mask=schedule,
        num_masks=num_masks,
    )


def _coordinate_leave_one_out(fn: tdist.Distribution, value: torch.Tensor) -> torch.Tensor:
    """:math:`\\log p(x_j \\mid x_{-j})` for every coordinate ``j``: shape batch + event."""
    if isinstance(fn, MaskedDistribution):
        values = _coordinate_leave_one_out(fn.base_dist, value)
        mask = fn._mask.reshape(fn._mask.shape + (1,) * len(fn.event_shape))
        return torch.where(mask, values, values.new_zeros(()))
    if isinstance(fn, ExpandedDistribution):
        values = _coordinate_leave_one_out(fn.base_dist, value)
        return values.expand(fn.batch_shape + fn.event_shape)
    if isinstance(fn, tdist.Independent) and is_supported(fn):
        # Coordinates independent given everything else: the conditional is the marginal.
        base = fn.base_dist
        while isinstance(base, tdist.Independent):
            base = base.base_dist
        return base.log_prob(value).expand(fn.batch_shape + fn.event_shape)
    if isinstance(fn, (tdist.MultivariateNormal, tdist.LowRankMultivariateNormal)):
        loc, covariance = gaussian_parts(fn)
        # Each vector as a batch of one: vectors sharing a covariance share its factorization.
        residuals = (value - loc).unsqueeze(-2)
        return leave_one_out_log_densities(covariance, residuals).squeeze(-2)
    raise TypeError(
        f"{type(fn).__name__} has no closed-form leave-one-out conditionals; supported are "
        "MultivariateNormal, LowRankMultivariateNormal and distributions that factorize"
    )


def coordinate_log_predictive(
    model: Callable,
    guide: Optional[Callable],
    *args,
    num_draws: int = 1,
    sites: Optional[Iterable[str]] = None,
    **kwargs,
) -> dict:
    """Leave-one-coordinate-out log predictives :math:`\\log p(x_{nj} \\mid x_{n,-j})`.

    The per-hidden-coordinate view of masking at size 1: for every data point :math:`n` and
    every coordinate :math:`j` of each observed site with event dimensions, the log density of
    :math:`x_{nj}` given the other coordinates of :math:`x_n` (and the guide's latent draw).
    Summed over coordinates it is :math:`D\\,S(x_n; 1)`, the masked score at mask size 1; it
    shows *which* coordinates a model predicts badly. Closed form for Gaussian sites (one
    factorization of the covariance gives every coordinate) and for sites that factorize (the
    conditional is the marginal); plate scaling and ``poutine.mask`` are applied as Pyro does.

    :param model: the Pyro model.
    :param guide: the guide, or ``None`` for the empty guide.
    :param int num_draws: guide draws averaged over (only matters with latent sites).
    :param sites: names of the observed sites to report; ``None`` reports every observed site
        with event dimensions.
    :returns: a dict from site name to a tensor of shape ``batch_shape + event_shape``.
    """
    if isinstance(num_draws, bool) or not isinstance(num_draws, numbers.Integral):
        raise TypeError(f"num_draws must be an int >= 1, got {num_draws!r}")
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}")
    if isinstance(sites, str):
        raise TypeError(f"sites must be a list of site names, got the string {sites!r}")
    wanted = None if sites is None else set(sites)
    guide = _empty_guide if guide is None else guide
    totals: dict = {}
    for seed in _draw_seeds(num_draws):
        with torch.no_grad(), _seeded(seed):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
            for name, site in prune_subsample_sites(model_trace).nodes.items():
                if site["type"] != "sample" or not site["is_observed"]:
                    continue
                fn = site["fn"]
                if not fn.event_shape:
                    continue
                if wanted is not None and name not in wanted:
                    continue
                value = site["value"]
                if not torch.isfinite(value).all():
                    raise ValueError(f"observed site '{name}': the observed value has NaN or inf")
                try:
                    values = _coordinate_leave_one_out(fn, value)
                except TypeError as error:
                    raise TypeError(f"observed site '{name}': {error}") from error
                event_dims = len(fn.event_shape)
                mask = site["mask"]
                if isinstance(mask, torch.Tensor):
                    mask = mask.reshape(mask.shape + (1,) * event_dims)
                values = scale_and_mask(values, site["scale"], mask)
                totals[name] = totals.get(name, 0.0) + values.detach() / num_draws
    missing = sorted((wanted or set()) - set(totals))
    if missing:
        raise ValueError(f"sites={sorted(wanted)} names {missing}, not observed sites with events")
    if not totals:
        raise ValueError(
            "the model has no maskable observed site (an observed site with event dimensions)"
        )
    return totals


def _import_arviz():
    try:
        with warnings.catch_warnings():
            # ArviZ 0.2x announces its 1.0 refactor on import; nothing here depends on it.
            warnings.filterwarnings(
                "ignore", message=".*ArviZ is undergoing a major refactor", category=FutureWarning
            )
            import arviz
    except ImportError as error:
        raise ImportError(
            "to_inference_data needs ArviZ, an optional dependency: pip install arviz "
            "(or pip install pyro_masked[tutorials])"
        ) from error
    return arviz


def to_inference_data(pointwise: PointwiseMaskedLogProb):
    """Export pointwise masked log predictives to an ArviZ ``InferenceData``.

    The ``log_likelihood`` group holds one variable per observed site, with one chain and one
    draw per independent mask draw (so its mean over draws is the masked estimate), and the
    ``observed_data`` group the observed values. The draws are draws of masks (and of the
    guide), not posterior samples: compare models on the means, e.g.
    ``idata.log_likelihood[site].mean("draw")``.

    :param pointwise: the result of :func:`pointwise_masked_log_prob`.
    :raises ImportError: when ArviZ is not installed.
    """
    if not isinstance(pointwise, PointwiseMaskedLogProb):
        raise TypeError(
            "pointwise must be the result of pointwise_masked_log_prob, got "
            f"{type(pointwise).__name__}"
        )
    arviz = _import_arviz()
    log_likelihood = {
        name: draws.detach().cpu().numpy()[None] for name, draws in pointwise.draws.items()
    }
    observed = {name: value.detach().cpu().numpy() for name, value in pointwise.observed.items()}
    return arviz.from_dict(log_likelihood=log_likelihood, observed_data=observed)
