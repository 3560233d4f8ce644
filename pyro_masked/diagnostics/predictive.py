"""Leave-one-coordinate-out log predictives: which coordinates a model predicts badly."""

from __future__ import annotations

import numbers
from typing import Callable, Iterable, Optional

import torch
import torch.distributions as tdist
from pyro import poutine
from pyro.distributions import ExpandedDistribution, MaskedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites

from pyro_masked.conditionals.gaussian import leave_one_out_log_densities
from pyro_masked.diagnostics.draws import _draw_seeds, _empty_guide, _seeded
from pyro_masked.scoring import gaussian_parts, is_supported

__all__ = ["coordinate_log_predictive"]


def _coordinate_leave_one_out(fn: tdist.Distribution, value: torch.Tensor) -> torch.Tensor:
    """:math:`\\log p(x_j \\mid x_{-j})` for every coordinate ``j``: shape batch + event."""
    if isinstance(fn, MaskedDistribution):
        values = _coordinate_leave_one_out(fn.base_dist, value)
        mask = fn._mask.reshape(fn._mask.shape + (1,) * len(fn.event_shape))
        return torch.where(mask, values, values.new_zeros(()))
    if isinstance(fn, ExpandedDistribution):
        values = _coordinate_leave_one_out(fn.base_dist, value)
        return values.expand(fn.batch_shape + fn.event_shape)
    if isinstance(fn, tdist.Independent) and is_supported(fn):
        # Coordinates independent given everything else: the conditional is the marginal.
        base = fn.base_dist
        while isinstance(base, tdist.Independent):
            base = base.base_dist
        return base.log_prob(value).expand(fn.batch_shape + fn.event_shape)
    if isinstance(fn, (tdist.MultivariateNormal, tdist.LowRankMultivariateNormal)):
        loc, covariance = gaussian_parts(fn)
        # Each vector as a batch of one: vectors sharing a covariance share its factorization.
        residuals = (value - loc).unsqueeze(-2)
        return leave_one_out_log_densities(covariance, residuals).squeeze(-2)
    raise TypeError(
        f"{type(fn).__name__} has no closed-form leave-one-out conditionals; supported are "
        "MultivariateNormal, LowRankMultivariateNormal and distributions that factorize"
    )


def coordinate_log_predictive(
    model: Callable,
    guide: Optional[Callable],
    *args,
    num_draws: int = 1,
    sites: Optional[Iterable[str]] = None,
    **kwargs,
) -> dict:
    """Leave-one-coordinate-out log predictives :math:`\\log p(x_{nj} \\mid x_{n,-j})`.

    The per-hidden-coordinate view of masking at size 1: for every data point :math:`n` and
    every coordinate :math:`j` of each observed site with event dimensions, the log density of
    :math:`x_{nj}` given the other coordinates of :math:`x_n` (and the guide's latent draw).
    Summed over coordinates it is :math:`D\\,S(x_n; 1)`, the masked score at mask size 1; it
    shows *which* coordinates a model predicts badly. Closed form for Gaussian sites (one
    factorization of the covariance gives every coordinate) and for sites that factorize (the
    conditional is the marginal); plate scaling and ``poutine.mask`` are applied as Pyro does.

    :param model: the Pyro model.
    :param guide: the guide, or ``None`` for the empty guide.
    :param int num_draws: guide draws averaged over (only matters with latent sites).
    :param sites: names of the observed sites to report; ``None`` reports every observed site
        with event dimensions.
    :returns: a dict from site name to a tensor of shape ``batch_shape + event_shape``.
    """
    if isinstance(num_draws, bool) or not isinstance(num_draws, numbers.Integral):
        raise TypeError(f"num_draws must be an int >= 1, got {num_draws!r}")
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}")
    if isinstance(sites, str):
        raise TypeError(f"sites must be a list of site names, got the string {sites!r}")
    wanted = None if sites is None else set(sites)
    guide = _empty_guide if guide is None else guide
    totals: dict = {}
    for seed in _draw_seeds(num_draws):
        with torch.no_grad(), _seeded(seed):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
            for name, site in prune_subsample_sites(model_trace).nodes.items():
                if site["type"] != "sample" or not site["is_observed"]:
                    continue
                fn = site["fn"]
                if not fn.event_shape:
                    continue
                if wanted is not None and name not in wanted:
                    continue
                value = site["value"]
                if not torch.isfinite(value).all():
                    raise ValueError(f"observed site '{name}': the observed value has NaN or inf")
                try:
                    values = _coordinate_leave_one_out(fn, value)
                except TypeError as error:
                    raise TypeError(f"observed site '{name}': {error}") from error
                event_dims = len(fn.event_shape)
                mask = site["mask"]
                if isinstance(mask, torch.Tensor):
                    mask = mask.reshape(mask.shape + (1,) * event_dims)
                values = scale_and_mask(values, site["scale"], mask)
                totals[name] = totals.get(name, 0.0) + values.detach() / num_draws
    missing = sorted((wanted or set()) - set(totals))
    if missing:
        raise ValueError(f"sites={sorted(wanted)} names {missing}, not observed sites with events")
    if not totals:
        raise ValueError(
            "the model has no maskable observed site (an observed site with event dimensions)"
        )
    return totals
