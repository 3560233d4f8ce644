"""Nearest-neighbour search over a fixed set of training inputs.

Local contexts need two queries: the :math:`L` nearest other training points of every training
point (computed once per data set and cached) and the :math:`r` nearest training points of a
few arbitrary points (test inputs, or a training point whose context reaches past its cached
list). :class:`NeighborIndex` answers both with a well-kept library:

- ``"sklearn"`` (the default on CPU): scikit-learn's :class:`~sklearn.neighbors.NearestNeighbors`,
  which picks a KD-tree or a ball tree for the dimension; :math:`O(N \\log N)` to build and about
  :math:`O(\\log N + r)` per query in low dimension.
- ``"faiss"``: an exact flat L2 index of faiss (``pip install faiss-cpu``), if installed.
- ``"torch"`` (the default for CUDA inputs): exact, blocked squared distances and
  :func:`torch.topk` on the inputs' device, :math:`O(N)` per query with memory bounded by
  ``block_size`` query rows at a time.

Distances are Euclidean in input space. For a stationary kernel with ARD lengthscales, rescale
the inputs (or accept neighbours that are near in the raw metric); for a non-stationary kernel
"nearest" still means nearest in input space, which need not be the most correlated points.

Ties (duplicate inputs) have no meaningful order; they are rejected unless
``allow_duplicates=True``, which is safe with a noise term (the context's kernel block stays
positive definite) and breaks ties by the library's order.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["NeighborIndex", "check_count", "check_inputs"]

_BACKENDS = ("auto", "sklearn", "faiss", "torch")


def check_inputs(X: torch.Tensor, name: str = "X") -> torch.Tensor:
    """Validate training or test inputs and return them as a 2-D ``(N, d)`` tensor.

    :raises TypeError: if ``X`` is not a floating-point tensor.
    :raises ValueError: if ``X`` is not 1-D or 2-D, is empty or holds NaN/infinite entries.
    """
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(X).__name__}")
    if not X.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {X.dtype}")
    if X.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape (N,) or (N, d), got {tuple(X.shape)}")
    if X.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    X = X.unsqueeze(-1) if X.dim() == 1 else X
    if not torch.isfinite(X).all():
        bad = (~torch.isfinite(X)).any(-1).nonzero()[0, 0].item()
        raise ValueError(f"{name} contains NaN or infinite entries (first in row {bad})")
    return X


def check_count(value: Any, name: str) -> int:
    """Validate a positive integer argument ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


class NeighborIndex:
    """Exact Euclidean nearest neighbours among fixed training inputs ``X``.

    :param X: training inputs, shape ``(N,)`` or ``(N, d)``.
    :param backend: ``"auto"``, ``"sklearn"``, ``"faiss"`` or ``"torch"`` (see the module).
    :param allow_duplicates: accept repeated inputs (zero distances between distinct points).
    :param block_size: query rows per progress-bar step, and at most per block of the torch
        backend (whose blocks also hold at most about :math:`2^{26}` distances).
    :param show_progress: show a progress bar for long searches (``None``: when the search has
        more than 100 000 query rows).
    """

    def __init__(
        self,
        X: torch.Tensor,
        backend: str = "auto",
        allow_duplicates: bool = False,
        block_size: int = 8192,
        show_progress: Optional[bool] = None,
    ):
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        X = check_inputs(X, "X")
        self.block_size = check_count(block_size, "block_size")
        self.num_points, self.dim = X.shape
        self.allow_duplicates = bool(allow_duplicates)
        self.show_progress = show_progress
        if backend == "auto":
            backend = "torch" if X.device.type == "cuda" else "sklearn"
        self.backend = backend
        self._points = X.detach()
        self._key = self.key_of(X)
        self._lists: dict[int, np.ndarray] = {}
        if backend == "sklearn":
            from sklearn.neighbors import NearestNeighbors

            self._tree = NearestNeighbors(algorithm="auto").fit(self._numpy(X))
        elif backend == "faiss":
            try:
                import faiss
            except ImportError as error:
                raise ImportError(
                    "backend='faiss' needs the faiss package (pip install faiss-cpu)"
                ) from error
            self._faiss = faiss.IndexFlatL2(self.dim)
            self._faiss.add(self._numpy(X).astype(np.float32))

    @staticmethod
    def _numpy(X: torch.Tensor) -> np.ndarray:
        return X.detach().cpu().to(torch.float64).numpy()

    def _progress(self, num_rows: int, what: str):
        show = self.show_progress if self.show_progress is not None else num_rows > 100_000
        return tqdm(total=num_rows, desc=what, unit="pt", disable=not show, leave=False)

    def query(self, points: torch.Tensor, num_neighbors: int) -> np.ndarray:
        """Indices of the ``num_neighbors`` nearest training points of each row of ``points``.

        :param points: shape ``(M, d)`` (or ``(M,)`` for one input dimension).
        :returns: ``int64`` array of shape ``(M, num_neighbors)``, nearest first.
        :raises ValueError: if ``num_neighbors`` exceeds the number of training points, or the
            points hold NaN or have the wrong dimension.
        """
        num_neighbors = check_count(num_neighbors, "num_neighbors")
        if num_neighbors > self.num_points:
            raise ValueError(
                f"num_neighbors={num_neighbors} exceeds the {self.num_points} training points"
            )
        points = check_inputs(points, "points")
        if points.shape[-1] != self.dim:
            raise ValueError(
                f"points have {points.shape[-1]} input dimensions, the training inputs {self.dim}"
            )
        return self._query(points, num_neighbors)

    def _query(self, points: torch.Tensor, num_neighbors: int) -> np.ndarray:
        if self.backend == "sklearn":
            return self._tree.kneighbors(self._numpy(points), num_neighbors, False)
        if self.backend == "faiss":
            query = self._numpy(points).astype(np.float32)
            return self._faiss.search(query, num_neighbors)[1].astype(np.int64)
        train = self._points
        points = points.to(device=train.device, dtype=train.dtype)
        # ||a - b||^2 up to the query's own norm, which does not change the order.
        train_sq_norm = train.square().sum(-1)
        out = torch.empty(points.shape[0], num_neighbors, dtype=torch.int64)
        # A block of query rows holds rows x N distances: at most about 2^26 of them.
        rows = max(1, min(self.block_size, 2**26 // max(1, self.num_points)))
        for start in range(0, points.shape[0], rows):
            block = points[start : start + rows]
            distance = train_sq_norm - 2.0 * block @ train.T
            out[start : start + block.shape[0]] = distance.topk(
                num_neighbors, dim=-1, largest=False
            ).indices.cpu()
        return out.numpy()

    def neighbors_of_members(self, members: np.ndarray, num_neighbors: int) -> np.ndarray:
        """The ``num_neighbors`` nearest *other* training points of training points ``members``.

        :returns: ``int64`` array ``(len(members), num_neighbors)``, nearest first; a point is
            never its own neighbour, even when a duplicate of it comes first.
        """
        members = np.asarray(members, dtype=np.int64)
        if num_neighbors > self.num_points - 1:
            raise ValueError(
                f"num_neighbors={num_neighbors} exceeds the {self.num_points - 1} other "
                "training points"
            )
        found = self._query(self._points[torch.as_tensor(members)], num_neighbors + 1)
        is_self = found == members[:, None]
        # Drop the point itself where it was found, else the farthest (a duplicate took its
        # place at distance zero).
        keep = ~is_self
        keep[~is_self.any(-1), -1] = False
        return found[keep].reshape(len(members), num_neighbors)

    def neighbor_lists(self, num_neighbors: int) -> np.ndarray:
        """The ``num_neighbors`` nearest other points of every training point, cached.

        Cost: one query per training point, :math:`O(N (\\log N + L))` with the tree backends;
        memory :math:`N L` 32-bit integers.

        :raises ValueError: if two distinct training points coincide and duplicates are not
            allowed.
        """
        num_neighbors = check_count(num_neighbors, "num_neighbors")
        cached = self._lists.get(num_neighbors)
        if cached is not None:
            return cached
        lists = np.empty((self.num_points, num_neighbors), dtype=np.int32)
        with self._progress(self.num_points, "nearest neighbours") as bar:
            for start in range(0, self.num_points, self.block_size):
                members = np.arange(start, min(start + self.block_size, self.num_points))
                found = self.neighbors_of_members(members, num_neighbors)
                if not self.allow_duplicates:
                    self._check_no_duplicates(members, found[:, 0])
                lists[members] = found
                bar.update(len(members))
        self._lists[num_neighbors] = lists
        return lists

    def _check_no_duplicates(self, members: np.ndarray, nearest: np.ndarray) -> None:
        points = self._points
        gap = (points[torch.as_tensor(members)] - points[torch.as_tensor(nearest)]).abs()
        same = (gap.amax(-1) == 0).cpu().numpy()
        if same.any():
            first = int(np.flatnonzero(same)[0])
            raise ValueError(
                f"X has duplicate inputs: rows {members[first]} and {nearest[first]} coincide. "
                "Nearest-neighbour contexts need distinct inputs; pass allow_duplicates=True "
                "to accept them (ties are then broken arbitrarily; fine with a noise term)"
            )

    @property
    def points(self) -> torch.Tensor:
        """The training inputs, ``(N, d)``."""
        return self._points

    @staticmethod
    def key_of(X: torch.Tensor) -> tuple:
        """Identifies a tensor's contents cheaply: storage, shape, device and in-place version."""
        X = X.unsqueeze(-1) if X.dim() == 1 else X
        return (X.data_ptr(), tuple(X.shape), X.dtype, str(X.device), X._version)

    def matches(self, X: torch.Tensor) -> bool:
        """Whether ``X`` is the tensor this index was built on (not changed in place since)."""
        return self.key_of(X) == self._key

    def __repr__(self) -> str:
        return f"NeighborIndex(N={self.num_points}, d={self.dim}, backend={self.backend!r})"
