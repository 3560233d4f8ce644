"""The evidence by masking: the total estimate and its per-data-point view, with standard errors.

With an empty guide (no latent sites) the cumulative masked score is an unbiased estimate of the
log marginal likelihood :math:`\\log p(x) = \\sum_m S(x; m)`; with latent sites it estimates the
masked ELBO, an unbiased estimate of the ordinary ELBO. See :mod:`pyro_masked.diagnostics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from pyro_masked.diagnostics.draws import (
    DEFAULT_NUM_MASKS,
    _check_num_draws,
    _draw_seeds,
    _exact_value,
    _mean_and_stderr,
    _num_seeds,
    _Options,
    _run_draws,
)
from pyro_masked.masks import MaskLike, MaskSchedule, as_schedule
from pyro_masked.scoring import NumMasks

__all__ = [
    "LogMarginalEstimate",
    "PointwiseMaskedLogProb",
    "estimate_log_marginal",
    "pointwise_masked_log_prob",
]


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
        from pyro_masked.diagnostics.inference_data import to_inference_data

        return to_inference_data(self)


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
