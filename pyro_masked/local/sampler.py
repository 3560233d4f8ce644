"""Drawing masking triples ``(k, j, context)`` for local masked scores.

With :math:`k` visible points, the masked score of a GP is
:math:`T_k = \\mathbb{E}[\\log p(y_j \\mid y_C)]` over a uniformly random :math:`k`-subset
:math:`C` of the :math:`N` points and a uniformly random hidden point :math:`j \\notin C`, and a
mask schedule :math:`\\pi` over mask sizes :math:`m = N - k` gives

.. math::

    \\widehat{\\log p}(y) = \\sum_{m} w_m S(y; m) = N\\, \\mathbb{E}_{k \\sim \\pi(N - k)}[T_k].

A local context keeps the :math:`c` nearest members of :math:`C` to :math:`x_j`. This module
draws the triples without ever drawing :math:`C`:

- :class:`ContextSizeSampler` draws :math:`k` from :math:`\\pi(N-k)`, by default *stratified*:
  the :math:`b`-th of :math:`B` draws is the inverse CDF at :math:`(b + U_b)/B`. Every draw is
  then its own equal-probability stratum of :math:`k`, so the minibatch mean is still unbiased
  for :math:`\\mathbb{E}[T_k]` while the spread *between* context sizes — small contexts give
  prior-like, strongly negative log densities, large ones sharp predictions — no longer adds to
  the variance. (:func:`~pyro_masked.local.estimator.estimate_local_log_marginal` reports
  both variances.)
- :func:`smallest_ranks`: the members of a uniformly random :math:`k`-subset of the
  :math:`N-1` other points have ranks (in :math:`x_j`'s distance order) forming a uniformly
  random :math:`k`-subset of :math:`\\{1, \\dots, N-1\\}`, and the :math:`c` nearest members are
  its :math:`c` smallest elements. Those are drawn one after another: given the previous rank
  :math:`p` and :math:`k'` members still to place among :math:`M' = N-1-p` ranks, the number
  of ranks skipped before the next member has
  :math:`P(G \\ge g) = \\binom{M'-g}{k'} / \\binom{M'}{k'}` (Vitter's sequential sampling),
  inverted by a vectorised bisection on log-gamma functions. Cost :math:`O(B c \\log N)`.
- :class:`ContextSampler` maps ranks to points through the cached list of the :math:`L` nearest
  neighbours of every point. Ranks past :math:`L` (small :math:`k`: far contexts) are looked up
  exactly by a tree query of the :math:`r` nearest points for that :math:`j`, and for very small
  :math:`k` (below ``brute_force_below``) the context is drawn as it is defined, a uniformly
  random :math:`k`-subset whose :math:`c` nearest members are found by brute force. Every path
  is exact: the triples have the distribution the estimator needs, whatever :math:`L`.

References:

- J. S. Vitter, "Faster methods for random sampling", Communications of the ACM 1984.
- A. V. Vecchia, "Estimation and model identification for continuous spatial processes",
  JRSS B 1988 (nested local contexts along one ordering).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch
from scipy.special import gammaln

from pyro_masked.local.neighbors import NeighborIndex, check_count
from pyro_masked.masks import MaskLike, as_schedule

__all__ = ["ContextBatch", "ContextSampler", "ContextSizeSampler", "smallest_ranks"]


def _generator(rng: Optional[np.random.Generator]) -> np.random.Generator:
    """The given generator, or a fresh one seeded from torch's global generator.

    Seeding from torch makes ``pyro.set_rng_seed`` / ``torch.manual_seed`` reproduce the draws.
    """
    if rng is not None:
        return rng
    return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))


class ContextSizeSampler:
    """Draws context sizes :math:`k \\in \\{0, \\dots, N-1\\}` with probability
    :math:`\\pi(N - k)` of a mask schedule.

    :param mask: ``"cumulative"``, an int mask size, a float rate or a
        :class:`~pyro_masked.masks.MaskSchedule`.
    :param num_points: :math:`N`.
    """

    def __init__(self, mask: MaskLike, num_points: int):
        self.schedule = as_schedule(mask)
        self.num_points = check_count(num_points, "num_points")
        probs = self.schedule.size_probs(self.num_points).flip(0).numpy()  # entry k: pi(N - k)
        cdf = np.cumsum(probs)
        cdf /= cdf[-1]
        cdf[int(np.flatnonzero(probs)[-1]) :] = 1.0  # no draw lands on a size of probability 0
        self._cdf = cdf
        self.probs = probs

    def draw(
        self, batch_size: int, rng: Optional[np.random.Generator] = None, stratified: bool = True
    ) -> np.ndarray:
        """``batch_size`` context sizes, shape ``(B,)``; stratified or independent draws."""
        batch_size = check_count(batch_size, "batch_size")
        rng = _generator(rng)
        uniform = rng.random(batch_size)
        if stratified:
            uniform = (np.arange(batch_size) + uniform) / batch_size
        return np.searchsorted(self._cdf, uniform, side="right").astype(np.int64)


def smallest_ranks(
    context_sizes: np.ndarray,
    num_ranks: int,
    num_others: int,
    rng: Optional[np.random.Generator] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``num_ranks`` smallest elements of uniformly random subsets of ``{1..num_others}``.

    :param context_sizes: subset sizes :math:`k_b \\le` ``num_others``, shape ``(B,)``.
    :returns: ``(ranks, valid)``, both ``(B, num_ranks)``: ranks ascending in each row; the
        first :math:`\\min(k_b, c)` entries are valid, the rest are 0.
    """
    rng = _generator(rng)
    context_sizes = np.asarray(context_sizes, dtype=np.int64)
    if (context_sizes < 0).any() or (context_sizes > num_others).any():
        raise ValueError(f"context sizes must lie in 0..{num_others}")
    batch = context_sizes.shape[0]
    ranks = np.zeros((batch, num_ranks), dtype=np.int64)
    valid = np.arange(num_ranks)[None, :] < np.minimum(context_sizes, num_ranks)[:, None]
    previous = np.zeros(batch, dtype=np.int64)
    still_to_place = context_sizes.copy()
    steps = max(1, math.ceil(math.log2(num_others + 2)))
    for column in range(num_ranks):
        active = valid[:, column]
        if not active.any():
            break
        pool = (num_others - previous)[active].astype(np.float64)  # M'
        needed = still_to_place[active].astype(np.float64)  # k' >= 1
        log_u = np.log1p(-rng.random(active.sum()))  # log of a uniform on (0, 1]
        log_total = gammaln(pool + 1) - gammaln(pool - needed + 1)
        # Largest skip g in [0, M' - k'] with P(G >= g) >= U; bisection on [low, high).
        low = np.zeros_like(pool)
        high = pool - needed + 1
        for _ in range(steps):
            mid = np.floor((low + high) / 2)
            log_survival = gammaln(pool - mid + 1) - gammaln(pool - mid - needed + 1) - log_total
            ok = log_survival >= log_u
            open_ = high - low > 1
            low = np.where(open_ & ok, mid, low)
            high = np.where(open_ & ~ok, mid, high)
        rank = previous[active] + 1 + low.astype(np.int64)
        ranks[active, column] = rank
        previous[active] = rank
        still_to_place[active] -= 1
    return ranks, valid


class ContextBatch(NamedTuple):
    """A minibatch of masking triples.

    :ivar targets: hidden points :math:`j`, ``int64`` tensor ``(B,)``.
    :ivar context_sizes: :math:`k` per triple, ``int64`` tensor ``(B,)``.
    :ivar context: indices of the :math:`\\min(k, c)` nearest members of :math:`C`, nearest
        first, ``int64`` tensor ``(B, c)``; padded with the target's own index.
    :ivar valid: which context entries are real, ``bool`` tensor ``(B, c)``.
    """

    targets: torch.Tensor
    context_sizes: torch.Tensor
    context: torch.Tensor
    valid: torch.Tensor


class ContextSampler:
    """Draws the local contexts of masking triples over fixed training inputs.

    :param index: the :class:`~pyro_masked.local.neighbors.NeighborIndex` of the inputs.
    :param context_size: :math:`c`, the number of nearest context members kept.
    :param num_neighbors: :math:`L`, the length of the cached neighbour lists (default
        :math:`\\min(N - 1, 2c)`); longer lists mean fewer tree queries and more memory,
        :math:`4 N L` bytes.
    :param brute_force_below: contexts smaller than this are drawn explicitly and searched by
        brute force (default :math:`\\lceil\\sqrt{c N}\\rceil`, where drawing :math:`k` points
        costs about what a tree query for the :math:`c N / k` nearest costs).
    """

    def __init__(
        self,
        index: NeighborIndex,
        context_size: int,
        num_neighbors: Optional[int] = None,
        brute_force_below: Optional[int] = None,
    ):
        self.index = index
        num_points = index.num_points
        self.context_size = check_count(context_size, "context_size")
        if num_points < 2:
            raise ValueError("local contexts need at least 2 training points")
        if num_neighbors is None:
            num_neighbors = min(num_points - 1, 2 * self.context_size)
        self.num_neighbors = check_count(num_neighbors, "num_neighbors")
        if self.num_neighbors > num_points - 1:
            raise ValueError(
                f"num_neighbors={num_neighbors} exceeds the {num_points - 1} other points"
            )
        if brute_force_below is None:
            brute_force_below = math.ceil(math.sqrt(self.context_size * num_points))
        if isinstance(brute_force_below, bool) or not isinstance(brute_force_below, int):
            raise TypeError(f"brute_force_below must be an int, got {brute_force_below!r}")
        self.brute_force_below = brute_force_below
        self._points_np: Optional[np.ndarray] = None

    @property
    def num_points(self) -> int:
        """The number of training points, :math:`N`."""
        return self.index.num_points

    def neighbor_lists(self) -> np.ndarray:
        """The cached ``(N, L)`` lists (computed on first use)."""
        return self.index.neighbor_lists(self.num_neighbors)

    def sample(
        self,
        targets: np.ndarray,
        context_sizes: np.ndarray,
        rng: Optional[np.random.Generator] = None,
    ) -> ContextBatch:
        """The local contexts of hidden points ``targets`` with context sizes ``context_sizes``.

        For each triple, :math:`C` is (in distribution) a uniformly random ``k``-subset of the
        other points and the context its ``min(k, c)`` nearest members to ``x_j``.
        """
        rng = _generator(rng)
        targets = np.asarray(targets, dtype=np.int64)
        context_sizes = np.asarray(context_sizes, dtype=np.int64)
        if targets.shape != context_sizes.shape or targets.ndim != 1:
            raise ValueError(
                f"targets {targets.shape} and context_sizes {context_sizes.shape} must be "
                "1-D of the same length"
            )
        num_points, width = self.num_points, self.context_size
        context = np.repeat(targets[:, None], width, axis=1)
        valid = np.zeros((len(targets), width), dtype=bool)
        brute = context_sizes < self.brute_force_below
        for row in np.flatnonzero(brute):
            members = self._brute_force_context(targets[row], context_sizes[row], rng)
            context[row, : len(members)] = members
            valid[row, : len(members)] = True
        rows = np.flatnonzero(~brute)
        if len(rows):
            ranks, rank_valid = smallest_ranks(context_sizes[rows], width, num_points - 1, rng)
            context[rows] = np.where(
                rank_valid, self._at_ranks(targets[rows], ranks), context[rows]
            )
            valid[rows] = rank_valid
        return ContextBatch(
            targets=torch.from_numpy(targets),
            context_sizes=torch.from_numpy(context_sizes),
            context=torch.from_numpy(context),
            valid=torch.from_numpy(valid),
        )

    def _brute_force_context(self, target: int, size: int, rng: np.random.Generator) -> np.ndarray:
        if size == 0:
            return np.zeros(0, dtype=np.int64)
        if self._points_np is None:
            self._points_np = self.index.points.detach().cpu().to(torch.float64).numpy()
        members = rng.choice(self.num_points - 1, size=size, replace=False)
        members = members + (members >= target)  # skip the target itself
        gap = self._points_np[members] - self._points_np[target]
        nearest = np.argsort(np.einsum("nd,nd->n", gap, gap), kind="stable")
        return members[nearest[: self.context_size]]

    def _at_ranks(self, targets: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """The points at 1-based ``ranks`` in each target's distance order (0 ranks ignored)."""
        lists = self.neighbor_lists()
        width = lists.shape[1]
        deepest = ranks.max(-1)
        out = lists[targets[:, None], np.clip(ranks, 1, width) - 1].astype(np.int64)
        # Ranks past the cached list: query the exact neighbours of those targets, bucketed by
        # depth (powers of two) so a few queries serve the whole minibatch.
        far = np.flatnonzero(deepest > width)
        if len(far):
            depth = 2 ** np.ceil(np.log2(deepest[far])).astype(np.int64)
            depth = np.minimum(depth, self.num_points - 1)
            for bucket in np.unique(depth):
                rows = far[depth == bucket]
                found = self.index.neighbors_of_members(targets[rows], int(bucket))
                out[rows] = np.take_along_axis(found, np.clip(ranks[rows], 1, None) - 1, 1)
        return out
