"""Draws: one evaluation of a model and guide with fresh random masks, read off its traces.

A *draw* runs the guide, replays the model against it under :func:`~pyro_masked.masked` (the
traces :class:`~pyro_masked.MaskedELBO` builds, so that Pyro's ``compute_log_prob`` applies
plate scaling and masks) and records, per observed site, the masked and the ordinary log
densities. Draws are independent replicates, so their spread gives a Monte Carlo standard
error. Every public diagnostic is built from draws.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
from pyro.distributions.util import scale_and_mask

from pyro_masked.infer import MaskedELBO
from pyro_masked.masks import MaskSchedule
from pyro_masked.scoring import NumMasks, check_num_masks, is_supported, masked_event_size

DEFAULT_NUM_MASKS = 32


def _check_num_draws(num_masks: NumMasks) -> NumMasks:
    num_masks = check_num_masks(num_masks)
    if num_masks != "all" and num_masks < 2:
        raise ValueError(
            f"num_masks must be >= 2 (independent draws give the standard error), got {num_masks}"
        )
    return num_masks


@dataclass
class _Draw:
    masked_scores: dict  # observed site -> scaled, masked log_prob tensor (masked estimate)
    unmasked_scores: dict  # observed site -> the same with the ordinary log_prob
    observed: dict  # observed site -> value
    event_sizes: dict  # masked observed site with event dims -> number of coordinates
    offset: float  # log p(z) - log q(z) summed over latent sites
    has_latents: bool
    closed_form: bool  # every observed site closed-form Gaussian or factorizing

    def masked_total(self) -> float:
        return self.offset + sum(float(v.sum()) for v in self.masked_scores.values())

    def unmasked_total(self) -> float:
        return self.offset + sum(float(v.sum()) for v in self.unmasked_scores.values())


def _empty_guide(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def _seeded(seed: int):
    """Run under a fixed torch seed without disturbing the caller's generator state."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        # The default generator directly: torch.manual_seed also walks every device.
        torch.random.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        yield


def _draw_seeds(count: int) -> list[int]:
    # From the global generator, so that pyro.set_rng_seed makes every result reproducible;
    # 32 bits, since the CPU generator keeps only those of a seed.
    return torch.randint(0, 2**32, (count,), dtype=torch.int64).tolist()


@dataclass(frozen=True)
class _Options:
    """What selects and scores the sites, as for :class:`~pyro_masked.MaskedELBO`."""

    sites: Optional[tuple] = None
    integrate: Optional[tuple] = None
    num_samples: int = 1

    @classmethod
    def of(cls, sites, integrate, num_samples) -> _Options:
        if isinstance(sites, str):
            raise TypeError(f"sites must be a list of site names, got the string {sites!r}")
        if integrate is None and num_samples != 1:
            raise ValueError(
                f"num_samples={num_samples} is the number of samples of the integrated "
                "latents; name them with integrate=(...)"
            )
        return cls(
            None if sites is None else tuple(sites),
            None if integrate is None else tuple(integrate),
            num_samples,
        )

    def loss(self, schedule: MaskSchedule, num_masks: NumMasks) -> MaskedELBO:
        # Latent integration is passed only when asked for, so that its arguments stay optional.
        extra = {}
        if self.integrate:
            extra = {"integrate": self.integrate, "num_samples": self.num_samples}
        return MaskedELBO(mask=schedule, num_masks=num_masks, sites=self.sites, **extra)


def _run_draw(loss: MaskedELBO, model, guide, args, kwargs, seed) -> _Draw:
    # The traces MaskedELBO itself builds (guide, replayed masked model, integrated latents,
    # log densities); no gradients, so that parameters leave no graphs behind.
    with torch.no_grad():
        with _seeded(seed):
            # Permutations are drawn when the masked scores are computed, inside this call.
            model_trace, guide_trace = loss._get_trace(model, guide, args, kwargs)
        return _read_traces(model_trace, guide_trace)


def _read_traces(model_trace, guide_trace) -> _Draw:
    masked_scores, unmasked_scores, observed, event_sizes = {}, {}, {}, {}
    offset, has_latents, closed_form = 0.0, False, True
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        fn = site["fn"]
        if site["infer"].get("masked_integrated"):
            # A latent integrated into an observed site's score (its own log density is 0):
            # enumerated values are exact, samples are random.
            prior = getattr(fn, "prior", None)
            has_latents = has_latents or not (prior is not None and prior.has_enumerate_support)
            continue
        if not site["is_observed"]:
            has_latents = True
            offset += float(site["log_prob_sum"])
            continue
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
            has_latents = True
            offset -= float(site["log_prob_sum"])
    return _Draw(
        masked_scores, unmasked_scores, observed, event_sizes, offset, has_latents, closed_form
    )


def _run_draws(model, guide, args, kwargs, schedule, num_masks, options, seeds) -> list[_Draw]:
    guide = _empty_guide if guide is None else guide
    # One permutation per site and draw: the draws, not the handler, do the averaging.
    loss = options.loss(schedule, "all" if num_masks == "all" else 1)
    draws = []
    for seed in seeds:
        draw = _run_draw(loss, model, guide, args, kwargs, seed)
        if not draw.event_sizes:
            raise ValueError(
                "the model has no maskable observed site (an observed site with event "
                "dimensions, e.g. a MultivariateNormal or Normal(...).to_event(1)); observed "
                f"sites: {sorted(draw.masked_scores) or 'none'}"
            )
        if num_masks == "all" and draw.has_latents:
            raise ValueError(
                "num_masks='all' averages over every mask, but the guide or model samples "
                "latent sites, whose randomness remains; use an int num_masks"
            )
        draws.append(draw)
    return draws


def _mean_and_stderr(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the first dimension and its standard error (zero for a single draw)."""
    mean = values.mean(0)
    if values.shape[0] < 2:
        return mean, torch.zeros_like(mean)
    return mean, values.std(0) / math.sqrt(values.shape[0])


def _num_seeds(num_masks: NumMasks) -> int:
    return 1 if num_masks == "all" else num_masks


def _exact_value(draw: _Draw) -> Optional[float]:
    return draw.unmasked_total() if draw.closed_form and not draw.has_latents else None
