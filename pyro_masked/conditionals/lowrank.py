"""Masked scores of low-rank-plus-diagonal Gaussians without forming the dense covariance.

For :math:`x \\sim \\mathcal{N}(\\mu, \\Sigma)` with
:math:`\\Sigma = \\mathrm{diag}(d) + W W^\\top`, :math:`W \\in \\mathbb{R}^{D \\times M}`
(``LowRankMultivariateNormal``; the marginal of a sparse GP with :math:`M` inducing points,
where the :math:`D` coordinates are the data points), the conditional of a coordinate given a
set :math:`C` of others follows from Woodbury's identity. With :math:`e = x - \\mu`,

.. math::

    A_C = I_M + \\sum_{t \\in C} \\frac{w_t w_t^\\top}{d_t}, \\qquad
    b_C = \\sum_{t \\in C} \\frac{w_t\\, e_t}{d_t}, \\qquad
    e_j \\mid e_C \\sim \\mathcal{N}\\big(w_j^\\top A_C^{-1} b_C,\\;
    d_j + w_j^\\top A_C^{-1} w_j\\big):

an :math:`M \\times M` system instead of a :math:`|C| \\times |C|` one. Along a random
permutation :math:`\\pi` the contexts are prefixes, so :math:`A_k` and :math:`b_k` (context
:math:`\\pi_{<k}`) are prefix sums.

The masked score of one permutation (:mod:`pyro_masked.conditionals.gaussian`) is
:math:`\\sum_{k} c_k T_k` with :math:`T_k = \\sum_{j \\ge k} \\ell_{jk}`,
:math:`\\ell_{jk} = \\log p(x_{\\pi_j} \\mid x_{\\pi_{<k}})` and context weights :math:`c_k`.
Scoring all :math:`D` context sizes would cost :math:`O(D^2 M^2)`; instead :math:`R` context
sizes are drawn by systematic sampling from :math:`p_k \\propto c_k (D - k)` (the weight the
schedule puts on size :math:`m = D - k`): with :math:`u \\sim U(0, 1)`, point :math:`r` takes
the :math:`k` whose cumulative probability interval holds :math:`(u + r)/R`. Each :math:`k` is
then drawn :math:`R p_k` times in expectation, so

.. math::

    \\widehat{T} = \\sum_{r=1}^{R} \\frac{c_{k_r}}{R\\, p_{k_r}}\\, T_{k_r}

is unbiased for the permutation's score, hence for :math:`\\sum_m w_m S(x; m)`, like the dense
engine. The points are evenly spread over the schedule's sizes (stratified), and a fixed mask
size (one :math:`k`) is scored exactly, as the dense engine does.

Every sum over coordinates is a matrix product: with :math:`u_t = w_t / \\sqrt{d_t}`, the
prefix sums at the drawn sizes are products of the indicator matrix :math:`[t < k_r]` with
the :math:`u_t u_t^\\top` (as :math:`D \\times M^2`) and the :math:`u_t e_t / \\sqrt{d_t}`, and
:math:`w_j^\\top A_{k_r}^{-1} w_j = d_j\\, \\mathrm{vec}(A_{k_r}^{-1})^\\top \\mathrm{vec}(u_j
u_j^\\top)` for all :math:`(r, j)` is one more product.

Cost per permutation, for :math:`n` vectors: :math:`O(R D M^2)` arithmetic in a few matrix
products, :math:`R` inverses of :math:`M \\times M` matrices (:math:`O(R M^3)`), and
:math:`O(n R D M)` for the conditional means; memory :math:`O(D M^2 + n R D)`. The exact
low-rank log density costs :math:`O(D M^2)` arithmetic and :math:`O(D M)` memory, the dense
engine :math:`O(D^3)`. The price of the sampled sizes is variance. For
``benchmarks/sparse_gp.py``'s model (:math:`M = 20`, log density about :math:`-940` at
:math:`D = 1000`, :math:`-9200` at :math:`D = 10^4`) the spread of one estimate at
:math:`D = 1000` is about 13 nats with :math:`R = 8`, 3.7 with :math:`R = 16` (the default,
:data:`CONTEXT_SIZES_PER_PERMUTATION`) and 2.5 with :math:`R = 32`, against 0.5 for the dense
engine's one permutation; at :math:`D = 10^4` it is about 20 nats for both :math:`R = 16` and
:math:`32` (``--context-sizes`` of the benchmark prints both).

References: M. A. Woodbury, "Inverting modified matrices", 1950; W. G. Madow, L. H. Madow,
"On the theory of systematic sampling", Ann. Math. Statist. 1944.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from pyro_masked.conditionals.gaussian import random_permutations
from pyro_masked.linalg import cholesky
from pyro_masked.util import LOG_2PI

__all__ = [
    "CONTEXT_SIZES_PER_PERMUTATION",
    "conditional_log_densities",
    "low_rank_cost_is_lower",
    "low_rank_masked_score",
    "systematic_context_sizes",
]

#: Context sizes :math:`R` scored per permutation (fewer if the schedule has fewer sizes).
CONTEXT_SIZES_PER_PERMUTATION = 16

_CAPACITANCE = "the low-rank capacitance matrix I + W_C^T D_C^-1 W_C"


def systematic_context_sizes(
    context_weights: torch.Tensor,
    num_perms: int,
    num_points: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Context sizes drawn by systematic sampling from :math:`p_k \\propto c_k (D - k)`.

    :param context_weights: :math:`c_k` for ``k = 0..D-1``, shape ``(D,)``, non-negative, not
        all zero.
    :param num_perms: independent draws (one per permutation).
    :param num_points: :math:`R` (default :data:`CONTEXT_SIZES_PER_PERMUTATION`), capped at
        the number of non-zero :math:`c_k`.
    :returns: ``(sizes, weights)`` of shape ``(num_perms, R)``: the drawn :math:`k_r` and
        :math:`c_{k_r} / (R\\, p_{k_r})`, so that ``sum_r weights_r T_{k_r}`` is unbiased for
        :math:`\\sum_k c_k T_k`.
    """
    size = context_weights.shape[0]
    device, dtype = context_weights.device, context_weights.dtype
    if num_points is None:
        num_points = CONTEXT_SIZES_PER_PERMUTATION
    num_points = max(1, min(num_points, int(torch.count_nonzero(context_weights))))
    mass = context_weights * torch.arange(size, 0, -1, dtype=dtype, device=device)
    cumulative = mass.cumsum(0)
    total = cumulative[-1]
    draw_device = device if generator is None else generator.device
    offsets = torch.rand(num_perms, 1, dtype=dtype, device=draw_device, generator=generator)
    points = offsets.to(device) + torch.arange(num_points, dtype=dtype, device=device)
    targets = points * (total / num_points)
    sizes = torch.searchsorted(cumulative, targets.contiguous(), right=True)
    # Rounding can push the last point past the final interval: take the last size with mass.
    last = int(torch.nonzero(mass).max())
    sizes = sizes.clamp(max=last)
    probabilities = mass[sizes] / total
    weights = context_weights[sizes] / (num_points * probabilities)
    return sizes, weights


def low_rank_masked_score(
    cov_factor: torch.Tensor,
    cov_diag: torch.Tensor,
    residuals: torch.Tensor,
    context_weights: torch.Tensor,
    num_masks: int,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Masked scores of vectors under :math:`\\mathcal{N}(\\mu, \\mathrm{diag}(d) + W W^\\top)`.

    :param cov_factor: :math:`W`, shape ``(B, D, M)``.
    :param cov_diag: :math:`d`, shape ``(B, D)``, positive.
    :param residuals: :math:`e = x - \\mu`, shape ``(B, n, D)``: ``n`` vectors per covariance,
        sharing the permutations and context sizes of the call.
    :param context_weights: :math:`c_k` for ``k = 0..D-1``, shape ``(D,)``.
    :param num_masks: permutations averaged.
    :param generator: where permutations and context sizes are drawn from (``None``: torch's
        global generator).
    :returns: shape ``(B, n)``, unbiased for :math:`\\sum_m w_m S(x; m)`.
    """
    size = cov_factor.shape[1]
    perms = random_permutations(num_masks, size, residuals.device, generator)  # (S, D)
    sizes, weights = systematic_context_sizes(context_weights, num_masks, generator=generator)
    log_densities = conditional_log_densities(cov_factor, cov_diag, residuals, perms, sizes)
    # T_k sums the positions j >= k; weighted over the drawn k, averaged over permutations.
    scored = torch.arange(size, device=sizes.device) >= sizes[..., None]  # (S, R, D)
    totals = (log_densities * scored[:, None]).sum(-1)  # (B, S, n, R)
    return (totals * weights[:, None]).sum(-1).mean(1)


def conditional_log_densities(
    cov_factor: torch.Tensor,
    cov_diag: torch.Tensor,
    residuals: torch.Tensor,
    perms: torch.Tensor,
    sizes: torch.Tensor,
) -> torch.Tensor:
    """:math:`\\log p(x_{\\pi_j} \\mid x_{\\pi_{<k}})` for every position ``j`` and drawn ``k``.

    Shapes: ``cov_factor`` ``(B, D, M)``, ``cov_diag`` ``(B, D)``, ``residuals`` ``(B, n, D)``,
    ``perms`` ``(S, D)`` and context sizes ``sizes`` ``(S, R)``. Returns ``(B, S, n, R, D)``;
    entries with ``j < k`` (a coordinate inside its own context) are not meaningful.
    """
    batch, size, rank = cov_factor.shape
    num_perms, num_points = sizes.shape
    factor = cov_factor[:, perms]  # (B, S, D, M)
    diag = cov_diag[:, perms]  # (B, S, D)
    errors = residuals[:, :, perms].movedim(1, 2)  # (B, S, n, D)
    inverse_scale = diag.rsqrt()
    scaled = factor * inverse_scale[..., None]  # u_t = w_t / sqrt(d_t)
    # Every sum over coordinates is a matrix product with M^2 (or M) rows, so the work is
    # O(R D M^2) in a few large products and the memory O(D M^2 + n R D).
    # A_k - I = sum_{t<k} u_t u_t^T and b_k = sum_{t<k} u_t e_t / sqrt(d_t) at the drawn k
    # (non-decreasing along r): sums over the segments between consecutive k_r, accumulated.
    whitened_errors = errors * inverse_scale[:, :, None]  # (B, S, n, D)
    # per-permutation blocks, stacked into tensors below
    precisions: Any = []
    information: Any = []
    for perm_index, perm_sizes in enumerate(sizes.tolist()):
        bounds = [0] + perm_sizes + [size]
        lengths = [stop - start for start, stop in zip(bounds[:-1], bounds[1:])]
        factor_segments = torch.split(scaled[:, perm_index], lengths, dim=1)[:-1]
        error_segments = torch.split(whitened_errors[:, perm_index], lengths, dim=-1)[:-1]
        precisions.append(torch.stack([seg.mT @ seg for seg in factor_segments], 1))
        information.append(
            torch.stack([e @ seg for e, seg in zip(error_segments, factor_segments)], -2)
        )  # (B, n, R, M)
    precisions = torch.stack(precisions, 1).cumsum(2)  # (B, S, R, M, M)
    precisions = precisions + torch.eye(rank, dtype=factor.dtype, device=factor.device)
    information = torch.stack(information, 1).cumsum(3)  # (B, S, n, R, M)
    inverse = torch.cholesky_inverse(cholesky(precisions, what=_CAPACITANCE))  # (B, S, R, M, M)
    # w_j^T A^-1 w_j = d_j u_j^T A^-1 u_j for every (k, j).
    starts = sizes.min(0).values.tolist()  # positions j < k_r are not scored
    quadratic = _QuadraticForms.apply(inverse, scaled, starts)  # (B, S, R, D)
    variance = diag[:, :, None] * (1 + quadratic)
    # w_j^T A^-1 b: A^-1 b per (vector, k), then one product with the w_j.
    solved = (inverse[:, :, None] @ information[..., None])[..., 0]
    mean = solved @ factor.mT[:, :, None]  # (B, S, n, R, D)
    return -0.5 * (
        LOG_2PI
        + variance.log()[:, :, None]
        + (errors[:, :, :, None] - mean).square() / variance[:, :, None]
    )


class _QuadraticForms(torch.autograd.Function):
    """``out[..., r, j] = u_j^T A_r u_j`` for ``j >= starts[r]`` (zero below), for symmetric
    ``A`` ``(..., R, M, M)`` and ``u`` ``(..., D, M)``, one context at a time.

    Forming every :math:`u_j u_j^\\top` (or every :math:`A_r u_j`) at once would hold
    :math:`D M^2` (or :math:`R D M`) numbers; a loop over the :math:`R` contexts keeps one
    :math:`D \\times M` product alive, forward and backward, and skips the positions inside the
    context (:math:`j < k_r`), whose scores are not used.
    """

    @staticmethod
    def forward(ctx, matrices: torch.Tensor, vectors: torch.Tensor, starts: list):
        ctx.save_for_backward(matrices, vectors)
        ctx.starts = starts
        out = vectors.new_zeros(vectors.shape[:-2] + (len(starts), vectors.shape[-2]))
        for r, start in enumerate(starts):
            tail = vectors[..., start:, :]
            out[..., r, start:] = ((tail @ matrices[..., r, :, :]) * tail).sum(-1)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        matrices, vectors = ctx.saved_tensors
        grad_matrices = torch.empty_like(matrices)
        grad_vectors = torch.zeros_like(vectors)
        for r, start in enumerate(ctx.starts):
            tail = vectors[..., start:, :]
            weight = grad_out[..., r, start:, None]  # (..., D - start, 1)
            grad_matrices[..., r, :, :] = (tail * weight).mT @ tail
            grad_vectors[..., start:, :] += 2 * weight * (tail @ matrices[..., r, :, :])
        return grad_matrices, grad_vectors, None


def low_rank_cost_is_lower(size: int, rank: int, num_vectors: int, num_covariances: int) -> bool:
    """Whether this engine beats densifying the covariance.

    Compares :math:`B R D M^2 + n R D M` with the dense engine's :math:`B D^3 + n D^2`, for
    ``num_vectors`` :math:`n` vectors in all and ``num_covariances`` :math:`B` distinct
    covariances: many vectors sharing one covariance (a plate) favour the dense quadratic
    form, one long vector (a sparse GP) this engine. A rank above a quarter of the size is
    treated as dense.
    """
    if 4 * rank > size:
        return False
    points = CONTEXT_SIZES_PER_PERMUTATION
    low_rank = num_covariances * points * size * rank**2 + num_vectors * points * size * rank
    return low_rank < num_covariances * size**3 + num_vectors * size**2
