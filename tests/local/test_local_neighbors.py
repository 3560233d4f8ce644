import numpy as np
import pytest
import torch

from pyro_masked.local import NeighborIndex


def brute_force_lists(X, num_neighbors):
    distance = torch.cdist(X, X)
    distance.fill_diagonal_(float("inf"))
    return distance.argsort(-1)[:, :num_neighbors].numpy()


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_neighbor_lists_match_brute_force(backend, dtype):
    X = torch.rand(300, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    index = NeighborIndex(X, backend=backend, block_size=64)
    lists = index.neighbor_lists(7)
    assert lists.shape == (300, 7)
    np.testing.assert_array_equal(lists, brute_force_lists(X.double(), 7))
    assert index.neighbor_lists(7) is lists  # cached
    queried = index.query(X[:5] + 0.01, 4)
    want = torch.cdist(X[:5].double() + 0.01, X.double()).argsort(-1)[:, :4].numpy()
    np.testing.assert_array_equal(queried, want)


def test_a_point_is_never_its_own_neighbor_even_among_duplicates():
    X = torch.tensor([[0.0], [0.0], [0.0], [1.0], [2.0]])
    with pytest.raises(ValueError, match="X has duplicate inputs: rows 0 and [12] coincide"):
        NeighborIndex(X).neighbor_lists(2)
    lists = NeighborIndex(X, allow_duplicates=True).neighbor_lists(2)
    for row, neighbors in enumerate(lists):
        assert row not in neighbors
    assert set(lists[0]) == {1, 2}


def test_bad_arguments_are_named():
    X = torch.rand(5, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        NeighborIndex(X, backend="annoy")
    with pytest.raises(ValueError, match="num_neighbors=5 exceeds the 4 other training points"):
        NeighborIndex(X).neighbor_lists(5)
    with pytest.raises(ValueError, match="points have 3 input dimensions, the training inputs 2"):
        NeighborIndex(X).query(torch.rand(2, 3), 1)
    with pytest.raises(ValueError, match="X must have shape \\(N,\\) or \\(N, d\\)"):
        NeighborIndex(torch.rand(2, 2, 2))
    with pytest.raises(TypeError, match="X must be a floating-point tensor"):
        NeighborIndex(torch.ones(3, 2, dtype=torch.int64))


def test_index_notices_inputs_changed_in_place():
    X = torch.rand(6, 2)
    index = NeighborIndex(X)
    assert index.matches(X)
    X.add_(1.0)
    assert not index.matches(X)
