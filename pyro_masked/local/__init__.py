"""Masked pre-training of Gaussian processes at scale, from local contexts and minibatches.

- :mod:`~pyro_masked.local.neighbors`: the one-off nearest-neighbour search.
- :mod:`~pyro_masked.local.sampler`: masking triples (context size, hidden point, context).
- :mod:`~pyro_masked.local.conditionals`: batched Gaussian conditionals given small contexts.
- :mod:`~pyro_masked.local.estimator`: unbiased minibatch estimates of the masked score and
  of the evidence.
- :mod:`~pyro_masked.local.multilevel`: the evidence from nested contexts, without the
  screening bias.
- :mod:`~pyro_masked.local.predict`: local kriging at new inputs.
"""

from pyro_masked.local.conditionals import (
    LocalConditional,
    conditional_given_context,
    local_log_predictive,
)
from pyro_masked.local.estimator import (
    LocalLogMarginalEstimate,
    LocalMaskedObjective,
    estimate_local_log_marginal,
)
from pyro_masked.local.multilevel import (
    LevelEstimate,
    MultilevelLogMarginalEstimate,
    estimate_multilevel_log_marginal,
)
from pyro_masked.local.neighbors import NeighborIndex
from pyro_masked.local.predict import local_predict
from pyro_masked.local.sampler import (
    ContextBatch,
    ContextSampler,
    ContextSizeSampler,
    smallest_ranks,
)

__all__ = [
    "ContextBatch",
    "ContextSampler",
    "ContextSizeSampler",
    "LevelEstimate",
    "LocalConditional",
    "LocalLogMarginalEstimate",
    "LocalMaskedObjective",
    "MultilevelLogMarginalEstimate",
    "NeighborIndex",
    "conditional_given_context",
    "estimate_local_log_marginal",
    "estimate_multilevel_log_marginal",
    "local_log_predictive",
    "local_predict",
    "smallest_ranks",
]
