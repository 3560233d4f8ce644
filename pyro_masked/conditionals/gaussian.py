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
from typing import Optional

import torch
from linear_operator.utils.cholesky import psd_safe_cholesky
from linear_operator.utils.errors import NanError, NotPSDError

__all__ = [
    "MAX_ENUMERATED_MASKS",
    "gaussian_masked_score",
    "leave_one_out_log_densities",
    "leave_one_out_score",
    "random_permutations",
]

#: ``num_masks="all"`` enumerates at most this many masks (summed over the schedule's sizes).
MAX_ENUMERATED_MASKS = 20_000

# Rows of L handled together by the residual form: large enough to amortise Python overhead,
# small enough that the (rows x D) temporaries stay in cache.
_ROW_BLOCK = 128

# With at least this many vectors per covariance (relative to D), the quadratic form's extra
# O(D^3) matrix products cost less than the residual form's O(n D^2) elementwise passes.
_QUADRATIC_FORM_MIN_VECTORS = 4

_LOG_2PI = math.log(2 * math.pi)


class _PermuteSymmetric(torch.autograd.Function):
    """``out[b, s] = K[b][perm[s]][:, perm[s]]`` with a gather-only backward.

    Advanced indexing's backward accumulates with a scatter, which costs several times the
    Cholesky factorization at GP sizes; the gradient of a permutation is the inverse
    permutation applied to the incoming gradient.
    """

    @staticmethod
    def forward(ctx, matrix: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(perms)
        return _gather_symmetric(matrix, perms)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (perms,) = ctx.saved_tensors
        inverse = torch.argsort(perms, dim=-1)
        batch, num_perms, size = grad_out.shape[0], grad_out.shape[1], grad_out.shape[-1]
        # grad_K = sum_s grad_out[s][inv_s][:, inv_s]
        rows = torch.gather(
            grad_out, 2, inverse[None, :, :, None].expand(batch, num_perms, size, size)
        )
        both = torch.gather(rows, 3, inverse[None, :, None, :].expand(batch, num_perms, size, size))
        return both.sum(1), None


def _gather_symmetric(matrix: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    batch, size = matrix.shape[0], matrix.shape[-1]
    num_perms = perms.shape[0]
    rows = matrix.index_select(-2, perms.reshape(-1)).view(batch, num_perms, size, size)
    return torch.gather(rows, 3, perms[None, :, None, :].expand(batch, num_perms, size, size))


class _UnpermuteSymmetric(torch.autograd.Function):
    """``out[b] = mean_s B[b, s][inv[s]][:, inv[s]]``, the inverse of :class:`_PermuteSymmetric`."""

    @staticmethod
    def forward(ctx, matrices: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(perms)
        inverse = torch.argsort(perms, dim=-1)
        batch, num_perms, size = matrices.shape[0], matrices.shape[1], matrices.shape[-1]
        rows = torch.gather(
            matrices, 2, inverse[None, :, :, None].expand(batch, num_perms, size, size)
        )
        both = torch.gather(rows, 3, inverse[None, :, None, :].expand(batch, num_perms, size, size))
        return both.mean(1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (perms,) = ctx.saved_tensors
        num_perms = perms.shape[0]
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
        for _, stop, lower, _, _, variance, residual in _row_blocks(factor, whitened):
            block_weights = weights[:stop] * lower
            safe_variance = torch.where(lower, variance, 1.0)
            log_terms = (block_weights * (safe_variance.log() + _LOG_2PI)).sum((-1, -2))
            quad_terms = (block_weights * residual.square() / safe_variance[:, None]).sum((-1, -2))
            out += -0.5 * (log_terms[:, None] + quad_terms)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        factor, whitened, weights = ctx.saved_tensors
        grad_factor = torch.zeros_like(factor)
        grad_whitened = torch.zeros_like(whitened)
        grad_total = grad_out.sum(-1)  # (B,)
        for start, stop, lower, factor_block, whitened_block, variance, residual in _row_blocks(
            factor, whitened
        ):
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


def _row_blocks(factor: torch.Tensor, whitened: torch.Tensor):
    """Yield, per block of rows, the row range, its lower-triangle mask, and ``v``, ``r``."""
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
    constant = -0.5 * (block_weights * (safe_variance.log() + _LOG_2PI)).sum((-1, -2))
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
) -> torch.Tensor:
    """``num_perms`` uniformly random permutations of ``range(size)``, shape ``(num_perms, size)``.

    Drawn from ``generator``, or from torch's global generator if it is ``None`` (so
    ``pyro.set_rng_seed`` makes them reproducible).
    """
    if generator is not None:
        device = generator.device
    uniform = torch.rand(num_perms, size, device=device, generator=generator)
    return torch.argsort(uniform, dim=-1)


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    try:
        return psd_safe_cholesky(matrix)
    except NanError as error:
        raise ValueError("the covariance matrix contains NaN entries") from error
    except NotPSDError as error:
        raise ValueError(
            "the covariance matrix is not positive definite, even after adding jitter "
            f"to its diagonal ({error})"
        ) from error


def _permuted_scores(
    covariance: torch.Tensor,
    residuals: torch.Tensor,
    weights: torch.Tensor,
    perms: torch.Tensor,
    scatter=None,
) -> torch.Tensor:
    """Masked scores averaged over ``perms``.

    ``covariance`` ``(B, D, D)``, ``residuals`` ``(B, n, D)``, ``weights`` ``(D,)`` context
    weights, ``perms`` ``(S, D)``; ``scatter`` as in :class:`_QuadraticForms`. Returns
    ``(B, n)``.
    """
    batch, num_vectors, size = residuals.shape
    num_perms = perms.shape[0]
    factor = _cholesky(_PermuteSymmetric.apply(covariance, perms))  # (B, S, D, D)
    if num_vectors >= max(2, size // _QUADRATIC_FORM_MIN_VECTORS):
        constant, precision_like = _quadratic_form(factor, weights)
        matrix = _UnpermuteSymmetric.apply(precision_like, perms)  # (B, D, D)
        quadratic = _QuadraticForms.apply(matrix, residuals, scatter)
        return constant.mean(1)[:, None] - 0.5 * quadratic
    permuted = residuals.index_select(-1, perms.reshape(-1))
    permuted = permuted.view(batch, num_vectors, num_perms, size).transpose(1, 2)
    whitened = torch.linalg.solve_triangular(factor, permuted.mT, upper=False).mT
    scores = _ResidualFormScore.apply(
        factor.reshape(batch * num_perms, size, size),
        whitened.reshape(batch * num_perms, num_vectors, size),
        weights,
    )
    return scores.view(batch, num_perms, num_vectors).mean(1)


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
    factor = _cholesky(covariance)
    precision = torch.cholesky_inverse(factor)
    diagonal = torch.diagonal(precision, dim1=-2, dim2=-1)[..., None, :]
    projected = residuals @ precision  # precision is symmetric
    return 0.5 * (diagonal.log() - _LOG_2PI - projected.square() / diagonal)


def leave_one_out_score(covariance: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
    """:math:`\\sum_j \\log p(x_j \\mid x_{-j})`, i.e. :math:`D\\,S(x; 1)`."""
    return leave_one_out_log_densities(covariance, residuals).sum(-1)


def _marginal_score(covariance: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
    """:math:`\\sum_j \\log p(x_j)`, i.e. :math:`D\\,S(x; D)` (the mask hides everything)."""
    variance = torch.diagonal(covariance, dim1=-2, dim2=-1)[:, None]
    return (-0.5 * (_LOG_2PI + variance.log() + residuals.square() / variance)).sum(-1)


def gaussian_masked_score(
    covariance: torch.Tensor,
    residuals: torch.Tensor,
    size_weights: torch.Tensor,
    num_masks,
    scatter=None,
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
    :param generator: where the permutations are drawn from (``None``: torch's global one).
    :returns: shape ``(B, n)``.
    """
    size = residuals.shape[-1]
    if num_masks != "all":
        context_weights = size_weights.flip(0) / torch.arange(
            size, 0, -1, dtype=size_weights.dtype, device=size_weights.device
        )
        perms = random_permutations(num_masks, size, residuals.device, generator)
        perms = perms.to(residuals.device)
        return _permuted_scores(covariance, residuals, context_weights, perms, scatter)
    total = 0.0
    for index in torch.nonzero(size_weights).flatten().tolist():  # entry m - 1 for size m
        mask_size = index + 1
        weight = size_weights[index] / size  # w_m S(x; m) = (w_m / D) * D S(x; m)
        if mask_size == 1:
            score = leave_one_out_score(covariance, residuals)
        elif mask_size == size:
            score = _marginal_score(covariance, residuals)
        else:
            perms = _subset_permutations(size, mask_size, residuals.device)
            context_weights = torch.zeros_like(size_weights)
            context_weights[size - mask_size] = size / mask_size
            score = _permuted_scores(covariance, residuals, context_weights, perms, scatter)
        total = total + weight * score
    return total


def count_enumerated_masks(size: int, sizes: list[int]) -> int:
    """How many masks ``num_masks="all"`` conditions on (sizes ``1`` and ``D`` are closed form)."""
    return sum(math.comb(size, m) for m in sizes if m not in (1, size))
