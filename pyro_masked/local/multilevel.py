"""A multilevel Monte Carlo estimate of a GP's evidence over nested local contexts.

Local contexts keep the :math:`c` nearest members of a random context :math:`C`; their score
:math:`T^{(c)} = \\log p(y_j \\mid y_{C^{(c)}})` misses what the farther members would have
added (the *screening error*), so the single-level estimate is biased low when noisy
neighbours screen poorly. The :math:`c` nearest members of one context are *nested* across
:math:`c`: for one triple :math:`(k, j, C)` the :math:`c_L` smallest ranks the sampler draws
give the contexts of every level :math:`c_0 < c_1 < \\dots < c_L` at once, as prefixes. With
the telescoping sum (Giles, 2008)

.. math::

    \\log p(y) \\approx N\\,\\mathbb{E}\\big[T^{(c_L)}\\big]
        = N\\,\\mathbb{E}\\big[T^{(c_0)}\\big]
        + \\sum_{l=1}^{L} N\\,\\mathbb{E}\\big[T^{(c_l)} - T^{(c_{l-1})}\\big],

each term is estimated from its own independent triples, the differences from *coupled*
pairs: both conditionals of one triple share :math:`k`, :math:`j` and the nearest
:math:`c_{l-1}` members, so the difference is small (exactly zero when
:math:`k \\le c_{l-1}`) and a few of the expensive triples suffice. With
:math:`c_L \\ge N - 1` every context is whole and the estimate is unbiased for the exact
:math:`\\log p(y)`; with smaller :math:`c_L` it is unbiased for the local evidence at
:math:`c_L`. The levels are independent, so the variance of the total is the sum of the
levels' variances :math:`V_l / n_l` (:math:`V_l`: the variance of one triple's term,
:math:`n_l` triples).

**Allocation.** A pilot of ``pilot_triples`` triples per level measures :math:`V_l` and the
seconds :math:`C_l` one triple costs; the allocation that reaches a standard error
:math:`\\varepsilon` at the least total cost is (Giles, 2008, §2)

.. math::

    n_l = \\varepsilon^{-2} \\sqrt{V_l / C_l}\\, \\sum_{i=0}^{L} \\sqrt{V_i C_i}.

The pilot only sets the allocation; the estimate uses fresh draws, so it stays unbiased and
its standard error honest. Pass ``num_triples`` instead for a fixed, reproducible allocation.

Cost: :math:`\\sum_l n_l (c_l^3 + c_{l-1}^3)/3` flops for the Cholesky factors of the
blocks, computed in chunks of bounded memory (about ``2**24`` block entries at a time),
plus one neighbour search.

References:

- M. B. Giles, "Multilevel Monte Carlo path simulation", Operations Research 2008.
- A. V. Vecchia, "Estimation and model identification for continuous spatial processes",
  JRSS B 1988.
- E. Fong, C. C. Holmes, "On the marginal likelihood and cross-validation", Biometrika 2020.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import gpytorch
import numpy as np
import torch

from pyro_masked.local.conditionals import MeanLike, local_log_predictive
from pyro_masked.local.estimator import LocalMaskedObjective, _check_targets
from pyro_masked.local.neighbors import NeighborIndex, check_count, check_inputs
from pyro_masked.local.sampler import ContextBatch, ContextSampler, ContextSizeSampler
from pyro_masked.masks import MaskLike

__all__ = ["LevelEstimate", "MultilevelLogMarginalEstimate", "estimate_multilevel_log_marginal"]

# Block entries (B * (c + 1)^2) evaluated at a time: bounds the memory of a chunk.
_CHUNK_ENTRIES = 2**24


@dataclass(frozen=True)
class LevelEstimate:
    """One level of a multilevel estimate.

    :ivar context_size: :math:`c_l`.
    :ivar coarser_context_size: :math:`c_{l-1}`, ``None`` on level 0.
    :ivar estimate: :math:`N` times the mean of the level's term, :math:`T^{(c_0)}` on level
        0 and :math:`T^{(c_l)} - T^{(c_{l-1})}` above: what widening the contexts from
        :math:`c_{l-1}` to :math:`c_l` adds to the evidence.
    :ivar stderr: its standard error (from ``num_batches`` independent stratified batches).
    :ivar num_triples: :math:`n_l`.
    :ivar seconds_per_triple: the measured cost :math:`C_l` of one triple.
    """

    context_size: int
    coarser_context_size: Optional[int]
    estimate: float
    stderr: float
    num_triples: int
    seconds_per_triple: float

    @property
    def variance_per_triple(self) -> float:
        """:math:`V_l = n_l \\cdot \\mathrm{stderr}^2`, the variance one triple contributes."""
        return self.num_triples * self.stderr**2


@dataclass(frozen=True)
class MultilevelLogMarginalEstimate:
    """A multilevel estimate of :math:`\\log p(y)` with its standard error and its levels.

    :ivar estimate: the sum of the levels' estimates.
    :ivar stderr: the square root of the sum of their squared standard errors.
    :ivar levels: the :class:`LevelEstimate` of each context size, coarsest first.
    :ivar num_points: :math:`N`.
    :ivar seconds: wall time of the pilot and the main draws (the neighbour search excluded).
    """

    estimate: float
    stderr: float
    levels: tuple[LevelEstimate, ...]
    num_points: int
    seconds: float

    @property
    def per_point(self) -> float:
        """The estimate divided by the number of data points."""
        return self.estimate / self.num_points

    @property
    def context_sizes(self) -> tuple[int, ...]:
        """The context sizes :math:`c_0 < \\dots < c_L`."""
        return tuple(level.context_size for level in self.levels)

    def up_to(self, level: int) -> tuple[float, float]:
        """``(estimate, stderr)`` of the local evidence with contexts of ``c_level`` alone.

        The partial sum of the first ``level + 1`` terms: a user sees what the screening of
        the smaller contexts costs, e.g. ``up_to(0)`` against the full estimate.
        """
        if not -len(self.levels) <= level < len(self.levels):
            raise IndexError(f"level {level} out of range for {len(self.levels)} levels")
        chosen = self.levels[: (level % len(self.levels)) + 1]
        return (
            sum(item.estimate for item in chosen),
            math.sqrt(sum(item.stderr**2 for item in chosen)),
        )


def check_context_sizes(context_sizes: Sequence[int], num_points: int) -> tuple[int, ...]:
    """Validate increasing context sizes; sizes past :math:`N - 1` are clipped to it."""
    if isinstance(context_sizes, (int, np.integer)) or not len(context_sizes):
        raise ValueError(
            f"context_sizes must be a non-empty sequence of ints, got {context_sizes!r}"
        )
    sizes = [check_count(size, "context_sizes entry") for size in context_sizes]
    if any(later <= earlier for earlier, later in zip(sizes, sizes[1:])):
        raise ValueError(f"context_sizes must increase strictly, got {tuple(sizes)}")
    # N - 1 already scores every context exactly: larger sizes add nothing.
    clipped: list[int] = []
    for size in sizes:
        size = min(size, num_points - 1)
        if not clipped or size > clipped[-1]:
            clipped.append(size)
    return tuple(clipped)


class _Level:
    """Draws the term of one level: :math:`T^{(c_0)}`, or the coupled difference."""

    def __init__(
        self,
        index: NeighborIndex,
        sizes: ContextSizeSampler,
        context_size: int,
        coarser: Optional[int],
    ):
        self.sizes = sizes
        self.context_size = context_size
        self.coarser = coarser
        self.sampler = ContextSampler(index, context_size)

    def draw(self, count, rng, kernel, X, y, noise, mean) -> torch.Tensor:
        """``count`` independent terms, the context sizes stratified over the ``count``."""
        num_points = self.sampler.num_points
        targets = rng.choice(num_points, size=count, replace=count > num_points)
        context_sizes = self.sizes.draw(count, rng, stratified=True)
        terms = torch.zeros(count, dtype=torch.float64)
        if self.coarser is not None:
            # k <= c_{l-1}: both levels see the whole context, the difference is exactly 0.
            rows = np.flatnonzero(context_sizes > self.coarser)
        else:
            rows = np.arange(count)
        if not len(rows):
            return terms
        batch = self.sampler.sample(targets[rows], context_sizes[rows], rng)
        chunk = max(1, _CHUNK_ENTRIES // (self.context_size + 1) ** 2)
        for start in range(0, len(rows), chunk):
            part = ContextBatch(*(field[start : start + chunk] for field in batch))
            value = self._log_predictive(part, self.context_size, kernel, X, y, noise, mean)
            if self.coarser is not None:
                value = value - self._log_predictive(part, self.coarser, kernel, X, y, noise, mean)
            terms[rows[start : start + chunk]] = value.detach().to(torch.float64).cpu()
        return terms

    @staticmethod
    def _log_predictive(batch, width, kernel, X, y, noise, mean) -> torch.Tensor:
        # The nearest `width` members are a prefix of the finer level's context.
        prefix = ContextBatch(
            batch.targets,
            batch.context_sizes,
            batch.context[:, :width].contiguous(),
            batch.valid[:, :width].contiguous(),
        )
        return local_log_predictive(kernel, X, y, prefix, noise, mean)


def estimate_multilevel_log_marginal(
    kernel: gpytorch.kernels.Kernel,
    X: torch.Tensor,
    y: torch.Tensor,
    noise: Union[float, torch.Tensor],
    context_sizes: Sequence[int] = (32, 128, 512),
    mean: MeanLike = None,
    mask: MaskLike = "cumulative",
    target_stderr: Optional[float] = None,
    num_triples: Optional[Sequence[int]] = None,
    pilot_triples: int = 256,
    max_triples: int = 2_000_000,
    num_batches: int = 16,
    seed: Optional[int] = None,
    objective: Optional[LocalMaskedObjective] = None,
    allow_duplicates: bool = False,
) -> MultilevelLogMarginalEstimate:
    """Estimate :math:`\\log p(y)` of a GP at scale from nested local contexts, with levels.

    See the module for the estimator, its allocation and its cost. With
    ``context_sizes[-1] >= N - 1`` it is unbiased for the exact evidence; otherwise for the
    local evidence at the largest context size, whose screening error is far smaller than
    that of the first. Compare ``result.up_to(0)`` (the first context size alone) with
    ``result.estimate`` to see what the screening cost.

    :param kernel: a GPyTorch kernel.
    :param X: training inputs ``(N, d)``; ``y``: targets ``(N,)``.
    :param noise: noise variance (a number, a scalar tensor or one per point ``(N,)``).
    :param context_sizes: strictly increasing :math:`c_0 < \\dots < c_L`; sizes past
        :math:`N - 1` are clipped to :math:`N - 1` (whole contexts).
    :param mean: ``None``, the training means ``(N,)`` or a GPyTorch mean.
    :param mask: the schedule (``"cumulative"`` for the evidence).
    :param target_stderr: the standard error to allocate for, in nats of :math:`\\log p(y)`;
        ``None``: :math:`10^{-3} N` (a thousandth of a nat per point).
    :param num_triples: a fixed number of triples per level instead of the pilot and
        ``target_stderr`` (reproducible for a given ``seed``).
    :param pilot_triples: triples per level of the pilot that measures :math:`V_l, C_l`.
    :param max_triples: cap on the triples of any one level (a level allocated more gets
        this many, and the standard error then exceeds ``target_stderr``).
    :param num_batches: independent stratified batches per level, for the standard errors
        (at least 2).
    :param seed: seeds the draws; ``None`` seeds them from torch's global generator.
    :param objective: a :class:`~pyro_masked.local.estimator.LocalMaskedObjective` built on
        ``X``: its neighbour index and its ``mask`` are reused.
    :param allow_duplicates: accept repeated inputs (when ``objective`` is ``None``).
    """
    X = check_inputs(X, "X")
    y = _check_targets(y, X)
    num_points = X.shape[0]
    if num_points < 2:
        raise ValueError("the evidence from local contexts needs at least 2 training points")
    sizes = check_context_sizes(context_sizes, num_points)
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 2:
        raise ValueError(f"num_batches must be an int >= 2, got {num_batches!r}")
    pilot_triples = check_count(pilot_triples, "pilot_triples")
    max_triples = check_count(max_triples, "max_triples")
    if num_triples is not None:
        if target_stderr is not None:
            raise ValueError("give target_stderr or num_triples, not both")
        if len(num_triples) != len(sizes):
            raise ValueError(
                f"num_triples needs one count per context size {sizes} (after clipping to "
                f"N - 1 = {num_points - 1}), got {len(num_triples)}"
            )
        counts = [check_count(count, "num_triples entry") for count in num_triples]
        if min(counts) < num_batches:
            raise ValueError(f"each num_triples entry must be >= num_batches={num_batches}")
    if target_stderr is None:
        target_stderr = 1e-3 * num_points
    elif not target_stderr > 0:
        raise ValueError(f"target_stderr must be positive, got {target_stderr!r}")
    noise = torch.as_tensor(noise, dtype=X.dtype, device=X.device)
    if objective is None:
        index = NeighborIndex(X, allow_duplicates=allow_duplicates)
        size_sampler = ContextSizeSampler(mask, num_points)
    elif not objective.matches(X):
        raise ValueError("objective was built on other inputs than X")
    else:
        index, size_sampler = objective.index, objective.size_sampler
    levels = [
        _Level(index, size_sampler, size, coarser)
        for size, coarser in zip(sizes, (None, *sizes[:-1]))
    ]
    rng = (
        np.random.default_rng(seed)
        if seed is not None
        else np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
    )
    with torch.no_grad():
        for level in levels:  # the neighbour lists first, outside the measured costs
            level.sampler.neighbor_lists()
        start = time.perf_counter()
        if num_triples is None:
            counts = _allocate(
                levels,
                rng,
                (kernel, X, y, noise, mean),
                pilot_triples,
                num_batches,
                target_stderr / num_points,
                max_triples,
            )
        results = []
        for level, count in zip(levels, counts):
            batch_size = math.ceil(count / num_batches)
            tick = time.perf_counter()
            batch_means = torch.stack(
                [
                    level.draw(batch_size, rng, kernel, X, y, noise, mean).mean()
                    for _ in range(num_batches)
                ]
            )
            seconds = time.perf_counter() - tick
            results.append(
                LevelEstimate(
                    context_size=level.context_size,
                    coarser_context_size=level.coarser,
                    estimate=float(num_points * batch_means.mean()),
                    stderr=float(num_points * batch_means.std() / math.sqrt(num_batches)),
                    num_triples=batch_size * num_batches,
                    seconds_per_triple=seconds / (batch_size * num_batches),
                )
            )
    return MultilevelLogMarginalEstimate(
        estimate=sum(level.estimate for level in results),
        stderr=math.sqrt(sum(level.stderr**2 for level in results)),
        levels=tuple(results),
        num_points=num_points,
        seconds=time.perf_counter() - start,
    )


def _allocate(levels, rng, problem, pilot_triples, num_batches, target, max_triples):
    """Giles' allocation :math:`n_l \\propto \\sqrt{V_l / C_l}` from a pilot of each level.

    ``target`` is the standard error per point; :math:`V_l` is the variance per triple of
    the level's term (stratified: from ``num_batches`` batch means).
    """
    variances, costs = [], []
    batch_size = max(2, math.ceil(pilot_triples / num_batches))
    for level in levels:
        tick = time.perf_counter()
        batch_means = torch.stack(
            [level.draw(batch_size, rng, *problem).mean() for _ in range(num_batches)]
        )
        costs.append((time.perf_counter() - tick) / (batch_size * num_batches))
        # A level whose pilot differences were all zero still gets its minimum share.
        variances.append(max(float(batch_means.var()) * batch_size, 1e-12))
    scale = sum(math.sqrt(v * c) for v, c in zip(variances, costs)) / target**2
    counts = [math.ceil(scale * math.sqrt(v / c)) for v, c in zip(variances, costs)]
    return [min(max(count, 2 * num_batches), max_triples) for count in counts]
