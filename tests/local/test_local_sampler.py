import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from pyro_masked.local import ContextSampler, ContextSizeSampler, NeighborIndex, smallest_ranks
from pyro_masked.masks import FixedRate, SizeWeights


def exact_context_distribution(X, target, size, width):
    """Every k-subset of the other points enumerated: P(the c nearest members = context)."""
    others = [i for i in range(X.shape[0]) if i != target]
    distance = (X - X[target]).square().sum(-1)
    counts = Counter()
    subsets = list(itertools.combinations(others, size))
    for subset in subsets:
        nearest = sorted(subset, key=lambda i: distance[i].item())[:width]
        counts[tuple(nearest)] += 1
    return {context: count / len(subsets) for context, count in counts.items()}


def sampled_counts(sampler, target, size, num_draws, seed):
    rng = np.random.default_rng(seed)
    batch = sampler.sample(np.full(num_draws, target), np.full(num_draws, size), rng)
    assert batch.valid.sum(-1).eq(min(size, sampler.context_size)).all()
    rows = batch.context[:, : min(size, sampler.context_size)].tolist()
    return Counter(tuple(row) for row in rows)


def chi_square_pvalue(counts, probs, num_draws):
    assert set(counts) <= set(probs), "a context the exact distribution gives probability 0"
    keys = sorted(probs)
    observed = np.array([counts.get(key, 0) for key in keys], dtype=float)
    expected = np.array([probs[key] for key in keys]) * num_draws
    return chisquare(observed, expected).pvalue


@pytest.mark.parametrize(
    "brute_force_below, num_neighbors",
    [(0, 3), (0, 11), (1000, 3)],
    ids=["ranks-past-the-cached-list", "ranks-in-the-cached-list", "explicit-context"],
)
@pytest.mark.parametrize("size", [1, 4, 9])
def test_context_sampler_matches_enumeration_of_subsets(brute_force_below, num_neighbors, size):
    X = torch.rand(12, 2, generator=torch.Generator().manual_seed(3))
    index = NeighborIndex(X)
    sampler = ContextSampler(index, 2, num_neighbors, brute_force_below)
    probs = exact_context_distribution(X, target=5, size=size, width=2)
    counts = sampled_counts(sampler, 5, size, 6000, seed=size)
    assert chi_square_pvalue(counts, probs, 6000) > 1e-3


def test_context_sampler_chi_square_rejects_a_wrong_rank_distribution():
    """Negative control: ranks drawn among N (not N - 1) others give a detectably wrong law."""
    X = torch.rand(12, 2, generator=torch.Generator().manual_seed(3))
    sampler = ContextSampler(NeighborIndex(X), 2, 11, 0)
    target, size = 5, 4
    rng = np.random.default_rng(0)
    ranks, _ = smallest_ranks(np.full(6000, size), 2, 12, rng)
    lists = sampler.neighbor_lists()
    contexts = np.where(ranks <= 11, lists[target][np.clip(ranks, 1, 11) - 1], -1)
    counts = Counter(tuple(row) for row in contexts.tolist())
    probs = exact_context_distribution(X, target, size, 2)
    keys = set(counts) | set(probs)
    observed = np.array([counts.get(key, 0) for key in keys], dtype=float)
    expected = np.array([probs.get(key, 1e-9) for key in keys]) * 6000
    assert chisquare(observed, expected * observed.sum() / expected.sum()).pvalue < 1e-6


def test_smallest_rank_has_the_order_statistic_law_at_large_n():
    num_others, size = 10**6, 1000
    ranks, valid = smallest_ranks(np.full(20000, size), 3, num_others, np.random.default_rng(1))
    assert valid.all() and (np.diff(ranks, axis=1) > 0).all()
    # The smallest of a uniform k-subset of 1..M has mean (M + 1) / (k + 1); the gaps between
    # consecutive order statistics have the same law.
    expected = (num_others + 1) / (size + 1)
    gaps = np.diff(np.concatenate([np.zeros((20000, 1)), ranks], 1), axis=1)
    sd = expected / math.sqrt(20000)
    assert np.abs(gaps.mean(0) - expected).max() < 4 * sd


def test_smallest_ranks_of_a_full_subset_are_one_to_c():
    ranks, valid = smallest_ranks(np.array([9, 2, 0]), 3, 9, np.random.default_rng(0))
    assert ranks.tolist() == [[1, 2, 3], [ranks[1, 0], ranks[1, 1], 0], [0, 0, 0]]
    assert valid.tolist() == [[True] * 3, [True, True, False], [False] * 3]


@pytest.mark.parametrize("stratified", [True, False])
def test_context_sizes_follow_the_schedule(stratified):
    num_points = 7
    weights = torch.tensor([0.1, 0.0, 0.3, 0.2, 0.0, 0.25, 0.15])
    for mask, probs in [
        ("cumulative", np.full(7, 1 / 7)),
        (FixedRate(0.3), np.eye(7)[7 - 2]),
        (SizeWeights(weights), weights.flip(0).numpy()),
    ]:
        sampler = ContextSizeSampler(mask, num_points)
        rng = np.random.default_rng(0)
        sizes = np.concatenate([sampler.draw(50, rng, stratified) for _ in range(200)])
        frequencies = np.bincount(sizes, minlength=num_points) / len(sizes)
        assert np.abs(frequencies - probs).max() < 0.01
        assert (frequencies[probs == 0] == 0).all()


def test_stratified_sizes_cover_every_stratum_once():
    sizes = ContextSizeSampler("cumulative", 1000).draw(100, np.random.default_rng(0))
    assert (sizes // 10 == np.arange(100)).all()
