"""Closed-form masked scores of Gaussian observation models, every mask size from one factor.

For :math:`x \\sim \\mathcal{N}(\\mu, \\Sigma)` in :math:`\\mathbb{R}^D` and a uniformly random
permutation :math:`\\pi` of the coordinates, every suffix of :math:`\\pi` of length :math:`m` is
a uniformly random mask of size :math:`m`. Factor the permuted covariance once,
:math:`\\Sigma_\\pi = L L^\\top`, and whiten :math:`z = L^{-1}(x_\\pi - \\mu_\\pi)`. The
conditional of permuted coordinate :math:`j` given the first :math:`k \\le j` coordinates is

.. math::

    x_{\\pi_j} \\mid x_{\\pi_{<k}} \\sim \\mathcal{N}\\big(x_{\\pi_j} - r_{jk},\\, v_{jk}\\big),
    \\qquad v_{jk} = \\sum_{i=k}^{j} L_{ji}^2,
    \\qquad r_{jk} = \\sum_{i=k}^{j} L_{ji} z_i,

reverse cumulative sums along row :math:`j` of :math:`L`. With :math:`\\ell_{jk}` that log
density and the schedule's context weights :math:`c_k = w_{D-k} / (D-k)`
(:meth:`~pyro_masked.masks.MaskSchedule.context_weights`), the masked estimate of one
permutation is

.. math::

    \\widehat{\\log p}(x) = \\sum_{k=0}^{D-1} c_k \\sum_{j=k}^{D-1} \\ell_{jk},

an unbiased estimate of :math:`\\sum_m w_m S(x; m)`, in :math:`O(D^2)` after the
:math:`O(D^3)` factorization instead of one conditioning per mask.

Two evaluations of the same quantity are used:

- the *residual form* (few vectors per covariance, e.g. one GP): the sums above, blocked over
  rows of :math:`L` with a hand-written backward so that no :math:`D \\times D` temporaries
  are stored for autograd;
- the *quadratic form* (many iid vectors sharing a covariance, e.g. PPCA in a plate): the
  score is :math:`a - \\tfrac12 e^\\top B e` with :math:`e = x - \\mu`,
  :math:`a = -\\tfrac12 \\sum_{j \\ge k} c_k \\log(2\\pi v_{jk})` and
  :math:`B = P_\\pi^\\top L^{-\\top} M L^{-1} P_\\pi`, where
  :math:`M_{ii'} = \\sum_j L_{ji} L_{ji'} \\Omega_{j,\\min(i,i')}` and
  :math:`\\Omega_{jt} = \\sum_{k \\le t} c_k / v_{jk}`. Every vector then costs one
  quadratic form, :math:`O(N D^2 + D^3)` in all, the order of the exact log density, and
  :math:`B` is averaged over permutations before it meets the data.

References:

- P. Moreno-Muñoz, P. Garcia Recasens, S. Hauberg, "On Masked Pre-training and the Marginal
  Likelihood", NeurIPS 2023.
- E. Fong, C. C. Holmes, "On the marginal likelihood and cross-validation", Biometrika 2020.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Optional, Union

import torch

from pyro_masked.linalg import cholesky
from pyro_masked.masks import context_weights, count_masks
from pyro_masked.util import LOG_2PI

__all__ = [
    "MAX_ENUMERATED_MASKS",
    "MAX_ENUMERATION_BYTES",
    "check_enumeration",
    "enumeration_fits",
    "gaussian_masked_score",
    "leave_one_out_log_densities",
    "leave_one_out_score",
    "random_permutations",
]

#: ``num_masks="all"`` enumerates at most this many masks (summed over the schedule's sizes).
MAX_ENUMERATED_MASKS = 20_000

#: ``num_masks="all"`` holds one permuted covariance per enumerated mask of a size (and per
#: covariance of the batch); their bytes may not exceed this (the factorization and its
#: temporaries take a few times as much again).
MAX_ENUMERATION_BYTES = 2**28

_COVARIANCE = "the covariance matrix"

# Rows of L handled together by the residual form: large enough to amortise Python overhead,
# small enough that the (rows x D) temporaries stay in cache.
_ROW_BLOCK = 128

# The quadratic form is used once the vectors per covariance number at least D divided by this
# ratio: its extra O(D^3) matrix products then cost less than the residual form's O(n D^2)
# elementwise passes.
_QUADRATIC_FORM_SIZE_PER_VECTOR = 4


class _PermuteSymmetric(torch.autograd.Function):
    """``out[b, s] = K[b][perm[b, s]][:, perm[b, s]]`` with a gather-only backward.

    ``perms`` has shape ``(1, S, D)`` (shared by every matrix) or ``(B, S, D)``. Advanced
    indexing's backward accumulates with a scatter, which costs several times the Cholesky
    factorization at GP sizes; the gradient of a permutation is the inverse permutation applied
    to the incoming gradient.
    """

    @staticmethod
    def forward(ctx, matrix: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(perms)
        return _gather_symmetric(matrix, perms)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (perms,) = ctx.saved_tensors
        # grad_K = sum_s grad_out[s][inv_s][:, inv_s]
        return _gather_symmetric(grad_out, torch.argsort(perms, dim=-1)).sum(1), None


def _gather_symmetric(matrix: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """``out[b, s] = matrix[b, (s)][perm[b, s]][:, perm[b, s]]``; ``matrix`` is ``(B, D, D)`` or
    ``(B, S, D, D)``; ``perms`` is ``(S, D)``, ``(1, S, D)`` or ``(B, S, D)``."""
    if perms.dim() == 2:
        perms = perms[None]
    batch, size = matrix.shape[0], matrix.shape[-1]
    num_perms = perms.shape[1]
    full = (batch, num_perms, size, size)
    if matrix.dim() == 3 and perms.shape[0] == 1:
        rows = matrix.index_select(-2, perms.reshape(-1)).view(full)
    else:
        if matrix.dim() == 3:
            matrix = matrix[:, None].expand(full)
        rows = torch.gather(matrix, 2, perms[:, :, :, None].expand(full))
    return torch.gather(rows, 3, perms[:, :, None, :].expand(full))


class _UnpermuteSymmetric(torch.autograd.Function):
    """``out[b] = mean_s B[b, s][inv[b, s]][:, inv[b, s]]``, the inverse of
    :class:`_PermuteSymmetric`."""

    @staticmethod
    def forward(ctx, matrices: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(perms)
        return _gather_symmetric(matrices, torch.argsort(perms, dim=-1)).mean(1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (perms,) = ctx.saved_tensors
        num_perms = perms.shape[-2]
        return _gather_symmetric(grad_out, perms) / num_perms, None


def _reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1).cumsum(-1).flip(-1)


class _ResidualFormScore(torch.autograd.Function):
    """Masked score :math:`\\sum_{j \\ge k} c_k \\ell_{jk}` of whitened vectors, blocked over rows.

    Inputs: ``L`` of shape ``(B, D, D)`` (lower triangular), ``Z`` of shape ``(B, n, D)`` (the
    whitened residuals, ``n`` vectors per factor) and context weights ``c`` of shape ``(D,)``.
    Returns shape ``(B, n)``. The backward recomputes each block instead of storing the
    ``(B, n, D, D)`` intermediates.

    With :math:`\\partial \\ell / \\partial v = -\\tfrac{1}{2v} + \\tfrac{r^2}{2v^2}` and
    :math:`\\partial \\ell / \\partial r = -r/v`, the gradient is
    :math:`\\partial / \\partial L_{ji} = 2 L_{ji} \\sum_{k \\le i} c_k \\partial_v \\ell_{jk}
    + z_i \\sum_{k \\le i} c_k \\partial_r \\ell_{jk}` and
    :math:`\\partial / \\partial z_i = \\sum_j L_{ji} \\sum_{k \\le i} c_k \\partial_r \\ell_{jk}`.
    """

    @staticmethod
    def forward(ctx, factor: torch.Tensor, whitened: torch.Tensor, weights: torch.Tensor):
        ctx.save_for_backward(factor, whitened, weights)
        batch, num_vectors, size = whitened.shape
        out = factor.new_zeros(batch, num_vectors)
        for _, stop, lower, _, _, variance, residual in lower_triangle_row_blocks(factor, whitened):
            block_weights = weights[:stop] * lower
            safe_variance = torch.where(lower, variance, 1.0)
            log_terms = (block_weights * (safe_variance.log() + LOG_2PI)).sum((-1, -2))
            quad_terms = (block_weights * residual.square() / safe_variance[:, None]).sum((-1, -2))
            out += -0.5 * (log_terms[:, None] + quad_terms)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        factor, whitened, weights = ctx.saved_tensors
        grad_factor = torch.zeros_like(factor)
        grad_whitened = torch.zeros_like(whitened)
        grad_total = grad_out.sum(-1)  # (B,)
        for (
            start,
            stop,
            lower,
            factor_block,
            whitened_block,
            variance,
            residual,
        ) in lower_triangle_row_blocks(factor, whitened):
            block_weights = weights[:stop] * lower
            safe_variance = torch.where(lower, variance, 1.0)
            inv_variance = safe_variance.reciprocal()
            scaled = residual * inv_variance[:, None]  # r / v, (B, n, b, w)
            vector_grad = grad_out[:, :, None, None]  # (B, n, 1, 1)
            grad_variance = block_weights * (
                -0.5 * grad_total[:, None, None] * inv_variance
                + 0.5 * (vector_grad * scaled.square()).sum(1)
            )
            grad_residual = -(vector_grad * block_weights) * scaled
            # Sums over context sizes k <= i: cumulative sums along the row.
            cum_variance = grad_variance.cumsum(-1)
            cum_residual = grad_residual.cumsum(-1)
            block_grad = 2 * factor_block * cum_variance + (
                whitened_block[:, :, None, :] * cum_residual
            ).sum(1)
            grad_factor[:, start:stop, :stop] = block_grad * lower
            grad_whitened[:, :, :stop] += (factor_block[:, None] * cum_residual * lower).sum(-2)
        return grad_factor, grad_whitened, None


def lower_triangle_row_blocks(factor: torch.Tensor, whitened: torch.Tensor):
    """Blocks of :data:`_ROW_BLOCK` rows of a lower-triangular factor, with their sums.

    For ``factor`` :math:`L` of shape ``(B, D, D)`` and ``whitened`` :math:`z` of shape
    ``(B, n, D)``, yields for rows ``start:stop`` the tuple ``(start, stop, lower,
    factor_block, whitened_block, variance, residual)``: the block's columns ``0:stop`` (the
    rest is zero), ``lower`` the mask :math:`k \\le j`, and the reverse cumulative sums
    :math:`v_{jk}` ``(B, b, stop)`` and :math:`r_{jk}` ``(B, n, b, stop)``. Memory per block
    is :math:`O(B n\\, b D)`, so the residual form never holds :math:`D \\times D` temporaries
    per vector.
    """
    size = factor.shape[-1]
    columns = torch.arange(size, device=factor.device)
    for start in range(0, size, _ROW_BLOCK):
        stop = min(size, start + _ROW_BLOCK)
        factor_block = factor[:, start:stop, :stop]  # (B, b, w)
        whitened_block = whitened[:, :, :stop]  # (B, n, w)
        lower = columns[:stop] <= columns[start:stop, None]  # (b, w): k <= j
        variance = _reverse_cumsum(factor_block.square())
        residual = _reverse_cumsum(factor_block[:, None] * whitened_block[:, :, None, :])
        yield start, stop, lower, factor_block, whitened_block, variance, residual


class _QuadraticForms(torch.autograd.Function):
    """``q[b, n] = e[b, n]^T B[b] e[b, n]`` with a backward that can reuse a scatter matrix.

    The gradient with respect to ``B`` is :math:`\\sum_n g_n e_n e_n^\\top`. When every vector
    of a group carries the same incoming gradient (a plate with uniform scale and no mask, the
    usual case) it is :math:`g\\, E^\\top E`, and ``scatter()`` (a callable returning
    :math:`E^\\top E` of shape ``(B, D, D)``, or ``None``) can supply that from a cache of the
    observed data, saving the :math:`O(N D^2)` product of every backward pass.
    """

    @staticmethod
    def forward(ctx, matrix: torch.Tensor, residuals: torch.Tensor, scatter):
        projected = residuals @ matrix
        ctx.scatter = scatter
        ctx.save_for_backward(residuals, projected)
        return (projected * residuals).sum(-1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        residuals, projected = ctx.saved_tensors
        grad_matrix = grad_residuals = None
        if ctx.needs_input_grad[0]:
            uniform = ctx.scatter is not None and bool((grad_out == grad_out[:, :1]).all())
            if uniform:
                grad_matrix = grad_out[:, :1, None] * ctx.scatter()
            else:
                grad_matrix = residuals.mT @ (grad_out[..., None] * residuals)
        if ctx.needs_input_grad[1]:
            grad_residuals = 2 * grad_out[..., None] * projected
        return grad_matrix, grad_residuals, None


def _quadratic_form(factor: torch.Tensor, weights: torch.Tensor):
    """The constant :math:`a` and the matrix :math:`L^{-\\top} M L^{-1}` of the quadratic form.

    ``factor`` has shape ``(..., D, D)``; returns shapes ``(...)`` and ``(..., D, D)``.
    """
    size = factor.shape[-1]
    lower = torch.ones(size, size, dtype=torch.bool, device=factor.device).tril()
    variance = _reverse_cumsum(factor.square())
    safe_variance = torch.where(lower, variance, 1.0)
    block_weights = weights * lower
    constant = -0.5 * (block_weights * (safe_variance.log() + LOG_2PI)).sum((-1, -2))
    omega = (block_weights / safe_variance).cumsum(-1)
    products = (omega * factor).mT @ factor  # entry (i, i') = M_{ii'} for i <= i'
    upper = products.triu()
    matrix = upper + upper.triu(1).mT
    half = torch.linalg.solve_triangular(factor.mT, matrix, upper=True)
    precision_like = torch.linalg.solve_triangular(factor.mT, half.mT, upper=True)
    return constant, precision_like


def random_permutations(
    num_perms: int,
    size: int,
    device: Optional[torch.device] = None,
    generator: Optional[torch.Generator] = None,
    *,
    num_groups: Optional[int] = None,
) -> torch.Tensor:
    """Uniformly random permutations of ``range(size)``.

    :param num_perms: permutations per group.
    :param size: the number of coordinates permuted.
    :param num_groups: ``None`` for shape ``(num_perms, size)``, else shape
        ``(num_groups, num_perms, size)``, every group drawn independently.
    :param generator: a :class:`torch.Generator` to draw from (on any device; the result is
        moved to ``device``); ``None`` draws from torch's global generator, so
        ``pyro.set_rng_seed`` makes them reproducible.
    """
    shape = (num_perms, size) if num_groups is None else (num_groups, num_perms, size)
    if generator is None:
        return torch.argsort(torch.rand(shape, device=device), dim=-1)
    # Drawn where the generator lives (a CPU generator serves data on any device), then moved.
    uniform = torch.rand(shape, device=generator.device, generator=generator)
    return torch.argsort(uniform, dim=-1).to(device)


def _permuted_scores(
    covariance: torch.Tensor,
    residuals: torch.Tensor,
    weights: torch.Tensor,
    perms: torch.Tensor,
    scatter=None,
) -> torch.Tensor:
    """Masked scores averaged over ``perms``.

    ``covariance`` ``(B, D, D)``, ``residuals`` ``(B, n, D)``, ``weights`` ``(D,)`` context
    weights, ``perms`` ``(S, D)`` shared by every group, or ``(B, S, D)``, one set per group;
    ``scatter`` as in :class:`_QuadraticForms`. Returns ``(B, n)``.
    """
    batch, num_vectors, size = residuals.shape
    if perms.dim() == 2:
        perms = perms[None]
    num_perms = perms.shape[1]
    factor = cholesky(_PermuteSymmetric.apply(covariance, perms), what=_COVARIANCE)  # (B, S, D, D)
    if num_vectors >= max(2, size // _QUADRATIC_FORM_SIZE_PER_VECTOR):
        constant, precision_like = _quadratic_form(factor, weights)
        matrix = _UnpermuteSymmetric.apply(precision_like, perms)  # (B, D, D)
        quadratic = _QuadraticForms.apply(matrix, residuals, scatter)
        return constant.mean(1)[:, None] - 0.5 * quadratic
    if perms.shape[0] == 1:
        permuted = residuals.index_select(-1, perms.reshape(-1))
        permuted = permuted.view(batch, num_vectors, num_perms, size).transpose(1, 2)
    else:
        full = (batch, num_perms, num_vectors, size)
        permuted = torch.gather(residuals[:, None].expand(full), 3, perms[:, :, None].expand(full))
    whitened = torch.linalg.solve_triangular(factor, permuted.mT, upper=False).mT
    scores = _ResidualFormScore.apply(
        factor.reshape(batch * num_perms, size, size),
        whitened.reshape(batch * num_perms, num_vectors, size),
        weights,
    )
    return scores.view(batch, num_perms, num_vectors).mean(1)


def _grouped_permuted_scores(
    covariance: torch.Tensor,
    residuals: torch.Tensor,
    weights: torch.Tensor,
    num_perms: int,
    num_groups: int,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    """Masked scores with independent permutations for each of ``num_groups`` groups of vectors.

    The ``B * n`` vectors of ``residuals`` ``(B, n, D)``, in order, are split into
    ``G = min(num_groups, B * n)`` contiguous groups of near-equal size; every group draws its
    own ``num_perms`` permutations. A group that spans several covariances is scored with each
    of them on its share of vectors, so the work is one permuted factorization per (covariance,
    group) pair, :math:`O((B + G) S D^3 + B n D^2)` in all. Returns ``(B, n)``.
    """
    batch, num_vectors, size = residuals.shape
    total = batch * num_vectors
    num_groups = min(num_groups, total)
    device = residuals.device
    perms = random_permutations(
        num_perms, size, device, num_groups=num_groups, generator=generator
    )  # (G, S, D)
    flat = torch.arange(total, device=device)
    group_of = flat * num_groups // total  # non-decreasing, every group non-empty
    cov_of = flat // num_vectors
    # Vectors with the same (covariance, group) form a contiguous run: one "pair" each.
    _, run_lengths = torch.unique_consecutive(cov_of * num_groups + group_of, return_counts=True)
    run_starts = torch.cumsum(run_lengths, 0) - run_lengths
    run_of = torch.repeat_interleave(torch.arange(len(run_lengths), device=device), run_lengths)
    position = flat - run_starts[run_of]
    longest = int(run_lengths.max())
    padded = residuals.new_zeros(len(run_lengths), longest, size)
    padded[run_of, position] = residuals.reshape(total, size)
    scores = _permuted_scores(
        covariance[cov_of[run_starts]], padded, weights, perms[group_of[run_starts]]
    )
    return scores[run_of, position].reshape(batch, num_vectors)


def _subset_permutations(size: int, mask_size: int, device) -> torch.Tensor:
    """Every mask of ``mask_size`` hidden coordinates, as permutations (visible first)."""
    rows = []
    for hidden in itertools.combinations(range(size), mask_size):
        hidden_set = set(hidden)
        rows.append([i for i in range(size) if i not in hidden_set] + list(hidden))
    return torch.tensor(rows, dtype=torch.long, device=device)


def leave_one_out_log_densities(covariance: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
    """:math:`\\log p(x_j \\mid x_{-j})` for every coordinate ``j``, in closed form.

    With :math:`P = \\Sigma^{-1}`, the conditional of coordinate :math:`j` given the others has
    variance :math:`1/P_{jj}` and residual :math:`(P e)_j / P_{jj}`: one factorization gives
    leave-one-out cross-validation for every coordinate. ``covariance`` has shape
    ``(..., D, D)`` and ``residuals`` :math:`e = x - \\mu` shape ``(..., n, D)``; returns the
    shape of ``residuals``.
    """
    factor = cholesky(covariance, what=_COVARIANCE)
    precision = torch.cholesky_inverse(factor)
    diagonal = torch.diagonal(precision, dim1=-2, dim2=-1)[..., None, :]
    projected = residuals @ precision  # precision is symmetric
    return 0.5 * (diagonal.log() - LOG_2PI - projected.square() / diagonal)


def leave_one_out_score(covariance: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
    """:math:`\\sum_j \\log p(x_j \\mid x_{-j})`, i.e. :math:`D\\,S(x; 1)`."""
    return leave_one_out_log_densities(covariance, residuals).sum(-1)


def _marginal_score(covariance: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
    """:math:`\\sum_j \\log p(x_j)`, i.e. :math:`D\\,S(x; D)` (the mask hides everything)."""
    variance = torch.diagonal(covariance, dim1=-2, dim2=-1)[:, None]
    return (-0.5 * (LOG_2PI + variance.log() + residuals.square() / variance)).sum(-1)


def gaussian_masked_score(
    covariance: torch.Tensor,
    residuals: torch.Tensor,
    size_weights: torch.Tensor,
    num_masks: Union[int, str],
    scatter: Any = None,
    *,
    mask_groups: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Masked estimate of :math:`\\log \\mathcal{N}(x; \\mu, \\Sigma)` for grouped residuals.

    :param covariance: shape ``(B, D, D)``, one covariance per group.
    :param residuals: :math:`x - \\mu`, shape ``(B, n, D)``: ``n`` vectors share each covariance.
    :param size_weights: :math:`w_m` for ``m = 1..D``, shape ``(D,)``, summing to ``D``.
    :param num_masks: an int (random permutations averaged) or ``"all"`` (exact expectation
        over every mask of the sizes with non-zero weight).
    :param scatter: optional callable returning :math:`\\sum_n e_n e_n^\\top` per group, shape
        ``(B, D, D)``, used by the backward pass when it applies (see :class:`_QuadraticForms`).
    :param mask_groups: ``None``: every vector shares the ``num_masks`` permutations, one
        :math:`O(D^3)` factorization per covariance and permutation. An int :math:`G`: the
        ``B * n`` vectors are split, in order, into :math:`G` groups with independent
        permutations (:math:`G \\ge B n` means one group per vector), costing
        :math:`O(G S D^3 + B n D^2)`. Independent groups make the errors of a sum over
        vectors add like independent errors, so the relative error of
        :math:`\\sum_n \\log p(x_n)` falls like :math:`1/\\sqrt{G}`; shared permutations give
        correlated errors that do not average out. Ignored for ``"all"`` (no randomness).
    :param generator: the :class:`torch.Generator` the permutations are drawn from (``None``:
        torch's global generator).
    :returns: shape ``(B, n)``.
    """
    size = residuals.shape[-1]
    if num_masks != "all":
        weights = context_weights(size_weights)
        if mask_groups is not None:
            return _grouped_permuted_scores(
                covariance,
                residuals,
                weights,
                num_masks,  # type: ignore[arg-type]
                mask_groups,
                generator,
            )
        # num_masks is an int here ("all" is handled below)
        perms = random_permutations(num_masks, size, residuals.device, generator=generator)  # type: ignore[arg-type]
        return _permuted_scores(covariance, residuals, weights, perms, scatter)
    # a tensor once the first size is added (every schedule has one)
    total: torch.Tensor = 0.0  # type: ignore[assignment]
    for index in torch.nonzero(size_weights).flatten().tolist():  # entry m - 1 for size m
        mask_size = index + 1
        weight = size_weights[index] / size  # w_m S(x; m) = (w_m / D) * D S(x; m)
        if mask_size == 1:
            score = leave_one_out_score(covariance, residuals)
        elif mask_size == size:
            score = _marginal_score(covariance, residuals)
        else:
            perms = _subset_permutations(size, mask_size, residuals.device)
            weights = torch.zeros_like(size_weights)
            weights[size - mask_size] = size / mask_size
            score = _permuted_scores(covariance, residuals, weights, perms, scatter)
        total = total + weight * score
    return total


def count_enumerated_masks(size: int, sizes: list[int]) -> int:
    """How many masks ``num_masks="all"`` conditions on (sizes ``1`` and ``D`` are closed form)."""
    return count_masks(size, [m for m in sizes if m not in (1, size)])


def enumeration_bytes(
    size: int, sizes: list[int], num_covariances: int = 1, dtype: torch.dtype = torch.float64
) -> int:
    """Bytes of the permuted covariances ``num_masks="all"`` holds at once: for the mask size
    with the most masks, one :math:`D \\times D` matrix per mask and covariance."""
    most = max((math.comb(size, m) for m in sizes if m not in (1, size)), default=0)
    return most * num_covariances * size * size * torch.finfo(dtype).bits // 8


def check_enumeration(
    size: int, sizes: list[int], num_covariances: int = 1, dtype: torch.dtype = torch.float64
) -> None:
    """Raise ``ValueError`` if ``num_masks="all"`` would need more than
    :data:`MAX_ENUMERATED_MASKS` masks or :data:`MAX_ENUMERATION_BYTES` of permuted covariances.
    """
    enumerated = count_enumerated_masks(size, sizes)
    if enumerated > MAX_ENUMERATED_MASKS:
        raise ValueError(
            f"num_masks='all' would condition on {enumerated} masks for an event of size "
            f"{size}, more than the limit of {MAX_ENUMERATED_MASKS}; use an int num_masks"
        )
    needed = enumeration_bytes(size, sizes, num_covariances, dtype)
    if needed > MAX_ENUMERATION_BYTES:
        raise ValueError(
            f"num_masks='all' would hold {needed / 2**30:.2f} GiB of permuted covariances "
            f"(one {size} x {size} matrix per mask and covariance) for an event of size {size}, "
            f"more than the limit of {MAX_ENUMERATION_BYTES / 2**30:.2f} GiB; use an int "
            "num_masks"
        )


def enumeration_fits(
    size: int, sizes: list[int], num_covariances: int = 1, dtype: torch.dtype = torch.float64
) -> bool:
    """Whether :func:`check_enumeration` accepts ``num_masks="all"`` for these sizes."""
    return count_enumerated_masks(size, sizes) <= MAX_ENUMERATED_MASKS and (
        enumeration_bytes(size, sizes, num_covariances, dtype) <= MAX_ENUMERATION_BYTES
    )
