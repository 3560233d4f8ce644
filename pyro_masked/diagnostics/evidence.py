"""The evidence by masking: the total estimate and its per-data-point view, with standard errors.

With an empty guide (no latent sites) the cumulative masked score is an unbiased estimate of the
log marginal likelihood :math:`\\log p(x) = \\sum_m S(x; m)`; with latent sites it estimates the
masked ELBO, an unbiased estimate of the ordinary ELBO. See :mod:`pyro_masked.diagnostics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, NamedTuple, Optional

import torch

if TYPE_CHECKING:
    import arviz

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
from pyro_masked.masks import MaskLike, MaskSchedule, as_schedule
from pyro_masked.scoring import NumMasks

__all__ = [
    "LogMarginalEstimate",
    "PointwiseMaskedLogProb",
    "Total",
    "estimate_log_marginal",
    "pointwise_masked_log_prob",
]


@dataclass(frozen=True)
class LogMarginalEstimate:
    """The result of :func:`estimate_log_marginal`.

    :ivar float estimate: the mean of the draws.
    :ivar float stderr: the Monte Carlo standard error of ``estimate`` (``0.0`` when nothing
        is random: ``num_masks="all"`` without sampled latent sites).
    :ivar int num_draws: the number of independent draws made.
    :ivar num_masks: the permutations averaged inside each draw, or ``"all"``.
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
    num_draws: int
    num_masks: NumMasks
    exact: Optional[float]
    unmasked: float
    mask: MaskSchedule
    draws: torch.Tensor = field(repr=False)


class Total(NamedTuple):
    """A sum of pointwise values and its Monte Carlo standard error."""

    estimate: float
    stderr: float


@dataclass(frozen=True)
class PointwiseMaskedLogProb:
    """The result of :func:`pointwise_masked_log_prob`.

    :ivar dict values: for each observed site, the masked log predictive of each data point
        (the site's ``log_prob`` tensor, with plate scaling and masks as Pyro applies them),
        averaged over the draws.
    :ivar dict stderrs: their Monte Carlo standard errors, each point's on its own. The errors
        of different points are correlated when they share permutations: use :meth:`total`
        for the error of a sum, not the root sum of squares of these.
    :ivar dict draws: the individual draws, shape ``(num_draws,) + batch_shape`` per site; a
        draw is one joint sample of every point's value.
    :ivar dict unmasked: the ordinary ``log_prob`` of each data point, averaged over draws.
    :ivar dict unmasked_draws: the ordinary ``log_prob`` of each data point in each draw,
        shape ``(num_draws,) + batch_shape`` per site.
    :ivar bool posterior_draws: whether each draw is one draw of latent sites from the guide
        (and no latent was integrated by sampling), so that ``unmasked_draws`` is a
        log-likelihood per approximate posterior draw, as ArviZ's ``log_likelihood`` group
        means.
    :ivar dict latent_draws: the guide's latent values in each draw, shape
        ``(num_draws,) + value_shape`` per site (empty without latent sites).
    :ivar dict observed: the observed values of each site.
    :ivar mask: the mask schedule.
    :ivar int num_draws: the number of independent draws made.
    :ivar num_masks: the permutations averaged inside each draw, or ``"all"``.
    """

    values: dict
    stderrs: dict
    draws: dict = field(repr=False)
    unmasked: dict = field(repr=False)
    unmasked_draws: dict = field(repr=False)
    observed: dict = field(repr=False)
    mask: MaskSchedule
    num_draws: int
    num_masks: NumMasks
    posterior_draws: bool = False
    latent_draws: dict = field(default_factory=dict, repr=False)

    def total(self, sites: Optional[Iterable[str]] = None) -> Total:
        """The sum of the pointwise values over data points (and sites), with its standard error.

        The error comes from the per-draw sums, so it accounts for the correlation between
        points that share masks; adding the pointwise ``stderrs`` in quadrature does not (with
        shared permutations it understates the error of a sum of :math:`N` points by a factor
        that grows like :math:`\\sqrt{N}`).

        :param sites: the sites to sum over; ``None`` sums over every observed site.
        """
        names = list(self.draws) if sites is None else list(sites)
        unknown = sorted(set(names) - set(self.draws))
        if unknown:
            raise ValueError(f"sites={names} names {unknown}, not observed sites of the result")
        per_draw = sum(self.draws[name].reshape(self.num_draws, -1).sum(-1) for name in names)
        mean, stderr = mean_and_stderr(torch.as_tensor(per_draw, dtype=torch.float64))
        return Total(float(mean), float(stderr))

    def as_inference_data(self) -> arviz.InferenceData:
        """This result as an ArviZ ``InferenceData``; see :func:`to_inference_data`."""
        from pyro_masked.diagnostics.inference_data import to_inference_data

        return to_inference_data(self)


def estimate_log_marginal(
    model: Callable,
    guide: Optional[Callable] = None,
    *,
    model_args: tuple = (),
    model_kwargs: Optional[dict] = None,
    mask: MaskLike = "cumulative",
    num_draws: int = DEFAULT_NUM_DRAWS,
    num_masks: NumMasks = 1,
    mask_groups: MaskGroups = EVERY_VECTOR,
    sites: Optional[Iterable[str]] = None,
    integrate: Optional[Iterable[str]] = None,
    num_samples: int = 1,
    seed: Optional[int] = None,
) -> LogMarginalEstimate:
    """Masked estimate of the log marginal likelihood, with a Monte Carlo standard error.

    Each of ``num_draws`` independent draws runs the guide, replays the model under
    :func:`~pyro_masked.masked` (``num_masks`` random permutations per observed site) and sums
    the trace's log densities as :class:`~pyro.infer.Trace_ELBO` does:

    .. math::

        \\widehat{\\mathcal{L}} = \\sum_{\\text{obs } s} \\widehat{\\log p}(x_s \\mid z)
            + \\log p(z) - \\log q(z),
        \\qquad z \\sim q.

    With ``mask="cumulative"`` and an empty guide (``guide=None``) the mean of the draws is an
    unbiased estimate of :math:`\\log p(x) = \\sum_m S(x; m)`; with a guide that samples
    latent sites it is an unbiased estimate of the ELBO; with a fixed size or rate it is the
    biased fixed-rate objective. ``stderr`` is the standard deviation of the draws over
    :math:`\\sqrt{n}`. Cost: ``num_draws`` runs of the guide and model, each ``num_masks``
    factorizations per Gaussian observed site.

    :param model: the Pyro model.
    :param guide: the guide, or ``None`` for the empty guide (no latent sites).
    :param tuple model_args: the model's and guide's positional arguments.
    :param dict model_kwargs: the model's and guide's keyword arguments (any names, ``mask``
        and ``num_samples`` included: they never mix with the options here).
    :param mask: ``"cumulative"``, an int mask size, a float rate or a
        :class:`~pyro_masked.masks.MaskSchedule`.
    :param int num_draws: independent draws (>= 2), whose spread gives ``stderr``.
    :param num_masks: random permutations averaged inside each draw, as in
        :class:`~pyro_masked.MaskedELBO`, or ``"all"`` for the exact expectation over every
        mask (small events only); without sampled latent sites nothing is then random, a single
        draw is made and ``stderr`` is 0.
    :param mask_groups: how the vectors of a site that share a covariance (the data points of
        a plate) share permutations within a draw. ``"vector"`` (default): every vector gets
        its own, so the errors of different points are independent and the relative error of
        :math:`\\sum_n \\log p(x_n)` falls like :math:`1/\\sqrt{N}`, at :math:`O(N D^3)`
        factorizations per draw. ``None``: all share them, as in training (one factorization
        per permutation, :math:`O(D^3 + N D^2)`), and the relative error does not shrink with
        :math:`N`. An int :math:`G`: :math:`G` groups with their own, at
        :math:`O(G D^3 + N D^2)`, relative error falling like :math:`1/\\sqrt{G}`. The
        measured trade-off is printed by ``benchmarks/evidence_groups.py``. Gaussian sites
        only: the latent-integration engine shares its permutations.
    :param sites: names of the observed sites to mask; ``None`` masks every observed site.
    :param integrate: names of local latent sites to integrate out of the masked score, with
        ``num_samples`` importance samples (or by enumeration), as in
        :class:`~pyro_masked.MaskedELBO`; an enumerated discrete latent leaves nothing random.
    :param int num_samples: importance samples per data point for ``integrate``.
    :param seed: ``None`` (draws from torch's global generator, so ``pyro.set_rng_seed``
        makes the result reproducible) or an int: draws from a private generator, the same
        result for the same seed, and the caller's random state left untouched.
    :raises ValueError: for an observed site in a subsampled plate (a random subset scaled up
        is not the data set's evidence).

    Example::

        >>> def ppca(x):  # probabilistic PCA with its latent integrated out
        ...     weight = torch.tensor([[1.0], [0.5], [-0.5], [0.2]])
        ...     covariance = weight @ weight.T + 0.3 * torch.eye(4)
        ...     with pyro.plate("data", x.shape[0]):
        ...         pyro.sample("x", dist.MultivariateNormal(torch.zeros(4), covariance), obs=x)
        >>> x = torch.randn(200, 4)
        >>> result = estimate_log_marginal(ppca, model_args=(x,), num_draws=64)
        >>> abs(result.estimate - result.exact) < 3 * result.stderr  # exact: log p(x) by Cholesky
        True
    """
    call = ModelCall.of(model, guide, model_args, model_kwargs)
    options = DrawOptions.of(num_masks, sites, integrate, num_samples, mask_groups)
    schedule = as_schedule(mask)
    num_draws = check_num_draws(num_draws)
    draws = run_draws(call, schedule, options, draw_seeds(num_draws, check_seed(seed)))
    values = torch.tensor([draw.masked_total() for draw in draws], dtype=torch.float64)
    estimate, stderr = mean_and_stderr(values)
    unmasked = sum(draw.unmasked_total() for draw in draws) / len(draws)
    return LogMarginalEstimate(
        estimate=float(estimate),
        stderr=float(stderr),
        num_draws=len(draws),
        num_masks=options.num_masks,
        exact=draws[0].exact_value(),
        unmasked=unmasked,
        mask=schedule,
        draws=values,
    )


def pointwise_masked_log_prob(
    model: Callable,
    guide: Optional[Callable] = None,
    *,
    model_args: tuple = (),
    model_kwargs: Optional[dict] = None,
    mask: MaskLike = "cumulative",
    num_draws: int = DEFAULT_NUM_DRAWS,
    num_masks: NumMasks = 1,
    mask_groups: MaskGroups = EVERY_VECTOR,
    sites: Optional[Iterable[str]] = None,
    integrate: Optional[Iterable[str]] = None,
    num_samples: int = 1,
    seed: Optional[int] = None,
) -> PointwiseMaskedLogProb:
    """The masked log predictive of every data point, for point-by-point model comparison.

    For each observed site, the value at a batch index is that data point's masked estimate
    :math:`\\sum_m w_m S(x_n; m)` (with ``mask="cumulative"``, an unbiased estimate of
    :math:`\\log p(x_n \\mid z)`, or of :math:`\\log p(x_n)` with an empty guide), averaged
    over ``num_draws`` independent draws; plate scaling and ``poutine.mask`` are applied as in
    the trace, so the values over all sites sum to :func:`estimate_log_marginal`'s estimate
    with the same draws when there are no latent sites.

    Standard errors of a sum: with ``mask_groups=None`` (or groups of several points) the
    points that share permutations have correlated errors, so the error of a sum over points
    is *not* the root sum of squares of ``stderrs``, which understates it by a factor growing
    like :math:`\\sqrt{N}`. Use
    :meth:`PointwiseMaskedLogProb.total`, which sums each draw first, or the joint draws in
    ``draws``; with the default ``mask_groups="vector"`` the points' errors are independent
    and both rules agree up to Monte Carlo noise (and shared latent draws of a guide, which
    still correlate them).

    The arguments are those of :func:`estimate_log_marginal`.
    """
    call = ModelCall.of(model, guide, model_args, model_kwargs)
    options = DrawOptions.of(num_masks, sites, integrate, num_samples, mask_groups)
    schedule = as_schedule(mask)
    num_draws = check_num_draws(num_draws)
    draws = run_draws(call, schedule, options, draw_seeds(num_draws, check_seed(seed)))
    values, stderrs, stacked, unmasked, unmasked_draws = {}, {}, {}, {}, {}
    for name in draws[0].masked_scores:
        shapes = {tuple(draw.masked_scores[name].shape) for draw in draws}
        if len(shapes) > 1:
            raise ValueError(
                f"observed site '{name}' changed its batch shape between draws ({sorted(shapes)}"
                "); pointwise values need the same data points in every draw"
            )
        stacked[name] = torch.stack([draw.masked_scores[name] for draw in draws])
        values[name], stderrs[name] = mean_and_stderr(stacked[name])
        unmasked_draws[name] = torch.stack([draw.unmasked_scores[name] for draw in draws])
        unmasked[name] = unmasked_draws[name].mean(0)
    return PointwiseMaskedLogProb(
        values=values,
        stderrs=stderrs,
        draws=stacked,
        unmasked=unmasked,
        unmasked_draws=unmasked_draws,
        observed=dict(draws[0].observed),
        mask=schedule,
        num_draws=len(draws),
        num_masks=options.num_masks,
        posterior_draws=all(draw.posterior_draw for draw in draws),
        latent_draws={
            name: torch.stack([draw.latents[name] for draw in draws])
            for name in draws[0].latents
            if all(name in draw.latents for draw in draws)
        },
    )
