"""Masked scores of latent-variable models, by importance sampling or enumeration of the latent.

For an observation :math:`x \\in \\mathbb{R}^D` whose coordinates are independent given a local
latent :math:`z`, the masked predictive of a hidden coordinate is an integral,

.. math::

    p(x_j \\mid x_V) = \\frac{\\int p(x_j \\mid z) \\prod_{i \\in V} p(x_i \\mid z)\\, p(z)\\, dz}
                          {\\int \\prod_{i \\in V} p(x_i \\mid z)\\, p(z)\\, dz},

for a context (visible set) :math:`V`. With :math:`K` samples :math:`z_k \\sim q` and weights
:math:`\\omega_k = p(z_k) / (K\\, q(z_k))` (so that :math:`\\sum_k \\omega_k f(z_k)` estimates
:math:`\\int p(z) f(z)\\, dz` without bias), or the :math:`K` values of a discrete latent with
:math:`\\omega_k = p(z = k)` (exact), write :math:`\\ell_{kj} = \\log p(x_j \\mid z_k)` and
:math:`\\log \\omega_{kV} = \\log \\omega_k + \\sum_{i \\in V} \\ell_{ki}`. The predictive is
estimated by the self-normalised ratio

.. math::

    \\log \\hat p(x_j \\mid x_V) = \\operatorname{logsumexp}_k(\\log \\omega_{kV} + \\ell_{kj})
        - \\operatorname{logsumexp}_k(\\log \\omega_{kV}),

except for the empty context, whose normaliser :math:`\\int p(z)\\, dz = 1` is known and used
exactly (the second term is dropped). For a random permutation :math:`\\pi` the contexts
:math:`V_t = \\{\\pi_0, \\dots, \\pi_{t-1}\\}` are prefixes, so every context weight is a cumulative
sum of :math:`\\ell` along :math:`\\pi`, and the masked estimate

.. math::

    \\widehat{\\log p}(x) = \\sum_{t=0}^{D-1} c_t \\sum_{j \\ge t}
        \\log \\hat p(x_{\\pi_j} \\mid x_{\\pi_{<t}})

(with the schedule's context weights :math:`c_t = w_{D-t} / (D-t)`,
:meth:`~pyro_masked.masks.MaskSchedule.context_weights`) costs :math:`O(K D^2)` per data point
with no loop over masks: a cumulative sum for the weights of all :math:`D` contexts, and one
batched matrix product of the normalised weights with :math:`e^{\\ell_{kj} - \\max_k \\ell_{kj}}`
for the :math:`D \\times D` numerators (the rare entries where that sum would underflow are
recomputed by log-sum-exp). Permutations are drawn independently for every data point, so the
scores of a plate's points are independent given the samples. ``num_masks="all"`` replaces the
prefixes by every mask of every size (an oracle for small :math:`D`), with the context weights
from one matrix product.

**What the estimator is.** For an enumerated discrete latent the predictives are exact (only the
choice of masks is random). For sampled latents it is consistent as :math:`K \\to \\infty` but
biased for finite :math:`K`:

- each :math:`\\log \\hat p(x_j \\mid x_V)` is a log of a ratio of two unbiased estimates; by
  the delta method its bias is :math:`(\\mathrm{CV}_V^2 - \\mathrm{CV}_{V \\cup j}^2) / (2K) +
  O(K^{-2})`, where :math:`\\mathrm{CV}_V^2` is the squared coefficient of variation of the
  importance weight :math:`p(z)\\, p(x_V \\mid z) / q(z)` under :math:`q`. It is
  :math:`O(1/K)`, and usually negative (conditioning on more coordinates makes the weights more
  uneven), but its sign is not fixed for a single term;
- for the cumulative schedule the terms telescope: for fixed samples, the average over
  permutations (``num_masks="all"`` computes it) is exactly
  :math:`\\log \\sum_k \\omega_k\\, p(x \\mid z_k)`, the importance-weighted estimate of
  :math:`\\log p(x)` (Burda et al., 2016). By Jensen's inequality its expectation is a lower
  bound, :math:`\\mathbb{E}\\,\\widehat{\\log p}(x) \\le \\log p(x)`, with gap
  :math:`\\mathrm{Var}_q[w] / (2 K\\, p(x)^2) + O(K^{-2})`,
  :math:`w = p(x, z) / q(z)`: biased downward, by :math:`O(1/K)`.

The user's knobs are :math:`K` (bias and variance shrink as :math:`1/K`) and the proposal
:math:`q` (the prior, or a guide close to the posterior, which shrinks :math:`\\mathrm{Var}_q[w]`).

References:

- P. Moreno-Muñoz, P. Garcia Recasens, S. Hauberg, "On Masked Pre-training and the Marginal
  Likelihood", NeurIPS 2023.
- Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Union

import torch

from pyro_masked.conditionals.gaussian import MAX_ENUMERATED_MASKS, random_permutations

__all__ = [
    "enumerated_contexts",
    "importance_context_score",
    "latent_masked_score",
    "prefix_context_score",
]


def count_enumerated_contexts(size: int, size_weights: torch.Tensor) -> int:
    """How many contexts ``num_masks="all"`` enumerates: :math:`\\sum_m \\binom{D}{m}`."""
    sizes = (torch.nonzero(size_weights).flatten() + 1).tolist()
    return sum(math.comb(size, m) for m in sizes)


def enumerated_contexts(
    size_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every mask of every size with non-zero weight, as contexts with averaging weights.

    A mask of size :math:`m` contributes :math:`w_m S(x; m)`, the mean over its
    :math:`\\binom{D}{m}` masks of :math:`(w_m / m) \\sum_{j \\in M} \\log p(x_j \\mid x_{-M})`,
    so each context (the complement of a mask) has weight :math:`w_m / (m \\binom{D}{m})`.

    :param size_weights: :math:`w_m` for ``m = 1..D``, shape ``(D,)``.
    :returns: ``visible`` ``(P, D)`` (bool) and weights ``(P,)``.
    """
    size = size_weights.shape[-1]
    rows, weights = [], []
    for index in torch.nonzero(size_weights).flatten().tolist():
        mask_size = index + 1
        weight = size_weights[index] / (mask_size * math.comb(size, mask_size))
        for hidden in itertools.combinations(range(size), mask_size):
            row = [True] * size
            for j in hidden:
                row[j] = False
            rows.append(row)
            weights.append(weight)
    visible = torch.tensor(rows, dtype=torch.bool, device=size_weights.device)
    return visible, torch.stack(weights)


def importance_context_score(
    loglik: torch.Tensor,
    log_weights: torch.Tensor,
    visible: torch.Tensor,
    context_weights: torch.Tensor,
) -> torch.Tensor:
    """Per data point, :math:`\\sum_p \\gamma_p \\sum_{j \\notin V_p}
    \\log \\hat p(x_j \\mid x_{V_p})` for contexts shared by every data point.

    :param loglik: :math:`\\ell_{kbj} = \\log p(x_{bj} \\mid z_{kb})`, shape ``(K, B, D)``.
    :param log_weights: :math:`\\log \\omega_{kb}`, shape ``(K, B)``: weights whose sum
        :math:`\\sum_k \\omega_{kb} f(z_{kb})` estimates (or, enumerated, equals)
        :math:`\\int p(z) f(z)\\, dz`.
    :param visible: the contexts :math:`V_p`, bool, shape ``(P, D)``.
    :param context_weights: :math:`\\gamma_p`, shape ``(P,)``.
    :returns: shape ``(B,)``.

    Cost :math:`O(K B P D)` in two matrix products and :math:`O(B P D)` logarithms.
    """
    # log omega_{kbp}: the prior weights times the likelihood of each context (a matrix product).
    log_context_weights = log_weights[..., None] + loglik @ visible.to(loglik.dtype).T
    return _context_score(loglik, log_context_weights, ~visible, context_weights)


def prefix_context_score(
    permuted_loglik: torch.Tensor,
    log_weights: torch.Tensor,
    context_weights: torch.Tensor,
) -> torch.Tensor:
    """Per permuted vector, :math:`\\sum_t c_t \\sum_{j \\ge t}
    \\log \\hat p(x_{\\pi_j} \\mid x_{\\pi_{<t}})`: the contexts are the prefixes.

    :param permuted_loglik: :math:`\\ell_{k b \\pi_b(i)}`, shape ``(K, M, D)``: each vector's
        log-likelihoods in the order of its own permutation.
    :param log_weights: shape ``(K, M)``, as in :func:`importance_context_score`.
    :param context_weights: :math:`c_t` for ``t = 0..D-1``, shape ``(D,)``.
    :returns: shape ``(M,)``.

    The context weights are exclusive cumulative sums along the permuted coordinates,
    :math:`O(K M D)`, and the hidden set of context ``t`` is the suffix ``j >= t`` for every
    vector, so the final contraction is one matrix-vector product.
    """
    num_samples, num_vectors, size = permuted_loglik.shape
    context_sizes = torch.nonzero(context_weights).flatten()  # the t with c_t != 0
    prefix_sums = torch.cat(
        [permuted_loglik.new_zeros(num_samples, num_vectors, 1), permuted_loglik.cumsum(-1)], -1
    )
    if len(context_sizes) == size:  # every context size used: a slice, not a gather
        prefix_sums = prefix_sums[..., :size]
    else:
        prefix_sums = prefix_sums[..., context_sizes]
    log_context_weights = log_weights[..., None] + prefix_sums  # (K, M, T)
    coords = torch.arange(size, device=permuted_loglik.device)
    hidden = coords >= context_sizes[:, None]  # (T, D)
    return _context_score(
        permuted_loglik, log_context_weights, hidden, context_weights[context_sizes]
    )


def _context_score(loglik, log_context_weights, hidden, context_weights) -> torch.Tensor:
    """:math:`\\sum_p \\gamma_p \\sum_{j \\in H_p} \\log \\hat p_{pj}` from the context weights.

    ``loglik`` ``(K, B, D)``, ``log_context_weights`` ``(K, B, P)``, ``hidden`` ``(P, D)`` bool
    (the complement of each context), ``context_weights`` ``(P,)``. Returns ``(B,)``.
    """
    dtype = loglik.dtype
    log_norm = torch.logsumexp(log_context_weights, 0)  # (B, P)
    if not torch.isfinite(log_norm).all():
        raise ValueError(
            "every sample has zero weight for some context (its likelihood of the visible "
            "coordinates is zero for all samples): use more samples or a better proposal"
        )
    normalised = torch.exp(log_context_weights - log_norm)  # (K, B, P)
    # The empty context's normaliser is known to be one; other contexts are self-normalised.
    empty = hidden.all(-1)  # (P,)
    offset = torch.where(empty, log_norm, log_norm.new_zeros(()))  # (B, P)
    # exp(loglik - max_k loglik) lies in (0, 1]; the shift is exact, so it needs no gradient.
    shift = loglik.detach().amax(0)  # (B, D)
    shift = torch.where(torch.isfinite(shift), shift, shift.new_zeros(()))
    scaled = torch.exp(loglik - shift)  # (K, B, D)
    hidden_weights = context_weights[:, None] * hidden  # (P, D)
    weights_by_point = normalised.permute(1, 2, 0).contiguous()  # (B, P, K)
    scaled_by_point = scaled.transpose(0, 1).contiguous()  # (B, K, D)
    # Below this the sum has lost relative precision to subnormal terms: such entries are
    # recomputed by log-sum-exp (rare), after the blocked fast path reports its minimum.
    finfo = torch.finfo(dtype)
    threshold = finfo.tiny / finfo.eps
    blocks = _row_blocks(hidden_weights)
    log_mixture_sum, smallest = _LogMixtureContraction.apply(
        weights_by_point, scaled_by_point, hidden_weights, blocks
    )
    if smallest < threshold:
        mixture = weights_by_point @ scaled_by_point  # (B, P, D)
        log_mixture = _recompute_underflow(
            mixture, hidden, threshold, log_context_weights, log_norm, loglik, shift
        )
        log_mixture_sum = log_mixture.reshape(log_mixture.shape[0], -1) @ hidden_weights.reshape(-1)
    # sum_{p, j} gamma_p [j hidden in p] (log mixture_pj + shift_j + offset_p), with the shift
    # and offset terms summed in closed form.
    score = log_mixture_sum + shift @ hidden_weights.sum(0)
    return score + offset @ (context_weights * hidden.sum(-1))


# Contexts handled together by the blocked contraction: blocks skip the columns no context in
# them hides (for prefixes, j < t), about 40% of the D x D entries for four blocks.
_MIN_BLOCK_ROWS = 16
_NUM_BLOCKS = 4


def _row_blocks(hidden_weights: torch.Tensor) -> tuple[tuple[int, int, int], ...]:
    """``(first_row, end_row, first_column)`` of each row block of the weight matrix."""
    num_contexts = hidden_weights.shape[0]
    rows = max(_MIN_BLOCK_ROWS, -(-num_contexts // _NUM_BLOCKS))
    used = (hidden_weights != 0).cpu()
    blocks = []
    for start in range(0, num_contexts, rows):
        stop = min(num_contexts, start + rows)
        columns = torch.nonzero(used[start:stop].any(0)).flatten()
        first = int(columns[0]) if len(columns) else hidden_weights.shape[1]
        blocks.append((start, stop, first))
    return tuple(blocks)


class _LogMixtureContraction(torch.autograd.Function):
    """:math:`\\sum_{p,j} H_{pj} \\log \\sum_k A_{bpk} E_{bkj}` per ``b``, by row blocks.

    Inputs ``A`` ``(B, P, K)`` (normalised weights), ``E`` ``(B, K, D)`` (scaled likelihoods),
    ``H`` ``(P, D)`` and the row blocks. Returns the ``(B,)`` sums and the smallest mixture
    entry (not differentiable), so the caller can fall back where the sums underflow. The
    backward uses :math:`\\partial / \\partial M = H / M` directly, without the
    :math:`(B, P, D)` intermediates autograd would keep for the log and the contraction.
    """

    @staticmethod
    def forward(ctx, weights, scaled, hidden_weights, blocks):
        batch = weights.shape[0]
        total = weights.new_zeros(batch)
        smallest = weights.new_full((), math.inf)
        mixtures = []
        for start, stop, first in blocks:
            if first >= scaled.shape[-1]:
                mixtures.append(weights.new_empty(batch, stop - start, 0))
                continue
            mixture = torch.bmm(weights[:, start:stop], scaled[:, :, first:])
            mixtures.append(mixture)
            smallest = torch.minimum(smallest, mixture.amin())
            block_weights = hidden_weights[start:stop, first:].reshape(-1)
            total += mixture.log().reshape(batch, -1) @ block_weights
        ctx.blocks = blocks
        ctx.save_for_backward(weights, scaled, hidden_weights, *mixtures)
        ctx.mark_non_differentiable(smallest)
        return total, smallest

    @staticmethod
    def backward(ctx, grad_total, grad_smallest):
        weights, scaled, hidden_weights, *mixtures = ctx.saved_tensors
        grad_weights = torch.zeros_like(weights)
        grad_scaled = torch.zeros_like(scaled)
        for (start, stop, first), mixture in zip(ctx.blocks, mixtures):
            if mixture.shape[-1] == 0:
                continue
            grad_mixture = hidden_weights[start:stop, first:] / mixture
            grad_mixture = grad_mixture * grad_total[:, None, None]
            grad_weights[:, start:stop] = torch.bmm(grad_mixture, scaled[:, :, first:].mT)
            grad_scaled[:, :, first:] += torch.bmm(weights[:, start:stop].mT, grad_mixture)
        return grad_weights, grad_scaled, None, None


def _recompute_underflow(mixture, hidden, threshold, log_context_weights, log_norm, loglik, shift):
    """``log(mixture)`` with the hidden entries below ``threshold`` recomputed by log-sum-exp.

    Visible entries are clamped (their weight is zero); clamping keeps their gradient finite.
    """
    log_mixture = mixture.clamp_min(threshold).log()
    underflow = (mixture < threshold) & hidden
    if underflow.any():
        batch_index, context_index, coord_index = underflow.nonzero(as_tuple=True)
        exact = torch.logsumexp(
            log_context_weights[:, batch_index, context_index]
            - log_norm[batch_index, context_index]
            + loglik[:, batch_index, coord_index]
            - shift[batch_index, coord_index],
            0,
        )
        log_mixture = log_mixture.index_put((batch_index, context_index, coord_index), exact)
    return log_mixture


def latent_masked_score(
    loglik: torch.Tensor,
    log_weights: torch.Tensor,
    size_weights: torch.Tensor,
    num_masks: Union[int, str] = 1,
    perms: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Masked estimate :math:`\\sum_m w_m S(x; m)` of a latent-variable model, per data point.

    :param loglik: per-coordinate log-likelihoods :math:`\\log p(x_{bj} \\mid z_{kb})`, shape
        ``(K, B, D)``; ``-inf`` is allowed (a sample that cannot explain a coordinate), NaN and
        ``+inf`` are not.
    :param log_weights: log importance weights, shape ``(K, B)`` or broadcastable:
        :math:`\\log p(z_k) - \\log q(z_k) - \\log K` for samples from a proposal :math:`q`
        (:math:`-\\log K` from the prior), :math:`\\log p(z = k)` for an enumerated latent.
    :param size_weights: :math:`w_m` for ``m = 1..D``, shape ``(D,)``
        (:meth:`~pyro_masked.masks.MaskSchedule.size_weights`).
    :param num_masks: random permutations averaged (int >= 1), or ``"all"``: every mask of every
        size with non-zero weight (at most
        :data:`~pyro_masked.conditionals.gaussian.MAX_ENUMERATED_MASKS`).
    :param perms: optional permutations to use instead of drawing ``num_masks`` of them for
        each data point from torch's global generator: ``(S, D)`` (shared by every data point)
        or ``(B, S, D)``.
    :param generator: the :class:`torch.Generator` the permutations are drawn from (``None``:
        torch's global one).
    :returns: shape ``(B,)``.

    Random permutations are drawn independently for each data point, so the scores of
    different points are independent given the samples and their sum over a plate has the
    variance of a sum of independent terms.
    """
    if loglik.dim() != 3:
        raise ValueError(f"loglik must have shape (K, B, D), got {tuple(loglik.shape)}")
    num_samples, batch, size = loglik.shape
    if num_samples < 1 or size < 1:
        raise ValueError(
            f"loglik must have K >= 1 samples and D >= 1 coordinates, got {tuple(loglik.shape)}"
        )
    if torch.isnan(loglik).any() or (loglik == math.inf).any():
        raise ValueError("loglik has NaN or +inf entries")
    log_weights = log_weights.expand(num_samples, batch)
    if torch.isnan(log_weights).any() or (log_weights == math.inf).any():
        raise ValueError("log_weights has NaN or +inf entries")
    size_weights = size_weights.to(dtype=loglik.dtype, device=loglik.device)
    if size_weights.shape != (size,):
        raise ValueError(f"size_weights must have shape ({size},), got {tuple(size_weights.shape)}")
    if num_masks == "all" and perms is None:
        count = count_enumerated_contexts(size, size_weights)
        if count > MAX_ENUMERATED_MASKS:
            raise ValueError(
                f"num_masks='all' would enumerate {count} masks for an event of size {size}, "
                f"more than the limit of {MAX_ENUMERATED_MASKS}; use an int num_masks"
            )
        visible, weights = enumerated_contexts(size_weights)
        return importance_context_score(loglik, log_weights, visible, weights)
    if perms is None:
        perms = random_permutations(batch * num_masks, size, loglik.device, generator)
        perms = perms.reshape(batch, num_masks, size)
    elif perms.shape[-1] != size or not (perms.dim() == 2 or perms.shape[:1] == (batch,)):
        raise ValueError(
            f"perms must have shape (S, {size}) or ({batch}, S, {size}), got {tuple(perms.shape)}"
        )
    perms = perms.to(loglik.device).expand(batch, *perms.shape[-2:])
    num_perms = perms.shape[1]
    # Each (point, permutation) pair becomes one vector with its coordinates in permuted order.
    index = perms[None].expand(num_samples, batch, num_perms, size)
    permuted = loglik[:, :, None, :].expand(index.shape).gather(-1, index)
    permuted = permuted.reshape(num_samples, batch * num_perms, size)
    repeated_weights = log_weights[:, :, None].expand(num_samples, batch, num_perms)
    scores = prefix_context_score(
        permuted, repeated_weights.reshape(num_samples, -1), _context_weights(size_weights)
    )
    return scores.reshape(batch, num_perms).mean(-1)


def _context_weights(size_weights: torch.Tensor) -> torch.Tensor:
    """:math:`c_t = w_{D-t} / (D - t)` for ``t = 0..D-1``."""
    size = size_weights.shape[-1]
    sizes = torch.arange(size, 0, -1, dtype=size_weights.dtype, device=size_weights.device)
    return size_weights.flip(0) / sizes
