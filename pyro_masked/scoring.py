"""``masked_log_prob``: the masked estimate of a distribution's log density over its event.

The public entry point validates its arguments, recognises the distribution and hands the
numbers to an engine in :mod:`pyro_masked.conditionals`.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Optional, Union

import numpy
import torch
import torch.distributions as tdist
from pyro.distributions.util import broadcast_shape

from pyro_masked.conditionals.gaussian import check_enumeration, gaussian_masked_score
from pyro_masked.conditionals.lowrank import low_rank_cost_is_lower, low_rank_masked_score
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
    per random permutation for every mask size (:mod:`pyro_masked.conditionals.gaussian`); a
    ``LowRankMultivariateNormal`` of rank well below :math:`D` scored on few vectors (a sparse
    GP) uses Woodbury conditionals on sampled context sizes instead, without forming the
    covariance (:mod:`pyro_masked.conditionals.lowrank`: unbiased, with more spread), except
    for ``num_masks="all"`` and ``mask_groups``.
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
        :data:`~pyro_masked.conditionals.gaussian.MAX_ENUMERATED_MASKS` in all, holding at most
        :data:`~pyro_masked.conditionals.gaussian.MAX_ENUMERATION_BYTES` of covariances.
    :param mask_groups: (keyword only) ``None``: every vector that shares a covariance shares
        the permutations of the call (one factorization per permutation; the right choice for
        training). An int ``G``: the vectors of the batch are split into ``G`` groups of
        near-equal size, each with its own independent permutations, at :math:`O(G D^3 + N
        D^2)` for ``N`` vectors; ``G`` at least the number of vectors gives independent masks
        per vector (the right choice for an evidence estimate whose relative error should
        shrink like :math:`1/\\sqrt{N}`).
    :param generator: (keyword only) the :class:`torch.Generator` the permutations are drawn
        from; ``None`` uses torch's global generator (so ``pyro.set_rng_seed`` applies).
        See :func:`pyro_masked.util.private_generator`.
    :returns: a tensor of shape ``broadcast(d.batch_shape, value.shape[:-event_dim])``.

    Vectors that share a covariance (the data points of a plate) share the permutations of a
    call by default, so their masking errors are correlated: the spread of a sum over ``N``
    points grows like ``N``, not :math:`\\sqrt{N}`, and its relative error does not shrink as
    data are added. Raising ``num_masks`` costs one :math:`O(D^3)` factorization per
    permutation, but no extra :math:`O(N D^2)` work, since the permutations are averaged before
    they meet the data. For an estimate of :math:`\\sum_n \\log p(x_n)` (model comparison),
    pass ``mask_groups=N``: independent permutations per vector, at :math:`O(N D^3)`, or ``G``
    groups at :math:`O(G D^3 + N D^2)`. Measured on a PPCA model with :math:`D = 20`
    (``benchmarks/mask_sharing.py``), the relative error of the sum is 8.0% (``N = 100``) and
    5.1% (``N = 1000``) with shared permutations, 1.3% and 0.37% per vector.

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
    _check_value_shape(d, value)
    unwrapped = unwrap(d)
    if unwrapped.factorizes:
        # Each coordinate's conditional is its marginal: the masked score is the log density.
        return d.log_prob(value)
    low_rank = _low_rank_parts(unwrapped.base, value, num_masks, mask_groups)
    if low_rank is not None:
        score = _low_rank_score(*low_rank, value, schedule, num_masks, generator)  # type: ignore[call-arg]
        return unwrapped.rewrap(score)
    gaussian = gaussian_parts(unwrapped.base)
    if gaussian is None:
        raise UnsupportedDistributionError(
            f"{type(d).__name__} has no masked conditionals; "
            f"supported are {SUPPORTED_DISTRIBUTIONS}"
        )
    loc, covariance = gaussian
    dtype = compute_dtype(value.dtype, loc.dtype, covariance.dtype)
    value, loc, covariance = value.to(dtype), loc.to(dtype), covariance.to(dtype)
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


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The floating dtype the masked score is computed in: the promotion of ``dtypes``.

    Integer observations are promoted to the distribution's dtype, as in ``log_prob``. Half
    precision (``float16``, ``bfloat16``) is raised to ``float32``: the score sums ``D^2``
    terms per vector, whose rounding in half precision biases it by a tenth of a nat per
    vector and more.
    """
    dtype = dtypes[0]
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
        dtype = torch.promote_types(dtype, torch.float32)
    return dtype


def _check_value_shape(d: tdist.Distribution, value: torch.Tensor) -> None:
    """Refuse a value whose shape does not fit the distribution, as ``log_prob`` validation does.

    A ``ValueError``, so that Pyro reports it with the site's name and shapes.
    """
    event_shape, batch_shape = d.event_shape, d.batch_shape
    event_dims = len(event_shape)
    if value.dim() < event_dims or value.shape[value.dim() - event_dims :] != event_shape:
        raise ValueError(
            f"value has shape {tuple(value.shape)}, which does not end with the "
            f"distribution's event shape {tuple(event_shape)}"
        )
    try:
        broadcast_shape(value.shape[: value.dim() - event_dims], batch_shape)
    except ValueError:
        raise ValueError(
            f"value has batch shape {tuple(value.shape[: value.dim() - event_dims])}, which "
            f"does not broadcast with the distribution's batch shape {tuple(batch_shape)}"
        ) from None


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
        return _unexpand(d.loc, 1), covariance
    if getattr(d, "islazy", False):  # GPyTorch, covariance a LinearOperator: nothing factored yet
        return _unexpand(d.loc, 1), d.lazy_covariance_matrix.to_dense()
    # torch (and non-lazy GPyTorch) keep the covariance they were given; read it from the
    # instance, since GPyTorch's property would rebuild it from the Cholesky factor.
    if "covariance_matrix" in d.__dict__:
        return _unexpand(d.loc, 1), _unexpand(d.__dict__["covariance_matrix"], 2)
    scale_tril = d._unbroadcasted_scale_tril
    return _unexpand(d.loc, 1), scale_tril @ scale_tril.mT


def _unexpand(tensor: torch.Tensor, event_dims: int) -> torch.Tensor:
    """Undo ``expand`` on batch dimensions (stride 0), so shared matrices are factored once.

    A plate expands a distribution built outside it, so its covariance is a stride-0 view of
    one matrix. Slicing that view would be correct, but its backward materialises a zero
    gradient of the full expanded shape (an :math:`N \\times D \\times D` tensor for a plate of
    :math:`N` vectors) before the expansion's backward sums it. When the view is a plain
    broadcast of the tensor it was taken from, that tensor is used instead: same values,
    and the gradient flows to it directly.
    """
    index = tuple(
        slice(0, 1) if stride == 0 and size > 1 else slice(None)
        for size, stride in zip(tensor.shape[:-event_dims], tensor.stride()[:-event_dims])
    )
    if all(part == slice(None) for part in index):
        return tensor
    base = tensor._base
    if base is not None and _is_broadcast_of(tensor, base):
        return base.reshape((1,) * (tensor.dim() - base.dim()) + tuple(base.shape))
    return tensor[index]


def _is_broadcast_of(view: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether ``view`` is exactly ``base.expand(view.shape)``, read from shapes and strides."""
    if base.dim() > view.dim() or view.storage_offset() != base.storage_offset():
        return False
    leading = view.dim() - base.dim()
    if any(stride != 0 for stride in view.stride()[:leading]):
        return False
    for base_size, base_stride, size, stride in zip(
        base.shape, base.stride(), view.shape[leading:], view.stride()[leading:]
    ):
        if base_size == size:
            if size > 1 and stride != base_stride:
                return False
        elif base_size != 1 or stride != 0:
            return False
    return True


class _ResidualScatter:
    """:math:`\\sum_n (x_n - \\mu)(x_n - \\mu)^\\top` for data ``x`` sharing one mean, on demand.

    The observations of a model are usually the same tensor at every step, so the data's own
    scatter :math:`X^\\top X` and sum are kept with the data tensor from its second use on
    (an entry dies with the tensor), and the masked score's backward pass costs
    :math:`O(N D)` instead of :math:`O(N D^2)`. An entry is used only while a private copy of
    the data it was computed from is equal to the data, element by element: a buffer refilled
    behind autograd's back (``x.data.copy_``, a NumPy array under ``torch.from_numpy``
    rewritten) has no version bump, so neither identity nor version can tell that it
    changed. The comparison reads :math:`2 N D` numbers, a fraction of the :math:`2 N D^2`
    operations it saves.

    CPU data only: on an accelerator the comparison would synchronise the device in every
    backward pass, and the product it saves is cheap there.
    """

    _entries: dict = {}  # id(data) -> (copy of data, X^T X, sum of rows); removed with the data
    _seen_once = object()  # the first use stores nothing: fresh data every step (minibatches)
    # would pay for a copy that is never reused

    def __init__(self, value: torch.Tensor, loc: torch.Tensor):
        self.value = value
        self.loc = loc.detach().reshape(-1)

    def __call__(self) -> torch.Tensor:
        data = self.value.detach().reshape(-1, self.value.shape[-1])
        key = id(self.value)
        entry = self._entries.get(key)
        if entry is None:
            weakref.finalize(self.value, self._entries.pop, key, None)
            self._entries[key] = self._seen_once
            second_moment, total = data.mT @ data, data.sum(0)
        else:
            if entry is self._seen_once or not _same_values(entry[0], data):
                entry = (data.clone(), data.mT @ data, data.sum(0))
                self._entries[key] = entry
            _, second_moment, total = entry
        loc = self.loc
        # sum_n (x_n - mu)(x_n - mu)^T = X^T X - t mu^T - mu (t - N mu)^T, t the sum of rows
        scatter = torch.addr(second_moment, total, loc, alpha=-1)
        scatter.addr_(loc, total - data.shape[0] * loc, alpha=-1)
        return scatter[None]


def _same_values(copy: torch.Tensor, data: torch.Tensor) -> bool:
    """Element by element; NaNs never compare equal, so data holding them is never reused."""
    if copy.shape != data.shape or copy.dtype != data.dtype:
        return False
    try:
        # NumPy compares CPU arrays about twice as fast as torch.equal.
        return bool(numpy.array_equal(copy.numpy(), data.numpy()))
    except (TypeError, RuntimeError):  # a dtype NumPy lacks (bfloat16), a lazy view
        return torch.equal(copy, data)


def _group_by_covariance(residuals: torch.Tensor, cov_batch_shape: torch.Size):
    """Arrange ``residuals`` as ``(G, n, D)``: ``G`` covariances, ``n`` vectors sharing each.

    Returns the grouped residuals, the covariance batch shape padded to the full batch
    (``cov_shape``, whose product is ``G``), and a function restoring scores of shape
    ``(G, n)`` to the batch shape.
    """
    size = residuals.shape[-1]
    batch_shape = torch.Size(broadcast_shape(residuals.shape[:-1], cov_batch_shape))
    residuals = residuals.expand(batch_shape + (size,))
    cov_shape = (1,) * (len(batch_shape) - len(cov_batch_shape)) + tuple(cov_batch_shape)
    own = [i for i, n in enumerate(cov_shape) if n != 1]
    shared = [i for i, n in enumerate(cov_shape) if n == 1]
    order = own + shared
    grouped = residuals.permute(order + [residuals.dim() - 1])
    grouped = grouped.reshape(math.prod(cov_shape), -1, size)

    def restore(scores: torch.Tensor) -> torch.Tensor:
        scores = scores.reshape([batch_shape[i] for i in order])
        return scores.permute([order.index(i) for i in range(len(order))])

    return grouped, cov_shape, restore


def _grouped_gaussian_score(
    loc, covariance, value, schedule, num_masks, mask_groups=None, generator=None
) -> torch.Tensor:
    """Group vectors that share a covariance, score them, and restore the batch shape."""
    size = value.shape[-1]
    size_weights = schedule.size_weights(size, dtype=value.dtype, device=value.device)
    grouped, cov_shape, restore = _group_by_covariance(value - loc, covariance.shape[:-2])
    num_groups = math.prod(cov_shape)
    if num_masks == "all":
        check_enumeration(size, schedule.sizes(size), num_groups, size_weights.dtype)
    scatter = None
    if (
        num_groups == 1
        and loc.shape[:-1].numel() == 1
        and value.shape[:-1].numel() == grouped.shape[1]
        and value.device.type == "cpu"
    ):
        scatter = _ResidualScatter(value, loc)
    scores = gaussian_masked_score(
        covariance.reshape(num_groups, size, size),
        grouped,
        size_weights,
        num_masks,
        scatter,
        mask_groups=mask_groups,
        generator=generator,
    )
    return restore(scores)


def _low_rank_parts(d, value: torch.Tensor, num_masks, mask_groups):
    """``(loc, cov_factor, cov_diag)`` of a ``LowRankMultivariateNormal`` that the low-rank
    engine scores more cheaply than the dense one, else None.

    The low-rank engine draws permutations shared by the vectors of the call; ``"all"`` and
    ``mask_groups`` use the dense engine.
    """
    if not isinstance(d, tdist.LowRankMultivariateNormal) or len(d.event_shape) != 1:
        return None
    if num_masks == "all" or mask_groups is not None:
        return None
    factor, diag = d._unbroadcasted_cov_factor, d._unbroadcasted_cov_diag
    size, rank = factor.shape[-2:]
    cov_batch = torch.Size(broadcast_shape(factor.shape[:-2], diag.shape[:-1]))
    batch = broadcast_shape(value.shape[:-1], d.loc.shape[:-1], cov_batch)
    if not low_rank_cost_is_lower(size, rank, math.prod(batch), cov_batch.numel()):
        return None
    return _unexpand(d.loc, 1), factor, diag


def _low_rank_score(loc, factor, diag, value, schedule, num_masks, generator) -> torch.Tensor:
    """Score with :mod:`pyro_masked.conditionals.lowrank`, grouped like the dense engine."""
    size, rank = factor.shape[-2:]
    cov_batch = torch.Size(broadcast_shape(factor.shape[:-2], diag.shape[:-1]))
    grouped, cov_shape, restore = _group_by_covariance(value - loc, cov_batch)
    num_groups = math.prod(cov_shape)
    factor = factor.expand(cov_batch + (size, rank)).reshape(num_groups, size, rank)
    diag = diag.expand(cov_batch + (size,)).reshape(num_groups, size)
    context_weights = schedule.context_weights(size, dtype=value.dtype, device=value.device)
    scores = low_rank_masked_score(factor, diag, grouped, context_weights, num_masks, generator)
    return restore(scores)
