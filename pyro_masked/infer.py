"""``MaskedELBO``: Pyro's Trace_ELBO with observed sites scored by masked pre-training."""

from __future__ import annotations

import math
from typing import Iterable, Optional

from pyro.infer import Trace_ELBO

from pyro_masked.handlers import masked
from pyro_masked.masks import MaskLike, as_schedule
from pyro_masked.scoring import NumMasks, check_num_masks

__all__ = ["MaskedELBO"]


class MaskedELBO(Trace_ELBO):
    """The evidence lower bound with masked pre-training scores for the observed sites.

    For a model :math:`p(x, z)` and guide :math:`q(z)`, the estimator is

    .. math::

        \\mathcal{L} = \\mathbb{E}_{q(z)}\\Big[
            \\sum_{\\text{obs } s} \\widehat{\\log p}(x_s \\mid z) + \\log p(z) - \\log q(z)
        \\Big],

    where :math:`\\widehat{\\log p}` is :func:`~pyro_masked.masked_log_prob` of each masked
    observed site: :math:`\\sum_m w_m S(x; m)` over its event coordinates. With
    ``mask="cumulative"`` it is an unbiased estimate of the ordinary ELBO, because
    :math:`\\log p(x) = \\sum_{m=1}^{D} S(x; m)`. So an empty guide gives type-II maximum
    likelihood by masking, an ``AutoDelta`` guide MAP, and a full guide an unbiased ELBO
    estimate; a fixed rate (``mask=0.15``) gives the biased objective of fixed-rate masked
    pre-training. Latent sites keep :math:`\\log p - \\log q`, and everything else — particles,
    vectorisation, plate scaling with subsampling, score-function terms of
    non-reparameterised guides — is :class:`~pyro.infer.Trace_ELBO`'s machinery, applied to
    :func:`~pyro_masked.masked` (model). Like every Pyro loss it is a sum (over data points
    and sites), not a mean.

    Example::

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=MaskedELBO(mask="cumulative"))

    or as a module for a plain PyTorch loop: ``loss_fn = MaskedELBO()(model, guide)``.

    :param mask: ``"cumulative"`` (every mask size; unbiased), an int mask size, a float rate
        in ``(0, 1)`` or a :class:`~pyro_masked.masks.MaskSchedule`.
    :param num_masks: random permutations averaged per site and particle, or ``"all"`` (the
        exact expectation over masks, for small events).
    :param sites: names of the observed sites to mask; ``None`` masks every observed site.
        Sites not chosen keep their ordinary ``log_prob``.

    The remaining arguments are :class:`~pyro.infer.Trace_ELBO`'s.

    References:

    - P. Moreno-Muñoz, P. Garcia Recasens, S. Hauberg, "On Masked Pre-training and the
      Marginal Likelihood", NeurIPS 2023.
    - E. Fong, C. C. Holmes, "On the marginal likelihood and cross-validation", Biometrika 2020.
    """

    def __init__(
        self,
        mask: MaskLike = "cumulative",
        num_masks: NumMasks = 1,
        sites: Optional[Iterable[str]] = None,
        num_particles: int = 1,
        max_plate_nesting: float = math.inf,
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        jit_options=None,
        retain_graph=None,
        tail_adaptive_beta: float = -1.0,
    ):
        self.mask = as_schedule(mask)
        self.num_masks = check_num_masks(num_masks)
        if isinstance(sites, str):
            raise TypeError(f"sites must be a list of site names, got the string {sites!r}")
        self.sites = None if sites is None else tuple(sites)
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
            ignore_jit_warnings=ignore_jit_warnings,
            jit_options=jit_options,
            retain_graph=retain_graph,
            tail_adaptive_beta=tail_adaptive_beta,
        )

    def _get_trace(self, model, guide, args, kwargs):
        masked_model = masked(model, mask=self.mask, num_masks=self.num_masks, sites=self.sites)
        return super()._get_trace(masked_model, guide, args, kwargs)
