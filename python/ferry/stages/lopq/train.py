"""LOPQ training, every pass over the data a chunk / combine / aggregate reduction.

A pass is three pure functions (the expression-chunking split, as dask's reduction triads):

    chunk(X, state) -> partial          what to do on one chunk of raw vectors
    combine(a, b) -> partial            merges two partials; associative, so trees work
    aggregate(partial, state) -> state  the next training state, once all chunks are in

``state`` is a :class:`TrainState` (the config and whatever is trained so far), small enough to
ship to every executor. The partials are explicit dataclasses holding only sums, counts and
moments, so any chunking and any combine tree give the same result up to float rounding; on
Spark they travel as npz bytes (:func:`partial_to_bytes`) through tree aggregation. One thing
does depend on the chunking: a Lloyd step's assignment takes the float32 winner where two
centroids are within float32 rounding of each other (assign()), and which of the two wins can
change with where a row falls in a chunk. A few rows in a thousand are that close; once one
moves, later steps follow slightly different paths. Models trained with other chunkings (or on
Spark) are then equally good but not equal: on the 50,000 x 128 mixture, chunks of 16,384 vs
5,000 rows gave identical coarse centroids, subquantizers differing by up to 0.2 and
reconstruction errors 95.798 vs 95.797.

The passes, in order:

    pca          moments (count, mean, centred scatter)   -> PCA, variance balanced over halves
    coarse_init  a hash-keyed sample of PCA'd vectors      -> k-means++ centroids for each half
    coarse_step  per-cluster counts and sums, both halves  -> one Lloyd step (x coarse_iters)
    rotations    per-cluster residual moments              -> local rotations R and means mu
    sub_init     a hash-keyed sample of raw rows           -> their local residuals; k-means++ for each
                                                              subquantizer, then sample_iters steps on the
                                                              sample, the last rotation_iters of them as
                                                              sub_rotation_step's
    sub_step     per-cluster counts and sums, M problems   -> one Lloyd step
    sub_rotation_step  the same, and per-cluster cross moments of residuals and their codes
                                                           -> one Lloyd step and new rotations R
                 (the last rotation_iters of the sub_iters subquantizer steps)

:func:`fit` runs them in-process over chunks of an array.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import math
import time
import warnings
import zipfile
from typing import Any, Callable, Sequence

import numpy as np
import scipy.sparse

from ferry.errors import InputError, InvalidParamsError
from ferry.stages.lopq.model import PCA, Centroids, LOPQModel, _f32, as_vectors, check_config, nearest

log = logging.getLogger("ferry.lopq")

#: Rows per chunk when fit() splits an in-memory array.
DEFAULT_CHUNK_ROWS = 16384
#: Points kept for k-means++ initialisation, per cluster to find. The subquantizers' first
#: sample_iters steps run on this sample too. 24 rather than 32: on the 50,000 x 128 mixture
#: (V=16, M=8, means of seeds 0..2, measured side by side when the constant was chosen; not a
#: committed benchmark) training took 1.72 s instead of 1.86 s for reconstruction error 97.5
#: instead of 97.3; 16 gave 1.60 s and 97.9. benchmarks/results/lopq_iterations.md has the
#: defaults at 24 (1.79 s, 97.5). At V=64 it costs more (benchmarks/lopq/run.py: 67.6 instead of
#: 66.7): fewer sample rows per coarse cluster for the rotation steps on the sample.
INIT_SAMPLE_PER_CLUSTER = 24
#: Farthest points each k-means partial keeps, to re-seed clusters that end up empty.
FAR_POINTS = 16


class LOPQTrainingWarning(UserWarning):
    """Training went on with a fallback (as the reference does), which may cost quality."""


# --- configuration and state ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train. D is the dimension LOPQ quantizes (after PCA); D_in the input's."""

    D_in: int
    V: int
    M: int
    subquantizer_clusters: int = 256
    pca: bool = True
    pca_dim: int | None = None
    seed: int = 0
    coarse_iters: int = 10
    # The schedule of the subquantizer steps (see fit()): 8 on the k-means++ sample, then 4 over
    # the data; the last 4 of each also refine the rotations.
    sub_iters: int = 4
    rotation_iters: int = 4
    sample_iters: int = 8
    tol: float = 1e-4
    init_sample: int | None = None

    @property
    def D(self) -> int:
        return self.D_in if not self.pca or self.pca_dim is None else self.pca_dim

    def check(self) -> None:
        if self.pca and self.pca_dim is not None and not 2 <= self.pca_dim <= self.D_in:
            raise InvalidParamsError(
                f"pca_dim must lie in 2..{self.D_in} (the input dimension), got {self.pca_dim}"
            )
        check_config(self.D, self.V, self.M, self.subquantizer_clusters, what="LOPQ training")
        if min(self.coarse_iters, self.sub_iters, self.rotation_iters, self.sample_iters) < 0:
            raise InvalidParamsError(f"iteration counts must be >= 0, got coarse_iters={self.coarse_iters}, "
                                     f"sub_iters={self.sub_iters}, rotation_iters={self.rotation_iters}, "
                                     f"sample_iters={self.sample_iters}")


@dataclasses.dataclass
class TrainState:
    """The config and the parameters trained so far; None for a step not reached yet."""

    config: TrainConfig
    pca: PCA | None = None
    Cs: np.ndarray | None = None
    Rs: np.ndarray | None = None
    mus: np.ndarray | None = None
    subs: np.ndarray | None = None
    #: The last Lloyd step's inertia (sum of squared distances), for the convergence test.
    inertia: float | None = None
    previous_inertia: float | None = None

    def lopq_space(self, X: np.ndarray) -> np.ndarray:
        """Raw checked vectors -> the space LOPQ quantizes."""
        return X if self.pca is None else self.pca.apply(X)

    def model(self) -> LOPQModel:
        if self.Cs is None:
            raise InvalidParamsError("no coarse centroids trained yet: run the coarse passes first")
        return LOPQModel(self.Cs, self.Rs, self.mus, self.subs, M=self.config.M, pca=self.pca)

    def converged(self) -> bool:
        if self.inertia is None or self.previous_inertia is None:
            return False
        return self.previous_inertia - self.inertia <= self.config.tol * max(self.inertia, 1e-300)


# --- pass: PCA moments -------------------------------------------------------------------------------

@dataclasses.dataclass
class Moments:
    """Count, mean and centred scatter sum((x - mean)(x - mean)^T) of a set of vectors."""

    n: int
    mean: np.ndarray
    scatter: np.ndarray


def moments_chunk(X: np.ndarray) -> Moments:
    n = X.shape[0]
    if n == 0:
        return Moments(0, np.zeros(X.shape[1]), np.zeros((X.shape[1], X.shape[1])))
    mean = X.mean(axis=0)
    Xc = X - mean
    return Moments(n, mean, Xc.T @ Xc)


def moments_combine(a: Moments, b: Moments) -> Moments:
    # Chan et al.'s pairwise update: exact algebra, and stable where raw sums of squares are not.
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    n = a.n + b.n
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.n / n)
    scatter = a.scatter + b.scatter + np.outer(delta, delta) * (a.n * b.n / n)
    return Moments(n, mean, scatter)


def covariance(m: Moments) -> np.ndarray:
    if m.n < 2:
        raise InputError(f"a covariance needs at least 2 vectors, got {m.n}")
    return m.scatter / (m.n - 1)


def pca_chunk(X: np.ndarray, state: TrainState, prepared=None) -> Moments:
    return moments_chunk(X)


def pca_aggregate(m: Moments, state: TrainState) -> TrainState:
    eigenvalues, eigenvectors = eigen(m)
    return dataclasses.replace(state, pca=prepare_pca(m.mean, eigenvalues, eigenvectors, state.config.D))


def eigen(m: Moments) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors (columns) of the covariance of the moments."""
    cov = covariance(m)
    return np.linalg.eigh((cov + cov.T) / 2)


def prepare_pca(mean: np.ndarray, eigenvalues: np.ndarray, eigenvectors: np.ndarray, D: int) -> PCA:
    """The top D principal axes, ordered so that the two halves carry balanced variance."""
    if D % 2 or not 2 <= D <= eigenvalues.size:
        raise InvalidParamsError(f"the PCA dimension D must be even and lie in 2..{eigenvalues.size} "
                                 f"(the input dimension), got {D}")
    top = np.argsort(eigenvalues, kind="stable")[::-1][:D]
    # Balance variance across the two halves: each half gets principal axes whose variances
    # have about the same product, so both coarse quantizers see equally informative data.
    perm = eigenvalue_allocation(2, eigenvalues[top])
    return PCA(mean, eigenvectors[:, top[perm]])


def eigenvalue_allocation(num_buckets: int, eigenvalues: np.ndarray) -> np.ndarray:
    """Order of dimensions that gives each of num_buckets equal-size buckets about the same
    product of eigenvalues (Ge et al., Optimized Product Quantization, CVPR 2013, sec. 3.2.4).

    Greedy: dimensions in decreasing eigenvalue go to the non-full bucket whose log-product is
    smallest. The eigenvalues are first scaled so the smallest positive one is 1, so that no
    log is negative (values below 1 would make an empty bucket look fullest, as the reference
    notes); zero or negative ones count as that smallest.
    """
    ev = np.asarray(eigenvalues, dtype=np.float64)
    D = ev.size
    if D % num_buckets:
        raise InvalidParamsError(f"{D} dimensions do not split into {num_buckets} equal buckets")
    per = D // num_buckets
    positive = ev[ev > 0]
    floor = positive.min() if positive.size else 1.0
    logs = np.log2(np.maximum(ev, floor) / floor)
    product = np.zeros(num_buckets)
    size = np.zeros(num_buckets, dtype=np.intp)
    buckets = np.zeros((num_buckets, per), dtype=np.intp)
    for i in np.argsort(ev, kind="stable")[::-1]:
        open_ = np.flatnonzero(size < per)
        b = open_[np.argmin(product[open_])]
        product[b] += logs[i]
        buckets[b, size[b]] = i
        size[b] += 1
    return buckets.ravel()


# --- passes: hash-keyed samples for k-means++ ---------------------------------------------------------

@dataclasses.dataclass
class Sample:
    """The rows with the smallest keys seen; keys hash the raw row, so any chunking agrees."""

    size: int
    keys: np.ndarray
    rows: np.ndarray


def row_keys(X: np.ndarray, seed: int) -> np.ndarray:
    """A 64-bit key per row from its float64 bits and the seed.

    The row's 64-bit words, each times its column's odd constant, summed modulo 2^64, then the
    seed added and splitmix64's finalizer applied: two passes over the data in numpy instead of
    a mixing round per column (12,500 x 128: 11.8 -> 1.6 ms).
    """
    bits = np.ascontiguousarray(X, dtype=np.float64).view(np.uint64)
    n, dim = bits.shape
    mult = _column_multipliers(dim)
    h = np.empty(n, dtype=np.uint64)
    for a in range(0, n, _KEY_BLOCK_ROWS):     # blocks: the products stay in cache
        np.sum(bits[a:a + _KEY_BLOCK_ROWS] * mult, axis=1, dtype=np.uint64, out=h[a:a + _KEY_BLOCK_ROWS])
    h += np.uint64((_GOLDEN * (seed + 1)) & _MASK64)
    return _mix64(h)


_GOLDEN, _MASK64 = 0x9E3779B97F4A7C15, 0xFFFFFFFFFFFFFFFF
_KEY_BLOCK_ROWS = 1024


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place on uint64 values."""
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


@functools.lru_cache(maxsize=None)
def _column_multipliers(dim: int) -> np.ndarray:
    """Odd 64-bit constants, one per column: splitmix64 of 1..dim, lowest bit set."""
    m = _mix64(np.arange(1, dim + 1, dtype=np.uint64) * np.uint64(_GOLDEN)) | np.uint64(1)
    m.flags.writeable = False
    return m


def sample_keep(keys: np.ndarray, rows: np.ndarray, size: int) -> Sample:
    if keys.size > size:
        keep = np.argpartition(keys, size - 1)[:size]
        keys, rows = keys[keep], rows[keep]
    order = np.argsort(keys, kind="stable")
    return Sample(size, keys[order], rows[order])


def sample_combine(a: Sample, b: Sample) -> Sample:
    return sample_keep(np.concatenate((a.keys, b.keys)), np.concatenate((a.rows, b.rows)), a.size)


def _init_size(cfg: TrainConfig, clusters: int) -> int:
    return cfg.init_sample or max(INIT_SAMPLE_PER_CLUSTER * clusters, 1024)


def coarse_init_chunk(X: np.ndarray, state: TrainState, halves: LloydSets | None = None) -> Sample:
    cfg = state.config
    Y = state.lopq_space(X) if halves is None else np.concatenate(halves.X, axis=1)
    return sample_keep(row_keys(X, cfg.seed), Y, _init_size(cfg, cfg.V))


def coarse_init_aggregate(s: Sample, state: TrainState) -> TrainState:
    cfg = state.config
    _require_points(s.rows.shape[0], cfg.V, "coarse clusters per half (V)")
    Cs = kmeans_plus_plus(_split(s.rows, 2), cfg.V, [_rng(cfg.seed, "coarse", h) for h in (0, 1)])
    return dataclasses.replace(state, Cs=Cs, inertia=None, previous_inertia=None)


def sub_init_chunk(X: np.ndarray, state: TrainState, prepared=None) -> Sample:
    # The sample keeps raw rows; the aggregate projects only those. Projecting every row here
    # (0.16 s of 50,000 x 128) was wasted whenever no plain sub_step follows to reuse it.
    cfg = state.config
    return sample_keep(row_keys(X, cfg.seed + 1), X, _init_size(cfg, cfg.subquantizer_clusters))


def sub_init_aggregate(s: Sample, state: TrainState) -> TrainState:
    cfg = state.config
    S = cfg.subquantizer_clusters
    _require_points(s.rows.shape[0], S, "subquantizer clusters")
    sample = LloydSets(_split(local_residuals(s.rows, state), cfg.M))
    subs = kmeans_plus_plus(sample.X, S, [_rng(cfg.seed, "sub", m) for m in range(cfg.M)])
    # The first steps move the parameters most and can run on the k-means++ sample, already here:
    # each costs a fraction of a step over the data, and no pass (no job on Spark). As over the
    # data, the last rotation_iters of them also refine the rotations, by the same chunk and
    # aggregate as a sub_rotation_step pass, with the sample as its one chunk.
    refine = min(cfg.rotation_iters, cfg.sample_iters)
    for _ in range(cfg.sample_iters - refine):
        parts, _ = kmeans_chunks(sample, subs)
        subs = kmeans_aggregates(parts, subs)
    state = dataclasses.replace(state, subs=subs)
    if refine:
        frames = local_frames(s.rows, state)
        for _ in range(refine):
            state = sub_rotation_step_aggregate(sub_rotation_step_chunk(s.rows, state, frames), state)
    return dataclasses.replace(state, inertia=None, previous_inertia=None)


def _require_points(n: int, k: int, what: str) -> None:
    if n < k:
        raise InputError(
            f"training needs at least as many points as {what}: found {n} point(s) for {k} clusters; "
            f"give more training data or ask for fewer clusters"
        )


def _rng(seed: int, *names) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF] + [hash_name(n) for n in names])


def hash_name(n) -> int:
    return int(n) if isinstance(n, (int, np.integer)) else sum(ord(c) << (8 * (i % 4)) for i, c in enumerate(n))


def kmeans_plus_plus(Xs: np.ndarray, k: int, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii), greedy with 2 + log k trials per centre, as
    scikit-learn does: each new centre is the candidate that most lowers the potential.

    Xs is a stack (B, n, d) of independent sets, each seeded from its own generator: the B
    seedings run in lockstep, one numpy call per step for all of them, because with a few
    thousand points a step costs less than numpy's per-call overhead (8 subquantizers took
    0.47 s one by one, 0.37 s together). Each set's centres are what seeding it alone gives.

    The distances that weigh the sampling are float32 (from data centred on its mean, so that
    no offset eats their digits): a matmul of a few candidate rows against every point runs at
    memory speed, and float32 halves the memory. The centres are rows of X, in float64.
    """
    B, n, dim = Xs.shape
    for X in Xs:
        _require_distinct(X, k)
    trials = 2 + int(math.log(k))
    sets = np.arange(B)
    centers = np.empty((B, k, dim))
    Xc = Xs - Xs.mean(axis=1, keepdims=True)
    sq = np.einsum("bij,bij->bi", Xc, Xc)
    # Squared distances from candidates to every point in one matmul: [c, |c|^2, 1] . [-2x, 1, |x|^2].
    left = np.empty((B, n, dim + 2), dtype=np.float32)
    left[..., :dim], left[..., dim], left[..., dim + 1] = Xc, sq, 1.0
    right = np.empty((B, dim + 2, n), dtype=np.float32)
    right[:, :dim], right[:, dim], right[:, dim + 1] = -2.0 * Xc.transpose(0, 2, 1), 1.0, sq
    # What float32 cannot resolve: each distance is off by up to a few ulps of |c|^2 + |x|^2. A
    # potential below that is rounding noise, which would pick copies of centres already chosen.
    noise = 4 * np.finfo(np.float32).eps * (sq.sum(axis=1) + n * sq.max(axis=1))
    first = np.array([rng.integers(n) for rng in rngs])
    centers[:, 0] = Xs[sets, first]
    # Each point's squared distance to its closest centre, zero-padded to whole blocks (see _draw).
    nb = -(-n // _KPP_BLOCK)
    closest = np.zeros((B, nb * _KPP_BLOCK), dtype=np.float32)
    closest[:, :n] = np.maximum(np.matmul(left[sets, first][:, None, :], right)[:, 0], np.float32(0))
    blocks = closest.reshape(B, nb, _KPP_BLOCK)
    for c in range(1, k):
        cand, potential = _draw(blocks, np.array([rng.random(trials) for rng in rngs]))
        for b in np.flatnonzero(~(potential > noise)):
            # Every point sits on a centre already, as far as float32 tells: take a point not chosen yet.
            taken = (((Xs[b, :, None, :] - centers[b, None, :c, :]) ** 2).sum(-1) == 0).any(1)
            cand[b] = rngs[b].choice(np.flatnonzero(~taken))
        np.minimum(cand, n - 1, out=cand)
        d = np.matmul(left[sets[:, None], cand], right)
        np.minimum(d, closest[:, None, :n], out=d)
        # Rounding can leave a point's distance to itself slightly below 0: clamped in the row kept.
        # The candidates' potentials are summed in float32 (pairwise, to ~1e-7): a closer race
        # is a tie either way, and float64 sums of the float32 distances cost twice as much.
        best = d.sum(axis=2).argmin(axis=1)
        chosen = cand[sets, best]
        centers[:, c] = Xs[sets, chosen]
        np.maximum(d[sets, best], np.float32(0), out=closest[:, :n])
    return centers


#: Points per block of k-means++'s two-level sampling (see _draw).
_KPP_BLOCK = 64


def _draw(blocks: np.ndarray, uniform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each set b of blocks (B, nb, _KPP_BLOCK) of non-negative weights, the points drawn by
    uniform[b] (values in [0, 1)) with probability proportional to their weight, as indices into
    the flattened blocks, and each set's total weight.

    The point of draw u is the first whose running sum exceeds u * total (np.searchsorted on the
    running sums, side "right"). It is found in two levels, a block by the blocks' running sums,
    then a point by the running sums within that block: no running sum over all the points,
    a sequential scan that cost k-means++ as much per step as the rest of its sampling.
    """
    B, nb, size = blocks.shape
    sets = np.arange(B)[:, None]
    sums = blocks.sum(axis=2).astype(np.float64)
    cum = np.cumsum(sums, axis=1)
    draws = uniform * cum[:, -1:]
    blk = np.minimum((cum[:, :, None] <= draws[:, None, :]).sum(axis=1), nb - 1)
    inner = np.cumsum(blocks[sets, blk], axis=2, dtype=np.float64)
    left_over = draws - (cum[sets, blk] - sums[sets, blk])
    return blk * size + (inner <= left_over[:, :, None]).sum(axis=2), cum[:, -1]


def _require_distinct(X: np.ndarray, k: int) -> None:
    """Raises unless X holds at least k distinct rows. Rows with distinct hash keys differ, so
    the exact (sorting) count runs only when the keys alone do not show k distinct rows."""
    n = X.shape[0]
    if np.unique(row_keys(X, 0)).size >= k:
        return
    distinct = np.unique(X, axis=0).shape[0]
    if distinct < k:
        raise InputError(
            f"k-means needs at least {k} distinct points for {k} clusters, found {distinct} among {n}; "
            "give more (or more varied) training data or ask for fewer clusters"
        )


# --- passes: Lloyd steps ---------------------------------------------------------------------------------

@dataclasses.dataclass
class KMeansPartial:
    """Per-cluster counts and sums, the inertia, and the farthest points (for empty clusters)."""

    counts: np.ndarray
    sums: np.ndarray
    inertia: float
    far_dists: np.ndarray
    far_rows: np.ndarray


#: Rows per block of assign(): the (rows x k) float32 distances stay in cache.
_ASSIGN_BLOCK_ROWS = 2048
#: Squared norms and coordinates above these overflow float32 distances: assign() then takes nearest()'s path.
_F32_SAFE = 1e30
_F32_SAFE_COORD = 1e15


def kmeans_chunk(X: np.ndarray, centroids) -> KMeansPartial:
    return kmeans_chunks(np.asarray(X)[None], [centroids])[0][0]


def assign(X: np.ndarray, cents: Centroids, work: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The nearest centroid of every row and its squared distance, for a Lloyd step.

    One float32 matmul per block of rows, |c|^2 - 2 x.c, as nearest() starts, but from data and
    centroids shifted by the data's mean (``work``: the float32 rows [x - shift, 1] and the
    shift, from LloydSets, made once for all the steps over the same rows): distances do not
    change, and an offset common to all points (raw features far from 0) no longer eats
    float32's digits. Unlike nearest() it keeps the float32 winner where two centroids are
    within rounding of each other: a Lloyd step needs a nearest centroid, and either of two tied
    ones lowers the inertia alike. The encoder's codes still come from nearest(), which settles
    such ties in float64. Skipping that check, and computing the distances within the same
    cache-sized block, made a training run about 16% faster.
    """
    n, dim = X.shape
    k = cents.C.shape[0]
    if n == 0 or k == 1:
        return _assign_exact(X, cents)
    Xa, shift = _shifted32(X[None])[0] if work is None else work
    C = cents.C - shift
    sq_c = np.einsum("ij,ij->i", C, C)
    if Xa is None or not sq_c.max() < _F32_SAFE:
        # Squares this large overflow float32: nearest() copes.
        return _assign_exact(X, cents)
    aug = np.vstack([-2.0 * C.T, sq_c[None, :]]).astype(np.float32)
    labels = np.empty(n, dtype=np.intp)
    dists = np.empty(n)
    rows = min(_ASSIGN_BLOCK_ROWS, n)
    d = np.empty((rows, k), dtype=np.float32)
    for a in range(0, n, rows):
        m = min(rows, n - a)
        np.matmul(Xa[a:a + m], aug, out=d[:m])
        lab = d[:m].argmin(axis=1)
        labels[a:a + m] = lab
        # The distance itself in float64 from the differences: a row's value then does not
        # depend on where the chunking put it (float32 matmul results may), nor do the sums.
        diff = X[a:a + m] - cents.C[lab]
        np.einsum("ij,ij->i", diff, diff, out=dists[a:a + m])
    return labels, dists


class LloydSets:
    """A stack of B sets of rows (B, n, d) that several k-means steps read, set b against its
    own centroids (the two halves, the M subvectors).

    The steps' float32 working copy, [x - shift, 1] per row with shift its set's mean, is made
    once, on first use, in one vectorized pass, instead of block by block in every step.
    """

    __slots__ = ("X", "_work")

    def __init__(self, X: np.ndarray, work: list | None = None):
        self.X = np.ascontiguousarray(X, dtype=np.float64)
        self._work = work

    def work(self) -> list[tuple[np.ndarray | None, np.ndarray]]:
        if self._work is None:
            self._work = _shifted32(self.X)
        return self._work


def _shifted32(Xs: np.ndarray) -> list[tuple[np.ndarray | None, np.ndarray]]:
    """Per set of the stack: (float32 rows [x - mean, 1], or None when a coordinate is too large
    for float32 squares or not finite, and the mean)."""
    B, n, d = Xs.shape
    shift = Xs.mean(axis=1) if n else np.zeros((B, d))
    out = []
    for b in range(B):
        diff = Xs[b] - shift[b]     # one set at a time: a float64 copy of one set, not of the stack
        if not (n and np.abs(diff).max() < _F32_SAFE_COORD):
            out.append((None, shift[b]))
            continue
        Xa = np.empty((n, d + 1), dtype=np.float32)
        Xa[:, :d] = diff
        Xa[:, d] = 1.0
        out.append((Xa, shift[b]))
    return out


def _assign_exact(X: np.ndarray, cents: Centroids) -> tuple[np.ndarray, np.ndarray]:
    labels = nearest(X, cents)
    diff = X - cents.C[labels]
    return labels, np.einsum("ij,ij->i", diff, diff)


def cluster_sums(X: np.ndarray, labels: np.ndarray, k: int, per_row: int = 1) -> np.ndarray:
    """Per-cluster sums of the rows of X: a sparse one-hot (k x n) matrix times X, one pass in C.

    Built column-compressed, as the labels already are (column j holds a 1 in row labels[j]).
    With per_row = p, every row belongs to p clusters: labels[p*j:p*(j+1)] are row j's.
    """
    n = X.shape[0]
    if n == 0:
        return np.zeros((k, X.shape[1]))
    onehot = scipy.sparse.csc_matrix((np.ones(n * per_row), labels, np.arange(0, n * per_row + 1, per_row)),
                                     shape=(k, n))
    return np.asarray(onehot @ X)


def kmeans_chunks(sets: "LloydSets | np.ndarray", centroids: Sequence) -> tuple[list[KMeansPartial], np.ndarray]:
    """The Lloyd partials of a stack of B sets (B, n, d), set b against centroids[b] (each K x d),
    and every row's label (nearest centroid), as a (B, n) array.

    Each set is assigned on its own; the counts, sums and far points of the whole stack come
    from one bincount, one sparse product and one argpartition (labels offset by b * K), not B
    of each: the M subquantizers of a step paid that per-call overhead M times.
    """
    sets = sets if isinstance(sets, LloydSets) else LloydSets(sets)
    Xs, work = sets.X, sets.work()
    B, n, d = Xs.shape
    cents = [c if isinstance(c, Centroids) else Centroids(c) for c in centroids]
    K = cents[0].C.shape[0]
    labels = np.empty((B, n), dtype=np.intp)
    dists = np.empty((B, n))
    for b in range(B):
        labels[b], dists[b] = assign(Xs[b], cents[b], work[b])
    flat = (labels + (np.arange(B) * K)[:, None]).ravel()
    counts = np.bincount(flat, minlength=B * K).astype(np.int64).reshape(B, K)
    sums = cluster_sums(Xs.reshape(B * n, d), flat, B * K).reshape(B, K, d)
    nf = min(FAR_POINTS, n)
    far = np.argpartition(dists, n - nf, axis=1)[:, n - nf:] if nf else np.empty((B, 0), np.intp)
    far_dists = np.take_along_axis(dists, far, axis=1)
    far_rows = Xs[np.arange(B)[:, None], far]
    inertia = dists.sum(axis=1)
    parts = [KMeansPartial(counts[b], sums[b], float(inertia[b]), far_dists[b], far_rows[b]) for b in range(B)]
    return parts, labels


def kmeans_combine(a: KMeansPartial, b: KMeansPartial) -> KMeansPartial:
    fd = np.concatenate((a.far_dists, b.far_dists))
    fr = np.concatenate((a.far_rows, b.far_rows))
    keep = np.argsort(-fd, kind="stable")[:FAR_POINTS]
    return KMeansPartial(a.counts + b.counts, a.sums + b.sums, a.inertia + b.inertia, fd[keep], fr[keep])


def kmeans_aggregate(p: KMeansPartial, old: np.ndarray) -> np.ndarray:
    """New centroids: the means; an empty cluster moves to the farthest point not used yet."""
    new = np.array(old, dtype=np.float64, copy=True)
    filled = p.counts > 0
    new[filled] = p.sums[filled] / p.counts[filled, None]
    empty = np.flatnonzero(~filled)
    if empty.size:
        order = np.argsort(-p.far_dists, kind="stable")
        for k, i in zip(empty, order):
            new[k] = p.far_rows[i]
    return new


def kmeans_aggregates(parts: Sequence[KMeansPartial], olds: np.ndarray) -> np.ndarray:
    """kmeans_aggregate for a stack: set b's new centroids from parts[b] and olds[b]."""
    return np.stack([kmeans_aggregate(p, old) for p, old in zip(parts, olds)])


def coarse_step_chunk(X: np.ndarray, state: TrainState, halves: LloydSets | None = None) -> tuple[KMeansPartial, ...]:
    halves = lopq_halves(X, state) if halves is None else halves
    return tuple(kmeans_chunks(halves, state.Cs)[0])


def coarse_step_aggregate(p, state: TrainState) -> TrainState:
    Cs = kmeans_aggregates(p, state.Cs)
    return dataclasses.replace(state, Cs=Cs, previous_inertia=state.inertia, inertia=p[0].inertia + p[1].inertia)


def sub_step_chunk(X: np.ndarray, state: TrainState, subvectors: LloydSets | None = None) -> tuple[KMeansPartial, ...]:
    subvectors = local_subvectors(X, state) if subvectors is None else subvectors
    return tuple(kmeans_chunks(subvectors, state.subs)[0])


def sub_step_aggregate(p, state: TrainState) -> TrainState:
    subs = kmeans_aggregates(p, state.subs)
    return dataclasses.replace(state, subs=subs, previous_inertia=state.inertia,
                               inertia=float(sum(q.inertia for q in p)))


def partials_combine(a: Sequence, b: Sequence) -> tuple:
    return tuple(kmeans_combine(x, y) for x, y in zip(a, b))


def local_residuals(X: np.ndarray, state: TrainState) -> np.ndarray:
    """Each half's residual (x - C[c]) - mu[c] rotated into its coarse cluster's frame."""
    model = LOPQModel(state.Cs, state.Rs, state.mus, None, M=state.config.M, pca=state.pca)
    return model.project(X)[1]


def _split(Y: np.ndarray, parts: int) -> np.ndarray:
    # (n, parts * d) -> contiguous (parts, n, d): k-means on one part then gathers rows of a
    # contiguous array instead of a strided column slice, several times faster.
    n = Y.shape[0]
    return np.ascontiguousarray(Y.reshape(n, parts, Y.shape[1] // parts).transpose(1, 0, 2))


def lopq_halves(X: np.ndarray, state: TrainState) -> LloydSets:
    """The two halves of the PCA'd vectors, as a contiguous (2, n, D/2) stack."""
    return LloydSets(_split(state.lopq_space(X), 2))


def local_subvectors(X: np.ndarray, state: TrainState) -> LloydSets:
    """The M subvectors of the local residuals, as a contiguous (M, n, D/M) stack."""
    return LloydSets(_split(local_residuals(X, state), state.config.M))


# --- pass: local rotations ---------------------------------------------------------------------------

@dataclasses.dataclass
class ClusterMoments:
    """Moments of the coarse residuals x_h - C_h[c] of every cluster of both halves."""

    counts: np.ndarray    # (2, V)
    means: np.ndarray     # (2, V, D/2)
    scatter: np.ndarray   # (2, V, D/2, D/2)


def rotations_chunk(X: np.ndarray, state: TrainState, halves: LloydSets | None = None) -> ClusterMoments:
    cfg = state.config
    halves = (lopq_halves(X, state) if halves is None else halves).X
    half, V = cfg.D // 2, cfg.V
    counts = np.zeros((2, V), dtype=np.int64)
    means = np.zeros((2, V, half))
    scatter = np.zeros((2, V, half, half))
    for h in (0, 1):
        Yh = halves[h]
        c = nearest(Yh, state.Cs[h])
        r = Yh - state.Cs[h][c]
        counts[h] = np.bincount(c, minlength=V)
        order = np.argsort(c, kind="stable")
        bounds = np.concatenate(([0], np.cumsum(counts[h])))
        rs = r[order]
        for v in np.flatnonzero(counts[h]):
            block = rs[bounds[v]:bounds[v + 1]]
            means[h, v] = block.mean(axis=0)
            centred = block - means[h, v]
            scatter[h, v] = centred.T @ centred
    return ClusterMoments(counts, means, scatter)


def rotations_combine(a: ClusterMoments, b: ClusterMoments) -> ClusterMoments:
    n = a.counts + b.counts
    safe = np.maximum(n, 1)
    wb = (b.counts / safe)[..., None]
    delta = b.means - a.means
    means = a.means + delta * wb
    cross = (a.counts * b.counts / safe)[..., None, None]
    scatter = a.scatter + b.scatter + delta[..., :, None] * delta[..., None, :] * cross
    return ClusterMoments(n, means, scatter)


def rotations_aggregate(m: ClusterMoments, state: TrainState) -> TrainState:
    cfg = state.config
    half, V = cfg.D // 2, cfg.V
    Rs = np.empty((2, V, half, half))
    fallback = []
    for h in (0, 1):
        for v in range(V):
            n = int(m.counts[h, v])
            if n < half or n < 2:
                # Too few residuals to estimate a D/2 x D/2 covariance: keep the residuals as
                # they are, as the reference does.
                Rs[h, v] = np.eye(half)
                fallback.append((h, v, n))
                continue
            cov = m.scatter[h, v] / (n - 1)
            eigenvalues, eigenvectors = np.linalg.eigh((cov + cov.T) / 2)
            perm = eigenvalue_allocation(cfg.M // 2, eigenvalues)
            Rs[h, v] = eigenvectors[:, perm].T
    if fallback:
        listed = ", ".join(f"half {h} cluster {v} ({n} points)" for h, v, n in fallback[:8])
        more = f" and {len(fallback) - 8} more" if len(fallback) > 8 else ""
        warnings.warn(
            f"{len(fallback)} coarse cluster(s) have fewer points than the {half} dimensions of a half, too few "
            f"to fit a local rotation: {listed}{more}. Their rotations fall back to the identity; train on more "
            f"data or with a smaller V (now {V}) for better codes",
            LOPQTrainingWarning, stacklevel=2,
        )
    return dataclasses.replace(state, Rs=Rs, mus=m.means.copy())


# --- pass: subquantizer step that also refines the rotations -------------------------------------------
#
# The rotations pass gives each coarse cluster the eigenvectors of its residuals' covariance,
# permuted by eigenvalue allocation: the parametric solution of Optimized PQ (Ge et al., CVPR
# 2013, sec. 3.2), which is exact only for Gaussian residuals. The non-parametric one (sec. 3.1)
# alternates between the codebooks and the rotation: with the codes fixed, the rotation R that
# minimises sum |R r - y|^2 over the cluster's residuals r and their reconstructions y is the
# orthogonal Procrustes solution U W^T of the SVD U S W^T of sum y r^T. A sub_rotation_step does
# both in one pass: it encodes the locally rotated residuals, accumulates the Lloyd sums of every
# subquantizer and each cluster's cross moments sum y r^T, and its aggregate moves both the
# subquantizers (means) and the rotations (Procrustes). The model format and the encoder are
# unchanged: a rotation is any orthogonal matrix.

@dataclasses.dataclass
class CrossMoments:
    """Per cluster of each half: the residuals counted and sum y r^T (codes' reconstruction y)."""

    counts: np.ndarray    # (2, V)
    cross: np.ndarray     # (2, V, D/2, D/2)


def local_frames(X: np.ndarray, state: TrainState, halves: LloydSets | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each half's unrotated local residuals (x - C[c]) - mu[c], rows sorted by cluster, as a
    (2, n, D/2) array, and the cluster bounds (2, V + 1): cluster v holds rows bounds[v]:bounds[v + 1].
    They depend on the PCA, coarse centroids and means only, so they stand while R moves. As in
    the sub_step passes, the parameters are the model's (float32 values), as the encoder's are.
    ``halves``: X's lopq_halves() if at hand (the coarse passes' prepared chunk), saving the PCA."""
    cfg = state.config
    half, V = cfg.D // 2, cfg.V
    Cs, mus = _f32(state.Cs), _f32(state.mus)
    Y = (halves if halves is not None else lopq_halves(X, state)).X
    resid = np.empty((2, X.shape[0], half))
    bounds = np.empty((2, V + 1), dtype=np.intp)
    for h in (0, 1):
        Yh = Y[h]
        c = nearest(Yh, Cs[h])
        order = np.argsort(c, kind="stable")
        c = c[order]
        resid[h] = (Yh[order] - Cs[h][c]) - mus[h][c]
        bounds[h, 0] = 0
        bounds[h, 1:] = np.cumsum(np.bincount(c, minlength=V))
    return resid, bounds


def sub_rotation_step_chunk(X: np.ndarray, state: TrainState, frames=None) -> tuple:
    cfg = state.config
    resid, bounds = local_frames(X, state) if frames is None else frames
    half, V, mh, d = cfg.D // 2, cfg.V, cfg.M // 2, cfg.D // cfg.M
    n = resid.shape[1]
    Rs = _f32(state.Rs)
    counts = np.diff(bounds, axis=1).astype(np.int64)
    cross = np.zeros((2, V, half, half))
    parts = []
    # Each subvector's rows contiguous, as the Lloyd step reads them: (M/2, n, d) per half, and
    # its float32 working copy [z, 1]. Residuals are centred on their cluster's mean, so the
    # copy needs no shift; a rotation keeps their norms, so r's largest coordinate bounds z's.
    Z = np.empty((mh, n, d))
    Za = np.empty((mh, n, d + 1), dtype=np.float32)
    Za[..., d] = 1.0
    no_shift = np.zeros(d)
    for h in (0, 1):
        r = resid[h]
        clusters = np.flatnonzero(counts[h])
        for v in clusters:
            a, b = bounds[h, v], bounds[h, v + 1]
            # One matmul per cluster for all M/2 subvectors, not one per subvector: fewer, larger
            # BLAS calls. Each entry is still one dot product over the D/2 coordinates, which
            # OpenBLAS sums in the same order for either shape (models checked bit for bit).
            Z[:, a:b] = (r[a:b] @ Rs[h, v].T).reshape(b - a, mh, d).transpose(1, 0, 2)
        subs = state.subs[h * mh:(h + 1) * mh]
        if n and np.sqrt(half) * np.abs(r).max() < _F32_SAFE_COORD:
            Za[..., :d] = Z
            sets = LloydSets(Z, [(Za[j], no_shift) for j in range(mh)])
        else:
            sets = LloydSets(Z)
        half_parts, labels = kmeans_chunks(sets, subs)
        parts.extend(half_parts)
        _cross_moments(r, labels, subs, counts[h], bounds[h], out=cross[h])
    return (*parts, CrossMoments(counts, cross))


def _cross_moments(r: np.ndarray, labels: np.ndarray, subs: np.ndarray, counts: np.ndarray, bounds: np.ndarray,
                   out: np.ndarray) -> None:
    """out[v] = sum y r^T over cluster v's rows (r: residuals (n, D/2) sorted by cluster, rows
    bounds[v]:bounds[v + 1]; y: their reconstructions, block j of y is subs[j][labels[j]]).

    Two ways to the same sums, whichever takes fewer multiply-adds for this chunk: the direct
    one gathers y (n x D/2) and makes one (D/2 x m) @ (m x D/2) matmul per cluster of m rows;
    the other sums each cluster's residuals by code, S_j[k] = the sum of r whose code j is k
    (one sparse product for every cluster and subvector), and block j of out[v] is subs[j]^T S_j.
    The sums win when clusters hold many rows for their K codes (a 50,000-row step of the
    benchmark's mixture: 42 ms direct, about 20 by sums) and lose when they hold few (large V,
    small chunks), where they would also hold more sums than rows.
    """
    mh, K, d = subs.shape
    n, half = r.shape
    present = np.flatnonzero(counts)
    P = present.size
    if n * mh * half + P * K * half * (mh + half) < n * half * half:
        keys = (np.arange(mh)[:, None] * P + np.repeat(np.arange(P), counts[present])) * K + labels
        S = cluster_sums(r, keys.T.ravel(), mh * P * K, per_row=mh).reshape(mh, P, K, half)
        out[present] = np.matmul(subs.transpose(0, 2, 1)[:, None], S).transpose(1, 0, 2, 3).reshape(P, half, half)
        return
    y = np.empty((n, half))
    np.take(subs.reshape(mh * K, d), (labels + (np.arange(mh) * K)[:, None]).T, axis=0, out=y.reshape(n, mh, d))
    for v in present:
        a, b = bounds[v], bounds[v + 1]
        out[v] = y[a:b].T @ r[a:b]


def sub_rotation_step_combine(a: Sequence, b: Sequence) -> tuple:
    *ka, ca = a
    *kb, cb = b
    return (*partials_combine(ka, kb), CrossMoments(ca.counts + cb.counts, ca.cross + cb.cross))


def sub_rotation_step_aggregate(p, state: TrainState) -> TrainState:
    cfg = state.config
    *kp, cm = p
    half = cfg.D // 2
    subs = kmeans_aggregates(kp, state.subs)
    Rs = np.array(state.Rs, dtype=np.float64, copy=True)
    for h in (0, 1):
        for v in range(cfg.V):
            # As the rotations pass: a cluster with fewer residuals than dimensions keeps its rotation.
            if cm.counts[h, v] >= max(half, 2):
                U, _, Wt = np.linalg.svd(cm.cross[h, v])
                Rs[h, v] = U @ Wt
    return dataclasses.replace(state, subs=subs, Rs=Rs, previous_inertia=state.inertia,
                               inertia=float(sum(q.inertia for q in kp)))


# --- the passes as data, and the in-process driver -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Pass:
    """One reduction over the data: chunk, combine, aggregate.

    ``chunk(X, state, prepared=None)`` reads raw vectors X; ``prepare(X, state)`` is the part of
    its work that depends only on parameters the pass does not change (the PCA'd vectors, the
    local residuals), which a driver may compute once and pass back in on later passes.
    """

    name: str
    chunk: Callable[..., Any]
    combine: Callable[[Any, Any], Any]
    aggregate: Callable[[Any, TrainState], TrainState]
    prepare: Callable[[np.ndarray, TrainState], np.ndarray] | None = None
    #: The state fields prepare() reads; a cached result stays valid while they are the same objects.
    prepare_reads: tuple[str, ...] = ()


PASSES = {p.name: p for p in (
    Pass("pca", pca_chunk, moments_combine, pca_aggregate),
    Pass("coarse_init", coarse_init_chunk, sample_combine, coarse_init_aggregate, lopq_halves, ("pca",)),
    Pass("coarse_step", coarse_step_chunk, partials_combine, coarse_step_aggregate, lopq_halves, ("pca",)),
    Pass("rotations", rotations_chunk, rotations_combine, rotations_aggregate, lopq_halves, ("pca",)),
    Pass("sub_init", sub_init_chunk, sample_combine, sub_init_aggregate),
    Pass("sub_step", sub_step_chunk, partials_combine, sub_step_aggregate, local_subvectors,
         ("pca", "Cs", "Rs", "mus")),
    Pass("sub_rotation_step", sub_rotation_step_chunk, sub_rotation_step_combine, sub_rotation_step_aggregate,
         local_frames, ("pca", "Cs", "mus")),
)}


class PreparedCache:
    """The prepared chunks of the last pass that had any, reused by the next passes with the same
    prepare function while the state fields it reads stand. Only one set is kept: each is as
    large as the data, and the passes sharing one run back to back."""

    def __init__(self):
        self._entries: dict[Callable, tuple[tuple, list]] = {}

    def clear(self) -> None:
        self._entries.clear()

    def peek(self, p: Pass, state: TrainState) -> list | None:
        """p's prepared chunks if they are here and still valid for state, else None."""
        hit = self._entries.get(p.prepare)
        deps = tuple(getattr(state, f) for f in p.prepare_reads)
        return hit[1] if hit is not None and all(a is b for a, b in zip(hit[0], deps)) else None

    def put(self, p: Pass, prepared: list, state: TrainState) -> None:
        self._entries.clear()
        self._entries[p.prepare] = (tuple(getattr(state, f) for f in p.prepare_reads), prepared)

    def get(self, p: Pass, chunks: Sequence[np.ndarray], state: TrainState) -> list:
        if p.prepare is None:
            return [None] * len(chunks)
        prepared = self.peek(p, state)
        if prepared is None:
            self._entries.clear()       # before preparing: one set as large as the data at a time
            prepared = [p.prepare(X, state) for X in chunks]
            self.put(p, prepared, state)
        return prepared


def tree_combine(partials: list, combine: Callable[[Any, Any], Any]):
    """Pairwise combination, as Spark's treeAggregate: depth log2(chunks)."""
    if not partials:
        raise InputError("no data: training needs at least one chunk of vectors")
    while len(partials) > 1:
        partials = [combine(partials[i], partials[i + 1]) if i + 1 < len(partials) else partials[i]
                    for i in range(0, len(partials), 2)]
    return partials[0]


def run_pass(p: Pass, chunks: Sequence[np.ndarray], state: TrainState, cache: PreparedCache | None = None) -> TrainState:
    """Runs one pass over chunks of raw (checked) vectors: chunk each, combine as a tree, aggregate."""
    prepared = cache.get(p, chunks, state) if cache is not None else [None] * len(chunks)
    return p.aggregate(tree_combine([p.chunk(X, state, Y) for X, Y in zip(chunks, prepared)], p.combine), state)


#: The reference's training steps (its --steps numbers) and the passes each runs.
STEPS = {0: "coarse clustering", 1: "rotations", 2: "subquantizers"}


def plan(cfg: TrainConfig, state: TrainState, steps: Sequence[int] = (0, 1, 2)):
    """The passes fit() runs, as a generator that sees each new state (for early stopping).

    ``steps`` picks the reference's training steps; PCA belongs to step 0 when the state has no
    PCA yet, and the parameters of skipped steps must already be in the state. Of the sub_iters
    subquantizer steps, the last rotation_iters also refine the rotations (sub_rotation_step);
    they start even if the plain steps stopped early, and their own early stop compares from
    their second step on. A run without step 1 must not refine given rotations: drive() sets
    rotation_iters to 0 for it, in the config every pass (sub_init's too) reads.
    """
    if 0 in steps:
        if cfg.pca and state.pca is None:
            state = yield "pca"
        state = yield "coarse_init"
        for _ in range(cfg.coarse_iters):
            state = yield "coarse_step"
            if state.converged():
                break
    if 1 in steps:
        state = yield "rotations"
    if 2 in steps:
        state = yield "sub_init"
        refine = min(cfg.rotation_iters, cfg.sub_iters)
        for _ in range(cfg.sub_iters - refine):
            state = yield "sub_step"
            if state.converged():
                break
        for i in range(refine):
            state = yield "sub_rotation_step"
            if i > 0 and state.converged():
                break


def check_steps(steps: Sequence[int], state: TrainState) -> tuple[int, ...]:
    """The steps sorted; raises unless the state holds what the skipped earlier steps produce."""
    steps = tuple(sorted(set(int(s) for s in steps)))
    if not steps or any(s not in STEPS for s in steps):
        raise InvalidParamsError(f"steps must be a non-empty subset of 0,1,2 ({STEPS}), got {list(steps)}")
    if steps[0] >= 1 and state.Cs is None:
        raise InvalidParamsError(f"steps {','.join(map(str, steps))} skip step 0 (coarse clustering): give an "
                                 "existing model holding the coarse centroids, or add step 0")
    if steps[0] >= 2 and state.Rs is None:
        raise InvalidParamsError("step 2 alone needs the rotations of step 1: give an existing model holding "
                                 "them, or add step 1")
    return steps


def sample_mask(X: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Rows kept by a sampling ratio: decided by a hash of each row, so any chunking keeps the same."""
    if not 0.0 < ratio <= 1.0:
        raise InvalidParamsError(f"a sampling ratio must lie in (0, 1], got {ratio}")
    if ratio == 1.0:
        return np.ones(X.shape[0], dtype=bool)
    return row_keys(X, seed) < np.uint64(int(ratio * 2.0 ** 64) - 1)


def _sampled(chunks: list[np.ndarray], ratio: float, seed: int) -> list[np.ndarray]:
    """The rows of each chunk a sampling ratio keeps; at ratio 1 the very same list (no copies)."""
    masks = [sample_mask(c, ratio, seed) for c in chunks]      # which also checks the ratio
    return chunks if ratio == 1.0 else [c[m] for c, m in zip(chunks, masks)]


def fit(X, V: int | None = None, M: int | None = None, subquantizer_clusters: int = 256, *, seed: int = 0,
        pca: bool = True, pca_dim: int | None = None, coarse_iters: int = TrainConfig.coarse_iters,
        sub_iters: int = TrainConfig.sub_iters, rotation_iters: int = TrainConfig.rotation_iters,
        sample_iters: int = TrainConfig.sample_iters, tol: float = TrainConfig.tol, init_sample: int | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        steps: Sequence[int] = (0, 1, 2), existing: LOPQModel | PCA | None = None, sampling_ratio: float = 1.0,
        subquantizer_sampling_ratio: float = 1.0,
        progress: Callable[[str, TrainState, float], None] | None = None) -> LOPQModel:
    """Trains an LOPQ model in-process by running every training pass over chunks of X.

    Parameters
    ----------
    X : array (N, D_in), or a sequence of such arrays (the chunks)
    V : coarse clusters per half.    M : subquantizers in total (even; D divisible by M).
    subquantizer_clusters : clusters per subquantizer (256: one byte per fine code).
    seed : seeds sampling and k-means++; the same seed and chunking give the same model (another
        chunking: the same sampling and seeds, but float32 near-ties may fall otherwise; see above).
    pca, pca_dim : rotate onto principal axes (keeping pca_dim of them; default all) and
        balance variance across the halves first; pca=False quantizes X as it is.
    coarse_iters, sub_iters, tol : Lloyd steps at most (10 coarse; 4 subquantizer steps over all
        the data), stopping early when the inertia improves by less than tol (relative).
    rotation_iters : how many of the subquantizer steps (the last ones: of the sample_iters on the
        sample, and of the sub_iters over the data, rotation_iters each; default 4) also refine
        each cluster's rotation, by orthogonal Procrustes against the codes' reconstructions
        (non-parametric OPQ, alternating with the subquantizers' Lloyd steps). Only when step 1
        runs; 0 keeps the reference's rotations (eigenvectors of the residual covariance).
    sample_iters : steps of the subquantizers on the k-means++ sample (on the driver, default 8),
        before the sub_iters steps over all the data; a fixed count, no early stop. Each costs a
        fraction of a pass; on a set no larger than the sample they are full steps. The defaults
        train the 50,000 x 128 mixture of benchmarks/lopq in 1.79 s to error 97.5 against 2.92 s
        and 96.3 for 12 steps over the data with the last 8 refining, and Oxford's 4,050 features
        to that schedule's very model (benchmarks/results/lopq_iterations.md).
    init_sample : points sampled for k-means++ (default 24 per cluster, INIT_SAMPLE_PER_CLUSTER, at
        least 1024); the subquantizers' sample_iters steps run on it too.
    steps : the reference's training steps to run: 0 coarse (with the PCA), 1 rotations,
        2 subquantizers; the others' parameters come from ``existing``.
    existing : a model whose PCA and trained parameters are kept (V and M default to its), or
        a prepared PCA to apply instead of training one.
    sampling_ratio, subquantizer_sampling_ratio : fractions of the rows every pass, and the
        subquantizer passes on top of that, train on (kept by a hash of the row and the seed).
    progress : called after every pass with (pass name, state, seconds); the default logs.
    """
    chunks = _as_chunks(X, chunk_rows)
    state = initial_state(chunks[0].shape[1], V, M, subquantizer_clusters, seed=seed, pca=pca, pca_dim=pca_dim,
                          coarse_iters=coarse_iters, sub_iters=sub_iters, rotation_iters=rotation_iters,
                          sample_iters=sample_iters, tol=tol,
                          init_sample=init_sample,
                          existing=existing)
    steps = check_steps(steps, state)
    cfg = state.config
    chunks = _sampled(chunks, sampling_ratio, cfg.seed + SAMPLING_SALT)
    sub_chunks = _sampled(chunks, subquantizer_sampling_ratio, cfg.seed + SUB_SAMPLING_SALT)
    n = sum(c.shape[0] for c in chunks)
    _require_points(n, cfg.V, "coarse clusters per half (V)")
    _require_points(sum(c.shape[0] for c in sub_chunks), cfg.subquantizer_clusters, "subquantizer clusters")
    cache, sub_cache = PreparedCache(), PreparedCache()

    def run(name: str, st: TrainState) -> TrainState:
        if not name.startswith("sub_"):
            return run_pass(PASSES[name], chunks, st, cache)
        p = PASSES[name]
        if p.prepare is local_frames and sub_chunks is chunks and sub_cache.peek(p, st) is None:
            # The frames start from the PCA'd halves the coarse passes prepared, if they stand.
            halves = cache.peek(PASSES["rotations"], st)
            if halves is not None:
                sub_cache.put(p, [local_frames(X, st, hv) for X, hv in zip(chunks, halves)], st)
        if p.prepare is not None:
            cache.clear()       # the subquantizer passes come last: the PCA'd halves are done with
        return run_pass(p, sub_chunks, st, sub_cache)

    return drive(state, steps, run, progress).model()


#: Salts of the row hashes that decide sampling (the k-means++ samples use seed and seed + 1).
SAMPLING_SALT = 0x5A3
SUB_SAMPLING_SALT = 0x5B7


def initial_state(D_in: int, V: int | None, M: int | None, subquantizer_clusters: int = 256, *,
                  existing: LOPQModel | PCA | None = None, **config) -> TrainState:
    """A checked TrainState to start from: empty, or holding an existing model's parameters."""
    if isinstance(existing, LOPQModel):
        if existing.input_dim != D_in:
            raise InputError(f"the existing model takes vectors of dimension {existing.input_dim}, the training "
                             f"data has {D_in}; give the data the model was trained on")
        if V is not None and V != existing.V:
            raise InvalidParamsError(f"V={V} but the existing model has V={existing.V}: its coarse centroids "
                                     "fix V; leave V out or train from scratch")
        V = existing.V
        M = existing.M if M is None else M
        if existing.pca is not None:
            config.update(pca=True, pca_dim=existing.pca.output_dim)
        else:
            config.update(pca=False, pca_dim=None)
        if existing.subs is not None:
            subquantizer_clusters = existing.num_subquantizers
    elif isinstance(existing, PCA):
        if existing.input_dim != D_in:
            raise InputError(f"the PCA takes vectors of dimension {existing.input_dim}, the training data has "
                             f"{D_in}; give the data the PCA was computed on")
        config.update(pca=True, pca_dim=existing.output_dim)
    if V is None or M is None:
        raise InvalidParamsError("V (coarse clusters per half) and M (subquantizers) are required unless an "
                                 "existing model gives them")
    cfg = TrainConfig(D_in=D_in, V=V, M=M, subquantizer_clusters=subquantizer_clusters, **config)
    cfg.check()
    state = TrainState(cfg)
    if isinstance(existing, PCA):
        state.pca = existing
    elif isinstance(existing, LOPQModel):
        state.pca, state.Cs = existing.pca, existing.Cs
        # Rotations balance variance over M/2 subvectors: another M needs them trained again.
        if existing.Rs is not None and existing.M == M:
            state.Rs, state.mus = existing.Rs, existing.mus
        if existing.subs is not None and existing.M == M:
            state.subs = existing.subs
    return state


def drive(state: TrainState, steps: Sequence[int], run: Callable[[str, TrainState], TrainState],
          progress: Callable[[str, TrainState, float], None] | None = None) -> TrainState:
    """Runs the planned passes, each by ``run(pass name, state) -> next state``: the one loop the
    in-process and the Spark drivers share, so both take the same passes in the same order."""
    if 1 not in steps:
        # The rotations are given (an existing model's): no step refines them, on the sample or the data.
        state = dataclasses.replace(state, config=dataclasses.replace(state.config, rotation_iters=0))
    plan_ = plan(state.config, state, steps)
    try:
        name = next(plan_)
    except StopIteration:
        return state
    while True:
        t0 = time.perf_counter()
        state = run(name, state)
        (progress or _log_progress)(name, state, time.perf_counter() - t0)
        try:
            name = plan_.send(state)
        except StopIteration:
            return state


def _log_progress(name: str, state: TrainState, seconds: float) -> None:
    extra = f", inertia {state.inertia:.6g}" if name.endswith("_step") and state.inertia is not None else ""
    log.info("lopq training: %s done in %.2f s%s", name, seconds, extra)


def _as_chunks(X, chunk_rows: int) -> list[np.ndarray]:
    if isinstance(X, np.ndarray) or not isinstance(X, (list, tuple)):
        X = as_vectors(X, None, what="training vectors")
        if X.shape[0] == 0:
            raise InputError("no training vectors: X has 0 rows")
        return [X[a:a + chunk_rows] for a in range(0, X.shape[0], chunk_rows)]
    if not X:
        raise InputError("no training vectors: the list of chunks is empty")
    chunks = [as_vectors(c, None, what=f"training chunk {i}") for i, c in enumerate(X)]
    dims = {c.shape[1] for c in chunks}
    if len(dims) != 1:
        raise InputError(f"all training chunks must have one dimension, found {sorted(dims)}")
    return chunks


# --- states and partials on the wire: npz, never pickle ---------------------------------------------------

_STATE_ARRAYS = ("Cs", "Rs", "mus", "subs")


def state_to_bytes(state: TrainState) -> bytes:
    """The whole training state in float64 as npz bytes: unlike TrainState.to_bytes (a float32
    model), an executor given these computes exactly what the in-process driver computes."""
    arrays = {"config": np.array(json.dumps(dataclasses.asdict(state.config)))}
    for name in _STATE_ARRAYS:
        if getattr(state, name) is not None:
            arrays[name] = getattr(state, name)
    if state.pca is not None:
        arrays["pca_mean"], arrays["pca_projection"] = state.pca.mean, state.pca.projection
    for name in ("inertia", "previous_inertia"):
        if getattr(state, name) is not None:
            arrays[name] = np.array(getattr(state, name))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def state_from_bytes(data: bytes) -> TrainState:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        state = TrainState(TrainConfig(**json.loads(str(arrays["config"]))))
    except (KeyError, ValueError, OSError, TypeError, zipfile.BadZipFile) as e:
        raise InputError(f"a training state does not decode ({type(e).__name__}: {e}); it must come from "
                         "state_to_bytes of the same ferry version") from None
    for name in _STATE_ARRAYS:
        setattr(state, name, arrays.get(name))
    if "pca_mean" in arrays:
        state.pca = PCA(arrays["pca_mean"], arrays["pca_projection"])
    for name in ("inertia", "previous_inertia"):
        if name in arrays:
            setattr(state, name, float(arrays[name]))
    return state



_PARTIAL_TYPES = {t.__name__: t for t in (Moments, Sample, KMeansPartial, ClusterMoments, CrossMoments)}


def partial_to_bytes(p) -> bytes:
    """A partial (or a tuple of partials) as npz bytes: arrays and scalars only."""
    items = p if isinstance(p, tuple) else (p,)
    arrays = {"__tuple__": np.array(isinstance(p, tuple)), "__n__": np.array(len(items))}
    for i, item in enumerate(items):
        arrays[f"{i}.__type__"] = np.array(type(item).__name__)
        for f in dataclasses.fields(item):
            arrays[f"{i}.{f.name}"] = np.asarray(getattr(item, f.name))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def partial_from_bytes(data: bytes):
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        items = []
        for i in range(int(arrays["__n__"])):
            cls = _PARTIAL_TYPES[str(arrays[f"{i}.__type__"])]
            kwargs = {}
            for f in dataclasses.fields(cls):
                v = arrays[f"{i}.{f.name}"]
                kwargs[f.name] = v.item() if v.ndim == 0 else v
            items.append(cls(**kwargs))
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise InputError(f"a training partial does not decode ({type(e).__name__}: {e}); it must come from "
                         "partial_to_bytes of the same ferry version") from None
    return tuple(items) if bool(arrays["__tuple__"]) else items[0]
