"""Small helpers shared by the package: constants, argument checks, private random streams and
the unwrapping of wrapped distributions.

Each concept lives here once, so that the losses, the engines and the diagnostics agree:

- :data:`LOG_2PI`, the Gaussian normalising constant;
- :func:`check_sites`, :func:`check_mask_groups` and :func:`check_generator`, the checks of
  arguments that several public functions take;
- :func:`private_generator`, a seeded :class:`torch.Generator` for reproducible masks that
  leaves the caller's global random state alone;
- :func:`unwrap`, which peels :class:`~pyro.distributions.MaskedDistribution`,
  :class:`~pyro.distributions.ExpandedDistribution` and
  :class:`~torch.distributions.Independent` off a site's distribution, down to the
  distribution an engine scores, and puts the layers back on the engine's scores.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
import torch.distributions as tdist
from pyro.distributions import ExpandedDistribution, MaskedDistribution
from pyro.distributions.util import broadcast_shape

__all__ = [
    "LOG_2PI",
    "Unwrapped",
    "check_generator",
    "check_mask_groups",
    "check_sites",
    "private_generator",
    "unwrap",
]

#: :math:`\log 2\pi`.
LOG_2PI = math.log(2 * math.pi)


def check_sites(
    sites: Optional[Iterable[str]], argument: str = "sites"
) -> Optional[tuple[str, ...]]:
    """Validate a collection of site names: ``None`` (every site) or an iterable of strings.

    A single string is refused rather than read as a sequence of one-letter names.

    :param sites: the argument as the user passed it.
    :param argument: its name, for error messages.
    :returns: ``None`` or the names as a tuple, in the given order.
    """
    if sites is None:
        return None
    if isinstance(sites, str):
        raise TypeError(
            f"{argument} must be a list of site names, got the string {sites!r}; "
            f"write {argument}=[{sites!r}]"
        )
    try:
        names = tuple(sites)
    except TypeError:
        raise TypeError(
            f"{argument} must be a list of site names, got {type(sites).__name__}"
        ) from None
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{argument} must contain site names (str), got {name!r}")
    return names


def check_mask_groups(mask_groups: Optional[int]) -> Optional[int]:
    """Validate ``mask_groups``: ``None`` or an int >= 1.

    ``None``: every vector that shares a covariance shares the permutations of a call (one
    factorization per permutation; the training default). An int ``G``: those vectors are split
    into ``G`` contiguous groups with independent permutations (``G`` at least the number of
    vectors: one set of permutations per vector).
    """
    if mask_groups is None:
        return None
    if isinstance(mask_groups, bool) or not isinstance(mask_groups, numbers.Integral):
        raise TypeError(f"mask_groups must be None or an int >= 1, got {mask_groups!r}")
    if mask_groups < 1:
        raise ValueError(f"mask_groups must be None or an int >= 1, got {mask_groups}")
    return int(mask_groups)


def check_generator(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """Validate ``generator``: ``None`` (torch's global generator) or a :class:`torch.Generator`."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be None or a torch.Generator, got {type(generator).__name__}"
        )
    return generator


def private_generator(seed: int, device: Union[str, torch.device, None] = None) -> torch.Generator:
    """A :class:`torch.Generator` on ``device`` seeded with ``seed``.

    Drawing from it (``torch.rand(..., generator=g)``) reproduces the same numbers for the same
    seed and never touches torch's global generators, on any device; ``torch.manual_seed``
    would reseed every device's generator, and forking the global state still consumes it.

    :param seed: an int; only its value modulo :math:`2^{64}` matters.
    :param device: where the draws happen (a CUDA generator draws on its device).
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    generator = torch.Generator(device=torch.device("cpu") if device is None else device)
    generator.manual_seed(int(seed) % 2**64)
    return generator


@dataclass(frozen=True)
class Unwrapped:
    """A distribution split into the base an engine scores and the layers wrapped around it.

    :ivar base: the innermost distribution: a univariate one for a distribution that factorizes
        over its event, otherwise a multivariate one (e.g. a Gaussian) whose events are masked.
    :ivar layers: the :class:`~pyro.distributions.MaskedDistribution`,
        :class:`~pyro.distributions.ExpandedDistribution` and
        :class:`~torch.distributions.Independent` wrappers, outermost first.
    """

    base: tdist.Distribution
    layers: tuple[tdist.Distribution, ...]

    @property
    def factorizes(self) -> bool:
        """Whether the coordinates are independent: the base is univariate."""
        return len(self.base.event_shape) == 0

    @property
    def masked_event_size(self) -> int:
        """The number of coordinates a mask chooses from (0: a univariate distribution).

        The event size of the whole distribution if it factorizes, otherwise the base's event
        size (independent copies of a multivariate base are masked one base event at a time).
        """
        if self.factorizes:
            outer = self.layers[0] if self.layers else self.base
            return outer.event_shape.numel() if len(outer.event_shape) else 0
        return self.base.event_shape.numel()

    @property
    def has_mask(self) -> bool:
        """Whether a :class:`~pyro.distributions.MaskedDistribution` is among the layers."""
        return any(isinstance(layer, MaskedDistribution) for layer in self.layers)

    def rewrap(self, score: torch.Tensor, sum_events: bool = True) -> torch.Tensor:
        """Apply the layers, innermost first, to a score of the base.

        :param score: the base's scores, shape ``batch + base.event_shape``-less, i.e. one per
            base event (for a univariate base, one per coordinate).
        :param sum_events: sum the dimensions that ``Independent`` layers reinterpret as event
            dimensions (a log density of the whole event); if ``False`` they are kept, giving
            one value per base event (per coordinate for a factorizing distribution), with the
            masks and expansions applied to them.
        :returns: the score of the wrapped distribution.
        """
        pending = 0  # trailing dims that Independent layers made event dims, kept unsummed
        for layer in reversed(self.layers):
            if isinstance(layer, tdist.Independent):
                ndims = layer.reinterpreted_batch_ndims
                if sum_events:
                    score = score.sum(tuple(range(-ndims, 0)))
                else:
                    pending += ndims
            elif isinstance(layer, ExpandedDistribution):
                event = score.shape[score.dim() - pending :]
                batch = broadcast_shape(score.shape[: score.dim() - pending], layer.batch_shape)
                score = score.expand(torch.Size(batch) + event)
            else:  # MaskedDistribution
                mask = torch.as_tensor(layer._mask, device=score.device)
                mask = mask.reshape(mask.shape + (1,) * pending)
                score = torch.where(mask, score, score.new_zeros(()))
        return score


def unwrap(d: tdist.Distribution) -> Unwrapped:
    """Peel masks, expansions and ``Independent`` off ``d``, down to the distribution scored.

    ``Independent`` is peeled until the base is univariate (the distribution factorizes over its
    event: each coordinate's conditional is its marginal) or not an ``Independent``; in the
    second case the reinterpreted dimensions index independent copies of a multivariate base,
    each masked over its own event.

    Example: for ``MultivariateNormal(loc, cov).expand([3]).to_event(1).mask(m)`` the base is
    the Gaussian and ``rewrap`` masks, sums over the 3 copies and applies ``m``, in that order.
    """
    layers = []
    base = d
    while isinstance(base, (MaskedDistribution, ExpandedDistribution, tdist.Independent)):
        layers.append(base)
        base = base.base_dist
    return Unwrapped(base, tuple(layers))
