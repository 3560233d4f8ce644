"""Export to ArviZ."""

from __future__ import annotations

import warnings

from pyro_masked.diagnostics.evidence import PointwiseMaskedLogProb

__all__ = ["to_inference_data"]


def _import_arviz():
    try:
        with warnings.catch_warnings():
            # ArviZ 0.2x announces its 1.0 refactor on import; nothing here depends on it.
            warnings.filterwarnings(
                "ignore", message=".*ArviZ is undergoing a major refactor", category=FutureWarning
            )
            import arviz
    except ImportError as error:
        raise ImportError(
            "to_inference_data needs ArviZ, an optional dependency: pip install arviz "
            "(or pip install pyro_masked[tutorials])"
        ) from error
    return arviz


def to_inference_data(pointwise: PointwiseMaskedLogProb):
    """Export pointwise masked log predictives to an ArviZ ``InferenceData``.

    The ``log_likelihood`` group holds one variable per observed site, with one chain and one
    draw per independent mask draw (so its mean over draws is the masked estimate), and the
    ``observed_data`` group the observed values. The draws are draws of masks (and of the
    guide), not posterior samples: compare models on the means, e.g.
    ``idata.log_likelihood[site].mean("draw")``.

    :param pointwise: the result of :func:`pointwise_masked_log_prob`.
    :raises ImportError: when ArviZ is not installed.
    """
    if not isinstance(pointwise, PointwiseMaskedLogProb):
        raise TypeError(
            "pointwise must be the result of pointwise_masked_log_prob, got "
            f"{type(pointwise).__name__}"
        )
    arviz = _import_arviz()
    log_likelihood = {
        name: draws.detach().cpu().numpy()[None] for name, draws in pointwise.draws.items()
    }
    observed = {name: value.detach().cpu().numpy() for name, value in pointwise.observed.items()}
    return arviz.from_dict(log_likelihood=log_likelihood, observed_data=observed)
