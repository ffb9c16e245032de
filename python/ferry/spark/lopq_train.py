"""LOPQ training on Spark: every pass of ferry.stages.lopq.train as an RDD reduction.

The data is an RDD of vector blocks (packed float64 arrays), cached once. A pass ships the
training state (float64 npz bytes) by broadcast, runs the pass's ``chunk`` over each partition
(``mapPartitions``), merges the partials with ``treeReduce(combine, depth=agg_depth)`` and runs
``aggregate`` on the driver. The passes, their order and the early stopping are the in-process
driver's (``train.drive``), and sampling is decided by row hashes, so a seed samples the same
rows and seeds k-means++ alike here and in ``ferry.lopq.fit`` for any partitioning. The models
are equally good but not equal: the Lloyd steps' float32 near-ties can fall otherwise with
another partitioning (see ``ferry.stages.lopq.train``).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np

from ferry.errors import InputError
from ferry.spark import lopq_tasks as tasks
from ferry.stages.lopq import train as T
from ferry.stages.lopq.model import PCA, LOPQModel, as_vectors

#: The reference's default depth of tree aggregation.
DEFAULT_AGG_DEPTH = 4


def check_agg_depth(depth: int) -> int:
    from ferry.errors import InvalidParamsError

    if int(depth) != depth or depth < 1:
        raise InvalidParamsError(f"agg_depth (the depth of tree aggregation) must be an integer >= 1, got {depth!r}")
    return int(depth)


def reduce_pass(blocks, name: str, state: T.TrainState, agg_depth: int = DEFAULT_AGG_DEPTH):
    """A pass's chunk on every partition, its partials combined as a tree of depth agg_depth."""
    sc = blocks.context
    state_bc = sc.broadcast(T.state_to_bytes(state))
    try:
        parts = blocks.mapPartitions(functools.partial(_pass_partition, name=name, state_bc=state_bc))
        try:
            merged = parts.treeReduce(tasks.combine_records(name), depth=agg_depth)
        except ValueError as e:
            if "empty" not in str(e).lower():
                raise
            raise InputError(f"no training vectors reached pass {name!r}: the data (after sampling) is empty; "
                             "give more data or a larger sampling ratio") from None
    finally:
        state_bc.destroy(blocking=False)
    tasks.reraise(merged)
    return T.partial_from_bytes(merged)


def run_pass(blocks, name: str, state: T.TrainState, agg_depth: int = DEFAULT_AGG_DEPTH) -> T.TrainState:
    """One training pass over an RDD of packed blocks: chunk per partition, tree combine, aggregate."""
    return T.PASSES[name].aggregate(reduce_pass(blocks, name, state, agg_depth), state)


def _pass_partition(blocks, name, state_bc):
    return tasks.pass_partition(blocks, name, state_bc.value)


def fit(blocks, D_in: int, V: int | None = None, M: int | None = None, subquantizer_clusters: int = 256, *,
        agg_depth: int = DEFAULT_AGG_DEPTH, steps: Sequence[int] = (0, 1, 2),
        existing: LOPQModel | PCA | None = None, sampling_ratio: float = 1.0,
        subquantizer_sampling_ratio: float = 1.0,
        progress: Callable[[str, T.TrainState, float], None] | None = None, **config) -> T.TrainState:
    """Trains on Spark; the arguments are ``ferry.lopq.fit``'s, the data an RDD of packed blocks
    (see :func:`blocks_from_dataframe` and friends). Returns the final training state."""
    agg_depth = check_agg_depth(agg_depth)
    state = T.initial_state(D_in, V, M, subquantizer_clusters, existing=existing, **config)
    steps = T.check_steps(steps, state)
    seed = state.config.seed
    T.sample_mask(np.empty((0, 1)), sampling_ratio, seed)               # checks the ratios up front
    T.sample_mask(np.empty((0, 1)), subquantizer_sampling_ratio, seed)
    data = blocks.mapPartitions(functools.partial(tasks.sampled, ratio=sampling_ratio,
                                                  seed=seed + T.SAMPLING_SALT)).persist()
    sub_data = None
    try:
        def run(name: str, st: T.TrainState) -> T.TrainState:
            nonlocal sub_data
            if name.startswith("sub_") and subquantizer_sampling_ratio < 1.0:
                if sub_data is None:
                    sub_data = data.mapPartitions(functools.partial(
                        tasks.sampled, ratio=subquantizer_sampling_ratio, seed=seed + T.SUB_SAMPLING_SALT)).persist()
                return run_pass(sub_data, name, st, agg_depth)
            return run_pass(data, name, st, agg_depth)

        return T.drive(state, steps, run, progress)
    finally:
        data.unpersist()
        if sub_data is not None:
            sub_data.unpersist()


def pca_moments(blocks, agg_depth: int = DEFAULT_AGG_DEPTH, sampling_ratio: float = 1.0, seed: int = 0) -> T.Moments:
    """The count, mean and scatter of the (sampled) vectors: the PCA pass without its aggregate."""
    agg_depth = check_agg_depth(agg_depth)
    T.sample_mask(np.empty((0, 1)), sampling_ratio, seed)
    data = blocks.mapPartitions(functools.partial(tasks.sampled, ratio=sampling_ratio, seed=seed + T.SAMPLING_SALT))
    # Any config will do: the pca chunk reads none of it.
    return reduce_pass(data, "pca", T.TrainState(T.TrainConfig(D_in=2, V=1, M=2)), agg_depth)


# --- the data as blocks ---------------------------------------------------------------------------------

def blocks_from_dataframe(df, column: str):
    """(RDD of packed blocks, dimension) of an array<float>/array<double> column."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as ST

    if column not in df.columns:
        from ferry.errors import SchemaError
        raise SchemaError(f"no vector column {column!r}: the data has columns {df.columns}")
    dtype = df.schema[column].dataType
    if not (isinstance(dtype, ST.ArrayType) and isinstance(dtype.elementType, (ST.FloatType, ST.DoubleType))):
        from ferry.errors import SchemaError
        raise SchemaError(f"column {column!r} must be array<float> or array<double>, found {dtype.simpleString()}; "
                          "cast it first")
    first = df.select(F.size(column).alias("n")).where(F.col(column).isNotNull()).head()
    if first is None:
        raise InputError(f"no training vectors: column {column!r} is empty")
    dim = int(first["n"])
    rows = df.select(column).mapInArrow(functools.partial(tasks.blocks_from_arrow, column=column, dim=dim),
                                        "block binary, error string")
    return rows.rdd.map(_block_or_error), dim


def _block_or_error(row):
    if row["error"] is not None:
        kind, _, message = row["error"].partition("\t")
        return ("error", kind, message)
    return bytes(row["block"])


def blocks_from_arrays(rdd, dim: int | None = None):
    """(RDD of packed blocks, dimension) of an RDD of numpy vectors, as a data UDF returns."""
    if dim is None:
        first = rdd.take(1)
        if not first:
            raise InputError("no training vectors: the data UDF returned an empty RDD")
        dim = int(np.asarray(first[0]).size)
    return rdd.mapPartitions(functools.partial(tasks.blocks_from_arrays, dim=dim)), dim


def blocks_from_text(sc, path: str):
    """(RDD of packed blocks, dimension) of the reference's text format."""
    from ferry.stages.lopq.io import parse_text_line

    lines = sc.textFile(path)
    first = lines.filter(lambda line: line.strip()).take(1)
    if not first:
        raise InputError(f"no training vectors: {path} holds no lines")
    dim = parse_text_line(first[0])[1].size
    return lines.mapPartitions(functools.partial(tasks.blocks_from_text, dim=dim)), dim


def blocks_from_array(sc, X: np.ndarray, partitions: int | None = None):
    """(RDD of packed blocks, dimension) of vectors held by the driver (a .fvecs file, say)."""
    X = as_vectors(X, None, what="the training vectors")
    if X.shape[0] == 0:
        raise InputError("no training vectors: the array is empty")
    n = partitions or sc.defaultParallelism
    bounds = np.linspace(0, X.shape[0], n + 1).astype(int)
    packed = [tasks.pack(X[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
    return sc.parallelize(packed, len(packed)), X.shape[1]
