"""Export to ArviZ."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from pyro_masked._optional import import_optional
from pyro_masked.diagnostics.evidence import PointwiseMaskedLogProb

if TYPE_CHECKING:
    import arviz

__all__ = ["to_inference_data"]


def _import_arviz():
    with warnings.catch_warnings():
        # ArviZ 0.2x announces its 1.0 refactor on import; nothing here depends on it.
        warnings.filterwarnings(
            "ignore", message=".*ArviZ is undergoing a major refactor", category=FutureWarning
        )
        return import_optional("arviz", "to_inference_data")


#: The group holding the masked draws: a name no ArviZ function reads on its own.
MASKED_GROUP = "masked_log_predictive"


def _numpy(tensors: dict) -> dict:
    return {name: tensor.detach().cpu().numpy() for name, tensor in tensors.items()}


def to_inference_data(pointwise: PointwiseMaskedLogProb) -> arviz.InferenceData:
    """Export pointwise masked log predictives to an ArviZ ``InferenceData``.

    Groups:

    - ``masked_log_predictive``: one variable per observed site, one chain, and one draw per
      independent draw of masks (and of the guide): the mean over draws is each point's masked
      estimate. These are *not* posterior draws of a log-likelihood, so they are kept out of
      ArviZ's ``log_likelihood`` group: there, ``az.loo``, ``az.waic`` and ``az.compare``
      would treat the spread of the masks as posterior uncertainty and return numbers with no
      meaning. Read it with ``az.summary(idata, group="masked_log_predictive")`` (means,
      Monte Carlo standard errors and effective sample sizes, which apply to independent
      draws) or ``idata.masked_log_predictive[site].mean("draw")``; compare models on the sums
      of those means, with :meth:`~pyro_masked.PointwiseMaskedLogProb.total` for the error.
    - ``log_likelihood``: only when every draw sampled latent sites from the guide (and nothing
      was integrated by sampling): the ordinary log density of each point under each guide
      draw, which is what ArviZ means by the group (with the guide as approximate posterior),
      and ``posterior``: the guide's latent values in those draws.
      ``az.loo`` and ``az.waic`` then apply, with their usual diagnostics telling whether the
      guide is good enough. Without latent sites there is no posterior to draw from and the
      group is absent, so ``az.loo`` refuses (``TypeError: log likelihood not found``).
    - ``observed_data``: the observed values.

    :param pointwise: the result of :func:`~pyro_masked.pointwise_masked_log_prob`.
    :raises ImportError: when ArviZ is not installed.
    """
    if not isinstance(pointwise, PointwiseMaskedLogProb):
        raise TypeError(
            "pointwise must be the result of pointwise_masked_log_prob, got "
            f"{type(pointwise).__name__}"
        )
    arviz = _import_arviz()
    # One chain: the draws are independent replicates.
    masked = {name: draws[None] for name, draws in _numpy(pointwise.draws).items()}
    log_likelihood = posterior = None
    if pointwise.posterior_draws:
        log_likelihood = {
            name: draws[None] for name, draws in _numpy(pointwise.unmasked_draws).items()
        }
        posterior = {name: draws[None] for name, draws in _numpy(pointwise.latent_draws).items()}
    idata = arviz.from_dict(
        posterior=posterior,
        log_likelihood=log_likelihood,
        observed_data=_numpy(pointwise.observed),
    )
    idata.extend(arviz.InferenceData(**{MASKED_GROUP: arviz.dict_to_dataset(masked)}))
    return idata
