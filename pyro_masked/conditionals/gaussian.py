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

# Rows of L handled together by the residual form, or ``None`` to choose them so that one
# (rows x D) temporary per vector holds about _BLOCK_ELEMENTS numbers: small enough to stay in a
# core's cache through the dozen passes made over it, large enough to amortise Python overhead.
_ROW_BLOCK: Optional[int] = None
_BLOCK_ELEMENTS = 2**17

# The quadratic form is used once the vectors per covariance number at least D divided by this
# ratio: its extra O(D^3) matrix products then cost less than the residual form's O(n D^2)
# elementwise passes.
_QUADRATIC_FORM_SIZE_PER_VECTOR = 4


class _PermutedCholesky(torch.autograd.Function):
    """Cholesky factors of permuted covariances, :math:`L_s L_s^\\top = P_s \\Sigma P_s^\\top`.

    ``covariance`` has shape ``(B, D, D)`` and ``perms`` shape ``(1, S, D)`` (shared by every
    matrix) or ``(B, S, D)``; returns ``(B, S, D, D)``. The backward is the factorization's
    (:func:`_cholesky_backward`) followed by the inverse permutation; the permutations are
    flat-index gathers (:func:`_permute_into`). Autograd through a gather and
    :func:`torch.linalg.cholesky` forms a full :math:`D \\times D` product, two full
    triangular solves and about ten more passes over :math:`D \\times D` matrices.
    """

    @staticmethod
    def forward(ctx, covariance: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
        factor = cholesky(_gather_symmetric(covariance, perms, symmetric=True), what=_COVARIANCE)
        ctx.save_for_backward(factor, perms)
        return factor

    @staticmethod
    def backward(ctx, grad_factor: torch.Tensor):
        factor, perms = ctx.saved_tensors
        grad = _cholesky_backward(factor, grad_factor)
        inverse = torch.argsort(perms, dim=-1)
        return _gather_symmetric(grad, inverse, reduce=True, symmetric=True), None


#: From this size on, the Cholesky backward runs block by block (:func:`_cholesky_backward`).
_BLOCKED_BACKWARD_SIZE = 512

#: Block edge of the blocked Cholesky backward.
_CHOLESKY_BLOCK = 128


def _cholesky_backward(factor: torch.Tensor, grad_factor: torch.Tensor) -> torch.Tensor:
    """The symmetric gradient :math:`\\bar\\Sigma` of :math:`L = \\operatorname{chol}(\\Sigma)`
    from :math:`\\bar L` (only its lower triangle is read); shapes ``(..., D, D)``.

    Small matrices take the closed form (Murray, "Differentiation of the Cholesky
    decomposition", 2016): :math:`\\bar\\Sigma = \\tfrac12 (Y + Y^\\top)`,
    :math:`Y = L^{-\\top} \\Phi(L^\\top \\bar L) L^{-1}`, :math:`\\Phi` the lower triangle with
    its diagonal halved: :math:`D^3/3` multiply-adds for the product (formed only in its lower
    triangle, :func:`_lower_of_transposed_product`) and :math:`D^3` for the two triangular
    solves, which overwrite their right-hand side.

    From :data:`_BLOCKED_BACKWARD_SIZE` on, the reverse mode of the blocked factorization
    (the blocked algorithm of the same paper): walking the column blocks :math:`J` backwards,
    with :math:`D = L_{JJ}`, :math:`C = L_{>J,J}`, :math:`R = L_{J,<J}`, :math:`B = L_{>J,<J}`,

    .. math::

        \\bar T = \\bar C D^{-1},\\quad \\bar D \\mathrel{-}= \\bar T^\\top C,\\quad
        \\bar B \\mathrel{-}= \\bar T R,\\quad \\bar R \\mathrel{-}= \\bar T^\\top B,\\quad
        \\bar S = \\operatorname{chol}^*(D, \\bar D),\\quad \\bar R \\mathrel{-}= 2 \\bar S R,

    with :math:`\\bar T` and :math:`\\bar S` (the closed form on the diagonal block) the
    gradient's blocks. About :math:`D^3/3` multiply-adds in all, a quarter of the closed
    form's: twice as fast from :math:`D \\approx 10^3` on, where the closed form's solves
    dominate a GP's step.
    """
    size = factor.shape[-1]
    if size < _BLOCKED_BACKWARD_SIZE:
        return _closed_form_cholesky_backward(factor, grad_factor)
    shape = factor.shape
    lower = factor.reshape(-1, size, size)
    # The lower-triangle gradient G, built in place over a copy of Lbar's lower triangle:
    # Sigmabar = (G + G^T) / 2 at the end.
    grad = grad_factor.tril().reshape(-1, size, size)
    for start in reversed(range(0, size, _CHOLESKY_BLOCK)):
        stop = min(size, start + _CHOLESKY_BLOCK)
        diagonal = lower[:, start:stop, start:stop]
        left = lower[:, start:stop, :start]
        grad_diagonal = grad[:, start:stop, start:stop]
        grad_left = grad[:, start:stop, :start]
        if stop < size:
            below = lower[:, stop:, start:stop]
            grad_below = torch.linalg.solve_triangular(
                diagonal, grad[:, stop:, start:stop], upper=False, left=False
            )
            grad[:, stop:, start:stop] = grad_below
            grad_diagonal.baddbmm_(grad_below.mT, below, alpha=-1.0)
            if start > 0:
                grad[:, stop:, :start].baddbmm_(grad_below, left, alpha=-1.0)
                grad_left.baddbmm_(grad_below.mT, lower[:, stop:, :start], alpha=-1.0)
        block = _closed_form_cholesky_backward(diagonal, grad_diagonal)  # symmetric
        if start > 0:
            grad_left.baddbmm_(block, left, alpha=-2.0)
        # G's convention: off-diagonal entries of the lower triangle count twice.
        halved_diagonal = block.diagonal(dim1=-2, dim2=-1).clone()
        block.tril_().mul_(2.0).diagonal(dim1=-2, dim2=-1).copy_(halved_diagonal)
        grad_diagonal.copy_(block)
    return _mirror_lower_triangle(grad).mul_(0.5).view(shape)


def _closed_form_cholesky_backward(factor: torch.Tensor, grad_factor: torch.Tensor) -> torch.Tensor:
    """The closed form of :func:`_cholesky_backward`."""
    phi = _lower_of_transposed_product(factor, grad_factor)
    return _symmetric_sandwich(factor, phi).mul_(0.5)


def _solve_in_place(
    factor: torch.Tensor, rhs: torch.Tensor, *, upper: bool, left: bool = True
) -> torch.Tensor:
    """:func:`torch.linalg.solve_triangular` writing over ``rhs`` (a temporary of the caller):
    the solver works in place anyway, and a fresh :math:`D \\times D` result would cost an
    allocation and a copy."""
    return torch.linalg.solve_triangular(factor, rhs, upper=upper, left=left, out=rhs)


#: Tile edge for transposing within a matrix: a tile and its mirror stay in cache.
_TILE = 256

#: Rows per block of a product of triangular matrices: each block skips the zero blocks.
_PRODUCT_ROWS = 128


def _lower_of_transposed_product(lower: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """:math:`\\operatorname{tril}(A^\\top B)` for lower-triangular ``A`` and ``B``.

    Row block :math:`I` needs only rows :math:`c \\ge \\min I` of both (:math:`A_{ca} = 0` for
    :math:`c < a`) and columns up to :math:`\\max I`: about :math:`D^3/3` multiply-adds instead
    of the full product's :math:`D^3`, in a few matrix products (used inside hand-written
    backward passes: it writes into its result, so autograd cannot follow it).
    """
    size = lower.shape[-1]
    if size <= _PRODUCT_ROWS:  # one block: the plain product, without slicing
        return torch.matmul(lower.mT, other).tril_()
    out = torch.empty_like(other)
    for start in range(0, size, _PRODUCT_ROWS):
        stop = min(size, start + _PRODUCT_ROWS)
        rows = out[..., start:stop, :stop]
        torch.matmul(lower[..., start:, start:stop].mT, other[..., start:, :stop], out=rows)
        out[..., start:stop, stop:] = 0.0
        rows[..., start:].tril_()
    return out


def _mirror_lower_triangle(lower: torch.Tensor) -> torch.Tensor:
    """:math:`A + A^\\top` for lower-triangular ``A`` (zero above the diagonal), in place
    beyond one tile.

    Tile by tile, so that the transposed reads stay in cache: several times faster than
    ``A + A.mT`` for large matrices.
    """
    size = lower.shape[-1]
    if size <= _TILE:  # one tile: a new matrix (exactly symmetric: addition commutes)
        return lower + lower.mT
    for start in range(0, size, _TILE):
        stop = min(size, start + _TILE)
        for left in range(0, start, _TILE):
            right = min(size, left + _TILE)
            lower[..., left:right, start:stop].copy_(lower[..., start:stop, left:right].mT)
        diagonal = lower[..., start:stop, start:stop]
        diagonal.add_(diagonal.mT.clone())
    return lower


#: Up to this many matrices, permutations are applied one matrix at a time by flat gathers
#: (several times faster than a batched gather at GP sizes).
_SELECT_MATRICES = 64

#: Entries gathered per flat-index chunk of :func:`_permute_into`: the chunk's index stays in
#: cache and costs a fraction of one matrix of memory.
_GATHER_ELEMENTS = 2**18


def _permute_into(
    out: torch.Tensor,
    source: torch.Tensor,
    perm: torch.Tensor,
    symmetric: bool,
    flat: Optional[torch.Tensor] = None,
):
    """``out = source[perm][:, perm]`` for one ``(D, D)`` matrix, by flat-index gathers.

    Each output row reads one source row, so a chunk of rows is one
    :func:`torch.index_select` of the flattened matrix with a small index: a single pass
    over memory, where a row selection followed by a column selection (a strided gather)
    makes two and a transpose. With ``symmetric`` (symmetric up to rounding) a transposed
    layout is read as it lies, saving a copy. ``flat``: the whole index
    (:func:`_flat_indices`), when the caller has it.
    """
    size = source.shape[-1]
    if not source.is_contiguous():
        source = source.mT if symmetric and source.mT.is_contiguous() else source.contiguous()
    if flat is not None:
        torch.index_select(source.view(-1), 0, flat, out=out.view(-1))
        return
    index = perm.to(torch.int32) if size * size < 2**31 else perm
    rows = max(1, _GATHER_ELEMENTS // size)
    for start in range(0, size, rows):
        stop = min(size, start + rows)
        chunk = (index[start:stop, None] * size + index).view(-1)
        torch.index_select(source.view(-1), 0, chunk, out=out[start:stop].view(-1))


def _flat_indices(perms: torch.Tensor) -> Optional[torch.Tensor]:
    """The flat gather index of every permutation in ``perms`` ``(P, S, D)``, shape
    ``(P, S, D * D)``, for permutations applied more than once (forward and backward); ``None``
    beyond :data:`_GATHER_ELEMENTS` entries a matrix, where :func:`_permute_into` builds it by
    chunks instead."""
    size = perms.shape[-1]
    if size * size > _GATHER_ELEMENTS or perms.shape[0] * perms.shape[1] > _SELECT_MATRICES:
        return None
    index = perms.to(torch.int32)
    return (index[..., :, None] * size + index[..., None, :]).flatten(-2)


def _gather_symmetric(
    matrix: torch.Tensor,
    perms: torch.Tensor,
    reduce: bool = False,
    symmetric: bool = False,
    flat: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out[b, s] = matrix[b, (s)][perm[b, s]][:, perm[b, s]]``; ``matrix`` is ``(B, D, D)`` or
    ``(B, S, D, D)``; ``perms`` is ``(S, D)``, ``(1, S, D)`` or ``(B, S, D)``. With ``reduce``
    the result is summed over ``s``, shape ``(B, D, D)``. ``symmetric``: the matrices are
    symmetric up to rounding (see :func:`_permute_into`). ``flat``: :func:`_flat_indices` of
    ``perms``, when the caller has them."""
    if perms.dim() == 2:
        perms = perms[None]
    batch, size = matrix.shape[0], matrix.shape[-1]
    num_perms = perms.shape[1]
    full = (batch, num_perms, size, size)
    if batch * num_perms == 1 and flat is not None and matrix.is_contiguous():
        out = torch.index_select(matrix.view(-1), 0, flat.view(-1))
        return out.view(full[1:] if reduce else full)
    if batch * num_perms <= _SELECT_MATRICES:
        out = matrix.new_empty(full)
        for b in range(batch):
            for s in range(num_perms):
                group = b if perms.shape[0] > 1 else 0
                source = matrix[b, s] if matrix.dim() == 4 else matrix[b]
                index = None if flat is None else flat[group, s]
                _permute_into(out[b, s], source, perms[group, s], symmetric, index)
        return out.sum(1) if reduce and num_perms > 1 else out[:, 0] if reduce else out
    if matrix.dim() == 3 and perms.shape[0] == 1:
        rows = matrix.index_select(-2, perms.reshape(-1)).view(full)
    else:
        if matrix.dim() == 3:
            matrix = matrix[:, None].expand(full)
        rows = torch.gather(matrix, 2, perms[:, :, :, None].expand(full))
    out = torch.gather(rows, 3, perms[:, :, None, :].expand(full))
    return out.sum(1) if reduce else out


def _reverse_cumsum(x: torch.Tensor, square: bool = False) -> torch.Tensor:
    """Suffix sums along the last dimension (of the squares, with ``square``): prefix sums of
    the reversed copy, taken in place on it."""
    flipped = x.flip(-1)
    return (flipped.square_() if square else flipped).cumsum_(-1).flip(-1)


def _row_blocks(size: int, num_vectors: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the row blocks the residual form works through."""
    rows = _ROW_BLOCK or max(1, _BLOCK_ELEMENTS // (size * num_vectors))
    return [(start, min(size, start + rows)) for start in range(0, size, rows)]


def _flipped_suffix_sums(
    factor: torch.Tensor, whitened: torch.Tensor, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:math:`v_{jk}` and :math:`r_{jk}` for rows ``start:stop``, context sizes in reverse.

    Column ``t`` of the results is the context size :math:`k = \\text{stop} - 1 - t`, so the
    suffix sums over :math:`i \\ge k` become prefix sums, taken in place on one reversed copy of
    the block (no flipping back and forth). Returns ``variance`` of shape ``(B, b, stop)`` and
    ``residual`` of shape ``(B, n, b, stop)``. Entries with :math:`k > j` lie above the diagonal,
    where :math:`L` is zero: they get variance 1 and residual 0, so they add nothing to the log
    and quadratic terms, and no mask is multiplied in.
    """
    rows = stop - start
    flipped = factor[:, start:stop, :stop].flip(-1)  # (B, b, w)
    variance = flipped.square().cumsum_(-1)
    residual = flipped[:, None] * whitened[:, :, None, :stop].flip(-1)
    residual.cumsum_(-1)
    steps = torch.arange(rows, device=factor.device)
    variance[..., :rows] += (steps[:, None] + steps) < rows - 1  # t < b - 1 - row: k > j
    return variance, residual


def _sum_vectors(x: torch.Tensor) -> torch.Tensor:
    """Sum over dimension 1 (the vectors), without a reduction pass when there is one."""
    return x[:, 0] if x.shape[1] == 1 else x.sum(1)


class _ResidualFormScore(torch.autograd.Function):
    """Masked score :math:`\\sum_{j \\ge k} c_k \\ell_{jk}` of permuted residuals, by row blocks.

    Inputs: ``L`` of shape ``(B, D, D)`` (lower triangular, zero above the diagonal as a
    Cholesky factor is), the permuted residuals ``E`` of shape ``(B, n, D)`` (``n`` vectors per
    factor) and context weights ``c`` of shape ``(D,)``. Returns shape ``(B, n)``.

    The residuals are whitened inside, :math:`z = L^{-1} e`, so that the backward adds the
    whitening's share of the factor's gradient, :math:`-\\operatorname{tril}(u z^\\top)` with
    :math:`u = L^{-\\top} \\bar z`, as one rank-``n`` update in place instead of autograd's
    outer product, mask and sum of :math:`D \\times D` matrices. Each block of rows is one
    reversed copy of :math:`L`'s block and a dozen in-place passes over it, sized to stay in
    cache; the backward recomputes the block instead of storing :math:`O(B n D^2)`
    intermediates. With :math:`s = r/v`, :math:`\\partial \\ell / \\partial v = \\tfrac12 (s^2 -
    1/v)` and :math:`\\partial \\ell / \\partial r = -s`, the score's gradient is
    :math:`\\partial / \\partial L_{ji} = 2 L_{ji} \\sum_{k \\le i} c_k \\partial_v \\ell_{jk}
    + z_i \\sum_{k \\le i} c_k \\partial_r \\ell_{jk}` and
    :math:`\\bar z_i = \\sum_j L_{ji} \\sum_{k \\le i} c_k \\partial_r \\ell_{jk}`. Entries of
    the factor's gradient above the diagonal are left unmasked: a lower-triangular factor's
    gradient there has no meaning, and the Cholesky factorization's backward reads only the
    lower triangle.
    """

    @staticmethod
    def forward(ctx, factor: torch.Tensor, residuals: torch.Tensor, weights: torch.Tensor):
        whitened = torch.linalg.solve_triangular(factor, residuals.mT, upper=False).mT
        ctx.save_for_backward(factor, whitened, weights)
        batch, num_vectors, size = whitened.shape
        reversed_weights = weights.flip(0)  # entry size - 1 - k is c_k
        # The 2 pi of every term: sum_k c_k (D - k) log(2 pi).
        counts = torch.arange(size, 0, -1, device=weights.device, dtype=weights.dtype)
        out = whitened.new_full((batch, num_vectors), -0.5 * LOG_2PI * float(weights @ counts))
        for start, stop in _row_blocks(size, num_vectors):
            variance, residual = _flipped_suffix_sums(factor, whitened, start, stop)
            terms = residual.square_().div_(variance[:, None])
            terms += variance.log_()[:, None]  # log v + r^2 / v, (B, n, b, w)
            out -= 0.5 * (terms.sum(-2) @ reversed_weights[size - stop :])
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        factor, whitened, weights = ctx.saved_tensors
        batch, num_vectors, size = whitened.shape
        grad_factor = torch.empty_like(factor)
        grad_whitened = torch.zeros_like(whitened)
        grad_total = grad_out.sum(-1)[:, None, None]  # (B, 1, 1)
        vector_grad = grad_out[:, :, None, None]  # (B, n, 1, 1)
        reversed_weights = weights.flip(0)
        for start, stop in _row_blocks(size, num_vectors):
            block_weights = reversed_weights[size - stop :]
            variance, residual = _flipped_suffix_sums(factor, whitened, start, stop)
            inverse = variance.reciprocal_()
            scaled = residual.mul_(inverse[:, None])  # s = r / v
            # 2 c_k dl/dv summed over vectors, and c_k dl/dr per vector.
            grad_variance = _sum_vectors(scaled.square().mul_(vector_grad))
            grad_variance.sub_(inverse.mul_(grad_total)).mul_(block_weights)
            grad_residual = scaled.mul_(-block_weights * vector_grad)
            # Back in context-size order, prefix sums over k <= i.
            cum_variance = grad_variance.flip(-1).cumsum_(-1)
            cum_residual = grad_residual.flip(-1).cumsum_(-1)
            factor_block = factor[:, start:stop, :stop]
            block_grad = cum_variance.mul_(factor_block)
            if num_vectors == 1:
                block_grad.addcmul_(cum_residual[:, 0], whitened[:, :, :stop])
            else:
                block_grad += (cum_residual * whitened[:, :, None, :stop]).sum(1)
            grad_factor[:, start:stop, :stop] = block_grad
            grad_factor[:, start:stop, stop:] = 0.0
            grad_whitened[:, :, :stop] += cum_residual.mul_(factor_block[:, None]).sum(-2)
        # Through z = L^{-1} e: e gets u = L^{-T} zbar, and L gets -u z^T.
        grad_residuals = torch.linalg.solve_triangular(factor.mT, grad_whitened.mT, upper=True).mT
        grad_factor.baddbmm_(grad_residuals.mT, whitened, alpha=-1.0)
        return grad_factor, grad_residuals, None


class _QuadraticForms(torch.autograd.Function):
    """``q[b, n] = e[b, n]^T B[b] e[b, n]`` with a backward that can reuse a scatter matrix.

    The gradient with respect to ``B`` is :math:`\\sum_n g_n e_n e_n^\\top`. When every vector
    of a group carries the same incoming gradient (a plate with uniform scale and no mask, the
    usual case) it is :math:`g\\, E^\\top E`, and ``scatter()`` (a callable returning
    :math:`E^\\top E` of shape ``(B, D, D)``, or ``None``) can supply that from a cache of the
    observed data, saving the :math:`O(N D^2)` product of every backward pass.

    ``B`` is symmetric. When the residuals need no gradient (observed data, a fixed mean), the
    forms are read off :math:`B`'s upper triangle (:func:`_symmetric_quadratic_forms`), half
    the multiply-adds of :math:`e^\\top (B e)`.
    """

    @staticmethod
    def forward(ctx, matrix: torch.Tensor, residuals: torch.Tensor, scatter):
        ctx.scatter = scatter
        if not ctx.needs_input_grad[1]:
            ctx.save_for_backward(residuals, None)
            return _symmetric_quadratic_forms(residuals, matrix)
        projected = residuals @ matrix
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


#: Columns per block of :func:`_symmetric_quadratic_forms` (narrower than products of two
#: matrices: the many vectors keep each block's product efficient).
_FORM_COLUMNS = 64


def _symmetric_quadratic_forms(residuals: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """:math:`e_n^\\top A e_n` for symmetric ``A`` ``(B, D, D)`` and ``residuals`` ``(B, n, D)``.

    By column blocks :math:`J`: :math:`e^\\top A e = \\sum_J e_J^\\top (A_{JJ} e_J + 2 A_{J,<J}
    e_{<J})`, each block meeting only the first :math:`\\max J` coordinates, about
    :math:`n D^2 / 2` multiply-adds, and no triangle of :math:`A` is copied.
    """
    size = matrix.shape[-1]
    if size <= 2 * _FORM_COLUMNS:
        return ((residuals @ matrix) * residuals).sum(-1)
    out = residuals.new_zeros(residuals.shape[:-1])
    for start in range(0, size, _FORM_COLUMNS):
        stop = min(size, start + _FORM_COLUMNS)
        block = residuals[..., start:stop]
        projected = block @ matrix[..., start:stop, start:stop]
        if start > 0:
            projected.baddbmm_(residuals[..., :start], matrix[..., :start, start:stop], alpha=2.0)
        out += projected.mul_(block).sum(-1)
    return out


def _lower_times_upper_part(lower: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """:math:`\\operatorname{tril}(A \\operatorname{triu}(B))` for lower-triangular ``A``;
    shapes ``(batch, D, D)``, only the upper triangle of ``B`` is read.

    Column block :math:`J` needs rows :math:`j \\ge \\min J` of :math:`A` and its columns up to
    :math:`\\max J`; only the diagonal block of :math:`B` is masked (a copy of one block, not of
    the matrix): about :math:`D^3/3` multiply-adds.
    """
    size = lower.shape[-1]
    if size <= _PRODUCT_ROWS:
        return torch.matmul(lower, other.triu()).tril_()
    out = torch.empty_like(lower)
    for start in range(0, size, _PRODUCT_ROWS):
        stop = min(size, start + _PRODUCT_ROWS)
        columns = out[:, start:, start:stop]
        torch.matmul(
            lower[:, start:, start:stop], other[:, start:stop, start:stop].triu(), out=columns
        )
        if start > 0:
            columns.baddbmm_(lower[:, start:, :start], other[:, :start, start:stop])
        out[:, :start, start:stop] = 0.0
        columns[:, : stop - start].tril_()
    return out


def _lower_times_strictly_lower_part(lower: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """:math:`A \\operatorname{tril}_{-1}(B)` for lower-triangular ``A``; shapes
    ``(batch, D, D)``, only the strictly lower triangle of ``B`` is read. By column blocks that
    skip the zero blocks (about :math:`D^3/3` multiply-adds), masking only the diagonal blocks
    of :math:`B`; the result is strictly lower triangular."""
    size = lower.shape[-1]
    if size <= _PRODUCT_ROWS:
        return torch.matmul(lower, other.tril(-1))
    out = torch.empty_like(lower)
    for start in range(0, size, _PRODUCT_ROWS):
        stop = min(size, start + _PRODUCT_ROWS)
        columns = out[:, start:, start:stop]
        strict = other[:, start:stop, start:stop].tril(-1)
        torch.matmul(lower[:, start:, start:stop], strict, out=columns)
        if stop < size:
            columns[:, stop - start :].baddbmm_(lower[:, stop:, stop:], other[:, stop:, start:stop])
        out[:, :start, start:stop] = 0.0
    return out


def _lower_of_transposed_product_minus(
    lower: torch.Tensor, other: torch.Tensor, left: torch.Tensor, right: torch.Tensor
) -> torch.Tensor:
    """:math:`\\operatorname{tril}(A^\\top B - C E)` for lower-triangular ``A`` and ``B``;
    shapes ``(batch, D, D)``. Row block :math:`I` of the result needs columns up to
    :math:`\\max I` only: :math:`D^3/2` multiply-adds for :math:`C E` and :math:`D^3/6` for
    :math:`A^\\top B` (see :func:`_lower_of_transposed_product`)."""
    size = lower.shape[-1]
    if size <= _PRODUCT_ROWS:
        return torch.baddbmm(torch.matmul(left, right), lower.mT, other, beta=-1.0).tril_()
    out = torch.empty_like(other)
    for start in range(0, size, _PRODUCT_ROWS):
        stop = min(size, start + _PRODUCT_ROWS)
        rows = out[:, start:stop, :stop]
        torch.matmul(left[:, start:stop], right[:, :, :stop], out=rows)
        rows.baddbmm_(lower[:, start:, start:stop].mT, other[:, start:, :stop], beta=-1.0)
        out[:, start:stop, stop:] = 0.0
        rows[:, :, start:].tril_()
    return out


def _symmetric_sandwich(factor: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """:math:`L^{-\\top} (\\Phi + \\Phi^\\top) L^{-1}`, :math:`\\Phi` the lower triangle of
    ``lower`` with its diagonal halved, computed over ``lower`` (a temporary of the caller)."""
    lower.diagonal(dim1=-2, dim2=-1).mul_(0.5)
    symmetric = _mirror_lower_triangle(lower)  # Phi + Phi^T
    # A symmetric matrix is its own transpose: handing the solver the transposed (column-
    # major) view and solving from the right saves LAPACK's layout copies.
    half = _solve_in_place(factor.mT, symmetric.mT, upper=True)
    return _solve_in_place(factor, half, upper=False, left=False)


#: Rows of the factor per block of the quadratic form's elementwise passes: about this many
#: numbers a block, so that the dozen passes made over each block stay in a core's cache.
_PART_ELEMENTS = 2**15


def _part_blocks(size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the row blocks of :func:`_weighted_factor` and its backward."""
    # Matrices of up to two blocks' worth stay in cache whole: one block, without slicing.
    rows = size if size * size <= 2 * _PART_ELEMENTS else max(1, _PART_ELEMENTS // size)
    return [(start, min(size, start + rows)) for start in range(0, size, rows)]


def _weighted_factor(lower: torch.Tensor, weights: torch.Tensor):
    """The elementwise part of the quadratic form's forward pass, by row blocks.

    For ``lower`` :math:`L` ``(batch, D, D)`` and context weights :math:`c`: the variances
    :math:`v_{jk} = \\sum_{i \\ge k} L_{ji}^2`, :math:`s_{jk} = c_k / v_{jk}`,
    :math:`\\Omega_{jt} = \\sum_{k \\le t} s_{jk}` and :math:`\\Omega \\circ L`, for
    :math:`k \\le j`. Row :math:`j` needs columns up to :math:`j` only, so a block of rows
    reads about half of its full width, and its passes stay in cache.

    Returns :math:`\\sum_{k \\le j} c_k \\log v_{jk}` per matrix, :math:`\\Omega \\circ L`
    (zero above the diagonal) and, for the backward pass, :math:`1/v`, :math:`s` and
    :math:`\\Omega` of every block of :func:`_part_blocks` (block ``(start, stop)`` holds rows
    ``start:stop`` and columns ``:stop``; :math:`s` is zero above the diagonal).
    """
    size = lower.shape[-1]
    blocks = _part_blocks(size)
    rows = blocks[0][1]
    # Entries of a block's diagonal square above the diagonal: v is zero there, made 1.
    above = lower.new_ones(rows, rows).triu_(1)
    below = 1.0 - above
    if len(blocks) == 1:  # one block: whole matrices, no slicing (small D is overhead-bound)
        variance = _reverse_cumsum(lower, square=True).add_(above)
        inverse = variance.reciprocal()
        scaled = inverse * weights
        omega = scaled.mul_(below).cumsum(-1)
        log_total = (variance.log_() @ weights).sum(-1)
        return log_total, omega * lower, [(inverse, scaled, omega)]
    weighted = torch.zeros_like(lower)
    saved, log_totals = [], []
    for start, stop in blocks:
        width = stop - start
        # v_jk = sum_{i >= k} L_ji^2: suffix sums, as prefix sums of the reversed row.
        variance = _reverse_cumsum(lower[:, start:stop, :stop], square=True)
        variance[:, :, start:].add_(above[:width, :width])
        inverse = variance.reciprocal()
        log_totals.append((variance.log_() @ weights[:stop]).sum(-1))
        scaled = inverse * weights[:stop]
        scaled[:, :, start:].mul_(below[:width, :width])
        omega = scaled.cumsum(-1)
        torch.mul(omega, lower[:, start:stop, :stop], out=weighted[:, start:stop, :stop])
        saved.append((inverse, scaled, omega))
    return torch.stack(log_totals).sum(0), weighted, saved


def _add_weighted_factor_backward(
    rest: torch.Tensor,
    crossed: torch.Tensor,
    diagonal: torch.Tensor,
    grad_constant: torch.Tensor,
    lower: torch.Tensor,
    saved: list,
) -> torch.Tensor:
    """Adds the elementwise part of the quadratic form's backward pass to ``rest``, by the row
    blocks of :func:`_weighted_factor` (``saved``, its blocks of :math:`1/v`, :math:`s` and
    :math:`\\Omega`): :math:`\\Omega \\circ Q - L \\circ \\operatorname{cumsum}_k\\big((2 \\bar
    s' / v + \\bar a / 2) \\circ s\\big)` with :math:`\\bar s' = \\sum_{t \\ge k} L \\circ (Q + L
    \\operatorname{diag}(W) / 2)`, half of :math:`\\bar s`. ``crossed`` :math:`Q` is
    overwritten; ``diagonal`` is :math:`\\operatorname{diag}(W)` as a row, shape
    ``(batch, 1, D)``, ``grad_constant`` :math:`\\bar a / 2` shape ``(batch, 1, 1)``."""
    size = lower.shape[-1]
    for (start, stop), (inverse, scaled, omega) in zip(_part_blocks(size), saved):
        if stop - start == size:
            block_lower, block_crossed, block_rest = lower, crossed, rest
        else:
            block = (slice(None), slice(start, stop), slice(None, stop))
            block_lower, block_crossed, block_rest = lower[block], crossed[block], rest[block]
        block_rest.addcmul_(omega, block_crossed)
        grad_omega = block_crossed.addcmul_(block_lower, diagonal[..., :stop], value=0.5)
        grad_omega.mul_(block_lower)
        grad_scaled = _reverse_cumsum(grad_omega)
        grad_variance = torch.addcmul(grad_constant, grad_scaled, inverse, value=2.0)
        block_rest.addcmul_(block_lower, grad_variance.mul_(scaled).cumsum_(-1), value=-1.0)
    return rest


class _PermutedQuadraticParts(torch.autograd.Function):
    """The constant :math:`a` and the matrix :math:`B` of the quadratic form, from the
    covariance.

    ``covariance`` :math:`\\Sigma` has shape ``(B, D, D)``, ``perms`` shape ``(1, S, D)``
    (shared) or ``(B, S, D)`` and ``weights`` :math:`c` shape ``(D,)``. For each permutation,
    :math:`L L^\\top = P \\Sigma P^\\top`, :math:`s_{jk} = c_k / v_{jk}`,
    :math:`\\Omega_{jt} = \\sum_{k \\le t} s_{jk}` and :math:`M` the lower triangle of
    :math:`L^\\top (\\Omega \\circ L)`, mirrored. Returns the constants, shape ``(B, S)``, and
    :math:`B = \\operatorname{mean}_s P_s^\\top L_s^{-\\top} M_s L_s^{-1} P_s`, shape
    ``(B, D, D)``.

    One function from the covariance to the parts, so that the backward passes of the
    factorization and of the parts share their products. For an incoming symmetric
    :math:`\\bar B` (the gradient of a symmetric matrix, as the quadratic forms send it) and,
    in each permutation's coordinates, :math:`W = L^{-1} \\bar B L^{-\\top}` and
    :math:`Q = L \\operatorname{tril}_{-1}(W)`, the factor's gradient is

    .. math::

        \\bar L = -2 L^{-\\top} M W + 2 R, \\quad
        R = \\operatorname{tril}\\big((\\Omega \\circ L) \\operatorname{triu}(W)\\big)
        + \\Omega \\circ Q + L \\circ \\operatorname{cumsum}_k(\\bar v),

    where :math:`\\bar\\Omega = L \\circ (L \\operatorname{diag}(W) + 2 Q)`,
    :math:`\\bar s_{jk} = \\sum_{t \\ge k} \\bar\\Omega_{jt}` and
    :math:`\\bar v = -(s / v) \\circ \\bar s - \\tfrac12 \\bar a\\, s`. The factorization's
    backward (Murray 2016) reads :math:`\\operatorname{tril}(L^\\top \\bar L)`, and
    :math:`L^\\top L^{-\\top} = I` makes that
    :math:`2 \\operatorname{tril}(L^\\top R) - 2 \\operatorname{tril}(M W)`: the lower triangle
    of one product instead of a full product, a triangular solve and a second product. Then
    :math:`\\bar\\Sigma = P^\\top L^{-\\top} (\\Phi + \\Phi^\\top) L^{-1} P` with :math:`\\Phi`
    that lower triangle halved on its diagonal. From :data:`_BLOCKED_BACKWARD_SIZE` on, where
    the blocked factorization backward is faster, :math:`\\bar L` is formed and handed to
    :func:`_cholesky_backward`. A step costs about :math:`4.5 D^3` multiply-adds, in a few
    dozen matrix products and elementwise passes.
    """

    @staticmethod
    def forward(ctx, covariance: torch.Tensor, perms: torch.Tensor, weights: torch.Tensor):
        inverse_perms = torch.argsort(perms, dim=-1)
        flat, inverse_flat = _flat_indices(perms), _flat_indices(inverse_perms)
        permuted = _gather_symmetric(covariance, perms, symmetric=True, flat=flat)
        factor = cholesky(permuted, what=_COVARIANCE)  # (B, S, D, D)
        batch, num_perms, size, _ = factor.shape
        lower = factor.view(-1, size, size)
        log_total, weighted, saved = _weighted_factor(lower, weights)
        counts = torch.arange(size, 0, -1, device=weights.device, dtype=weights.dtype)
        constant = -0.5 * log_total - 0.5 * LOG_2PI * (weights @ counts)
        products = _lower_of_transposed_product(lower, weighted)
        products.diagonal(dim1=-2, dim2=-1).mul_(0.5)
        matrix = _mirror_lower_triangle(products)  # M
        merged = size < _BLOCKED_BACKWARD_SIZE
        kept = matrix.clone() if merged else None
        half = _solve_in_place(lower.mT, matrix.mT, upper=True)  # L^-T M
        precision_like = _solve_in_place(lower, half, upper=False, left=False)
        ctx.save_for_backward(perms)
        # Intermediates (not inputs or outputs) are kept on ctx.
        ctx.parts = lower, weighted, saved, kept if merged else precision_like
        ctx.indices = inverse_perms, flat, inverse_flat
        ctx.merged = merged
        total = _gather_symmetric(
            precision_like.view(batch, num_perms, size, size),
            inverse_perms,
            reduce=True,
            symmetric=True,
            flat=inverse_flat,
        )
        return constant.view(batch, num_perms), total / num_perms if num_perms > 1 else total

    @staticmethod
    def backward(ctx, grad_constant: torch.Tensor, grad_matrix: torch.Tensor):
        (perms,) = ctx.saved_tensors
        lower, weighted, saved, kept = ctx.parts
        inverse_perms, flat, inverse_flat = ctx.indices
        batch, num_perms, size = grad_constant.shape + lower.shape[-1:]
        if num_perms > 1:
            grad_matrix = grad_matrix / num_perms
        inner = _gather_symmetric(grad_matrix, perms, symmetric=True, flat=flat)
        inner = inner.view(-1, size, size)
        # W = L^-1 Bbar L^-T in place: two solves from the right in LAPACK's cheapest layouts.
        _solve_in_place(lower.mT, inner.mT, upper=True, left=False)  # L^-1 Bbar
        # L^-1 Bbar, kept only for the blocked backward.
        half = None if ctx.merged else inner.clone()
        _solve_in_place(lower.mT, inner, upper=True, left=False)  # W
        crossed = _lower_times_strictly_lower_part(lower, inner)  # Q
        rest = _add_weighted_factor_backward(  # R
            _lower_times_upper_part(weighted, inner),
            crossed,
            inner.diagonal(dim1=-2, dim2=-1)[:, None, :],
            0.5 * grad_constant.reshape(-1, 1, 1),
            lower,
            saved,
        )
        if ctx.merged:
            # tril(L^T R - M W), then the factorization's closed-form backward.
            phi = _lower_of_transposed_product_minus(lower, rest, kept, inner)
            grad = _symmetric_sandwich(lower, phi)
        else:
            # Lbar / 2 = R - L^-T M W = R - B (L^-1 Bbar)^T, then the blocked backward.
            assert half is not None
            rest.baddbmm_(kept, half.mT, alpha=-1.0)
            grad = _cholesky_backward(lower, rest).mul_(2.0)
        grad = grad.view(batch, num_perms, size, size)
        total = _gather_symmetric(grad, inverse_perms, True, symmetric=True, flat=inverse_flat)
        return total, None, None


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
    if num_vectors >= max(2, size // _QUADRATIC_FORM_SIZE_PER_VECTOR):
        constant, matrix = _PermutedQuadraticParts.apply(covariance, perms, weights)
        quadratic = _QuadraticForms.apply(matrix, residuals, scatter)
        return constant.mean(1)[:, None] - 0.5 * quadratic
    factor = _PermutedCholesky.apply(covariance, perms)  # (B, S, D, D)
    if perms.shape[0] == 1:
        permuted = residuals.index_select(-1, perms.reshape(-1))
        permuted = permuted.view(batch, num_vectors, num_perms, size).transpose(1, 2)
    else:
        full = (batch, num_perms, num_vectors, size)
        permuted = torch.gather(residuals[:, None].expand(full), 3, perms[:, :, None].expand(full))
    scores = _ResidualFormScore.apply(
        factor.reshape(batch * num_perms, size, size),
        permuted.reshape(batch * num_perms, num_vectors, size),
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
