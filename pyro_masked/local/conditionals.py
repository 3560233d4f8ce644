"""Gaussian conditionals of one point given a small context, batched over a minibatch.

For a GP with kernel :math:`k`, mean :math:`\\mu` and Gaussian noise :math:`\\sigma^2_n`, the
hidden target :math:`y_j` given context targets :math:`y_C` (:math:`|C| \\le c`) is Gaussian
with

.. math::

    \\mathbb{E}[y_j \\mid y_C] = \\mu_j + k_{jC} (K_{CC} + \\Sigma_C)^{-1} (y_C - \\mu_C), \\qquad
    \\mathrm{Var}[y_j \\mid y_C] = k_{jj} + \\sigma^2_j - k_{jC} (K_{CC} + \\Sigma_C)^{-1} k_{Cj}.

Both come from one Cholesky factor of the joint :math:`(c+1) \\times (c+1)` block with the
target last, :math:`L L^\\top = K_{[C, j]} + \\Sigma`, and the whitened residual
:math:`z = L^{-1}(y_{[C, j]} - \\mu_{[C, j]})`: the conditional mean is
:math:`\\mu_j + \\sum_{i \\le c} L_{c+1, i} z_i` and the conditional standard deviation
:math:`L_{c+1, c+1}`. For a minibatch of :math:`B` triples the blocks are evaluated by the
GPyTorch kernel on batched inputs of shape ``(B, c + 1, d)`` — the sampled points only — and
factored together: :math:`O(B c^3)` time, :math:`O(B c^2)` memory, independent of :math:`N`.
Contexts with fewer than :math:`c` members are padded; padded rows and columns of the block are
replaced by those of the identity and their residuals by zero, which leaves the conditional of
the target unchanged. Gradients flow by autograd through the kernel, the Cholesky factor
(:func:`pyro_masked.linalg.cholesky`, jitter added only to the blocks that need it) and the
triangular solve.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Union

import gpytorch
import torch

from pyro_masked.linalg import cholesky
from pyro_masked.local.sampler import ContextBatch

__all__ = ["LocalConditional", "conditional_given_context", "local_log_predictive"]

_LOG_2PI = math.log(2 * math.pi)

MeanLike = Union[None, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


class LocalConditional(NamedTuple):
    """Mean and variance of each target given its context, both ``(B,)``."""

    mean: torch.Tensor
    variance: torch.Tensor

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """:math:`\\log \\mathcal{N}(\\text{value}; \\text{mean}, \\text{variance})`, ``(B,)``."""
        return -0.5 * (
            (value - self.mean).square() / self.variance + self.variance.log() + _LOG_2PI
        )


def _gather_noise(noise: torch.Tensor, index: torch.Tensor, num_points: int) -> torch.Tensor:
    """Noise variances at ``index``: ``noise`` is one variance or one per training point."""
    if noise.numel() == 1:
        return noise.reshape(()).expand(index.shape)
    if noise.shape != (num_points,):
        raise ValueError(
            f"noise must hold one variance or one per training point ({num_points}), got shape "
            f"{tuple(noise.shape)}"
        )
    return noise[index]


def _prior_mean(mean: MeanLike, points: torch.Tensor, index: Optional[torch.Tensor]):
    if mean is None:
        return points.new_zeros(points.shape[:-1])
    if isinstance(mean, torch.Tensor):
        if index is None:
            raise ValueError("a mean given as a tensor of training means cannot predict")
        return mean[index]
    return mean(points)


def joint_conditional(
    kernel: gpytorch.kernels.Kernel,
    points: torch.Tensor,
    context_residual: torch.Tensor,
    valid: torch.Tensor,
    noise_diagonal: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional mean offset and variance of the last point of each block given the others.

    :param kernel: a GPyTorch kernel, or any callable mapping inputs ``(B, n, d)`` to their
        covariance blocks ``(B, n, n)``.
    :param points: inputs ``(B, c + 1, d)``, the target last.
    :param context_residual: :math:`y_C - \\mu_C`, ``(B, c)``.
    :param valid: which context entries are real, ``(B, c)``.
    :param noise_diagonal: variances added to the block's diagonal, ``(B, c + 1)``.
    :returns: ``(offset, variance)``, each ``(B,)``: the conditional mean is the target's prior
        mean plus ``offset``.
    """
    batch, width = valid.shape
    covariance = kernel(points)
    if not isinstance(covariance, torch.Tensor):  # a GPyTorch kernel's lazy output
        covariance = covariance.to_dense()
    covariance = covariance + torch.diag_embed(noise_diagonal)
    present = torch.cat([valid, valid.new_ones(batch, 1)], -1)
    pair = present.unsqueeze(-1) & present.unsqueeze(-2)
    identity = torch.eye(width + 1, dtype=covariance.dtype, device=covariance.device)
    covariance = torch.where(pair, covariance, identity)
    factor = cholesky(
        covariance,
        what="a local context's kernel block (context points and target)",
        hint="Are there duplicate inputs without noise?",
    )
    residual = torch.where(valid, context_residual, torch.zeros_like(context_residual))
    whitened = torch.linalg.solve_triangular(
        factor[..., :width, :width], residual.unsqueeze(-1), upper=False
    ).squeeze(-1)
    offset = (factor[..., width, :width] * whitened).sum(-1)
    variance = factor[..., width, width].square()
    return offset, variance


def conditional_given_context(
    kernel: gpytorch.kernels.Kernel,
    X: torch.Tensor,
    y: torch.Tensor,
    batch: ContextBatch,
    noise: torch.Tensor,
    mean: MeanLike = None,
) -> LocalConditional:
    """The Gaussian of each hidden target :math:`y_j` given its local context :math:`y_C`.

    :param kernel: a GPyTorch kernel (evaluated on the sampled points only).
    :param X: training inputs ``(N, d)``.
    :param y: training targets ``(N,)``.
    :param batch: the triples, from :class:`~pyro_masked.local.sampler.ContextSampler`.
    :param noise: the noise variance, one value or one per training point ``(N,)``.
    :param mean: ``None`` (zero mean), the prior means at the training inputs ``(N,)``, or a
        callable (a GPyTorch mean) applied to inputs of shape ``(B, c + 1, d)``.
    :returns: the conditional mean and variance (noise of :math:`y_j` included), each ``(B,)``.
    """
    device = X.device
    index = torch.cat([batch.context, batch.targets.unsqueeze(-1)], -1).to(device)
    valid = batch.valid.to(device)
    points = X[index]
    prior = _prior_mean(mean, points, index)
    noise_diagonal = _gather_noise(noise, index, X.shape[0])
    context_residual = y[index[:, :-1]] - prior[:, :-1]
    offset, variance = joint_conditional(kernel, points, context_residual, valid, noise_diagonal)
    return LocalConditional(mean=prior[:, -1] + offset, variance=variance)


def local_log_predictive(
    kernel: gpytorch.kernels.Kernel,
    X: torch.Tensor,
    y: torch.Tensor,
    batch: ContextBatch,
    noise: torch.Tensor,
    mean: MeanLike = None,
) -> torch.Tensor:
    """:math:`\\log p(y_j \\mid y_{C})` for every triple of ``batch``, shape ``(B,)``.

    Arguments as for :func:`conditional_given_context`.
    """
    conditional = conditional_given_context(kernel, X, y, batch, noise, mean)
    return conditional.log_prob(y[batch.targets.to(X.device)])
