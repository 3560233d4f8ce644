"""The local masked score of GPyTorch and Pyro GP models, from a minibatch of hidden points.

:func:`local_masked_score` serves :class:`~pyro_masked.MaskedMarginalLogLikelihood` with
``context_size`` set: it reads the kernel and the training inputs from the model's own output
(the lazily evaluated kernel of ``model(train_x)``), the prior means from that output's mean and
the noise from the likelihood, and evaluates kernel blocks for the sampled points only, so an
``ExactGP`` training loop runs unchanged at :math:`N = 10^6` without anything of size
:math:`N \\times N` (or :math:`N \\times L \\times c`) being formed.

:func:`local_observe` is the Pyro form: inside a model it opens a subsampled
:func:`pyro.plate` over the data points and observes each hidden point of the minibatch under
its conditional given its local context. Pyro scales the plate by :math:`N / B`, so the
model's log joint is :math:`\\frac{N}{B} \\sum_b \\log p(y_{j_b} \\mid y_{C_b})`, the unbiased
local masked estimate; :class:`~pyro.infer.Trace_ELBO` and :class:`~pyro_masked.MaskedELBO`
(a univariate site has nothing left to mask) both optimise it.
"""

from __future__ import annotations

from typing import Any, Optional

import gpytorch
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from gpytorch.lazy import LazyEvaluatedKernelTensor

from pyro_masked.local.conditionals import MeanLike, conditional_given_context
from pyro_masked.local.estimator import LocalMaskedObjective
from pyro_masked.local.neighbors import check_count

__all__ = ["LocalObjectiveCache", "local_masked_score", "local_observe"]


class LocalObjectiveCache:
    """Builds a :class:`~pyro_masked.local.estimator.LocalMaskedObjective` once per data set.

    The neighbour search runs on the first call and again only when the training inputs
    change (a different tensor with different values, or an in-place change).

    :param context_size: :math:`c`.
    :param options: passed to :class:`~pyro_masked.local.estimator.LocalMaskedObjective`
        (``mask``, ``stratified``, ``num_neighbors``, ``backend``, ``allow_duplicates``, ...).
    """

    def __init__(self, context_size: int, **options: Any):
        self.context_size = check_count(context_size, "context_size")
        self.options = options
        self.objective: Optional[LocalMaskedObjective] = None

    def get(self, X: torch.Tensor) -> LocalMaskedObjective:
        """The objective for the inputs ``X``, built again only when ``X`` changed."""
        objective = self.objective
        if objective is not None:
            if objective.matches(X):
                return objective
            points = objective.index.points
            if points.shape == X.shape and torch.equal(points, X.detach().to(points.device)):
                return objective
        self.objective = LocalMaskedObjective(X, self.context_size, **self.options)
        return self.objective


def _kernel_and_inputs(function_dist) -> tuple[gpytorch.kernels.Kernel, torch.Tensor]:
    covariance = function_dist.lazy_covariance_matrix
    if not isinstance(covariance, LazyEvaluatedKernelTensor):
        raise TypeError(
            "context_size needs the model's covariance to be its kernel evaluated lazily, "
            "`covar_module(x)` returned as it is by forward() (with "
            "gpytorch.settings.lazily_evaluate_kernels on); got "
            f"{type(covariance).__name__}"
        )
    if covariance.x1 is not covariance.x2 and not torch.equal(covariance.x1, covariance.x2):
        raise ValueError("context_size needs the covariance of the training inputs with themselves")
    if covariance.params:
        raise ValueError(
            f"context_size does not support kernel call options {sorted(covariance.params)}"
        )
    X = covariance.x1
    if X.dim() != 2 or covariance.kernel.batch_shape != torch.Size():
        raise ValueError(
            "context_size supports models without batch dimensions (training inputs of shape "
            f"(N, d)); got inputs of shape {tuple(X.shape)} and kernel batch shape "
            f"{tuple(covariance.kernel.batch_shape)}"
        )
    return covariance.kernel, X


def local_masked_score(
    cache: LocalObjectiveCache,
    function_dist: gpytorch.distributions.MultivariateNormal,
    target: torch.Tensor,
    likelihood: gpytorch.likelihoods.Likelihood,
    batch_size: int,
    *params: Any,
    rng: Optional[np.random.Generator] = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Unbiased minibatch estimate of the local masked score of a GPyTorch exact GP (a sum
    over data points, not divided by :math:`N`).

    :param cache: the objective cache of the marginal log likelihood.
    :param function_dist: ``model(train_x)``; its covariance must be the lazily evaluated
        kernel (GPyTorch's default), its mean the prior mean at the training inputs.
    :param target: ``(N,)``.
    :param likelihood: a Gaussian likelihood; its noise at the training points is read from
        its diagonal noise covariance (homoskedastic or fixed per-point noise).
    :param batch_size: hidden points :math:`B` per call.
    """
    kernel, X = _kernel_and_inputs(function_dist)
    if target.shape != (X.shape[0],):
        raise ValueError(
            f"context_size needs targets of shape ({X.shape[0]},), got {tuple(target.shape)}"
        )
    objective = cache.get(X)
    noise = likelihood._shaped_noise_covar(target.shape, *params, **kwargs).diagonal()
    batch = objective.sample(batch_size, rng)
    log_predictive = objective.log_predictive(kernel, X, target, noise, batch, function_dist.loc)
    return objective.num_points * log_predictive.mean()


def local_observe(
    name: str,
    objective: LocalMaskedObjective,
    kernel: gpytorch.kernels.Kernel,
    X: torch.Tensor,
    y: torch.Tensor,
    noise: torch.Tensor,
    batch_size: int,
    mean: MeanLike = None,
    rng: Optional[np.random.Generator] = None,
) -> torch.Tensor:
    """Observe a minibatch of hidden points given their local contexts, inside a Pyro model.

    Opens ``pyro.plate(name + "_points", N, subsample_size=batch_size)``; its subsample are
    the hidden points :math:`j_b`, each with a context size drawn from the objective's mask
    schedule (stratified) and the local context of that size, and observes
    ``pyro.sample(name, Normal(conditional mean, conditional sd), obs=y[j])``. The plate's
    scale :math:`N / B` makes the site's log density the unbiased local masked estimate.

    :param name: the observed site's name.
    :param objective: a :class:`~pyro_masked.local.estimator.LocalMaskedObjective` on ``X``.
    :param kernel: a GPyTorch kernel; ``X``: ``(N, d)``; ``y``: ``(N,)``.
    :param noise: the noise variance (one value or one per point).
    :param batch_size: :math:`B`.
    :param mean: ``None``, training means ``(N,)`` or a GPyTorch mean.
    :returns: the subsample indices :math:`j_b`.
    """
    batch_size = check_count(batch_size, "batch_size")
    num_points = objective.num_points
    with pyro.plate(
        name + "_points", num_points, subsample_size=min(batch_size, num_points)
    ) as targets:
        batch = objective.sample(len(targets), rng, targets=targets)  # type: ignore[arg-type]
        conditional = conditional_given_context(kernel, X, y, batch, noise, mean)
        pyro.sample(
            name, dist.Normal(conditional.mean, conditional.variance.sqrt()), obs=y[targets]
        )
    return targets  # type: ignore[return-value]
