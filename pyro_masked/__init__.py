"""pyro_masked: masked pre-training for Pyro models.

Masking hides random coordinates of the data and scores the model's predictions of them from
the rest; summed over every mask size the score is exactly the log marginal likelihood, so a
model can be fitted and its evidence estimated by masking.
"""

from pyro_masked import masks
from pyro_masked.handlers import MaskedMessenger, masked
from pyro_masked.infer import MaskedELBO
from pyro_masked.masks import Cumulative, FixedRate, FixedSize, MaskSchedule, SizeWeights
from pyro_masked.scoring import UnsupportedDistributionError, masked_log_prob

__version__ = "0.1.0"

__all__ = [
    "Cumulative",
    "FixedRate",
    "FixedSize",
    "MaskSchedule",
    "MaskedELBO",
    "MaskedMessenger",
    "SizeWeights",
    "UnsupportedDistributionError",
    "masked",
    "masked_log_prob",
    "masks",
]
