"""What the executors run for LOPQ on PySpark: vector blocks, one training pass over a
partition, encoding. Kept apart from the pyspark.ml classes so a Python worker imports only
numpy, pyarrow and the stage.

Blocks of vectors travel as ``.npy`` bytes and partials as npz bytes (loaded with
allow_pickle=False). A ferry error on an executor comes back as a record naming its class, so
the driver raises the same error with the same message instead of a Java stack trace.
"""
from __future__ import annotations

import functools
import io

import numpy as np
import pyarrow as pa

from ferry import errors
from ferry.stages.lopq import errors as lopq_errors
from ferry.stages.lopq import train as T
from ferry.stages.lopq.model import as_vectors
from ferry.spark.zip_imports import keep_spark_zip_directories

#: Vectors per cached block: the in-process driver's chunk size, so each block is one chunk.
BLOCK_ROWS = T.DEFAULT_CHUNK_ROWS

ERRORS = {cls.__name__: cls for cls in (
    *errors.BY_CATEGORY.values(), lopq_errors.ModelFormatError, lopq_errors.UnsafePickleError)}


def pack(X: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, X, allow_pickle=False)
    return buf.getvalue()


def unpack(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def failure(e: errors.FerryError) -> tuple:
    return ("error", type(e).__name__, str(e))


def reraise(record) -> None:
    """Raises the ferry error an executor reported, if the record is one."""
    if isinstance(record, tuple) and record and record[0] == "error":
        raise ERRORS.get(record[1], errors.InputError)(record[2])


def _blocks(vectors, dim: int, what: str):
    """Stacks an iterator of arrays (single vectors or row blocks) into checked blocks."""
    pending, rows = [], 0
    for v in vectors:
        X = as_vectors(v, dim, what=what)
        pending.append(X)
        rows += X.shape[0]
        if rows >= BLOCK_ROWS:
            yield np.concatenate(pending)
            pending, rows = [], 0
    if rows:
        yield np.concatenate(pending)


def guarded(fn):
    """A partition function whose ferry errors become one error record. It also keeps the reused
    Python worker from re-reading Spark's zip archives at every task (a training run is dozens
    of short tasks)."""
    @functools.wraps(fn)    # executors then import it by name instead of receiving its code
    def run(*args, **kwargs):
        keep_spark_zip_directories()
        try:
            yield from fn(*args, **kwargs)
        except errors.FerryError as e:
            yield failure(e)
    return run


@guarded
def blocks_from_arrays(arrays, dim: int):
    """An RDD partition of numpy arrays (the reference's data UDF output) -> packed blocks."""
    for X in _blocks(arrays, dim, "a training vector"):
        yield pack(X)


@guarded
def blocks_from_text(lines, dim: int | None):
    """Lines ``id<TAB>base64 pickled array`` -> packed blocks, through the numpy-only unpickler."""
    from ferry.stages.lopq.io import iter_text_vectors

    for X in _blocks((v for _, v in iter_text_vectors(lines)), dim, "a vector of the text input"):
        yield pack(X)


def blocks_from_arrow(batches, column: str, dim: int):
    """mapInArrow: a vector column -> one row of packed vectors per block (or an error row)."""
    from ferry.stages.lopq.stages import vectors_from_column

    keep_spark_zip_directories()

    @guarded
    def packed():
        vectors = (vectors_from_column("LopqEncoder", b.column(column), column) for b in batches)
        for X in _blocks(vectors, dim, f"column {column!r}"):
            yield pack(X)

    for item in packed():
        if isinstance(item, tuple):
            yield pa.RecordBatch.from_pydict({"block": [None], "error": [f"{item[1]}\t{item[2]}"]}, BLOCK_ARROW)
        else:
            yield pa.RecordBatch.from_pydict({"block": [item], "error": [None]}, BLOCK_ARROW)


BLOCK_ARROW = pa.schema([("block", pa.binary()), ("error", pa.string())])


def sampled(blocks, ratio: float, seed: int):
    """Keeps the rows a sampling ratio keeps; the row hash decides, so any partitioning agrees."""
    if ratio >= 1.0:
        # Every row kept: the packed blocks as they are, not unpacked and packed again.
        yield from blocks
        return
    for b in blocks:
        if isinstance(b, tuple):
            yield b
            continue
        X = unpack(b)
        keep = T.sample_mask(X, ratio, seed)
        if keep.any():
            yield pack(X[keep])


@guarded
def pass_partition(blocks, name: str, state_bytes: bytes):
    """One training pass over a partition: the chunk of every block, combined; one record."""
    p = T.PASSES[name]
    state = T.state_from_bytes(state_bytes)
    acc = None
    for b in blocks:
        reraise(b)
        part = p.chunk(unpack(b), state)
        acc = part if acc is None else p.combine(acc, part)
    if acc is not None:
        yield T.partial_to_bytes(acc)


def combine_records(name: str):
    """treeReduce's function: two packed partials (or error records) -> one."""
    combine = T.PASSES[name].combine

    def merge(a, b):
        if isinstance(a, tuple):
            return a
        if isinstance(b, tuple):
            return b
        return T.partial_to_bytes(combine(T.partial_from_bytes(a), T.partial_from_bytes(b)))
    return merge


# --- encoding ---------------------------------------------------------------------------------------------

def encode_batches(batches, params: dict, model_bc, coarse_col: str, fine_col: str):
    """mapInArrow: the lopq_encode stage on every batch; its codes appended to the input columns.

    params are the stage's resolved params, whose 'model' is the digest of the broadcast model
    bytes; the stage keeps the parsed model per Python worker, by digest.
    """
    from ferry import registry

    keep_spark_zip_directories()
    proc = registry.get("lopq_encode").open(params, {params["model"]: model_bc.value})
    for b in batches:
        out = proc.process(b)
        yield pa.RecordBatch.from_arrays(
            [*b.columns, out.column("coarse"), out.column("fine")],
            schema=b.schema.append(pa.field(coarse_col, pa.list_(pa.int32()))).append(
                pa.field(fine_col, pa.list_(pa.int32()))))
