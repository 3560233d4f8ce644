"""Mask schedules: which mask sizes a masked score averages over, and with what weight.

A schedule is a probability distribution :math:`\\pi(m)` over the mask sizes
:math:`m = 1, \\dots, D`. The masked estimate it defines is

.. math::

    \\widehat{\\log p}(x) = D \\sum_{m=1}^{D} \\pi(m)\\, S(x; m),
    \\qquad
    S(x; m) = \\mathbb{E}_{|M| = m}\\Big[\\frac{1}{m} \\sum_{j \\in M}
    \\log p(x_j \\mid x_{-M})\\Big],

so that the uniform distribution over sizes (:class:`Cumulative`) recovers the log marginal
likelihood :math:`\\log p(x) = \\sum_m S(x; m)` exactly in expectation, and a point mass at
``m`` (:class:`FixedSize`, :class:`FixedRate`) gives the biased :math:`D\\, S(x; m)` of
fixed-rate masked pre-training. The weights :math:`w_m = D\\,\\pi(m)` always sum to ``D``.

References:

- E. Fong, C. C. Holmes, "On the marginal likelihood and cross-validation", Biometrika 2020.
- P. Moreno-Muñoz, P. Garcia Recasens, S. Hauberg, "On Masked Pre-training and the Marginal
  Likelihood", NeurIPS 2023.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable, Union

import torch

__all__ = [
    "Cumulative",
    "FixedRate",
    "FixedSize",
    "MaskSchedule",
    "RateSize",
    "SizeWeights",
    "as_schedule",
    "context_weights",
    "count_masks",
]


class MaskSchedule:
    """Base class of mask schedules: a distribution over mask sizes ``1..D``.

    Subclasses implement :meth:`size_probs`. :meth:`size_weights` and :meth:`context_weights`
    turn it into the weights the conditional engines use.
    """

    def size_probs(self, event_size: int) -> torch.Tensor:
        """Probabilities :math:`\\pi(m)` of mask sizes ``m = 1..event_size``, shape ``(D,)``."""
        raise NotImplementedError

    def size_weights(
        self,
        event_size: int,
        dtype: torch.dtype = torch.float64,
        device: Union[torch.device, str, None] = None,
    ) -> torch.Tensor:
        """Weights :math:`w_m = D\\,\\pi(m)` on :math:`S(x; m)`, entry ``m - 1`` for size ``m``."""
        probs = self.size_probs(event_size).to(dtype=dtype, device=device)
        return event_size * probs

    def context_weights(
        self,
        event_size: int,
        dtype: torch.dtype = torch.float64,
        device: Union[torch.device, str, None] = None,
    ) -> torch.Tensor:
        """Weight of each hidden coordinate's log predictive given a context of ``k`` coordinates.

        A mask of size ``m`` leaves a context of ``k = D - m`` visible coordinates and averages
        its ``m`` hidden coordinates, so entry ``k`` is :math:`c_k = w_{D-k} / (D - k)`,
        for ``k = 0..D-1``.
        """
        return context_weights(self.size_weights(event_size, dtype, device))

    def sizes(self, event_size: int) -> list[int]:
        """The mask sizes with non-zero weight."""
        probs = self.size_probs(event_size)
        return [m + 1 for m in torch.nonzero(probs > 0).flatten().tolist()]

    def validate(self, event_size: int) -> None:
        """Raise ``ValueError`` if the schedule cannot be used for an event of this size."""
        self.size_probs(event_size)


class Cumulative(MaskSchedule):
    """Every mask size ``1..D`` with equal weight: an unbiased estimate of :math:`\\log p(x)`."""

    def size_probs(self, event_size: int) -> torch.Tensor:
        return torch.full((event_size,), 1.0 / event_size, dtype=torch.float64)

    def __repr__(self) -> str:
        return "Cumulative()"


class FixedSize(MaskSchedule):
    """A single mask size ``m``; the estimate is :math:`D\\, S(x; m)`.

    :param int size: the number of hidden coordinates, ``1 <= size <= D``.
    """

    size: int

    def __init__(self, size: int):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise TypeError(f"mask size must be an int, got {size!r}")
        if size < 1:
            raise ValueError(f"mask size must be >= 1, got {size}")
        self.size = int(size)

    def size_probs(self, event_size: int) -> torch.Tensor:
        if self.size > event_size:
            raise ValueError(
                f"mask size {self.size} is outside 1..{event_size} (the event has {event_size} "
                "coordinates)"
            )
        probs = torch.zeros(event_size, dtype=torch.float64)
        probs[self.size - 1] = 1.0
        return probs

    def __repr__(self) -> str:
        return f"FixedSize({self.size})"


class FixedRate(MaskSchedule):
    """A fixed masking rate: mask size :math:`\\max(1, \\lfloor \\text{rate}\\cdot D + 1/2
    \\rfloor)`, at most :math:`D`.

    The product is rounded to the nearest int, halves up (0.5 of 5, 7 and 9 coordinates hides
    3, 4 and 5), as one rounds by hand; products within :math:`10^{-9}` of a half count as a
    half, so that a rate written in decimal (``0.15 * 10``) rounds as it reads. BERT's 15% is
    ``FixedRate(0.15)``. The estimate is :math:`D\\, S(x; m)`, biased for :math:`\\log p(x)`.

    :param float rate: the fraction of coordinates hidden, in ``(0, 1)``.
    """

    rate: float

    def __init__(self, rate: float):
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
            raise TypeError(f"mask rate must be a float, got {rate!r}")
        if not 0.0 < rate < 1.0 or math.isnan(rate):
            raise ValueError(f"mask rate must lie in (0, 1), got {rate}")
        self.rate = float(rate)

    def mask_size(self, event_size: int) -> int:
        """The number of hidden coordinates for an event of ``event_size`` coordinates."""
        rounded = math.floor(self.rate * event_size + 0.5 + _HALF_TOLERANCE)
        return min(event_size, max(1, rounded))

    def size_probs(self, event_size: int) -> torch.Tensor:
        probs = torch.zeros(event_size, dtype=torch.float64)
        probs[self.mask_size(event_size) - 1] = 1.0
        return probs

    def __repr__(self) -> str:
        return f"FixedRate({self.rate})"


class SizeWeights(MaskSchedule):
    """Custom probabilities over mask sizes.

    :param probs: either a callable ``D -> tensor of shape (D,)`` of non-negative weights over
        sizes ``1..D``, or a fixed 1-D tensor/sequence of them (then ``D`` must match). Weights
        are normalised to sum to one.

    Example: ``SizeWeights(lambda D: torch.ones(D))`` is a uniformly random size (the same
    expectation as :class:`Cumulative`), and ``SizeWeights(lambda D: torch.arange(D, 0, -1))``
    favours small masks.
    """

    def __init__(self, probs: Union[Callable[[int], torch.Tensor], torch.Tensor, list]):
        self._probs = probs if callable(probs) else torch.as_tensor(probs, dtype=torch.float64)
        if not callable(probs):
            self._check(self._probs, self._probs.numel())  # type: ignore[arg-type,union-attr]

    @staticmethod
    def _check(probs: torch.Tensor, event_size: int) -> torch.Tensor:
        if probs.shape != (event_size,):
            raise ValueError(
                f"SizeWeights: expected {event_size} weights (one per mask size), "
                f"got shape {tuple(probs.shape)}"
            )
        if not torch.isfinite(probs).all() or (probs < 0).any():
            raise ValueError("SizeWeights: weights must be finite and non-negative")
        largest = probs.max()
        if largest <= 0:
            raise ValueError("SizeWeights: weights must not all be zero")
        # Scaled by the largest weight first, so that a sum of huge weights cannot overflow and
        # tiny ones cannot underflow to an all-zero schedule.
        scaled = probs / largest
        normalised = scaled / scaled.sum()
        if not torch.isfinite(normalised).all() or not normalised.sum() > 0:
            raise ValueError(
                f"SizeWeights: the weights {probs.tolist()} do not normalise to probabilities"
            )
        return normalised

    def size_probs(self, event_size: int) -> torch.Tensor:
        probs = self._probs(event_size) if callable(self._probs) else self._probs
        probs = torch.as_tensor(probs, dtype=torch.float64).detach().cpu()
        return self._check(probs, event_size)

    def __repr__(self) -> str:
        return f"SizeWeights({self._probs!r})"


MaskLike = Union[str, int, float, MaskSchedule]

# Products of a decimal rate and a size that are meant to be a half (0.15 * 10 = 1.5000000000000002
# or 0.35 * 10 = 3.4999999999999996) round up.
_HALF_TOLERANCE = 1e-9


def context_weights(size_weights: torch.Tensor) -> torch.Tensor:
    """Weight :math:`c_k = w_{D-k} / (D - k)` of a hidden coordinate's log predictive given a
    context of ``k`` visible coordinates, for ``k = 0..D-1``, from the size weights
    :math:`w_m` (entry ``m - 1`` for size ``m``, shape ``(..., D)``).

    A mask of size ``m`` leaves ``k = D - m`` coordinates visible and averages its ``m`` hidden
    coordinates' log predictives, whence the division by ``m``. The engines use this formula.
    """
    size = size_weights.shape[-1]
    sizes = torch.arange(size, 0, -1, dtype=size_weights.dtype, device=size_weights.device)
    return size_weights.flip(-1) / sizes


def count_masks(event_size: int, sizes: Iterable[int]) -> int:
    """How many masks the given sizes have in all: :math:`\\sum_m \\binom{D}{m}`.

    What ``num_masks="all"`` enumerates (engines leave out the sizes they score in closed form).
    """
    return sum(math.comb(event_size, int(size)) for size in sizes)


def as_schedule(mask: MaskLike) -> MaskSchedule:
    """Turn the ``mask`` argument of the public API into a :class:`MaskSchedule`.

    ``"cumulative"`` gives :class:`Cumulative`, an ``int`` a :class:`FixedSize`, a ``float`` in
    ``(0, 1)`` a :class:`FixedRate`; a schedule is returned as it is.
    """
    if isinstance(mask, MaskSchedule):
        return mask
    if isinstance(mask, str):
        if mask == "cumulative":
            return Cumulative()
        raise ValueError(
            f"mask={mask!r} is not understood: use 'cumulative', an int size, "
            "a float rate in (0, 1) or a pyro_masked.masks.MaskSchedule"
        )
    if isinstance(mask, bool):
        raise TypeError(
            f"mask must be 'cumulative', an int, a float or a MaskSchedule, got {mask!r}"
        )
    if isinstance(mask, numbers.Integral):
        return FixedSize(int(mask))
    if isinstance(mask, numbers.Real):
        return FixedRate(float(mask))
    raise TypeError(
        f"mask must be 'cumulative', an int, a float or a MaskSchedule, got {type(mask).__name__}"
    )


class RateSize(FixedRate):
    """A masking rate in ``(0, 1]`` as a single mask size per site.

    :class:`FixedRate`'s rule, :math:`\\min(D, \\max(1, \\mathrm{round}(\\text{rate} \\cdot D)))`,
    so a point of a masking-rate curve (:func:`~pyro_masked.mask_rate_curve`) is what
    ``MaskedELBO(mask=rate)`` optimises, extended to ``rate = 1`` (every coordinate hidden: the
    product of the marginals).

    :param float rate: the fraction of coordinates hidden, in ``(0, 1]``.
    """

    def __init__(self, rate: float):
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
            raise TypeError(f"mask rate must be a float in (0, 1], got {rate!r}")
        if math.isnan(rate) or not 0.0 < rate <= 1.0:
            raise ValueError(f"mask rate must lie in (0, 1], got {rate}")
        self.rate = float(rate)

    def __repr__(self) -> str:
        return f"RateSize({self.rate})"
