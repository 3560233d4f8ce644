"""Leave-one-coordinate-out log predictives: which coordinates a model predicts badly."""

from __future__ import annotations

import numbers
from typing import Callable, Iterable, Optional

import torch
import torch.distributions as tdist
from pyro import poutine
from pyro.distributions.util import broadcast_shape, scale_and_mask
from pyro.poutine.util import prune_subsample_sites

from pyro_masked.conditionals.gaussian import leave_one_out_log_densities
from pyro_masked.diagnostics.draws import (
    ModelCall,
    check_full_plates,
    check_seed,
    draw_seeds,
    seeded,
)
from pyro_masked.scoring import gaussian_parts
from pyro_masked.util import check_sites, unwrap

__all__ = ["coordinate_log_predictive"]


def _coordinate_leave_one_out(fn: tdist.Distribution, value: torch.Tensor) -> torch.Tensor:
    """:math:`\\log p(x_j \\mid x_{-j})` for every coordinate ``j``: shape batch + event.

    The distribution is unwrapped (:func:`~pyro_masked.util.unwrap`) down to what is scored:
    a univariate base factorizes, so each coordinate's conditional is its marginal; a Gaussian
    base gets its closed-form leave-one-out within each of its events (for independent copies,
    each copy on its own). The layers are then put back per coordinate.
    """
    value = value.expand(broadcast_shape(value.shape, fn.batch_shape + fn.event_shape))
    unwrapped = unwrap(fn)
    if unwrapped.factorizes:
        return unwrapped.rewrap(unwrapped.base.log_prob(value), sum_events=False)
    gaussian = gaussian_parts(unwrapped.base)
    if gaussian is None:
        raise TypeError(
            f"{type(unwrapped.base).__name__} has no closed-form leave-one-out conditionals; "
            "supported are MultivariateNormal, LowRankMultivariateNormal, distributions that "
            "factorize and independent copies of these"
        )
    loc, covariance = gaussian
    # Each vector as a batch of one: vectors sharing a covariance share its factorization.
    residuals = (value - loc).unsqueeze(-2)
    values = leave_one_out_log_densities(covariance, residuals).squeeze(-2)
    # One value per coordinate of the base's event, kept through the layers.
    return unwrapped.rewrap(values, sum_events=False, base_event_dims=1)


def coordinate_log_predictive(
    model: Callable,
    guide: Optional[Callable] = None,
    *,
    model_args: tuple = (),
    model_kwargs: Optional[dict] = None,
    num_draws: int = 1,
    sites: Optional[Iterable[str]] = None,
    seed: Optional[int] = None,
) -> dict:
    """Leave-one-coordinate-out log predictives :math:`\\log p(x_{nj} \\mid x_{n,-j})`.

    The per-hidden-coordinate view of masking at size 1: for every data point :math:`n` and
    every coordinate :math:`j` of each observed site with event dimensions, the log density of
    :math:`x_{nj}` given the other coordinates of :math:`x_n` (and the guide's latent draw).
    Summed over coordinates it is :math:`D\\,S(x_n; 1)`, the masked score at mask size 1; it
    shows *which* coordinates a model predicts badly. Closed form for Gaussian sites (one
    factorization of the covariance gives every coordinate), for sites that factorize (the
    conditional is the marginal) and for independent copies of these (e.g.
    ``MultivariateNormal(...).expand([k]).to_event(1)``, a multi-output ``pyro.contrib.gp``
    model: each coordinate is conditioned on the rest of its own copy); plate scaling and
    ``poutine.mask`` are applied as Pyro does.

    :param model: the Pyro model.
    :param guide: the guide, or ``None`` for the empty guide.
    :param tuple model_args: the model's and guide's positional arguments.
    :param dict model_kwargs: the model's and guide's keyword arguments.
    :param int num_draws: independent guide draws averaged over (only matters with latent
        sites).
    :param sites: names of the observed sites to report; ``None`` reports every observed site
        with event dimensions.
    :param seed: ``None`` (torch's global generator) or an int for a private one; see
        :func:`~pyro_masked.estimate_log_marginal`.
    :returns: a dict from site name to a tensor of shape ``batch_shape + event_shape``.
    """
    call = ModelCall.of(model, guide, model_args, model_kwargs)
    if isinstance(num_draws, bool) or not isinstance(num_draws, numbers.Integral):
        raise TypeError(f"num_draws must be an int >= 1, got {num_draws!r}")
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}")
    sites = check_sites(sites)
    wanted = None if sites is None else set(sites)
    totals: dict = {}
    for draw_seed in draw_seeds(num_draws, check_seed(seed)):
        with torch.no_grad(), seeded(draw_seed):
            guide_trace = poutine.trace(call.guide).get_trace(*call.args, **call.kwargs)
            model_trace = poutine.trace(poutine.replay(call.model, trace=guide_trace)).get_trace(
                *call.args, **call.kwargs
            )
            for name, site in prune_subsample_sites(model_trace).nodes.items():
                if site["type"] != "sample" or not site["is_observed"]:
                    continue
                fn = site["fn"]
                if not fn.event_shape:
                    continue
                if wanted is not None and name not in wanted:
                    continue
                check_full_plates(name, site)
                value = site["value"]
                if not torch.isfinite(value).all():
                    raise ValueError(f"observed site '{name}': the observed value has NaN or inf")
                try:
                    values = _coordinate_leave_one_out(fn, value)
                except TypeError as error:
                    raise TypeError(f"observed site '{name}': {error}") from error
                values = values.expand(fn.batch_shape + fn.event_shape)
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
