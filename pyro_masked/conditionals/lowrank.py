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
Scoring all :math:`D` context sizes would cost :math:`O(D^2 M)`; instead :math:`R` context
sizes are drawn by systematic sampling from :math:`p_k \\propto c_k (D - k)` (the weight the
schedule puts on size :math:`m = D - k`): with :math:`u \\sim U(0, 1)`, point :math:`r` takes
the :math:`k` whose cumulative probability interval holds :math:`(u + r)/R`. Each :math:`k` is
then drawn :math:`R p_k` times in expectation, so

.. math::

    \\widehat{T} = \\sum_{r=1}^{R} \\frac{c_{k_r}}{R\\, p_{k_r}}\\, T_{k_r}

is unbiased for the permutation's score, hence for :math:`\\sum_m w_m S(x; m)`, like the dense
engine. The points are evenly spread over the schedule's sizes (stratified), and a fixed mask
size (one :math:`k`) is scored exactly, as the dense engine does.

Scoring every position :math:`j` in each of the :math:`R` contexts costs
:math:`O(R D M^2)` per permutation. For long events (beyond ``_ALL_PAIRS_LIMIT`` entries) each
position is scored in one context only: the positions, shuffled, are cut into :math:`R`
near-equal groups :math:`G_r`, and position :math:`j \\in G_r` counts
:math:`(D / |G_r|)\\, \\omega_r\\, \\ell_{j k_r}` (if :math:`j \\ge k_r`). Every position
lands in :math:`G_r` with probability :math:`|G_r| / D`, so this is unbiased too, with more
variance and :math:`R` times less work.

Cost per permutation, for :math:`n` vectors: the prefix sums at the drawn sizes,
:math:`O(D M^2)`; :math:`R` Cholesky factors of :math:`M \\times M` matrices,
:math:`O(R M^3)`; one triangular solve per position, :math:`O(D M^2)`, and the conditionals,
:math:`O(n D M)` (all pairs: :math:`O(R D M^2 + n R D M)`). Memory :math:`O(D M + n D)` (all
pairs: :math:`O(R D M + n R D)`). The exact low-rank log density costs :math:`O(D M^2)`, the
dense engine :math:`O(D^3)`.

References: M. A. Woodbury, "Inverting modified matrices", 1950; W. G. Madow, L. H. Madow,
"On the theory of systematic sampling", Ann. Math. Statist. 1944.
"""

from __future__ import annotations

from typing import Optional

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
CONTEXT_SIZES_PER_PERMUTATION = 8

# Up to this many (vector, context, position, rank) entries every position is scored in every
# drawn context; beyond it each position is scored in one context (same expectation, more
# variance, R times less work).
_ALL_PAIRS_LIMIT = 2**17

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
    size, rank = cov_factor.shape[1:]
    perms = random_permutations(num_masks, size, residuals.device, generator)  # (S, D)
    sizes, weights = systematic_context_sizes(context_weights, num_masks, generator=generator)
    num_points = sizes.shape[1]
    if residuals.shape[0] * residuals.shape[1] * num_points * size * rank <= _ALL_PAIRS_LIMIT:
        log_densities = conditional_log_densities(cov_factor, cov_diag, residuals, perms, sizes)
        # T_k sums the positions j >= k; weighted over the drawn k, averaged over permutations.
        scored = torch.arange(size, device=sizes.device) >= sizes[..., None]  # (S, R, D)
        totals = (log_densities * scored[:, None]).sum(-1)  # (B, S, n, R)
        return (totals * weights[:, None]).sum(-1).mean(1)
    groups = random_permutations(num_masks, size, residuals.device, generator)  # (S, D)
    scores = [
        _one_context_per_position(cov_factor, cov_diag, residuals, perm, size_draw, weight, group)
        for perm, size_draw, weight, group in zip(perms, sizes, weights, groups)
    ]
    return torch.stack(scores).mean(0)


def _one_context_per_position(
    cov_factor: torch.Tensor,
    cov_diag: torch.Tensor,
    residuals: torch.Tensor,
    perm: torch.Tensor,
    sizes: torch.Tensor,
    weights: torch.Tensor,
    shuffled_positions: torch.Tensor,
) -> torch.Tensor:
    """One permutation's estimate with each position scored in one of the drawn contexts.

    The positions, shuffled, are cut into :math:`R` near-equal groups :math:`G_r`; position
    :math:`j \\in G_r` is scored in context :math:`k_r` only, with weight :math:`D / |G_r|`
    (its chance of landing in :math:`G_r` is :math:`|G_r| / D`), so the estimate stays unbiased
    for :math:`\\sum_r \\omega_r T_{k_r}` while every position costs one :math:`O(M^2)`
    triangular solve. ``sizes`` (non-decreasing) and ``weights`` are ``(R,)``; returns
    ``(B, n)``.
    """
    batch, size, rank = cov_factor.shape
    num_points = sizes.shape[0]
    factor, diag = cov_factor[:, perm], cov_diag[:, perm]  # (B, D, M), (B, D)
    errors = residuals[:, :, perm]  # (B, n, D)
    inverse_scale = diag.rsqrt()
    scaled = factor * inverse_scale[..., None]
    whitened_errors = errors * inverse_scale[:, None]
    # A_k - I and b_k at the drawn k: sums over the segments between consecutive k_r.
    bounds = [0] + sizes.tolist()
    lengths = [stop - start for start, stop in zip(bounds[:-1], bounds[1:])]
    lengths.append(size - bounds[-1])
    factor_segments = torch.split(scaled, lengths, dim=1)[:-1]
    error_segments = torch.split(whitened_errors, lengths, dim=2)[:-1]
    precisions = torch.stack([segment.mT @ segment for segment in factor_segments], 1)
    precisions = precisions.cumsum(1) + torch.eye(rank, dtype=factor.dtype, device=factor.device)
    information = torch.stack(
        [errs @ segment for errs, segment in zip(error_segments, factor_segments)], 1
    ).cumsum(1)  # (B, R, n, M)
    lower = cholesky(precisions, what=_CAPACITANCE)  # (B, R, M, M)
    solved_information = torch.linalg.solve_triangular(lower, information.mT, upper=False)
    total = residuals.new_zeros(batch, residuals.shape[1])
    cuts = [round(r * size / num_points) for r in range(num_points + 1)]
    for r in range(num_points):
        positions = shuffled_positions[cuts[r] : cuts[r + 1]]
        solved_factor = torch.linalg.solve_triangular(
            lower[:, r], factor[:, positions].mT, upper=False
        )  # (B, M, P)
        variance = diag[:, positions] + solved_factor.square().sum(-2)  # (B, P)
        mean = solved_information[:, r].mT @ solved_factor  # (B, n, P)
        log_density = -0.5 * (
            LOG_2PI
            + variance.log()[:, None]
            + (errors[:, :, positions] - mean).square() / variance[:, None]
        )
        in_context = positions >= sizes[r]
        scale = weights[r] * size / len(positions)
        total = total + scale * (log_density * in_context).sum(-1)
    return total


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
    size, rank = cov_factor.shape[1:]
    factor = cov_factor[:, perms]  # (B, S, D, M)
    diag = cov_diag[:, perms]  # (B, S, D)
    errors = residuals[:, :, perms].movedim(1, 2)  # (B, S, n, D)
    inverse_scale = diag.rsqrt()
    scaled = factor * inverse_scale[..., None]  # w_t / sqrt(d_t)
    # A_k - I and b_k sum the first k permuted coordinates: products with the indicator of
    # t < k_r, O(R D M^2) in matrix products (a prefix sum over D would cost less arithmetic,
    # but as an (N, M, M) cumulative sum it is many times slower).
    before = (torch.arange(size, device=sizes.device) < sizes[..., None]).to(factor.dtype)
    precisions = (scaled.mT[:, :, None] * before[None, :, :, None, :]) @ scaled[:, :, None]
    precisions = precisions + torch.eye(rank, dtype=factor.dtype, device=factor.device)
    weighted_errors = scaled[:, :, None] * (errors * inverse_scale[:, :, None])[..., None]
    information = before[None, :, None] @ weighted_errors  # (B, S, n, R, M)
    lower = cholesky(precisions, what=_CAPACITANCE)
    # w_j^T A^-1 w_j and w_j^T A^-1 b through L^-1 W^T (one product per k) and L^-1 b.
    solved_factor = torch.linalg.solve_triangular(
        lower, factor.mT.contiguous()[:, :, None], upper=False
    )  # (B, S, R, M, D)
    solved_information = torch.linalg.solve_triangular(
        lower[:, :, None], information[..., None], upper=False
    )[..., 0]  # (B, S, n, R, M)
    variance = diag[:, :, None] + solved_factor.square().sum(-2)  # (B, S, R, D)
    mean = (solved_information[..., None, :] @ solved_factor[:, :, None])[..., 0, :]
    return -0.5 * (
        LOG_2PI
        + variance.log()[:, :, None]
        + (errors[:, :, :, None] - mean).square() / variance[:, :, None]
    )


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
