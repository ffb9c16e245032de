"""Small purpose-built stages that the worker tests (Python and Scala) load with --stages."""
import time

import numpy as np
import pyarrow as pa

from ferry.registry import Param, require_columns, stage


@stage("identity", output_schema=lambda schema, params: schema,
       doc="Returns every input batch unchanged (any columns).")
def identity(batch):
    return batch


@stage("raise_error", params=[Param("message", "string", "Text of the ValueError.", default="boom")],
       output_schema=lambda schema, params: schema, doc="Raises ValueError(message) on the first batch.")
def raise_error(batch, message):
    def deeper():
        raise ValueError(message)
    deeper()


def _scale_schema(schema, params):
    require_columns("scale", schema, {"x": pa.float64()})
    return pa.schema([("y", pa.float64())])


@stage("scale", params=[Param("factor", "float", "Multiplier.", check=lambda v: None if v != 0 else "must not be 0")],
       output_schema=_scale_schema, doc="y = factor * x.")
def scale(batch, factor):
    x = batch.column("x").to_numpy(zero_copy_only=False)
    return pa.RecordBatch.from_arrays([pa.array(factor * x)], names=["y"])


@stage("slow", params=[Param("seconds", "float", "Sleep per batch.", default=0.2)],
       output_schema=lambda schema, params: schema, doc="Sleeps, then returns the batch (for timeouts).")
def slow(batch, seconds):
    time.sleep(seconds)
    return batch


@stage("running_sum", output_schema=lambda schema, params: pa.schema([("total", pa.float64())]),
       doc="Stateful: emits nothing per batch, and the sum of column x when the stream ends.")
class RunningSum:
    def __init__(self):
        self.total = 0.0

    def process(self, batch):
        self.total += float(np.sum(batch.column("x").to_numpy(zero_copy_only=False)))
        return None

    def finish(self):
        return {"total": [self.total]}


@stage("running_sums", params=[Param("pieces", "int", "Batches finish yields.", default=3)],
       output_schema=lambda schema, params: pa.schema([("piece", pa.int64()), ("total", pa.float64())]),
       doc="Stateful: emits nothing per batch; when the stream ends, `pieces` batches (a generator), "
           "the sum of column x in each.")
class RunningSums:
    def __init__(self, pieces):
        self.pieces, self.total = pieces, 0.0

    def process(self, batch):
        self.total += float(np.sum(batch.column("x").to_numpy(zero_copy_only=False)))
        return None

    def finish(self):
        return ({"piece": [i], "total": [self.total]} for i in range(self.pieces))


@stage("repeat", params=[Param("times", "int", "Copies of each row.", check=lambda v: None if v >= 1 else "must be >= 1")],
       output_schema=lambda schema, params: schema, doc="Each input row `times` times (output larger than input).")
def repeat(batch, times):
    return batch.take(pa.array(np.repeat(np.arange(batch.num_rows), times)))
