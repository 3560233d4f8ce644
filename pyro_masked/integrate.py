"""Local latents integrated out of the masked score, by importance sampling or enumeration.

:class:`~pyro_masked.MaskedELBO` with ``integrate=("z",)`` runs the model and guide through the
two handlers of :class:`Integration`:

- on the guide, the integrated sites are recorded (their distribution is the proposal) and
  hidden from the guide trace, so their :math:`\\log q` leaves the objective;
- on the model, each integrated site takes ``K`` values in a new dimension left of every plate
  (``K`` samples from the proposal, or from the prior where the guide has no such site, or every
  value of a discrete latent), its :math:`\\log p - \\log q` becomes the importance weights, and
  the observed site that depends on it is scored by
  :func:`~pyro_masked.conditionals.latent.latent_masked_score`: its per-coordinate
  log-likelihoods come from the univariate distribution under the site's ``Independent``.

The engine knows nothing of traces; this module turns sites into tensors.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable, Optional

import torch
import torch.distributions as tdist
from pyro.distributions import TorchDistribution, constraints
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from pyro_masked.conditionals.latent import latent_masked_score
from pyro_masked.handlers import MaskedScore
from pyro_masked.masks import MaskSchedule
from pyro_masked.scoring import NumMasks, all_finite
from pyro_masked.util import Unwrapped, check_sites, unwrap

__all__ = ["Integration", "IntegratedObservation", "check_integrate", "check_num_samples"]


def check_integrate(integrate: Optional[Iterable[str]]) -> tuple[str, ...]:
    """Validate the ``integrate`` argument: a sequence of site names."""
    names = check_sites(integrate, argument="integrate") or ()
    if len(set(names)) != len(names):
        raise ValueError(f"integrate={names} names a site twice")
    return names


def check_num_samples(num_samples: int) -> int:
    """Validate ``num_samples``: the number ``K`` of importance samples, an int >= 1."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return int(num_samples)


class IntegratedLatent(TorchDistribution):
    """Stands in for an integrated site in the model trace: its own log density is zero.

    The site's prior (and proposal) enter the importance weights of the observed site instead.
    """

    arg_constraints = {}

    def __init__(self, prior: TorchDistribution):
        self.prior = prior
        super().__init__(prior.batch_shape, prior.event_shape, validate_args=False)

    @property
    def support(self):
        return self.prior.support

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        # Enumerated values may be integers; the log density is real.
        dtype = value.dtype if value.is_floating_point() else torch.get_default_dtype()
        return torch.zeros(self.batch_shape, dtype=dtype, device=value.device)


def coordinate_distribution(fn: tdist.Distribution, site: str) -> Unwrapped:
    """An observed site's distribution split into its univariate base and the layers around it.

    ``base.log_prob`` gives one log-likelihood per event coordinate (through
    :meth:`~pyro_masked.util.Unwrapped.rewrap` with ``sum_events=False``, which applies the
    expansions), which is what makes the masked predictive a ratio of sums over samples.
    """
    unwrapped = unwrap(fn)
    if unwrapped.has_mask:
        raise TypeError(
            f"observed site '{site}' depends on integrated latents and has a masked "
            "distribution (.mask()); use pyro.poutine.mask around the site instead"
        )
    if not unwrapped.factorizes:
        raise TypeError(
            f"observed site '{site}' depends on integrated latents, so its distribution must "
            "factorize over the event given them (an Independent of a univariate distribution, "
            f"e.g. Bernoulli(logits=...).to_event(1)); got {type(fn).__name__} over "
            f"{type(unwrapped.base).__name__}"
        )
    return unwrapped


class IntegratedObservation(TorchDistribution):
    """An observed site's masked score with the integrated latents summed out.

    ``base`` is the site's distribution with the ``K`` values of the latents in batch dimension
    ``-(max_plate_nesting + 1)`` (the leftmost); ``log_weights`` has the same layout. ``log_prob``
    returns one score per data point, with that dimension gone.

    :param base: the observed site's distribution given the ``K`` latent values.
    :param log_weights: :math:`\\log \\omega_k`, shape ``(K, ...)`` broadcastable to the batch.
    :param schedule: the mask schedule, or ``None`` for an unmasked site: then the score is
        :math:`\\log \\sum_k \\omega_k\\, p(x \\mid z_k)`, the importance-weighted
        :math:`\\log p(x)`.
    :param num_masks: permutations averaged, or ``"all"``.
    :param site: the site's name, for error messages.
    :param generator: the :class:`torch.Generator` the permutations are drawn from (``None``:
        torch's global one).
    """

    arg_constraints = {}

    def __init__(
        self,
        base: TorchDistribution,
        log_weights: torch.Tensor,
        schedule: Optional[MaskSchedule],
        num_masks: NumMasks,
        site: str,
        generator: Optional[torch.Generator] = None,
    ):
        self.base_dist = base
        self.coordinates = coordinate_distribution(base, site)
        self.log_weights = log_weights
        self.schedule = schedule
        self.num_masks = num_masks
        self.site = site
        self.generator = generator
        super().__init__(base.batch_shape[1:], base.event_shape, validate_args=False)

    @property
    def support(self) -> Optional[constraints.Constraint]:
        return self.base_dist.support

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        coordinates = self.coordinates
        loglik = coordinates.rewrap(coordinates.base.log_prob(value), sum_events=False)
        # (K, batch..., event...)
        event_dims = len(self.base_dist.event_shape)
        batch_shape = loglik.shape[: loglik.dim() - event_dims]
        loglik = loglik.reshape(batch_shape + (-1,))
        batch_shape = torch.Size(torch.broadcast_shapes(batch_shape, self.log_weights.shape))
        num_samples, point_shape = batch_shape[0], batch_shape[1:]
        size = loglik.shape[-1]
        loglik = loglik.expand(batch_shape + (size,)).reshape(num_samples, -1, size)
        log_weights = self.log_weights.expand(batch_shape).reshape(num_samples, -1)
        if self.schedule is None:
            score = torch.logsumexp(log_weights + loglik.sum(-1), 0)
        else:
            size_weights = self.schedule.size_weights(
                size, dtype=loglik.dtype, device=loglik.device
            )
            try:
                score = latent_masked_score(
                    loglik, log_weights, size_weights, self.num_masks, generator=self.generator
                )
            except ValueError as error:
                raise ValueError(f"observed site '{self.site}': {error}") from error
        return score.reshape(point_shape)


class Integration:
    """The handlers that integrate the named local latents out of one model/guide run.

    :param sites: names of the latent sites to integrate.
    :param num_samples: ``K``, importance samples per data point (enumerated discrete sites
        use their whole support instead).
    :param max_plate_nesting: plates in the model, particle plate included; the ``K`` values go
        in batch dimension ``-(max_plate_nesting + 1)``.
    """

    def __init__(self, sites: tuple[str, ...], num_samples: int, max_plate_nesting: int):
        self.sites = frozenset(sites)
        self.num_samples = num_samples
        self.max_plate_nesting = int(max_plate_nesting)
        self.proposals: dict[str, TorchDistribution] = {}
        self.guide_sites: set[str] = set()
        self.log_weights: Optional[torch.Tensor] = None
        self.kind: Optional[str] = None  # "sampled" or "enumerated"
        self.integrated: list[str] = []
        self.observed: Optional[str] = None

    def guide(self, guide: Callable) -> Callable:
        """The guide, recording the integrated sites' proposals and hiding them from its trace."""
        return _GuideRecorder(self)(guide)

    def model(self, model: Callable) -> Callable:
        """The model, with the integrated sites' values and the dependent observed site's score."""
        return _ModelIntegrator(self)(model)

    # Model side.

    def integrate_site(self, msg: dict) -> None:
        """Give an integrated latent site its ``K`` values and record their weights."""
        name, prior = msg["name"], msg["fn"]
        if msg["is_observed"]:
            raise ValueError(f"integrate names '{name}', which is an observed site")
        if len(prior.batch_shape) > self.max_plate_nesting:
            raise ValueError(
                f"integrated site '{name}' has batch shape {tuple(prior.batch_shape)}, more "
                f"dimensions than max_plate_nesting={self.max_plate_nesting}; declare its "
                "batch dimensions with pyro.plate"
            )
        enumerate_it = prior.has_enumerate_support
        kind = "enumerated" if enumerate_it else "sampled"
        if self.kind is not None and (kind == "enumerated" or self.kind == "enumerated"):
            raise ValueError(
                f"integrate names '{name}' and {self.integrated}: an enumerated discrete site "
                "can only be integrated on its own"
            )
        self.kind = kind
        event_shape = prior.event_shape
        padding = (1,) * self.max_plate_nesting
        if enumerate_it:
            support = prior.enumerate_support(expand=False)
            value = support.reshape((support.shape[0],) + padding + event_shape)
            log_weights = prior.log_prob(value)
        else:
            value, log_weights = self._sample(name, prior)
        self.log_weights = (
            log_weights if self.log_weights is None else self.log_weights + log_weights
        )
        msg["value"] = value
        msg["is_observed"] = True
        msg["fn"] = IntegratedLatent(prior)
        msg["infer"] = dict(msg["infer"], masked_integrated=True)
        self.integrated.append(name)

    def _sample(self, name: str, prior: TorchDistribution):
        proposal = self.proposals.get(name)
        source = prior if proposal is None else proposal
        if len(source.batch_shape) > self.max_plate_nesting:
            raise ValueError(
                f"the guide's distribution at integrated site '{name}' has batch shape "
                f"{tuple(source.batch_shape)}, more dimensions than "
                f"max_plate_nesting={self.max_plate_nesting}"
            )
        sample_shape = (self.num_samples,)
        reparameterized = source.has_rsample
        # A non-reparameterised proposal is held fixed: its samples carry no gradient.
        draws = source.rsample(sample_shape) if reparameterized else source.sample(sample_shape)
        if not reparameterized:
            draws = draws.detach()
        padding = (1,) * (self.max_plate_nesting - len(source.batch_shape))
        value = draws.reshape(sample_shape + padding + draws.shape[1:])
        log_count = math.log(self.num_samples)
        if proposal is None:
            if reparameterized:
                # log p(z) - log p(z) vanishes identically, gradient included.
                log_weights = value.new_full((1,) * (self.max_plate_nesting + 1), -log_count)
            else:
                # Zero, but its gradient is the score function of the prior's parameters.
                log_prior = prior.log_prob(value)
                log_weights = log_prior - log_prior.detach() - log_count
        else:
            log_proposal = proposal.log_prob(value)
            if not reparameterized:
                log_proposal = log_proposal.detach()
            log_weights = prior.log_prob(value) - log_proposal - log_count
        return value, log_weights

    def observe_site(self, msg: dict) -> None:
        """Score the observed site that depends on the integrated latents."""
        name, fn = msg["name"], msg["fn"]
        if isinstance(fn, MaskedScore):
            base, schedule, num_masks = fn.base_dist, fn.schedule, fn.num_masks
            generator = fn.generator
        else:
            base, schedule, num_masks, generator = fn, None, 1, None
        if self.log_weights is None or len(base.batch_shape) <= self.max_plate_nesting:
            return  # does not depend on the integrated latents
        if len(base.batch_shape) != self.max_plate_nesting + 1:
            raise ValueError(
                f"observed site '{name}' has batch shape {tuple(base.batch_shape)}, more "
                f"dimensions than max_plate_nesting={self.max_plate_nesting} plus the "
                "dimension of the integrated samples"
            )
        if self.observed is not None:
            raise ValueError(
                f"observed sites '{self.observed}' and '{name}' both depend on the integrated "
                f"latents {self.integrated}; only one observed site per integrated latent is "
                "supported"
            )
        coordinates = coordinate_distribution(base, name)
        value = msg["value"]
        if not all_finite(value):
            raise ValueError(f"observed site '{name}': the observed value has NaN or inf entries")
        likelihood = coordinates.base
        inside = likelihood.support.check(value)  # type: ignore[union-attr]
        if not bool(inside.all()):
            raise ValueError(
                f"observed site '{name}': observed values lie outside the support "
                f"({likelihood.support}) of its {type(likelihood).__name__} likelihood"
            )
        self.observed = name
        msg["fn"] = IntegratedObservation(
            base, self.log_weights, schedule, num_masks, name, generator
        )
        if schedule is not None:
            # Unmasked, the same samples give the importance-weighted log p(x).
            unmasked = IntegratedObservation(base, self.log_weights, None, 1, name)
            msg["infer"] = dict(msg["infer"], unmasked_fn=unmasked)

    def check_latent(self, msg: dict) -> None:
        """Check a latent site that is not integrated against the integrated ones."""
        name, fn = msg["name"], msg["fn"]
        if isinstance(fn, _Subsample):
            return
        if name not in self.guide_sites:
            raise ValueError(
                f"latent site '{name}' is neither integrated nor in the guide, so the observed "
                "sites would be scored given a draw from its prior: add it to the guide or to "
                f"integrate={tuple(sorted(self.sites))}"
            )
        if self.log_weights is not None and len(fn.batch_shape) > self.max_plate_nesting:
            raise ValueError(
                f"latent site '{name}' depends on the integrated latents {self.integrated}; "
                "integrate it as well"
            )

    def finish(self) -> None:
        """Check, after the model ran, that every named site was integrated."""
        missing = sorted(self.sites - set(self.integrated))
        if missing:
            raise ValueError(
                f"integrate={tuple(sorted(self.sites))} names {missing}, which the model did "
                "not sample as latent sites"
            )
        if self.observed is None:
            raise ValueError(
                f"no observed site depends on the integrated latents {self.integrated}"
            )


class _GuideRecorder(Messenger):
    def __init__(self, integration: Integration):
        super().__init__()
        self.integration = integration

    def _pyro_sample(self, msg) -> None:
        name = msg["name"]
        self.integration.guide_sites.add(name)
        if name in self.integration.sites:
            self.integration.proposals[name] = msg["fn"]
            msg["stop"] = True  # hidden from the guide trace: its log q is integrated out


class _ModelIntegrator(Messenger):
    def __init__(self, integration: Integration):
        super().__init__()
        self.integration = integration

    def __exit__(self, exc_type, exc_value, traceback):
        result = super().__exit__(exc_type, exc_value, traceback)
        if exc_type is None:
            self.integration.finish()
        return result

    def _pyro_sample(self, msg) -> None:
        if msg["name"] in self.integration.sites:
            self.integration.integrate_site(msg)
        elif msg["is_observed"]:
            self.integration.observe_site(msg)
        else:
            self.integration.check_latent(msg)
