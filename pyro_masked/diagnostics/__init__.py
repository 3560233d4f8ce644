"""Reading the evidence by masking: estimates with standard errors, the masking-rate curve,
the bias of a fixed masking rate, and pointwise masked log predictives.

One job per module: :mod:`~pyro_masked.diagnostics.draws` (independent evaluations of the
model read off the traces), :mod:`~pyro_masked.diagnostics.evidence` (the estimate and its
per-data-point view), :mod:`~pyro_masked.diagnostics.rates` (the masking-rate curve and the
fixed-rate bias), :mod:`~pyro_masked.diagnostics.predictive` (leave-one-coordinate-out
predictives), :mod:`~pyro_masked.diagnostics.plotting` and
:mod:`~pyro_masked.diagnostics.inference_data` (ArviZ export).

Everything here evaluates a model and a guide with the traces
:class:`~pyro_masked.MaskedELBO` builds — the guide is run, the model is replayed against it
under :func:`~pyro_masked.masked`, and Pyro's ``compute_log_prob`` applies plate scaling and
masks — and then reads the numbers off the traces. One *draw* is one such evaluation with
fresh random masks (one random permutation per observed site) and, if the guide samples latent
sites, a fresh guide sample. Draws are independent, so their spread gives a Monte Carlo
standard error.

With an empty guide (no latent sites) the cumulative draw is an unbiased estimate of the log
marginal likelihood :math:`\\log p(x)`, because

.. math::

    \\log p(x) = \\sum_{m=1}^{D} S(x; m), \\qquad
    S(x; m) = \\mathbb{E}_{|M| = m}\\Big[\\frac{1}{m} \\sum_{j \\in M}
    \\log p(x_j \\mid x_{-M})\\Big].

With latent sites it estimates the masked ELBO
:math:`\\mathbb{E}_q[\\sum_s \\widehat{\\log p}(x_s \\mid z) + \\log p(z) - \\log q(z)]`,
an unbiased estimate of the ordinary ELBO.

With ``integrate=("z",)`` the local latent ``z`` is integrated out of the masked score as in
:class:`~pyro_masked.MaskedELBO`: exactly when it is discrete and enumerable (then nothing is
random but the masks, and the exact :math:`\\log p(x)` is known), by ``num_samples`` importance
samples otherwise (then ``unmasked`` is the importance-weighted bound on the same samples).

Cost: every draw is one run of the guide and the model, and one factorization per Gaussian
observed site (every mask size of the draw's permutation comes from it). A curve over ``R``
rates with ``n`` draws costs ``R n`` runs; the draws are not batched, so that each one stays an
independent replicate. Within a draw, the data points of a site share its permutation (the
engine's one-factorization design), so their errors are correlated: the spread of a draw over
a whole data set is what the standard errors here measure, and it is what a training step
with ``MaskedELBO(num_masks=1)`` sees.

References:

- E. Fong, C. C. Holmes, "On the marginal likelihood and cross-validation", Biometrika 2020.
- P. Moreno-Muñoz, P. Garcia Recasens, S. Hauberg, "On Masked Pre-training and the Marginal
  Likelihood", NeurIPS 2023.
"""

from pyro_masked.diagnostics.evidence import (
    LogMarginalEstimate,
    PointwiseMaskedLogProb,
    estimate_log_marginal,
    pointwise_masked_log_prob,
)
from pyro_masked.diagnostics.inference_data import to_inference_data
from pyro_masked.diagnostics.predictive import coordinate_log_predictive
from pyro_masked.diagnostics.rates import (
    FixedRateBias,
    MaskRateCurve,
    fixed_rate_bias,
    mask_rate_curve,
)
from pyro_masked.masks import RateSize

__all__ = [
    "FixedRateBias",
    "LogMarginalEstimate",
    "MaskRateCurve",
    "PointwiseMaskedLogProb",
    "RateSize",
    "coordinate_log_predictive",
    "estimate_log_marginal",
    "fixed_rate_bias",
    "mask_rate_curve",
    "pointwise_masked_log_prob",
    "to_inference_data",
]
