"""Search over LOPQ codes: an inverted multi-index walked by the multi-sequence algorithm.

Items live in cells (c0, c1), one per pair of coarse codes. A query visits cells in increasing
order of its coarse distance d0[c0] + d1[c1] (Babenko & Lempitsky, The Inverted Multi-Index,
CVPR 2012), collecting items until a result quota or a number of cells is reached. Candidates
are ranked by asymmetric distance: the query, projected into each visited cluster's local
frame, against the subquantizer centroids (one lookup table per cluster and half, shared by
every cell that uses it). That distance is exactly |q - decode(code)|^2 in the model's space.
Optionally the candidates are re-ranked by exact distance to their original vectors.
"""
from __future__ import annotations

import heapq
from typing import Callable, Iterator, NamedTuple

import numpy as np

from ferry.errors import InputError, InvalidParamsError
from ferry.stages.lopq.model import LOPQModel, as_vectors

#: Items retrieved when neither quota nor max_cells is given (the reference's default).
DEFAULT_QUOTA = 10


class SearchResult(NamedTuple):
    """Results ranked nearest first."""

    ids: np.ndarray            # item ids
    distances: np.ndarray      # squared distances: asymmetric (ADC), or exact when re-ranked
    coarse: np.ndarray         # (k, 2) coarse codes of the results
    fine: np.ndarray           # (k, M) fine codes of the results
    cells_visited: int         # non-empty cells whose items were retrieved
    candidates: int            # items retrieved and ranked


def multisequence(d0: np.ndarray, d1: np.ndarray) -> Iterator[tuple[float, int, int]]:
    """Yields (d0[a] + d1[b], a, b) for every cell (a, b), in increasing distance.

    A cell enters the heap only once both its predecessors in the two sorted orders have been
    output, so the heap stays small and no cell is pushed twice.
    """
    o0, o1 = np.argsort(d0, kind="stable"), np.argsort(d1, kind="stable")
    s0, s1 = d0[o0], d1[o1]
    n0, n1 = len(o0), len(o1)
    done = np.zeros((n0, n1), dtype=bool)
    heap = [(float(s0[0] + s1[0]), 0, 0)]
    while heap:
        d, i, j = heapq.heappop(heap)
        done[i, j] = True
        yield d, int(o0[i]), int(o1[j])
        if i + 1 < n0 and (j == 0 or done[i + 1, j - 1]):
            heapq.heappush(heap, (float(s0[i + 1] + s1[j]), i + 1, j))
        if j + 1 < n1 and (i == 0 or done[i - 1, j + 1]):
            heapq.heappush(heap, (float(s0[i] + s1[j + 1]), i, j + 1))


class LOPQSearcher:
    """An inverted multi-index of LOPQ codes for one model.

    >>> searcher = LOPQSearcher(model)                      # doctest: +SKIP
    >>> searcher.add(X)                                     # or add_codes(coarse, fine, ids)
    >>> result = searcher.search(q, quota=100)              # or max_cells=..., rerank=X
    """

    def __init__(self, model: LOPQModel):
        model._require_complete("search")
        self.model = model
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._index = None
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, X, ids=None) -> None:
        """Encodes vectors X and indexes them under ids (default: their insertion positions)."""
        coarse, fine = self.model.encode(X)
        self.add_codes(coarse, fine, ids)

    def add_codes(self, coarse, fine, ids=None) -> None:
        """Indexes items by their codes, e.g. codes computed on Spark by the lopq_encode stage."""
        coarse = np.asarray(coarse)
        fine = np.asarray(fine)
        n = coarse.shape[0] if coarse.ndim == 2 else -1
        self.model._check_coarse(coarse, n)
        S = self.model.num_subquantizers
        if fine.shape != (n, self.model.M) or not np.issubdtype(fine.dtype, np.integer):
            raise InputError(f"fine codes must be integers of shape ({n}, {self.model.M}), got {fine.dtype} {fine.shape}")
        if n and (fine.min() < 0 or fine.max() >= S):
            raise InputError(f"fine codes must lie in 0..{S - 1}, found {int(fine.min())}..{int(fine.max())}")
        ids = np.arange(self._count, self._count + n) if ids is None else np.asarray(ids)
        if ids.shape != (n,):
            raise InputError(f"ids must be one per item ({n}), got shape {ids.shape}")
        self._parts.append((coarse.astype(np.int32), fine.astype(np.uint8 if S <= 256 else np.int32), ids))
        self._count += n
        self._index = None

    def _built(self):
        # Items sorted by cell, with offsets: cell c holds rows start[c]:start[c + 1].
        if self._index is None:
            V = self.model.V
            if self._parts:
                coarse = np.concatenate([p[0] for p in self._parts])
                fine = np.concatenate([p[1] for p in self._parts])
                ids = np.concatenate([p[2] for p in self._parts])
            else:
                coarse = np.empty((0, 2), np.int32)
                fine = np.empty((0, self.model.M), np.uint8)
                ids = np.empty(0, np.int64)
            cell = coarse[:, 0].astype(np.int64) * V + coarse[:, 1]
            order = np.argsort(cell, kind="stable")
            start = np.concatenate(([0], np.cumsum(np.bincount(cell, minlength=V * V))))
            self._index = (start, coarse[order], fine[order], ids[order], order)
            self._parts = [(coarse, fine, ids)]
        return self._index

    def search(self, q, *, quota: int | None = None, max_cells: int | None = None, k: int | None = None,
               rerank: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None) -> SearchResult:
        """The indexed items nearest to query q, ranked.

        quota : stop once at least this many items are retrieved (whole cells are taken).
        max_cells : stop after this many non-empty cells. With both, whichever comes first;
            with neither, quota=10.
        k : return at most the k best (default: every candidate, as the reference does).
        rerank : the original vectors, as an array aligned with insertion order or a function
            from an array of ids to their vectors; candidates are then ranked by exact
            squared distance instead of the asymmetric one.
        """
        model = self.model
        if quota is None and max_cells is None:
            quota = DEFAULT_QUOTA
        for name, v in (("quota", quota), ("max_cells", max_cells), ("k", k)):
            if v is not None and (int(v) != v or v < 1):
                raise InvalidParamsError(f"{name} must be a positive integer, got {v!r}")
        q_in = as_vectors(q, model.input_dim, what="the query")
        if q_in.shape[0] != 1:
            raise InputError(f"search takes one query vector, got {q_in.shape[0]}; use search_batch for several")
        x = model.to_lopq_space(q_in)[0]
        half = model.D // 2
        start, coarse, fine, ids, positions = self._built()
        V = model.V
        d0 = ((x[:half] - model.Cs[0]) ** 2).sum(axis=1)
        d1 = ((x[half:] - model.Cs[1]) ** 2).sum(axis=1)
        ranges, got, visited = [], 0, 0
        for _, a, b in multisequence(d0, d1):
            c = a * V + b
            lo, hi = start[c], start[c + 1]
            if hi == lo:
                continue
            ranges.append((lo, hi))
            got += hi - lo
            visited += 1
            if (quota is not None and got >= quota) or (max_cells is not None and visited >= max_cells):
                break
        rows = (np.concatenate([np.arange(lo, hi) for lo, hi in ranges]) if ranges
                else np.empty(0, dtype=np.intp))
        cand_coarse, cand_fine = coarse[rows], fine[rows].astype(np.intp)
        if rerank is None:
            dist = self._adc(x, cand_coarse, cand_fine)
        else:
            dist = self._exact(q_in[0], rerank, ids[rows], positions[rows])
        order = np.argsort(dist, kind="stable")[:k]
        rows = rows[order]
        return SearchResult(ids[rows], dist[order], coarse[rows], fine[rows].astype(np.int32), visited, len(dist))

    def search_batch(self, Q, **kwargs) -> list[SearchResult]:
        Q = as_vectors(Q, self.model.input_dim, what="the queries")
        return [self.search(q, **kwargs) for q in Q]

    def _adc(self, x: np.ndarray, coarse: np.ndarray, fine: np.ndarray) -> np.ndarray:
        if coarse.shape[0] == 0:
            return np.empty(0)
        model = self.model
        half, mh = model.D // 2, model.M // 2
        dist = np.zeros(coarse.shape[0])
        cols = np.arange(mh)[None, :]
        for h in (0, 1):
            clusters, which = np.unique(coarse[:, h], return_inverse=True)
            tables = model.local_tables(x[h * half:(h + 1) * half], h, clusters)   # (k, M/2, S)
            dist += tables[which[:, None], cols, fine[:, h * mh:(h + 1) * mh]].sum(axis=1)
        return dist

    def _exact(self, q: np.ndarray, rerank, cand_ids: np.ndarray, cand_pos: np.ndarray) -> np.ndarray:
        if callable(rerank):
            vectors = as_vectors(rerank(cand_ids), self.model.input_dim, what="re-ranking vectors")
            if vectors.shape[0] != cand_ids.shape[0]:
                raise InputError(f"the re-ranking function returned {vectors.shape[0]} vectors for "
                                 f"{cand_ids.shape[0]} ids; return one vector per id, in order")
        else:
            data = np.asarray(rerank)
            if data.ndim != 2 or data.shape[0] != self._count:
                raise InputError(f"re-ranking vectors must be an array of one row per indexed item "
                                 f"({self._count}, in insertion order), got shape {data.shape}")
            vectors = as_vectors(data[cand_pos], self.model.input_dim, what="re-ranking vectors")
        return ((vectors - q) ** 2).sum(axis=1)
