"""Local kriging: GP predictions at new inputs from their nearest training points.

The predictive of :math:`f(x_*)` given the :math:`c` training points nearest to :math:`x_*`,

.. math::

    \\mathbb{E}[f_* \\mid y_C] = \\mu_* + k_{*C} (K_{CC} + \\Sigma_C)^{-1} (y_C - \\mu_C),
    \\qquad
    \\mathrm{Var}[f_* \\mid y_C] = k_{**} - k_{*C} (K_{CC} + \\Sigma_C)^{-1} k_{C*},

plus the noise variance for a new observation :math:`y_*`. It is the same conditional the
local masked score trains (:mod:`pyro_masked.local.conditionals`), so the model is evaluated
as it was fitted; with :math:`c = N` it is the exact GP predictive. Cost :math:`O(M c^3)` time
for :math:`M` test points after one tree query each, processed in chunks of ``chunk_size``
test points so memory stays :math:`O(\\text{chunk\\_size} \\cdot c^2)` whatever :math:`M`.
"""

from __future__ import annotations

from typing import Optional, Union

import gpytorch
import torch

from pyro_masked.local.conditionals import LocalConditional, MeanLike, joint_conditional
from pyro_masked.local.neighbors import NeighborIndex, check_count, check_inputs

__all__ = ["local_predict"]


def local_predict(
    kernel: gpytorch.kernels.Kernel,
    X: torch.Tensor,
    y: torch.Tensor,
    Xnew: torch.Tensor,
    noise: Union[float, torch.Tensor],
    context_size: int,
    mean: MeanLike = None,
    noiseless: bool = True,
    index: Optional[NeighborIndex] = None,
    chunk_size: int = 4096,
) -> LocalConditional:
    """Predictive mean and variance at ``Xnew`` from the ``context_size`` nearest training
    points of each new input.

    :param kernel: a GPyTorch kernel.
    :param X: training inputs ``(N, d)``; ``y``: training targets ``(N,)``.
    :param Xnew: new inputs ``(M, d)`` (or ``(M,)`` for one input dimension).
    :param noise: noise variance of the training targets: one value, or one per training
        point ``(N,)`` (then only ``noiseless=True`` predictions are defined).
    :param context_size: :math:`c \\le N`; :math:`c = N` gives the exact GP predictive.
    :param mean: ``None`` (zero mean) or a callable mapping inputs ``(n, d)`` to means
        ``(n,)`` (a GPyTorch mean); evaluated once at the training inputs.
    :param noiseless: predict :math:`f_*` (``True``) or a new observation :math:`y_*`.
    :param index: a :class:`~pyro_masked.local.neighbors.NeighborIndex` built on ``X``, to
        reuse; ``None`` builds one.
    :param chunk_size: test points per chunk (bounds the memory).
    :returns: :class:`~pyro_masked.local.conditionals.LocalConditional` with ``mean`` and
        ``variance``, each ``(M,)``.
    """
    X = check_inputs(X, "X")
    Xnew = check_inputs(Xnew, "Xnew")
    if Xnew.shape[-1] != X.shape[-1]:
        raise ValueError(f"Xnew has {Xnew.shape[-1]} input dimensions but X has {X.shape[-1]}")
    if not isinstance(y, torch.Tensor) or y.shape != (X.shape[0],):
        raise ValueError(f"y must be a tensor of shape ({X.shape[0]},), one target per row of X")
    context_size = check_count(context_size, "context_size")
    if context_size > X.shape[0]:
        raise ValueError(f"context_size={context_size} exceeds the {X.shape[0]} training points")
    chunk_size = check_count(chunk_size, "chunk_size")
    if isinstance(mean, torch.Tensor):
        raise TypeError("mean must be None or a GPyTorch mean to predict at new inputs")
    noise = torch.as_tensor(noise, dtype=X.dtype, device=X.device)
    per_point = noise.numel() > 1
    if per_point and noise.shape != (X.shape[0],):
        raise ValueError(f"noise must be one variance or one per training point ({X.shape[0]},)")
    if per_point and not noiseless:
        raise ValueError("noisy predictions need one noise variance, not one per training point")
    if index is None:
        index = NeighborIndex(X)
    elif not index.matches(X):
        raise ValueError("index was built on other inputs than X")
    train_mean = None if mean is None else mean(X)
    means, variances = [], []
    for start in range(0, Xnew.shape[0], chunk_size):
        new = Xnew[start : start + chunk_size].to(X.device)
        nearest = torch.as_tensor(index.query(new, context_size), device=X.device)
        points = torch.cat([X[nearest], new.unsqueeze(-2)], -2)
        if mean is None:
            context_mean, new_mean = y.new_zeros(nearest.shape), y.new_zeros(new.shape[0])
        else:
            context_mean, new_mean = train_mean[nearest], mean(new)  # type: ignore[index]
        context_noise = noise[nearest] if per_point else noise.reshape(()).expand(nearest.shape)
        target_noise = torch.zeros_like(context_noise[:, :1])
        if not noiseless:
            target_noise = target_noise + noise.reshape(())
        valid = torch.ones_like(nearest, dtype=torch.bool)
        offset, variance = joint_conditional(
            kernel,
            points,
            y[nearest] - context_mean,
            valid,
            torch.cat([context_noise, target_noise], -1),
        )
        means.append(new_mean + offset)
        variances.append(variance)
    return LocalConditional(mean=torch.cat(means), variance=torch.cat(variances))
