"""``masked_log_prob``: the masked estimate of a distribution's log density over its event.

The public entry point validates its arguments, recognises the distribution and hands the
numbers to an engine in :mod:`pyro_masked.conditionals`.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Optional, Union

import torch
import torch.distributions as tdist
from pyro.distributions.util import broadcast_shape

from pyro_masked.conditionals.gaussian import (
    MAX_ENUMERATED_MASKS,
    count_enumerated_masks,
    gaussian_masked_score,
)
from pyro_masked.masks import MaskLike, MaskSchedule, as_schedule
from pyro_masked.util import check_generator, check_mask_groups, unwrap

__all__ = [
    "SUPPORTED_DISTRIBUTIONS",
    "UnsupportedDistributionError",
    "all_finite",
    "masked_event_size",
    "masked_log_prob",
]

NumMasks = Union[int, str]

#: What :func:`masked_log_prob` accepts, for error messages and documentation.
SUPPORTED_DISTRIBUTIONS = (
    "MultivariateNormal (torch, Pyro or GPyTorch, LinearOperator covariances included), "
    "LowRankMultivariateNormal, distributions that factorize over the event "
    "(Independent of univariate distributions, e.g. Normal(...).to_event(1)), "
    "Independent copies of a supported Gaussian (each base event masked on its own), "
    "and univariate distributions (nothing to mask), possibly expanded or masked"
)


class UnsupportedDistributionError(TypeError):
    """The distribution has no masked conditionals in this package."""


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite.

    One reduction first: a finite sum proves every entry finite, and only a non-finite sum (a
    NaN or inf entry, or an overflow) pays for the elementwise test that tells them apart.
    """
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_num_masks(num_masks: NumMasks) -> NumMasks:
    """Validate the ``num_masks`` argument: an int >= 1 or ``"all"``."""
    if isinstance(num_masks, str):
        if num_masks != "all":
            raise ValueError(f"num_masks must be an int >= 1 or 'all', got {num_masks!r}")
        return num_masks
    if isinstance(num_masks, bool) or not isinstance(num_masks, numbers.Integral):
        raise TypeError(f"num_masks must be an int >= 1 or 'all', got {num_masks!r}")
    if num_masks < 1:
        raise ValueError(f"num_masks must be >= 1, got {num_masks}")
    return int(num_masks)


def masked_log_prob(
    d: tdist.Distribution,
    value: torch.Tensor,
    mask: MaskLike = "cumulative",
    num_masks: NumMasks = 1,
    *,
    mask_groups: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Masked pre-training estimate of ``d.log_prob(value)``, masking over the event dimension.

    With :math:`S(x; m)` the mean log predictive density of a hidden coordinate under a
    uniformly random mask of size :math:`m`, a schedule with weights :math:`w_m`
    (:mod:`pyro_masked.masks`) gives

    .. math::

        \\widehat{\\log p}(x) = \\sum_{m=1}^{D} w_m\\, S(x; m).

    ``mask="cumulative"`` (:math:`w_m = 1`) is an unbiased estimate of :math:`\\log p(x)`, since
    :math:`\\log p(x) = \\sum_m S(x; m)` (Fong & Holmes, 2020); a fixed size or rate returns
    :math:`D\\, S(x; m)` (Moreno-Muñoz et al., 2023). Gaussian models use one Cholesky factor
    per random permutation for every mask size (:mod:`pyro_masked.conditionals.gaussian`).
    Distributions that factorize over the event have their marginals as conditionals, so
    their masked score equals ``d.log_prob(value)`` for every schedule, and a univariate
    distribution has nothing to mask.

    :param d: the distribution; see :data:`SUPPORTED_DISTRIBUTIONS`.
    :param value: observed values, shape ``batch_shape + event_shape`` (broadcastable).
    :param mask: ``"cumulative"``, an int mask size, a float rate in ``(0, 1)`` or a
        :class:`~pyro_masked.masks.MaskSchedule`.
    :param num_masks: random permutations averaged (an int >= 1, batched), or ``"all"`` for the
        exact expectation over every mask of the chosen sizes. ``"all"`` is closed form for
        sizes ``1`` (leave-one-out) and ``D``; other sizes enumerate their masks, at most
        :data:`~pyro_masked.conditionals.gaussian.MAX_ENUMERATED_MASKS` in all.
    :param mask_groups: (keyword only) ``None``: every vector that shares a covariance shares
        the permutations of the call (one factorization per permutation; the right choice for
        training). An int ``G``: those vectors are split into ``G`` groups, each with its own
        independent permutations, at :math:`O(G D^3)` factorizations; ``G`` equal to the
        number of vectors gives independent masks per vector (the right choice for an
        evidence estimate whose error should shrink with the number of vectors).
    :param generator: (keyword only) the :class:`torch.Generator` the permutations are drawn
        from; ``None`` uses torch's global generator (so ``pyro.set_rng_seed`` applies).
        See :func:`pyro_masked.util.private_generator`.
    :returns: a tensor of shape ``broadcast(d.batch_shape, value.shape[:-event_dim])``.

    Vectors that share a covariance (the data points of a plate) share the permutations of a
    call, so their masking errors are correlated: the spread of a sum over ``N`` points grows
    like ``N``, not ``sqrt(N)``. Raising ``num_masks`` costs one :math:`O(D^3)` factorization
    per permutation, but no extra :math:`O(N D^2)` work, since the permutations are averaged
    before they meet the data.

    Example::

        >>> d = dist.MultivariateNormal(torch.zeros(3), torch.eye(3))
        >>> masked_log_prob(d, torch.randn(10, 3)).shape
        torch.Size([10])
    """
    schedule = as_schedule(mask)
    num_masks = check_num_masks(num_masks)
    mask_groups = check_mask_groups(mask_groups)
    generator = check_generator(generator)
    if not isinstance(d, tdist.Distribution):
        raise TypeError(f"d must be a torch or Pyro distribution, got {type(d).__name__}")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"value must be a tensor, got {type(value).__name__}")
    event_shape = d.event_shape
    if value.shape[value.dim() - len(event_shape) :] != event_shape or value.dim() < len(
        event_shape
    ):
        raise ValueError(
            f"value has shape {tuple(value.shape)}, which does not end with the "
            f"distribution's event shape {tuple(event_shape)}"
        )
    if not all_finite(value):
        raise ValueError("value contains NaN or infinite entries")
    return _masked_log_prob(d, value, schedule, num_masks, mask_groups, generator)


def _masked_log_prob(
    d: tdist.Distribution,
    value: torch.Tensor,
    schedule: MaskSchedule,
    num_masks: NumMasks,
    mask_groups: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Dispatch on the distribution's type; arguments are already validated."""
    unwrapped = unwrap(d)
    if unwrapped.factorizes:
        # Each coordinate's conditional is its marginal: the masked score is the log density.
        return d.log_prob(value)
    gaussian = gaussian_parts(unwrapped.base)
    if gaussian is None:
        raise UnsupportedDistributionError(
            f"{type(d).__name__} has no masked conditionals; "
            f"supported are {SUPPORTED_DISTRIBUTIONS}"
        )
    loc, covariance = gaussian
    score = _grouped_gaussian_score(
        loc,
        covariance,
        value,
        schedule,
        num_masks,
        mask_groups=mask_groups,
        generator=generator,
    )
    # Masks, expansions and independent copies of the base event, innermost first.
    return unwrapped.rewrap(score)


def is_supported(d: tdist.Distribution) -> bool:
    """Whether :func:`masked_log_prob` can score ``d``."""
    unwrapped = unwrap(d)
    return unwrapped.factorizes or _is_gaussian(unwrapped.base)


def masked_event_size(d: tdist.Distribution) -> int:
    """The number of coordinates a mask of ``d`` chooses from (0: nothing to mask).

    The event size, except for independent copies of a multivariate base, whose base events
    are masked one by one.
    """
    return unwrap(d).masked_event_size


def _is_gaussian(d) -> bool:
    if isinstance(d, (tdist.MultivariateNormal, tdist.LowRankMultivariateNormal)):
        return len(d.event_shape) == 1
    return False


def gaussian_parts(d):
    """``(loc, covariance)`` with the covariance's unexpanded batch shape, or None."""
    if not _is_gaussian(d):
        return None
    if isinstance(d, tdist.LowRankMultivariateNormal):
        factor = d._unbroadcasted_cov_factor
        covariance = factor @ factor.mT + torch.diag_embed(d._unbroadcasted_cov_diag)
        return d.loc, covariance
    if getattr(d, "islazy", False):  # GPyTorch, covariance a LinearOperator: nothing factored yet
        return d.loc, d.lazy_covariance_matrix.to_dense()
    # torch (and non-lazy GPyTorch) keep the covariance they were given; read it from the
    # instance, since GPyTorch's property would rebuild it from the Cholesky factor.
    if "covariance_matrix" in d.__dict__:
        return d.loc, _unexpand(d.__dict__["covariance_matrix"], 2)
    scale_tril = d._unbroadcasted_scale_tril
    return d.loc, scale_tril @ scale_tril.mT


def _unexpand(tensor: torch.Tensor, event_dims: int) -> torch.Tensor:
    """Undo ``expand`` on batch dimensions (stride 0), so shared matrices are factored once."""
    index = tuple(
        slice(0, 1) if stride == 0 and size > 1 else slice(None)
        for size, stride in zip(tensor.shape[:-event_dims], tensor.stride()[:-event_dims])
    )
    return tensor[index]


class _ResidualScatter:
    """:math:`\\sum_n (x_n - \\mu)(x_n - \\mu)^\\top` for data ``x`` sharing one mean, on demand.

    The data's own scatter :math:`X^\\top X` and sum are cached for as long as the data tensor
    lives unchanged (the observations of a model are the same tensor at every step), so the
    masked score's backward pass costs :math:`O(D^2)` instead of :math:`O(N D^2)` in the data.
    """

    _cache: dict = {}
    _max_entries = 8

    def __init__(self, value: torch.Tensor, loc: torch.Tensor):
        self.value = value
        self.loc = loc.detach().reshape(-1)

    def __call__(self) -> torch.Tensor:
        data = self.value.detach().reshape(-1, self.value.shape[-1])
        key = id(self.value)
        entry = self._cache.get(key)
        if entry is None or entry[0]() is not self.value or entry[1] != self.value._version:
            if len(self._cache) >= self._max_entries:
                self._cache.pop(next(iter(self._cache)))
            entry = (weakref.ref(self.value), self.value._version, data.mT @ data, data.sum(0))
            self._cache[key] = entry
        _, _, second_moment, total = entry
        loc = self.loc
        cross = torch.outer(total, loc)
        scatter = second_moment - cross - cross.mT + data.shape[0] * torch.outer(loc, loc)
        return scatter[None]


def _grouped_gaussian_score(
    loc, covariance, value, schedule, num_masks, *, mask_groups=None, generator=None
) -> torch.Tensor:
    """Group vectors that share a covariance, score them, and restore the batch shape.

    ``mask_groups`` splits each covariance's vectors into that many contiguous groups with
    independent permutations; ``generator`` is where the permutations come from.
    """
    size = value.shape[-1]
    size_weights = schedule.size_weights(size, dtype=value.dtype, device=value.device)
    if num_masks == "all":
        enumerated = count_enumerated_masks(size, schedule.sizes(size))
        if enumerated > MAX_ENUMERATED_MASKS:
            raise ValueError(
                f"num_masks='all' would condition on {enumerated} masks for an event of size "
                f"{size}, more than the limit of {MAX_ENUMERATED_MASKS}; use an int num_masks"
            )
    residuals = value - loc
    batch_shape = torch.Size(broadcast_shape(residuals.shape[:-1], covariance.shape[:-2]))
    residuals = residuals.expand(batch_shape + (size,))
    cov_shape = (1,) * (len(batch_shape) - (covariance.dim() - 2)) + tuple(covariance.shape[:-2])
    covariance = covariance.reshape(cov_shape + (size, size))
    own = [i for i, n in enumerate(cov_shape) if n != 1]
    shared = [i for i, n in enumerate(cov_shape) if n == 1]
    order = own + shared
    grouped = residuals.permute(order + [residuals.dim() - 1])
    num_groups = math.prod(cov_shape)
    grouped = grouped.reshape(num_groups, -1, size)
    covariance = covariance.reshape(num_groups, size, size)
    if mask_groups is not None and num_masks != "all" and grouped.shape[1] > 1:
        # Independent permutations per group of vectors: one call per group.
        chunks = grouped.tensor_split(min(mask_groups, grouped.shape[1]), dim=1)
        scores = torch.cat(
            [
                gaussian_masked_score(
                    covariance, chunk, size_weights, num_masks, generator=generator
                )
                for chunk in chunks
            ],
            dim=1,
        )
    else:
        scatter = None
        if num_groups == 1 and loc.shape[:-1].numel() == 1 and value.shape == batch_shape + (size,):
            scatter = _ResidualScatter(value, loc)
        scores = gaussian_masked_score(
            covariance, grouped, size_weights, num_masks, scatter, generator=generator
        )
    scores = scores.reshape([batch_shape[i] for i in order])
    return scores.permute([order.index(i) for i in range(len(order))])
