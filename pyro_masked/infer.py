"""``MaskedELBO``: Pyro's Trace_ELBO with observed sites scored by masked pre-training."""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from pyro.infer import Trace_ELBO

from pyro_masked.handlers import masked
from pyro_masked.integrate import Integration, check_integrate, check_num_samples
from pyro_masked.masks import MaskLike, as_schedule
from pyro_masked.scoring import NumMasks, check_num_masks
from pyro_masked.util import check_generator, check_mask_groups, check_sites

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

    The positional arguments are :class:`~pyro.infer.Trace_ELBO`'s, in its order
    (``MaskedELBO(4)`` averages 4 particles, as ``Trace_ELBO(4)`` does); the masking arguments
    are keyword only.

    :param mask: ``"cumulative"`` (every mask size; unbiased), an int mask size, a float rate
        in ``(0, 1)`` or a :class:`~pyro_masked.masks.MaskSchedule`.
    :param num_masks: random permutations averaged per site and particle, or ``"all"`` (the
        exact expectation over masks, for small events).
    :param sites: names of the observed sites to mask; ``None`` masks every observed site
        that has something to mask. Sites not chosen keep their ordinary ``log_prob``.
    :param mask_groups: ``None`` (default): the vectors of a site that share a covariance share
        the permutations of a step. An int ``G``: they are split into ``G`` groups with
        independent permutations; see :func:`~pyro_masked.masked_log_prob`.
    :param generator: the :class:`torch.Generator` the permutations are drawn from; ``None``
        uses torch's global generator (``pyro.set_rng_seed`` applies).
    :param integrate: names of local latent sites to integrate out of the masked score. Each
        is given ``num_samples`` values per data point in a new batch dimension left of every
        plate: samples from the guide's distribution at that site (the proposal :math:`q`), or
        from the prior where the guide has no such site; a discrete site with enumerable
        support is enumerated exactly instead. The observed site that depends on them
        (its distribution must factorize over the event given them, e.g.
        ``Bernoulli(logits=...).to_event(1)``) is scored by the self-normalised importance
        sampled masked predictive of :mod:`pyro_masked.conditionals.latent`, computed for every
        mask size at :math:`O(K D^2)` per data point; the integrated sites' own
        :math:`\\log p - \\log q` leave the objective (they are inside the weights), and other
        latents keep :math:`\\log p - \\log q`. Enumeration is exact; sampling is consistent as
        :math:`K \\to \\infty` and biased for finite :math:`K`: with ``mask="cumulative"`` the
        expectation over masks is the importance-weighted bound
        :math:`\\log \\frac{1}{K}\\sum_k p(x, z_k)/q(z_k)` (Burda et al., 2016), below
        :math:`\\log p(x)` in expectation by :math:`O(1/K)`. Samples from a reparameterised
        proposal carry gradients to the guide and the model; a non-reparameterised proposal is
        held fixed (its samples and :math:`\\log q` are detached, while the prior's
        :math:`\\log p` keeps its gradient). An observed site that depends on the integrated
        latents but is not masked (``sites``) is scored by that importance-weighted
        :math:`\\log p(x)`.
    :param num_samples: :math:`K`, the importance samples per data point.

    Example, a latent-variable model trained by masking with its latent ``z`` integrated out by
    256 samples from the prior (an empty guide)::

        elbo = MaskedELBO(integrate=("z",), num_samples=256)
        svi = SVI(model, lambda data: None, pyro.optim.Adam({"lr": 0.01}), loss=elbo)

    References:

    - P. Moreno-Muñoz, P. Garcia Recasens, S. Hauberg, "On Masked Pre-training and the
      Marginal Likelihood", NeurIPS 2023.
    - E. Fong, C. C. Holmes, "On the marginal likelihood and cross-validation", Biometrika 2020.
    - Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = math.inf,
        max_iarange_nesting=None,
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        jit_options=None,
        retain_graph=None,
        tail_adaptive_beta: float = -1.0,
        *,
        mask: MaskLike = "cumulative",
        num_masks: NumMasks = 1,
        sites: Optional[Iterable[str]] = None,
        mask_groups: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        integrate: Optional[Iterable[str]] = None,
        num_samples: int = 1,
    ):
        self.mask = as_schedule(mask)
        self.num_masks = check_num_masks(num_masks)
        self.sites = check_sites(sites)
        self.mask_groups = check_mask_groups(mask_groups)
        self.generator = check_generator(generator)
        self.integrate = check_integrate(integrate)
        self.num_samples = check_num_samples(num_samples)
        if self.num_samples != 1 and not self.integrate:
            raise ValueError(
                f"num_samples={num_samples} is the number of samples of the integrated latents; "
                "name them with integrate=(...)"
            )
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            max_iarange_nesting=max_iarange_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
            ignore_jit_warnings=ignore_jit_warnings,
            jit_options=jit_options,
            retain_graph=retain_graph,
            tail_adaptive_beta=tail_adaptive_beta,
        )

    def _get_trace(self, model, guide, args, kwargs):
        masked_model = masked(
            model,
            mask=self.mask,
            num_masks=self.num_masks,
            sites=self.sites,
            mask_groups=self.mask_groups,
            generator=self.generator,
        )
        if not self.integrate:
            return super()._get_trace(masked_model, guide, args, kwargs)
        if self.max_plate_nesting == math.inf:
            self._guess_max_plate_nesting(masked_model, guide, args, kwargs)
        integration = Integration(self.integrate, self.num_samples, self.max_plate_nesting)
        return super()._get_trace(
            integration.model(masked_model), integration.guide(guide), args, kwargs
        )
