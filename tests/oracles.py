"""Plain, obviously-correct references: one conditioning per mask, full enumeration of masks."""

import itertools
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def conditional_log_density(covariance, residual, hidden, visible):
    """log N(x_hidden | x_visible) for one hidden coordinate, by an explicit linear solve."""
    var = covariance[hidden, hidden]
    mean = torch.zeros((), dtype=covariance.dtype)
    if visible:
        cross = covariance[hidden, visible]
        gain = torch.linalg.solve(covariance[visible][:, visible], cross)
        mean = gain @ residual[visible]
        var = var - cross @ gain
    return -0.5 * (math.log(2 * math.pi) + var.log() + (residual[hidden] - mean) ** 2 / var)


def permutation_score(covariance, residual, perm, context_weights):
    """sum_k c_k sum_{j >= k} log p(x_{perm_j} | x_{perm_<k}), one conditioning per term."""
    size = len(perm)
    total = torch.zeros((), dtype=covariance.dtype)
    for k in range(size):
        visible = [int(i) for i in perm[:k]]
        for j in range(k, size):
            term = conditional_log_density(covariance, residual, int(perm[j]), visible)
            total = total + context_weights[k] * term
    return total


def expected_masked_score(covariance, residual, mask_size):
    """D * S(x; m): every mask of size m enumerated, one conditioning per hidden coordinate."""
    size = residual.shape[-1]
    masks = list(itertools.combinations(range(size), mask_size))
    total = torch.zeros((), dtype=covariance.dtype)
    for hidden_set in masks:
        visible = [i for i in range(size) if i not in hidden_set]
        for hidden in hidden_set:
            total = total + conditional_log_density(covariance, residual, hidden, visible)
    return size * total / (len(masks) * mask_size)


def random_spd(size, generator=None, jitter=0.3):
    factor = torch.randn(size, size, generator=generator)
    return factor @ factor.T + jitter * torch.eye(size)


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage any operation returns (views share their base's storage)."""

    def __init__(self):
        super().__init__()
        self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.largest_bytes = max(self.largest_bytes, tensor.untyped_storage().nbytes())
        return out
