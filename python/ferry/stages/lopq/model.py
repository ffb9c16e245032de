"""The LOPQ model: its parameters, batch encoding, decoding, and the protobuf model format.

A vector x of dimension D (after the optional PCA) is split into two halves x_0, x_1. Half h
is quantized by its coarse centroids C_h (V of them): c_h = argmin_v |x_h - C_h[v]|^2. The
residual (x_h - C_h[c_h]) - mu_h[c_h] is rotated into the cluster's local frame by R_h[c_h]
and cut into M/2 subvectors; each subvector's fine code is its nearest centroid in its own
subquantizer. The code of x is ((c_0, c_1), (f_0, ..., f_{M-1})).

Parameters are float32 on disk; in memory they are float64 arrays holding float32 values, so
a model encodes the same before and after a save/load, and computes in float64 as the
reference implementation does.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ferry.errors import InputError, InvalidParamsError
from ferry.stages.lopq.errors import ModelFormatError

#: Rows encoded per block: large enough for BLAS to run at speed, small enough that the
#: (rows x clusters) distance buffers stay in cache. Measured on D=128, M=8, 256 clusters.
ENCODE_BLOCK_ROWS = 2048


def check_config(D: int, V: int, M: int, num_subquantizers: int | None = None, *, what: str = "LOPQ") -> None:
    """Raises InvalidParamsError unless D, V, M (and the subquantizer size) make an LOPQ model."""
    if V < 1:
        raise InvalidParamsError(f"{what}: V (coarse clusters per half) must be >= 1, got {V}")
    if M < 2 or M % 2:
        raise InvalidParamsError(
            f"{what}: M (subquantizers in total) must be even and >= 2, got {M}: each half of a vector "
            f"gets M/2 subquantizers; use M={max(2, M + M % 2)}"
        )
    if D < 2 or D % M:
        raise InvalidParamsError(
            f"{what}: the dimension D={D} must be divisible by M={M} (each subvector has D/M dimensions); "
            f"choose M among {[m for m in range(2, D + 1, 2) if D % m == 0] or '(none: D is odd)'}"
            " or reduce the vectors to a dimension divisible by M with PCA"
        )
    if num_subquantizers is not None and num_subquantizers < 1:
        raise InvalidParamsError(f"{what}: subquantizer clusters must be >= 1, got {num_subquantizers}")


def as_vectors(X, dim: int | None, *, what: str = "vectors") -> np.ndarray:
    """X as a C-contiguous float64 (N, dim) array; raises InputError for any other shape or NaN/inf."""
    arr = np.asarray(X)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InputError(f"{what} must be numeric, got an array of dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"{what} must be real, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InputError(f"{what} must be a 2-D array (one vector per row), got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise InputError(
            f"{what} must have dimension {dim} (the model's input dimension), got {arr.shape[1]} "
            f"(array of shape {arr.shape}); encode vectors of the kind the model was trained on"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if arr.size and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise InputError(
            f"{what} must be finite; row {bad[0]} has {arr[bad[0], bad[1]]} at dimension {bad[1]} "
            f"({int((~np.isfinite(arr)).any(axis=1).sum())} row(s) affected): drop or impute them first"
        )
    return arr


def _f32(a) -> np.ndarray:
    """a rounded to float32 values, held as float64 (what the model file can represent)."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float64).astype(np.float32).astype(np.float64))


class Centroids:
    """A centroid matrix with what nearest() needs, computed once.

    ``aug32`` is [-2 C^T; |c|^2] in float32, so that [x, 1] @ aug32 = |c|^2 - 2 x.c comes out
    of one matmul with no separate pass to add the norms.
    """

    __slots__ = ("C", "sq", "aug32", "max_sq")

    def __init__(self, C: np.ndarray):
        self.C = np.ascontiguousarray(C, dtype=np.float64)
        self.sq = np.einsum("ij,ij->i", self.C, self.C)
        with np.errstate(over="ignore"):   # huge values overflow float32; nearest() then falls back
            self.aug32 = np.ascontiguousarray(np.vstack([-2.0 * self.C.T, self.sq[None, :]]).astype(np.float32))
        self.max_sq = float(self.sq.max()) if self.sq.size else 0.0


def nearest(X: np.ndarray, cents: "Centroids | np.ndarray") -> np.ndarray:
    """Index of the nearest row of C for every row of X, as ((x - C)**2).sum(1).argmin() gives it.

    Distances come from one float32 matmul, |c|^2 - 2 x.c (twice the speed of float64 and half
    the memory traffic). Rows whose best and second-best distances are closer than that form's
    rounding error are recomputed in float64 from the differences, so every code is the one
    the direct float64 formula (the reference's) gives.
    """
    if not isinstance(cents, Centroids):
        cents = Centroids(cents)
    n, k = X.shape[0], cents.C.shape[0]
    if k == 1 or n == 0:
        return np.zeros(n, dtype=np.intp)
    if n > ENCODE_BLOCK_ROWS:
        # Row blocks keep the (rows x k) distance buffer in cache.
        return np.concatenate([nearest(X[a:a + ENCODE_BLOCK_ROWS], cents)
                               for a in range(0, n, ENCODE_BLOCK_ROWS)])
    with np.errstate(over="ignore", invalid="ignore"):
        Xa = np.empty((n, X.shape[1] + 1), dtype=np.float32)
        Xa[:, :-1] = X
        Xa[:, -1] = 1.0
        d = np.matmul(Xa, cents.aug32)
        best = d.argmin(axis=1)
        rows = np.arange(n)
        best_val = d[rows, best]
        d[rows, best] = np.inf
        gap = d.min(axis=1) - best_val
    # Rounding x, -2C and |c|^2 to float32 and summing dim+1 products errs by at most about
    # 2 (dim+4) u (|x|^2 + |c|^2) per distance; the gap between two distances gets twice that,
    # and the margin doubles it again. A few rows in a thousand land inside it.
    u = float(np.finfo(np.float32).eps)
    scale = np.einsum("ij,ij->i", X, X) + cents.max_sq
    # Written as "not clearly apart" so that rows whose float32 distances overflowed (NaN gaps)
    # are recomputed in float64 too.
    close = np.flatnonzero(~(gap > 8.0 * (X.shape[1] + 4) * u * scale))
    if close.size:
        for a in range(0, close.size, 256):
            idx = close[a:a + 256]
            best[idx] = ((X[idx, None, :] - cents.C[None, :, :]) ** 2).sum(axis=2).argmin(axis=1)
    return best


class PCA:
    """x -> (x - mean) @ projection: centring, rotation onto the top principal axes, balancing."""

    def __init__(self, mean, projection):
        mean = np.asarray(mean, dtype=np.float64)
        projection = np.asarray(projection, dtype=np.float64)
        if mean.ndim != 1 or projection.ndim != 2 or projection.shape[0] != mean.shape[0]:
            raise InvalidParamsError(
                f"PCA needs a mean of shape (D_in,) and a projection of shape (D_in, D); got "
                f"{mean.shape} and {projection.shape}"
            )
        self.mean = _f32(mean)
        self.projection = _f32(projection)

    @property
    def input_dim(self) -> int:
        return self.mean.shape[0]

    @property
    def output_dim(self) -> int:
        return self.projection.shape[1]

    def apply(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean) @ self.projection

    def invert(self, Y: np.ndarray) -> np.ndarray:
        """The least-squares preimage: the projection's columns are orthonormal."""
        return Y @ self.projection.T + self.mean


class LOPQModel:
    """An LOPQ model: coarse centroids, local rotations and means, subquantizers, optional PCA.

    Parameters
    ----------
    Cs : array (2, V, D/2)
        Coarse centroids of each half.
    Rs : array (2, V, D/2, D/2), optional
        Rotation of each coarse cluster's residuals (rows: the local axes).
    mus : array (2, V, D/2), optional
        Mean residual of each coarse cluster.
    subs : array (M, S, D/M), optional
        Subquantizer centroids: the M/2 of the first half, then the M/2 of the second.
    M : int, optional
        Subquantizers in total; needed only while ``subs`` is not trained yet.
    pca : PCA, optional
        Applied to every input vector before it is quantized.
    num_subquantizers : int, optional
        The header value to write; a file may declare a value its matrices do not have (the
        reference's own fixture declares 256 for 10-row subquantizers, and its reader ignores
        the field). It is kept for a byte-stable round trip; the matrices decide everything.

    A model missing Rs/mus or subs is partially trained: it loads, saves and reports its
    coarse codes, and encode() says which step is missing.
    """

    def __init__(self, Cs, Rs=None, mus=None, subs=None, *, M: int | None = None, pca: PCA | None = None,
                 num_subquantizers: int | None = None):
        Cs = _f32(Cs)
        if Cs.ndim != 3 or Cs.shape[0] != 2:
            raise InvalidParamsError(f"Cs must have shape (2, V, D/2), got {Cs.shape}")
        self.Cs = Cs
        self.V, half = Cs.shape[1], Cs.shape[2]
        self.D = 2 * half
        if (Rs is None) != (mus is None):
            raise InvalidParamsError("Rs and mus come from the same training step: give both or neither")
        self.Rs = None if Rs is None else _f32(Rs)
        self.mus = None if mus is None else _f32(mus)
        if self.Rs is not None and self.Rs.shape != (2, self.V, half, half):
            raise InvalidParamsError(f"Rs must have shape (2, V, D/2, D/2) = {(2, self.V, half, half)}, got {self.Rs.shape}")
        if self.mus is not None and self.mus.shape != (2, self.V, half):
            raise InvalidParamsError(f"mus must have shape (2, V, D/2) = {(2, self.V, half)}, got {self.mus.shape}")
        self.subs = None if subs is None else _f32(subs)
        if self.subs is not None:
            if self.subs.ndim != 3:
                raise InvalidParamsError(f"subs must have shape (M, S, D/M), got {self.subs.shape}")
            if M is not None and M != self.subs.shape[0]:
                raise InvalidParamsError(f"M={M} but subs holds {self.subs.shape[0]} subquantizers")
            M = self.subs.shape[0]
        if M is None:
            raise InvalidParamsError("M (subquantizers in total) is needed when subs is not given")
        self.M = int(M)
        check_config(self.D, self.V, self.M, what="LOPQModel")
        if self.subs is not None and self.subs.shape[2] != self.D // self.M:
            raise InvalidParamsError(
                f"subs must have shape (M, S, D/M) with D/M = {self.D // self.M}, got {self.subs.shape}"
            )
        if pca is not None and pca.output_dim != self.D:
            raise InvalidParamsError(f"the PCA outputs dimension {pca.output_dim} but the model quantizes D={self.D}")
        self.pca = pca
        self._declared_num_subquantizers = num_subquantizers
        self._prepared = None

    # --- shape ----------------------------------------------------------------------------

    @property
    def num_subquantizers(self) -> int | None:
        """Clusters per subquantizer (S), from the matrices."""
        return None if self.subs is None else self.subs.shape[1]

    @property
    def subquantizer_clusters(self) -> int | None:
        return self.num_subquantizers

    @property
    def input_dim(self) -> int:
        """The dimension of the vectors encode() takes (before PCA)."""
        return self.D if self.pca is None else self.pca.input_dim

    @property
    def complete(self) -> bool:
        return self.Rs is not None and self.subs is not None

    def __repr__(self) -> str:
        pca = f", pca {self.pca.input_dim}->{self.D}" if self.pca is not None else ""
        state = "" if self.complete else (", coarse only" if self.Rs is None else ", no subquantizers")
        return f"LOPQModel(D={self.D}, V={self.V}, M={self.M}, S={self.num_subquantizers}{pca}{state})"

    def _require_complete(self, what: str) -> None:
        if self.Rs is None:
            raise InvalidParamsError(f"{what} needs the local rotations, but this model has coarse centroids only; "
                                     "train the rotations (and subquantizers) first")
        if self.subs is None and what != "project":
            raise InvalidParamsError(f"{what} needs the subquantizers, but this model has none; train them first")

    def _prep(self):
        # Constants of the hot path, computed once per model (the model is immutable in use).
        if self._prepared is None:
            half = self.D // 2
            p = {"coarse": [Centroids(C) for C in self.Cs]}
            if self.Rs is not None:
                p["RT"] = np.ascontiguousarray(self.Rs.transpose(0, 1, 3, 2))
            if self.subs is not None:
                p["fine"] = [Centroids(S) for S in self.subs]
                p["S_sq"] = np.stack([c.sq for c in p["fine"]])
            p["half"] = half
            self._prepared = p
        return self._prepared

    # --- encoding -------------------------------------------------------------------------

    def to_lopq_space(self, X) -> np.ndarray:
        """Checked float64 vectors in the space LOPQ quantizes (after the PCA, if any)."""
        X = as_vectors(X, self.input_dim)
        return X if self.pca is None else self.pca.apply(X)

    def encode_coarse(self, X) -> np.ndarray:
        """Coarse codes int32 (N, 2) of vectors X (N, input_dim)."""
        X = self.to_lopq_space(X)
        p, half = self._prep(), self.D // 2
        out = np.empty((X.shape[0], 2), dtype=np.int32)
        for h in (0, 1):
            out[:, h] = nearest(X[:, h * half:(h + 1) * half], p["coarse"][h])
        return out

    def encode(self, X, *, block_rows: int = ENCODE_BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
        """LOPQ codes of vectors X (N, input_dim): (coarse int32 (N, 2), fine int32 (N, M)).

        Vectorized over blocks of rows: every distance is a BLAS matmul, the rotations are
        applied cluster by cluster, and no Python loop runs per vector.
        """
        self._require_complete("encode")
        X = self.to_lopq_space(X)
        n = X.shape[0]
        coarse = np.empty((n, 2), dtype=np.int32)
        fine = np.empty((n, self.M), dtype=np.int32)
        # With many coarse clusters a block needs enough rows per cluster for the rotations'
        # matmuls to be worth their call.
        block_rows = max(block_rows, 16 * self.V)
        for a in range(0, n, block_rows):
            b = min(n, a + block_rows)
            Z = self._project_block(X[a:b], coarse[a:b])
            self._fine_block(Z, fine[a:b])
        return coarse, fine

    def project(self, X, coarse: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(coarse codes, local residuals Z (N, D)): each half's residual in its cluster's frame."""
        self._require_complete("project")
        X = self.to_lopq_space(X)
        n = X.shape[0]
        out = np.empty((n, 2), dtype=np.int32)
        if coarse is not None:
            out[:] = self._check_coarse(coarse, n)
        Z = np.empty_like(X)
        for a in range(0, n, ENCODE_BLOCK_ROWS):
            b = min(n, a + ENCODE_BLOCK_ROWS)
            Z[a:b] = self._project_block(X[a:b], out[a:b], given=coarse is not None)
        return out, Z

    def _project_block(self, X: np.ndarray, coarse_out: np.ndarray, given: bool = False) -> np.ndarray:
        p, half = self._prep(), self.D // 2
        Z = np.empty_like(X)
        for h in (0, 1):
            Xh = X[:, h * half:(h + 1) * half]
            if given:
                c = coarse_out[:, h].astype(np.intp)
            else:
                c = nearest(Xh, p["coarse"][h])
                coarse_out[:, h] = c
            # (x - C) - mu, in the reference's order of operations.
            r = (Xh - self.Cs[h][c]) - self.mus[h][c]
            Z[:, h * half:(h + 1) * half] = _rotate_by_cluster(r, c, p["RT"][h])
        return Z

    def _fine_block(self, Z: np.ndarray, fine_out: np.ndarray) -> None:
        p = self._prep()
        d = self.D // self.M
        for m in range(self.M):
            fine_out[:, m] = nearest(Z[:, m * d:(m + 1) * d], p["fine"][m])

    def _check_coarse(self, coarse, n: int) -> np.ndarray:
        coarse = np.asarray(coarse)
        if coarse.shape != (n, 2) or not np.issubdtype(coarse.dtype, np.integer):
            raise InputError(f"coarse codes must be integers of shape ({n}, 2), got {coarse.dtype} {coarse.shape}")
        if n and (coarse.min() < 0 or coarse.max() >= self.V):
            raise InputError(f"coarse codes must lie in 0..{self.V - 1} (V={self.V}), found "
                             f"{int(coarse.min())}..{int(coarse.max())}")
        return coarse

    # --- decoding -------------------------------------------------------------------------

    def decode(self, coarse, fine) -> np.ndarray:
        """Reconstructions (N, input_dim) of codes: the inverse of encode up to quantization.

        With a PCA the reconstruction is mapped back to the input space (its least-squares
        preimage); without one it lies in the model's space.
        """
        self._require_complete("decode")
        coarse = np.atleast_2d(coarse)
        fine = np.atleast_2d(fine)
        n = coarse.shape[0]
        coarse = self._check_coarse(coarse, n).astype(np.intp)
        S = self.num_subquantizers
        if fine.shape != (n, self.M) or not np.issubdtype(fine.dtype, np.integer):
            raise InputError(f"fine codes must be integers of shape ({n}, {self.M}), got {fine.dtype} {fine.shape}")
        if n and (fine.min() < 0 or fine.max() >= S):
            raise InputError(f"fine codes must lie in 0..{S - 1}, found {int(fine.min())}..{int(fine.max())}")
        half = self.D // 2
        # Local reconstruction: each subvector's centroid, concatenated.
        Z = self.subs[np.arange(self.M), fine.astype(np.intp)].reshape(n, self.D)
        X = np.empty((n, self.D))
        for h in (0, 1):
            c = coarse[:, h]
            r = _rotate_by_cluster(Z[:, h * half:(h + 1) * half], c, self.Rs[h])  # z @ R  ==  R^T z
            X[:, h * half:(h + 1) * half] = r + self.mus[h][c] + self.Cs[h][c]
        return X if self.pca is None else self.pca.invert(X)

    # --- search support -------------------------------------------------------------------

    def local_tables(self, q_half: np.ndarray, half: int, clusters: np.ndarray) -> np.ndarray:
        """Squared distances (len(clusters), M/2, S) from the query half, projected into each
        cluster's local frame, to every centroid of that half's subquantizers."""
        self._require_complete("search")
        clusters = np.asarray(clusters, dtype=np.intp)
        r = (q_half[None, :] - self.Cs[half][clusters]) - self.mus[half][clusters]
        z = np.einsum("kij,kj->ki", self.Rs[half][clusters], r)
        mh, d = self.M // 2, self.D // self.M
        z = z.reshape(len(clusters), mh, d)
        subs = self.subs[half * mh:(half + 1) * mh]                      # (M/2, S, d)
        p = self._prep()
        S_sq = p["S_sq"][half * mh:(half + 1) * mh]                        # (M/2, S)
        t = np.einsum("kmd,msd->kms", z, subs)
        t *= -2.0
        t += S_sq[None]
        t += np.einsum("kmd,kmd->km", z, z)[:, :, None]
        return np.maximum(t, 0.0, out=t)

    # --- the protobuf format --------------------------------------------------------------

    def to_proto(self):
        """The model as an LOPQModelParams message (reference-compatible fields 1..8)."""
        pb = _pb()
        msg = pb.LOPQModelParams()
        msg.D, msg.V, msg.M = self.D, self.V, self.M
        declared = self._declared_num_subquantizers
        if declared is not None:
            msg.num_subquantizers = declared
        elif self.subs is not None:
            msg.num_subquantizers = self.num_subquantizers
        for C in self.Cs:
            _matrix(msg.Cs.add(), C)
        if self.Rs is not None:
            for R in self.Rs.reshape(-1, *self.Rs.shape[2:]):
                _matrix(msg.Rs.add(), R)
            for mu in self.mus.reshape(-1, self.mus.shape[2]):
                msg.mus.add().values.extend(mu.astype(np.float32).tolist())
        if self.subs is not None:
            for sub in self.subs:
                _matrix(msg.subs.add(), sub)
        if self.pca is not None:
            msg.pca_mean.values.extend(self.pca.mean.astype(np.float32).tolist())
            _matrix(msg.pca_projection, self.pca.projection)
        return msg

    def to_bytes(self) -> bytes:
        return self.to_proto().SerializeToString()

    def save(self, path) -> None:
        """Writes the model as an LOPQModelParams protobuf (the reference's `.lopq` format)."""
        data = self.to_bytes()
        tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    @classmethod
    def from_proto(cls, msg, *, source: str = "the model") -> "LOPQModel":
        return _from_proto(cls, msg, source)

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "the model") -> "LOPQModel":
        """Parses and validates a model; raises ModelFormatError saying what is wrong with it."""
        return _from_proto(cls, _parse(bytes(data), source), source)

    @classmethod
    def load(cls, path) -> "LOPQModel":
        """Reads a `.lopq` protobuf model (written by ferry or by the reference). Never unpickles."""
        with open(path, "rb") as f:
            data = f.read()
        return cls.from_bytes(data, source=repr(os.fspath(path)))


def _rotate_by_cluster(r: np.ndarray, c: np.ndarray, RT: np.ndarray) -> np.ndarray:
    """Row i of the result is r[i] @ RT[c[i]]; one matmul per cluster present, no per-row loop."""
    out = np.empty_like(r)
    n = r.shape[0]
    if n == 0:
        return out
    first = c[0]
    if (c == first).all():
        np.matmul(r, RT[first], out=out)
        return out
    # Sorting once and multiplying contiguous slices beats gathering rows cluster by cluster
    # when there are many clusters with few rows each.
    order = np.argsort(c, kind="stable")
    r_sorted = r[order]
    out_sorted = np.empty_like(r_sorted)
    counts = np.bincount(c, minlength=RT.shape[0])
    bounds = np.concatenate(([0], np.cumsum(counts)))
    for v in np.flatnonzero(counts):
        s, e = bounds[v], bounds[v + 1]
        np.matmul(r_sorted[s:e], RT[v], out=out_sorted[s:e])
    out[order] = out_sorted
    return out


def _matrix(m, a: np.ndarray) -> None:
    m.values.extend(np.ascontiguousarray(a, dtype=np.float32).ravel().tolist())
    m.shape.extend(int(s) for s in a.shape)


def _pb():
    try:
        from ferry.v1 import lopq_pb2
    except ImportError as e:  # pragma: no cover - a broken install
        raise ImportError(
            "ferry.v1.lopq_pb2 is missing: the build generates it from proto/ferry/v1/lopq.proto; "
            "reinstall with `pip install -e .` (or `pip install spark-ferry`)"
        ) from e
    return lopq_pb2


# --- reading and validating a model file -------------------------------------------------------

_FOREIGN_MAGIC = {
    b"PK\x03\x04": "a zip archive (an .npz file?)",
    b"\x93NUMPY": "a .npy array",
    b"\x1f\x8b": "a gzip file",
    b"\x89HDF": "an HDF5 file",
    b"MATLAB": "a MATLAB .mat file (the reference's export_mat)",
}


def _looks_like_pickle(data: bytes) -> bool:
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return True  # PROTO opcode: pickle protocol 2..5
    # Protocols 0/1 end with STOP and start with MARK, GLOBAL, EMPTY_LIST/DICT or a dict/list opcode.
    return data.endswith(b".") and data[:1] in (b"(", b"c", b"]", b"}", b"l", b"d")


def _parse(data: bytes, source: str):
    from google.protobuf.message import DecodeError

    fix = ("Give a file written by LOPQModel.save or by the reference's export_proto "
           "(LOPQModelParams protobuf, usually named *.lopq)")
    if not data:
        raise ModelFormatError(f"{source} is empty (0 bytes); expected an LOPQModelParams protobuf. {fix}")
    if _looks_like_pickle(data):
        raise ModelFormatError(
            f"{source} is a Python pickle, not an LOPQModelParams protobuf; ferry never loads pickles "
            "(unpickling runs arbitrary code). Convert the model once, where you trust the pickle, with the "
            "reference's LOPQModel.export_proto(path), then load that file"
        )
    for magic, what in _FOREIGN_MAGIC.items():
        if data.startswith(magic):
            raise ModelFormatError(f"{source} is {what}, not an LOPQModelParams protobuf. {fix}")
    msg = _pb().LOPQModelParams()
    try:
        msg.ParseFromString(data)
    except DecodeError as e:
        raise ModelFormatError(
            f"{source} ({len(data)} bytes) does not parse as an LOPQModelParams protobuf ({e}): the file is "
            f"truncated or is not an LOPQ model. {fix}"
        ) from None
    return msg


def _from_proto(cls, msg, source: str) -> LOPQModel:
    from google.protobuf.unknown_fields import UnknownFieldSet

    def bad(what: str) -> ModelFormatError:
        return ModelFormatError(f"{source} is not a valid LOPQ model: {what}")

    missing = [f for f in ("D", "V", "M") if not msg.HasField(f)]
    if not len(msg.Cs):
        missing.append("Cs (the coarse centroids)")
    if missing:
        unknown = len(UnknownFieldSet(msg))
        foreign = f" and it holds {unknown} field(s) LOPQModelParams does not define" if unknown else ""
        raise bad(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing{foreign}. The data is foreign "
            "or truncated: give an LOPQModelParams protobuf (*.lopq) written by LOPQModel.save or export_proto"
        )
    D, V, M = msg.D, msg.V, msg.M
    try:
        check_config(D, V, M, what="its header")
    except InvalidParamsError as e:
        raise bad(str(e)) from None
    half = D // 2

    def matrix(m, name: str, i: int, shape: tuple[int, ...]) -> np.ndarray:
        got = tuple(m.shape)
        if got != shape:
            raise bad(f"{name}[{i}] has shape {list(got)}, expected {list(shape)} (D={D}, V={V}, M={M})")
        values = np.asarray(m.values, dtype=np.float64)
        if values.size != int(np.prod(shape)):
            raise bad(f"{name}[{i}] has {values.size} values for shape {list(shape)} "
                      f"({int(np.prod(shape))} expected): the file is truncated or corrupt")
        if not np.isfinite(values).all():
            raise bad(f"{name}[{i}] holds NaN or infinite values")
        return values.reshape(shape)

    def count(name: str, n: int, expected: int, why: str):
        if n != expected:
            raise bad(f"it has {n} {name} where {expected} are expected ({why}); the file is truncated or "
                      "was written for other dimensions")

    count("coarse centroid matrices (Cs)", len(msg.Cs), 2, "one per half")
    Cs = np.stack([matrix(m, "Cs", i, (V, half)) for i, m in enumerate(msg.Cs)])
    Rs = mus = subs = None
    if len(msg.Rs) or len(msg.mus):
        count("rotations (Rs)", len(msg.Rs), 2 * V, "2V: V per half")
        count("residual means (mus)", len(msg.mus), 2 * V, "2V: V per half")
        Rs = np.stack([matrix(m, "Rs", i, (half, half)) for i, m in enumerate(msg.Rs)]).reshape(2, V, half, half)
        mu_list = []
        for i, v in enumerate(msg.mus):
            values = np.asarray(v.values, dtype=np.float64)
            if values.shape != (half,):
                raise bad(f"mus[{i}] has {values.size} values, expected D/2 = {half}")
            if not np.isfinite(values).all():
                raise bad(f"mus[{i}] holds NaN or infinite values")
            mu_list.append(values)
        mus = np.stack(mu_list).reshape(2, V, half)
    if len(msg.subs):
        count("subquantizer matrices (subs)", len(msg.subs), M, "M: M/2 per half")
        S = tuple(msg.subs[0].shape)[0] if len(msg.subs[0].shape) == 2 else 0
        if S < 1:
            raise bad(f"subs[0] has shape {list(msg.subs[0].shape)}, expected [clusters, D/M = {D // M}]")
        subs = np.stack([matrix(m, "subs", i, (S, D // M)) for i, m in enumerate(msg.subs)])
    pca = None
    if msg.HasField("pca_projection") or msg.HasField("pca_mean"):
        shape = tuple(msg.pca_projection.shape)
        if len(shape) != 2 or shape[1] != D:
            raise bad(f"pca_projection has shape {list(shape)}, expected [D_in, D={D}]")
        P = matrix(msg.pca_projection, "pca_projection", 0, shape)
        mean = np.asarray(msg.pca_mean.values, dtype=np.float64)
        if mean.shape != (shape[0],):
            raise bad(f"pca_mean has {mean.size} values, expected D_in = {shape[0]}")
        pca = PCA(mean, P)
    declared = msg.num_subquantizers if msg.HasField("num_subquantizers") else None
    return cls(Cs, Rs, mus, subs, M=M, pca=pca, num_subquantizers=declared)


def load(path) -> LOPQModel:
    return LOPQModel.load(path)


def codes_to_json(coarse: Sequence[int], fine: Sequence[int]) -> str:
    """One code in the reference's text form: ``[[c0, c1], [f0, ..., fM-1]]``."""
    return "[[" + ", ".join(str(int(c)) for c in coarse) + "], [" + ", ".join(str(int(f)) for f in fine) + "]]"
