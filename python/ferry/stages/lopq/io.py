"""Reading vectors: texmex .fvecs files, and the reference's text format of pickled arrays.

The reference's Spark jobs read lines ``id<TAB>base64(pickle(numpy array))``. Unpickling runs
whatever the pickle names, so these lines go through an unpickler that admits numpy arrays of
numbers and nothing else; anything else is refused before it runs.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import pickle
from typing import Iterable, Iterator

import numpy as np

from ferry.errors import InputError
from ferry.stages.lopq.errors import UnsafePickleError


def read_fvecs(path, max_rows: int | None = None) -> np.ndarray:
    """A texmex .fvecs file as float32 (N, D): each vector is int32 D, then D float32 values."""
    raw = np.fromfile(path, dtype="<i4")
    if raw.size == 0:
        return np.empty((0, 0), dtype=np.float32)
    D = int(raw[0])
    size = os.path.getsize(path)
    if D <= 0 or raw.size % (D + 1) or size % 4:
        raise InputError(
            f"{os.fspath(path)!r} is not an .fvecs file of dimension {D}: its {size} bytes are not a whole number "
            f"of {4 * (D + 1)}-byte records (int32 dimension + {D} float32); the file is truncated or not .fvecs"
        )
    rows = raw.reshape(-1, D + 1)
    if max_rows is not None:
        rows = rows[:max_rows]
    dims = rows[:, 0]
    if (dims != D).any():
        bad = int(np.flatnonzero(dims != D)[0])
        raise InputError(f"{os.fspath(path)!r}: record {bad} has dimension {int(dims[bad])}, the first has {D}; "
                         ".fvecs files hold vectors of one dimension")
    return np.ascontiguousarray(rows[:, 1:]).view("<f4").astype(np.float32, copy=False)


def write_fvecs(path, X) -> None:
    X = np.asarray(X, dtype="<f4")
    if X.ndim != 2:
        raise InputError(f"write_fvecs takes a 2-D array, got shape {X.shape}")
    out = np.empty((X.shape[0], X.shape[1] + 1), dtype="<f4")
    out[:, 0] = np.array(X.shape[1], dtype="<i4").view("<f4")
    out[:, 1:] = X
    out.tofile(path)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals numpy needs to rebuild an ndarray; everything else is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Protocol 5 rebuilds contiguous arrays from their bytes.
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return getattr(_numpy_module(module), name)
        if (module, name) == ("_codecs", "encode"):
            # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1").
            return _latin1_encode
        raise UnsafePickleError(
            f"the pickle names {module}.{name}; only numpy arrays are accepted (numpy.ndarray, numpy.dtype, "
            "numpy.core.multiarray._reconstruct) and nothing is run. Store vectors as numpy arrays, or better "
            "as .fvecs or Parquet"
        )


def _numpy_module(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        # numpy 2 moved numpy.core to numpy._core; pickles name either.
        return importlib.import_module(module.replace("numpy.core", "numpy._core"))


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    if encoding not in ("latin1", "latin-1", "iso-8859-1") or not isinstance(text, str):
        raise UnsafePickleError(f"the pickle calls _codecs.encode with {encoding!r}; only latin1 bytes are accepted")
    return text.encode("latin1")


def loads_vector(data: bytes) -> np.ndarray:
    """One pickled numpy array, through the numpy-only unpickler; a 1-D float64 vector."""
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickleError:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed pickle is bad input
        raise InputError(f"a vector does not unpickle ({type(e).__name__}: {e}); expected a pickled numpy array") from None
    if not isinstance(obj, np.ndarray):
        raise UnsafePickleError(f"the pickle holds a {type(obj).__name__}, not a numpy array")
    if obj.dtype.hasobject or not (np.issubdtype(obj.dtype, np.number) or obj.dtype == bool):
        raise UnsafePickleError(f"the pickled array has dtype {obj.dtype}; only numeric arrays are accepted")
    return np.asarray(obj, dtype=np.float64).ravel()


def parse_text_line(line: str | bytes) -> tuple[str, np.ndarray]:
    """``id<TAB>base64(pickle(array))`` -> (id, vector)."""
    if isinstance(line, bytes):
        line = line.decode("utf-8")
    line = line.rstrip("\r\n")
    key, sep, payload = line.partition("\t")
    if not sep:
        raise InputError(f"a line must be 'id<TAB>base64 pickled array', found no tab in {line[:80]!r}")
    try:
        data = base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"the vector of id {key!r} is not valid base64 ({e})") from None
    return key, loads_vector(data)


def iter_text_vectors(lines: Iterable[str | bytes]) -> Iterator[tuple[str, np.ndarray]]:
    for line in lines:
        if line.strip():
            yield parse_text_line(line)


def read_text_vectors(path) -> tuple[list[str], np.ndarray]:
    """A file of ``id<TAB>base64 pickled array`` lines as (ids, float64 (N, D))."""
    ids, vecs = [], []
    with open(path, "rb") as f:
        for i, (key, vec) in enumerate(iter_text_vectors(f)):
            if vecs and vec.shape != vecs[0].shape:
                raise InputError(f"{os.fspath(path)!r} line {i + 1} (id {key!r}) has dimension {vec.size}, "
                                 f"the first line has {vecs[0].size}")
            ids.append(key)
            vecs.append(vec)
    return ids, (np.stack(vecs) if vecs else np.empty((0, 0)))


def format_code_line(item_id, coarse, fine) -> str:
    """The reference's output line: ``id<TAB>[[c0, c1], [f0, ..., fM-1]]``."""
    from ferry.stages.lopq.model import codes_to_json

    return f"{item_id}\t{codes_to_json(coarse, fine)}"
