"""Arrow <-> numpy and Arrow IPC messages: the only way data crosses a process boundary.

Schemas and record batches travel as IPC *encapsulated messages* (the schema once per stream,
then one message per batch). Reading a batch is zero-copy: numpy views point into the
received bytes.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from ferry.errors import InputError

#: Default caps for one batch on the wire: throughput levels off near 1 MB per message.
DEFAULT_MAX_ROWS = 65536
DEFAULT_MAX_BYTES = 4 << 20


def schema_to_bytes(schema: pa.Schema) -> bytes:
    return schema.serialize().to_pybytes()


def schema_from_bytes(data: bytes) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(data))


def batch_to_bytes(batch: pa.RecordBatch) -> bytes:
    return batch.serialize().to_pybytes()


def batch_from_bytes(data: bytes, schema: pa.Schema) -> pa.RecordBatch:
    return pa.ipc.read_record_batch(pa.py_buffer(data), schema)


def empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    # pa.nulls, not pa.array([]): pa.array imports pandas on its first call (~0.5 s of CPU in each
    # fresh worker whose stage answers a batch with nothing, as tiles_emit and tiles_reduce do).
    return pa.RecordBatch.from_arrays([pa.nulls(0, f.type) for f in schema], schema=schema)


def split_batch(batch: pa.RecordBatch, max_rows: int = DEFAULT_MAX_ROWS,
                max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[pa.RecordBatch]:
    """Slices batch into zero-copy pieces of at most max_rows rows and about max_bytes bytes.

    A single row larger than max_bytes travels alone (it cannot be split further).
    """
    n = batch.num_rows
    if n == 0:
        yield batch
        return
    bytes_per_row = max(1.0, batch.nbytes / n)
    step = max(1, min(max_rows, int(max_bytes // bytes_per_row)))
    for start in range(0, n, step):
        yield batch.slice(start, step)


def column_numpy(batch: pa.RecordBatch, name: str, dtype=None) -> np.ndarray:
    """A numpy view of a column without nulls; raises InputError naming the first null row."""
    col = batch.column(batch.schema.get_field_index(name))
    if col.null_count:
        first = int(np.flatnonzero(~np.asarray(col.is_valid()))[0])
        raise InputError(
            f"Column {name!r} has {col.null_count} null value(s), the first at row {first} of the batch; "
            "nulls cannot be computed on: drop or fill them first"
        )
    arr = col.to_numpy(zero_copy_only=False)
    return arr if dtype is None else arr.astype(dtype, copy=False)


def complex_from_columns(real: np.ndarray, imag: np.ndarray | None) -> np.ndarray:
    """Two float columns -> one complex128 array (neither Arrow nor Spark has a complex type)."""
    out = np.empty(len(real), dtype=np.complex128)
    out.real = real
    out.imag = 0.0 if imag is None else imag
    return out
