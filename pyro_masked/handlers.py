"""The ``masked`` effect handler: observed sites scored by their masked log density.

The handler swaps the distribution of each chosen observed site for a thin wrapper whose
``log_prob`` is :func:`~pyro_masked.masked_log_prob`. Pyro's own ``compute_log_prob`` then
applies plate scaling, ``poutine.mask`` and caching as for any site, so the handler composes
with ``Trace_ELBO``, ``TraceGraph_ELBO``, ``TraceEnum_ELBO``, ``RenyiELBO`` and ``Predictive``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence, Union

import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.poutine.messenger import Messenger

from pyro_masked.masks import MaskLike, MaskSchedule, as_schedule
from pyro_masked.scoring import (
    SUPPORTED_DISTRIBUTIONS,
    NumMasks,
    _masked_log_prob,
    all_finite,
    check_num_masks,
    is_supported,
    masked_event_size,
)
from pyro_masked.util import check_generator, check_mask_groups, check_sites, unwrap

__all__ = ["MaskedMessenger", "MaskedScore", "masked"]


class MaskedScore(TorchDistribution):
    """A distribution that samples like ``base`` and scores like its masked estimate.

    :param base: the site's distribution.
    :param schedule: the mask schedule.
    :param num_masks: permutations averaged, or ``"all"``.
    :param site: the site's name, for error messages.
    :param mask_groups: ``None`` (vectors sharing a covariance share the permutations) or the
        number of groups with independent permutations; see
        :func:`~pyro_masked.masked_log_prob`.
    :param generator: the :class:`torch.Generator` the permutations come from (``None``: the
        global one).
    """

    arg_constraints = {}

    def __init__(
        self,
        base: TorchDistribution,
        schedule: MaskSchedule,
        num_masks: NumMasks,
        site: str = "?",
        *,
        mask_groups: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ):
        self.base_dist = base
        self.schedule = schedule
        self.num_masks = num_masks
        self.site = site
        self.mask_groups = mask_groups
        self.generator = generator
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self) -> Optional[constraints.Constraint]:
        return self.base_dist.support

    @property
    def has_rsample(self) -> bool:  # type: ignore[override]  # torch's is a class attribute
        return self.base_dist.has_rsample

    @property
    def mean(self) -> torch.Tensor:
        return self.base_dist.mean

    @property
    def variance(self) -> torch.Tensor:
        return self.base_dist.variance

    def sample(self, sample_shape: Sequence[int] = torch.Size()) -> torch.Tensor:
        return self.base_dist.sample(sample_shape)  # type: ignore[arg-type]

    def rsample(self, sample_shape: Sequence[int] = torch.Size()) -> torch.Tensor:
        return self.base_dist.rsample(sample_shape)  # type: ignore[arg-type]

    def expand(self, batch_shape: Sequence[int], _instance: Any = None) -> MaskedScore:
        return MaskedScore(
            self.base_dist.expand(batch_shape),
            self.schedule,
            self.num_masks,
            self.site,
            mask_groups=self.mask_groups,
            generator=self.generator,
        )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        try:
            return _masked_log_prob(
                self.base_dist,
                value,
                self.schedule,
                self.num_masks,
                self.mask_groups,
                self.generator,
            )
        except (ValueError, TypeError) as error:
            if type(error) in (ValueError, TypeError):
                raise type(error)(f"masked site '{self.site}': {error}") from error
            # A subclass (e.g. linear_operator's NotPSDError, which callers catch by type) may
            # have another constructor: keep the exception and add the site as a note.
            error.add_note(f"raised while scoring masked site '{self.site}'")
            raise


class MaskedMessenger(Messenger):
    """Score the chosen observed sites by their masked log density.

    :param mask: ``"cumulative"``, an int mask size, a float rate or a
        :class:`~pyro_masked.masks.MaskSchedule`.
    :param num_masks: random permutations averaged per site, or ``"all"``.
    :param sites: names of the observed sites to mask; ``None`` masks every observed site of
        a distribution, and leaves ``pyro.factor`` and ``pyro.deterministic`` sites (which
        observe no data) with their ordinary ``log_prob``.
    :param mask_groups: (keyword only) ``None`` or the number of groups of vectors with
        independent permutations; see :func:`~pyro_masked.masked_log_prob`.
    :param generator: (keyword only) the :class:`torch.Generator` the permutations come from.
    """

    def __init__(
        self,
        mask: MaskLike = "cumulative",
        num_masks: NumMasks = 1,
        sites: Optional[Iterable[str]] = None,
        *,
        mask_groups: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        self.schedule = as_schedule(mask)
        self.num_masks = check_num_masks(num_masks)
        sites = check_sites(sites)
        self.sites = None if sites is None else frozenset(sites)
        self.mask_groups = check_mask_groups(mask_groups)
        self.generator = check_generator(generator)
        self._seen: set[str] = set()

    def __enter__(self):
        self._seen = set()
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback):
        result = super().__exit__(exc_type, exc_value, traceback)
        if exc_type is None and self.sites is not None:
            missing = sorted(self.sites - self._seen)
            if missing:
                raise ValueError(
                    f"sites={sorted(self.sites)} names {missing}, which the model did not "
                    "sample as observed sites"
                )
        return result

    def _pyro_sample(self, msg) -> None:
        # Each masked site records its ordinary distribution in ``msg["infer"]["unmasked_fn"]``.
        name = msg["name"]
        if not msg["is_observed"] or (self.sites is not None and name not in self.sites):
            return
        if isinstance(msg["fn"], MaskedScore):  # already wrapped by an outer handler
            return
        self._seen.add(name)
        fn = msg["fn"]
        if self.sites is None and _is_not_an_observation(msg):
            # pyro.factor and pyro.deterministic (obs_mask's merged site too): no data to mask.
            return
        if not is_supported(fn):
            hint = (
                "leave it unmasked by listing only the sites to mask in sites=[...]"
                if self.sites is None
                else "remove it from sites=[...] to score it by its ordinary log_prob"
            )
            raise TypeError(
                f"observed site '{name}' has a {type(fn).__name__} distribution, which has no "
                f"masked conditionals; supported are {SUPPORTED_DISTRIBUTIONS}. To {hint}."
            )
        value = msg["value"]
        if not all_finite(value):
            raise ValueError(f"observed site '{name}': the observed value has NaN or inf entries")
        event_size = masked_event_size(fn)
        if event_size > 0:
            try:
                self.schedule.validate(event_size)
            except ValueError as error:
                raise ValueError(f"observed site '{name}': {error}") from error
        msg["fn"] = MaskedScore(
            fn,
            self.schedule,
            self.num_masks,
            name,
            mask_groups=self.mask_groups,
            generator=self.generator,
        )
        # The site's ordinary distribution, for whoever reads the trace (the diagnostics).
        msg["infer"] = dict(msg["infer"], unmasked_fn=fn)


def _is_not_an_observation(msg) -> bool:
    """Whether an observed site is a ``pyro.factor`` or ``pyro.deterministic`` (Unit, Delta).

    Such sites add a term to the log density or record a value; they observe no data that a
    mask could hide, so masking leaves them with their ordinary ``log_prob``.
    """
    if msg["infer"].get("_deterministic"):
        return True
    return isinstance(unwrap(msg["fn"]).base, (dist.Unit, dist.Delta))


def masked(
    fn: Optional[Callable] = None,
    mask: MaskLike = "cumulative",
    num_masks: NumMasks = 1,
    sites: Optional[Iterable[str]] = None,
    *,
    mask_groups: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Union[MaskedMessenger, Callable]:
    """Effect handler: the model with its observed sites scored by masked pre-training.

    Each chosen observed site's ``log_prob`` becomes
    :func:`~pyro_masked.masked_log_prob` of its distribution (latent sites are unchanged), so
    any Pyro objective run on ``masked(model)`` uses the masked scores::

        loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
            masked(model, mask=0.15), guide, data)

    Usable as a decorator, a function wrapper or a context manager (``with masked(): ...``).

    :param fn: the model (a stochastic function); omit it to get the handler itself.
    :param mask: ``"cumulative"``, an int mask size, a float rate or a
        :class:`~pyro_masked.masks.MaskSchedule`.
    :param num_masks: random permutations averaged per site, or ``"all"``.
    :param sites: names of the observed sites to mask; ``None`` masks every observed site of
        a distribution and leaves ``pyro.factor`` and ``pyro.deterministic`` sites alone.
    :param mask_groups: (keyword only) ``None`` (the vectors that share a covariance share the
        permutations: right for training) or the number of groups of vectors with independent
        permutations (right for evidence estimates); see :func:`~pyro_masked.masked_log_prob`
        and :class:`~pyro_masked.MaskedELBO`.
    :param generator: (keyword only) the :class:`torch.Generator` the permutations come from.
    """
    messenger = MaskedMessenger(
        mask=mask,
        num_masks=num_masks,
        sites=sites,
        mask_groups=mask_groups,
        generator=generator,
    )
    return messenger(fn) if fn is not None else messenger
