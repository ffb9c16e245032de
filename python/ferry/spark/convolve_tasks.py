"""What the executors run for ferry.spark.Convolve: the planning and the computing pass of one
partition. Kept apart from the pyspark.ml classes so a Python worker imports only numpy,
pyarrow and the stage."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ferry.arrow import column_numpy, complex_from_columns
from ferry.errors import InputError
from ferry.spark.zip_imports import keep_spark_zip_directories
from ferry.stages.convolve import StreamConvolver, runs_of


def compute_rows(batches, plan, kernel, mode, n, names):
    """The computing pass as a mapInArrow function: this partition's runs between their halos."""
    from pyspark import TaskContext
    keep_spark_zip_directories()
    yield from compute_partition(TaskContext.get().partitionId(), plan.value, batches, kernel, mode, n, names)


def plan_partition(batches, keep: int, max_runs: int):
    """Planning pass of one partition: its runs, with their first and last `keep` samples."""
    from pyspark import TaskContext
    keep_spark_zip_directories()
    part = TaskContext.get().partitionId()
    runs: list[list] = []   # [start, length, head list, tail array]
    for b in batches:
        for name in ("id", "real", "imag"):
            col = b.column(name)
            if col.null_count:
                row = int(np.flatnonzero(~np.asarray(col.is_valid()))[0])
                sid = b.column("id")[row].as_py()
                where = f"at id {sid}" if sid is not None else f"in partition {part}"
                yield problem(part, f"column {name!r} holds null values (the first {where}); drop or fill them")
                return
        ids = b.column("id").to_numpy()
        x = complex_from_columns(b.column("real").to_numpy(), b.column("imag").to_numpy())
        starts, ends = runs_of(ids)
        for k, (a, e) in enumerate(zip(starts, ends)):
            if k == 0 and runs and runs[-1][0] + runs[-1][1] == ids[a]:
                r = runs[-1]            # this batch continues the previous run
            else:
                r = [int(ids[a]), 0, [], x[:0]]
                runs.append(r)
                if len(runs) > max_runs:
                    yield problem(part, "fragmented")
                    return
            seg = x[a:e]
            if len(r[2]) < keep:
                r[2].extend(seg[:keep - len(r[2])])
            r[3] = np.concatenate((r[3], seg))[-keep:] if keep else seg[:0]
            r[1] += int(e - a)
    for i, (start, length, head, tail) in enumerate(runs):
        head = np.asarray(head, np.complex128)
        yield pa.RecordBatch.from_pylist([{
            "partition": part, "index": i, "start": start, "length": length,
            "head_real": head.real.tolist(), "head_imag": head.imag.tolist(),
            "tail_real": tail.real.tolist(), "tail_imag": tail.imag.tolist(), "problem": None}],
            schema=PLAN_ARROW)



PLAN_ARROW = pa.schema([("partition", pa.int32()), ("index", pa.int32()), ("start", pa.int64()),
                         ("length", pa.int64()), ("head_real", pa.list_(pa.float64())),
                         ("head_imag", pa.list_(pa.float64())), ("tail_real", pa.list_(pa.float64())),
                         ("tail_imag", pa.list_(pa.float64())), ("problem", pa.string())])


def problem(part: int, text: str) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([{"partition": part, "index": -1, "start": 0, "length": 0, "head_real": [],
                                        "head_imag": [], "tail_real": [], "tail_imag": [], "problem": text}],
                                      schema=PLAN_ARROW)


def compute_partition(part, plan, batches, kernel, mode, n, names):
    """Feeds one partition's runs, each between its halos, through one StreamConvolver."""
    runs = plan.get(part, [])
    conv = StreamConvolver(kernel, mode, n)
    out_schema = pa.schema([(names[0], pa.int64(), False), (names[1], pa.float64(), False),
                            (names[2], pa.float64(), False)])
    run_i, pos = -1, 0          # current run, and rows of it seen so far
    for b in batches:
        ids = column_numpy(b, "id", np.int64)
        x = complex_from_columns(column_numpy(b, "real"), column_numpy(b, "imag"))
        out_ids, out_vals = [], []

        def emit(i, v):
            out_ids.append(i)
            out_vals.append(v)

        at = 0
        while at < ids.size:
            if run_i < 0 or pos == runs[run_i][1]:
                if run_i >= 0:
                    start, length, _, right = runs[run_i]
                    emit(*conv.feed(np.arange(start + length, start + length + right.size), right,
                                    np.ones(right.size, bool)))
                run_i, pos = run_i + 1, 0
                if run_i >= len(runs):
                    raise InputError("The input changed between the planning and the computing pass "
                                     f"(partition {part} has more rows than planned); cache or checkpoint it")
                start, length, left, _ = runs[run_i]
                emit(*conv.feed(np.arange(start - left.size, start), left, np.ones(left.size, bool)))
            start, length = runs[run_i][0], runs[run_i][1]
            take = min(length - pos, ids.size - at)
            if ids[at] != start + pos or (take > 1 and ids[at + take - 1] != start + pos + take - 1):
                raise InputError("The input changed between the planning and the computing pass (partition "
                                 f"{part}: expected id {start + pos}, found {int(ids[at])}); cache or checkpoint it")
            emit(*conv.feed(ids[at:at + take], x[at:at + take]))
            pos += take
            at += take
        yield _out_batch(out_ids, out_vals, out_schema)
    if run_i >= 0:
        start, length, _, right = runs[run_i]
        if pos != length or run_i != len(runs) - 1:
            raise InputError("The input changed between the planning and the computing pass "
                             f"(partition {part} has fewer rows than planned); cache or checkpoint it")
        tail_ids, tail_vals = conv.feed(np.arange(start + length, start + length + right.size), right,
                                        np.ones(right.size, bool))
        yield _out_batch([tail_ids], [tail_vals], out_schema)
    elif runs:
        raise InputError(f"The input changed between the planning and the computing pass (partition {part} "
                         "is empty but was planned with rows); cache or checkpoint it")
    conv.finish()


def _out_batch(ids, vals, schema):
    ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
    vals = np.concatenate(vals) if vals else np.empty(0, np.complex128)
    vals = vals.astype(np.complex128, copy=False)
    return pa.RecordBatch.from_arrays([pa.array(ids), pa.array(np.ascontiguousarray(vals.real)),
                                       pa.array(np.ascontiguousarray(vals.imag))], schema=schema)
