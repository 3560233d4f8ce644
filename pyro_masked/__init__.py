"""pyro_masked: masked pre-training for Pyro models.

Masking hides random coordinates of the data and scores the model's predictions of them from
the rest; summed over every mask size the score is exactly the log marginal likelihood, so a
model can be fitted and its evidence estimated by masking.
"""

from pyro_masked import gp, local, masks
from pyro_masked.diagnostics import (
    FixedRateBias,
    LogMarginalEstimate,
    MaskRateCurve,
    PointwiseMaskedLogProb,
    coordinate_log_predictive,
    estimate_log_marginal,
    fixed_rate_bias,
    mask_rate_curve,
    pointwise_masked_log_prob,
    to_inference_data,
)
from pyro_masked.gpytorch import MaskedMarginalLogLikelihood
from pyro_masked.handlers import MaskedMessenger, MaskedScore, masked
from pyro_masked.infer import MaskedELBO, NothingToMaskWarning
from pyro_masked.linalg import NotPositiveDefiniteError
from pyro_masked.masks import Cumulative, FixedRate, FixedSize, MaskSchedule, SizeWeights
from pyro_masked.scoring import UnsupportedDistributionError, masked_log_prob

__version__ = "0.1.0"

__all__ = [
    "Cumulative",
    "FixedRateBias",
    "FixedRate",
    "FixedSize",
    "LogMarginalEstimate",
    "MaskRateCurve",
    "MaskSchedule",
    "MaskedELBO",
    "MaskedMarginalLogLikelihood",
    "MaskedMessenger",
    "MaskedScore",
    "NotPositiveDefiniteError",
    "NothingToMaskWarning",
    "PointwiseMaskedLogProb",
    "SizeWeights",
    "UnsupportedDistributionError",
    "coordinate_log_predictive",
    "estimate_log_marginal",
    "fixed_rate_bias",
    "gp",
    "local",
    "mask_rate_curve",
    "masked",
    "masked_log_prob",
    "masks",
    "pointwise_masked_log_prob",
    "to_inference_data",
]
