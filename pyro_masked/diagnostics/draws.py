"""Draws: independent evaluations of a model and guide with fresh random masks.

A *draw* runs the guide, replays the model against it under :func:`~pyro_masked.masked` (the
traces :class:`~pyro_masked.MaskedELBO` builds, so that Pyro's ``compute_log_prob`` applies
plate scaling and masks) and records, per observed site, the masked and the ordinary log
densities. Draws are independent replicates, so their spread gives a Monte Carlo standard
error. Every public diagnostic is built from draws; this module is internal to
:mod:`pyro_masked.diagnostics`.

Two counts, two names, as in the rest of the package:

- ``num_masks``: random permutations averaged *inside* one draw (as in the losses), or
  ``"all"`` for the exact expectation over every mask;
- ``num_draws``: independent draws, whose spread is the standard error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from pyro.distributions.util import scale_and_mask

from pyro_masked.infer import MaskedELBO
from pyro_masked.masks import MaskSchedule
from pyro_masked.scoring import NumMasks, check_num_masks, is_supported, masked_event_size
from pyro_masked.util import check_mask_groups, check_sites, private_generator

__all__ = [
    "DEFAULT_NUM_DRAWS",
    "Draw",
    "DrawOptions",
    "EVERY_VECTOR",
    "MaskGroups",
    "ModelCall",
    "check_evidence_mask_groups",
    "check_full_plates",
    "check_num_draws",
    "check_seed",
    "draw_seeds",
    "mean_and_stderr",
    "run_draws",
    "seeded",
]

#: Independent draws when the caller does not say: a standard error good to about 13%.
DEFAULT_NUM_DRAWS = 32


def check_num_draws(num_draws: int, argument: str = "num_draws") -> int:
    """Validate a number of independent draws: an int >= 2 (one draw has no spread)."""
    if isinstance(num_draws, bool) or not isinstance(num_draws, numbers.Integral):
        raise TypeError(f"{argument} must be an int >= 2, got {num_draws!r}")
    if num_draws < 2:
        raise ValueError(
            f"{argument} must be >= 2 (independent draws give the standard error), got {num_draws}"
        )
    return int(num_draws)


def check_seed(seed: Optional[int]) -> Optional[int]:
    """Validate ``seed``: ``None`` or an int (not a bool)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be None or an int, got {seed!r}")
    return None if seed is None else int(seed)


@dataclass(frozen=True)
class ModelCall:
    """A model, its guide and the arguments both are called with."""

    model: Callable
    guide: Callable
    args: tuple
    kwargs: dict

    @classmethod
    def of(
        cls,
        model: Callable,
        guide: Optional[Callable],
        model_args: tuple,
        model_kwargs: Optional[dict],
    ) -> ModelCall:
        """Validate a model, its guide (``None``: an empty one) and their arguments."""
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if guide is not None and not callable(guide):
            raise TypeError(f"guide must be None or callable, got {type(guide).__name__}")
        if not isinstance(model_args, tuple):
            raise TypeError(
                "model_args must be a tuple of the model's positional arguments, e.g. "
                f"model_args=(data,); got {type(model_args).__name__}"
            )
        if model_kwargs is None:
            model_kwargs = {}
        if not isinstance(model_kwargs, dict):
            raise TypeError(
                "model_kwargs must be a dict of the model's keyword arguments, got "
                f"{type(model_kwargs).__name__}"
            )
        return cls(model, _empty_guide if guide is None else guide, model_args, model_kwargs)


def _empty_guide(*args, **kwargs) -> None:
    return None


#: ``mask_groups`` of the estimators: ``"vector"`` (independent permutations per vector), an
#: int number of groups, or ``None`` (one permutation shared by every vector).
MaskGroups = Union[int, str, None]

#: The evidence estimators' default ``mask_groups``: independent permutations for every vector.
EVERY_VECTOR = "vector"


def check_evidence_mask_groups(mask_groups: MaskGroups) -> MaskGroups:
    """Validate ``mask_groups`` of the diagnostics: ``"vector"``, ``None`` or an int >= 1."""
    if isinstance(mask_groups, str):
        if mask_groups != EVERY_VECTOR:
            raise ValueError(
                f"mask_groups must be 'vector', None or an int >= 1, got {mask_groups!r}"
            )
        return mask_groups
    return check_mask_groups(mask_groups)


@dataclass(frozen=True)
class DrawOptions:
    """How a draw selects and scores the sites, as for :class:`~pyro_masked.MaskedELBO`."""

    num_masks: NumMasks = 1
    sites: Optional[tuple] = None
    integrate: Optional[tuple] = None
    num_samples: int = 1
    mask_groups: MaskGroups = EVERY_VECTOR

    @classmethod
    def of(
        cls,
        num_masks: NumMasks,
        sites: Optional[Iterable[str]],
        integrate: Optional[Iterable[str]],
        num_samples: int,
        mask_groups: Union[int, str, None],
    ) -> DrawOptions:
        """Validate the options as :class:`~pyro_masked.MaskedELBO` and the estimators take them."""
        num_masks = check_num_masks(num_masks)
        sites = check_sites(sites)
        mask_groups = check_evidence_mask_groups(mask_groups)
        if integrate is None and num_samples != 1:
            raise ValueError(
                f"num_samples={num_samples} is the number of samples of the integrated "
                "latents; name them with integrate=(...)"
            )
        return cls(
            num_masks,
            sites,
            None if integrate is None else tuple(integrate),
            num_samples,
            mask_groups,
        )

    def replace(self, **changes: Any) -> DrawOptions:
        """A copy with the given fields changed."""
        return dataclasses.replace(self, **changes)

    def loss(self, schedule: MaskSchedule) -> MaskedELBO:
        """The :class:`~pyro_masked.MaskedELBO` a draw evaluates under ``schedule``."""
        # Latent integration is passed only when asked for, so that its arguments stay optional.
        extra: dict = {}
        if self.integrate:
            extra = {"integrate": self.integrate, "num_samples": self.num_samples}
        # One group per vector: any count at least the number of vectors means that.
        groups = sys.maxsize if self.mask_groups == EVERY_VECTOR else self.mask_groups
        return MaskedELBO(
            mask=schedule,
            num_masks=self.num_masks,
            sites=self.sites,
            mask_groups=groups,  # type: ignore[arg-type]
            **extra,
        )


@dataclass
class Draw:
    """What one draw reads off the traces."""

    masked_scores: dict  # observed site -> scaled, masked log_prob tensor (masked estimate)
    unmasked_scores: dict  # observed site -> the same with the ordinary log_prob
    observed: dict  # observed site -> value
    event_sizes: dict  # masked observed site with event dims -> number of coordinates
    offset: float  # log p(z) - log q(z) summed over latent sites
    has_latents: bool
    closed_form: bool  # every observed site closed-form Gaussian or factorizing
    # The guide drew latent sites and nothing was integrated by sampling: the ordinary log
    # densities are the log-likelihood of one approximate posterior draw.
    posterior_draw: bool = False
    latents: dict = dataclasses.field(default_factory=dict)  # guide site -> sampled value

    def masked_total(self) -> float:
        """The masked scores of the observed sites plus the latent sites' terms."""
        return self.offset + sum(float(v.sum()) for v in self.masked_scores.values())

    def unmasked_total(self) -> float:
        """The same total with the ordinary log densities of the observed sites."""
        return self.offset + sum(float(v.sum()) for v in self.unmasked_scores.values())

    def exact_value(self) -> Optional[float]:
        """:math:`\\log p(x)` when the ordinary log densities give it, else None."""
        return self.unmasked_total() if self.closed_form and not self.has_latents else None


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run under a fixed torch seed without disturbing the caller's generator state."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        # The default generator directly: torch.manual_seed also walks every device.
        torch.random.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        yield


def draw_seeds(count: int, seed: Optional[int]) -> list[int]:
    """One seed per draw: from a private generator seeded by ``seed`` (the caller's random state
    untouched), or from torch's global generator when ``seed`` is None (so that
    ``pyro.set_rng_seed`` makes the result reproducible, as it does any Pyro sampling)."""
    generator = None if seed is None else private_generator(seed)
    # 32 bits: the CPU generator keeps only those of a seed.
    return torch.randint(0, 2**32, (count,), dtype=torch.int64, generator=generator).tolist()


def check_full_plates(name: str, site: Any) -> None:
    """Refuse an observed site inside a subsampled plate.

    A subsample is scaled up to stand for the whole data set, so a draw's total is a random
    estimate whose "exact" value is not :math:`\\log p(x)`, and a position in the batch holds
    a different data point in every draw; nothing the diagnostics report would be right.
    """
    for frame in site["cond_indep_stack"]:
        if frame.full_size is not None and frame.size != frame.full_size:
            raise ValueError(
                f"observed site '{name}' lies in plate '{frame.name}', which subsamples "
                f"{frame.size} of its {frame.full_size} data points; the diagnostics need every "
                "data point in every draw. Run them with the plate unsubsampled (no "
                "subsample_size or subsample), or on the subset as a data set of its own."
            )


def _run_draw(loss: MaskedELBO, call: ModelCall, seed: int) -> Draw:
    # The traces MaskedELBO itself builds (guide, replayed masked model, integrated latents,
    # log densities); no gradients, so that parameters leave no graphs behind.
    with torch.no_grad():
        with seeded(seed):
            # Permutations are drawn when the masked scores are computed, inside this call.
            model_trace, guide_trace = loss._get_trace(
                call.model, call.guide, call.args, call.kwargs
            )
        return _read_traces(model_trace, guide_trace)


def _read_traces(model_trace, guide_trace) -> Draw:
    masked_scores, unmasked_scores, observed, event_sizes = {}, {}, {}, {}
    offset, has_latents, closed_form = 0.0, False, True
    integrated_by_sampling, guide_sampled, latents = False, False, {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        fn = site["fn"]
        if site["infer"].get("masked_integrated"):
            # A latent integrated into an observed site's score (its own log density is 0):
            # enumerated values are exact, samples are random.
            prior = getattr(fn, "prior", None)
            sampled = not (prior is not None and prior.has_enumerate_support)
            integrated_by_sampling = integrated_by_sampling or sampled
            has_latents = has_latents or sampled
            continue
        if not site["is_observed"]:
            has_latents = True
            offset += float(site["log_prob_sum"])
            continue
        check_full_plates(name, site)
        masked_scores[name] = site["log_prob"].detach()
        observed[name] = site["value"].detach()
        # The masking handlers record the site's ordinary distribution.
        unmasked_fn = site["infer"].get("unmasked_fn")
        if unmasked_fn is None:
            # A site left out by ``sites=``: scored by its ordinary log density.
            unmasked_scores[name] = masked_scores[name]
            closed_form = closed_form and is_supported(fn)
            continue
        unmasked = scale_and_mask(unmasked_fn.log_prob(site["value"]), site["scale"], site["mask"])
        unmasked_scores[name] = torch.as_tensor(unmasked).detach().expand(site["log_prob"].shape)
        event_size = masked_event_size(unmasked_fn)
        if event_size > 0:
            event_sizes[name] = event_size
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and not site["is_observed"]:
            has_latents = guide_sampled = True
            offset -= float(site["log_prob_sum"])
            latents[site["name"]] = site["value"].detach()
    return Draw(
        masked_scores,
        unmasked_scores,
        observed,
        event_sizes,
        offset,
        has_latents,
        closed_form,
        posterior_draw=guide_sampled and not integrated_by_sampling,
        latents=latents,
    )


def run_draws(
    call: ModelCall, schedule: MaskSchedule, options: DrawOptions, seeds: list[int]
) -> list[Draw]:
    """One draw per seed; a single draw when nothing is random.

    With ``num_masks="all"`` and no sampled latent site every mask is already averaged inside
    the draw, so further draws would repeat it: one is returned, and its standard error is 0.
    """
    loss = options.loss(schedule)
    draws = []
    for seed in seeds:
        draw = _run_draw(loss, call, seed)
        if not draw.event_sizes:
            raise ValueError(
                "the model has no maskable observed site (an observed site with event "
                "dimensions, e.g. a MultivariateNormal or Normal(...).to_event(1)); observed "
                f"sites: {sorted(draw.masked_scores) or 'none'}"
            )
        draws.append(draw)
        if options.num_masks == "all" and not draw.has_latents:
            break
    return draws


def mean_and_stderr(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the first dimension and its standard error (zero for a single draw)."""
    mean = values.mean(0)
    if values.shape[0] < 2:
        return mean, torch.zeros_like(mean)
    return mean, values.std(0) / math.sqrt(values.shape[0])
