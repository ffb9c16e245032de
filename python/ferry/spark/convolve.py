"""``ferry.spark.Convolve``: exact convolution of a DataFrame series, in-process on PySpark."""
from __future__ import annotations

import functools

import numpy as np
from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import DataFrame, functions as F, types as T

from ferry.arrow import complex_from_columns
from ferry.errors import InputError, InvalidParamsError, SchemaError
from ferry.spark import convolve_tasks
from ferry.spark.halo_plan import Run, check_coverage, halos
from ferry.stages.convolve import MODES

#: A partition with more runs than this is not laid out contiguously (e.g. after repartition(n));
#: the data is then re-laid out by id range before computing.
MAX_RUNS_PER_PARTITION = 1024

_PLAN_SCHEMA = T.StructType([
    T.StructField("partition", T.IntegerType()),
    T.StructField("index", T.IntegerType()),
    T.StructField("start", T.LongType()),
    T.StructField("length", T.LongType()),
    T.StructField("head_real", T.ArrayType(T.DoubleType())),
    T.StructField("head_imag", T.ArrayType(T.DoubleType())),
    T.StructField("tail_real", T.ArrayType(T.DoubleType())),
    T.StructField("tail_imag", T.ArrayType(T.DoubleType())),
    T.StructField("problem", T.StringType()),
])


class Convolve(Transformer, DefaultParamsReadable, DefaultParamsWritable):
    """numpy.convolve over the whole series held in a DataFrame, however it is partitioned.

    The input has one row per sample: an id column (the sample index, a dense range 0..N-1) and
    real and imaginary parts. The output has one row per output sample of
    ``numpy.convolve(x, kernel, mode)`` with the same three column names; other input columns
    are not carried over (rows do not correspond one to one in the "full" and "valid" modes).

    Examples
    --------
    >>> from ferry.spark import Convolve
    >>> conv = Convolve(kernelReal=[0.25, 0.5, 0.25], mode="same")
    >>> conv.getMode()
    'same'
    """

    idCol = Param(Params._dummy(), "idCol", "sample index column (long), a dense range 0..N-1",
                  typeConverter=TypeConverters.toString)
    realCol = Param(Params._dummy(), "realCol", "real part column (double)", typeConverter=TypeConverters.toString)
    imagCol = Param(Params._dummy(), "imagCol", "imaginary part column (double); empty for a real series",
                    typeConverter=TypeConverters.toString)
    kernelReal = Param(Params._dummy(), "kernelReal", "real parts of the kernel taps (at least one)",
                       typeConverter=TypeConverters.toListFloat)
    kernelImag = Param(Params._dummy(), "kernelImag", "imaginary parts of the taps; empty for a real kernel",
                       typeConverter=TypeConverters.toListFloat)
    mode = Param(Params._dummy(), "mode", "numpy.convolve mode: full, same (default) or valid",
                 typeConverter=TypeConverters.toString)

    @keyword_only
    def __init__(self, *, idCol="id", realCol="real", imagCol="imag", kernelReal=None, kernelImag=None, mode="same"):
        super().__init__()
        self._setDefault(idCol="id", realCol="real", imagCol="imag", kernelImag=[], mode="same")
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, idCol="id", realCol="real", imagCol="imag", kernelReal=None, kernelImag=None, mode="same"):
        return self._set(**{k: v for k, v in self._input_kwargs.items() if v is not None})

    def setIdCol(self, value): return self._set(idCol=value)
    def setRealCol(self, value): return self._set(realCol=value)
    def setImagCol(self, value): return self._set(imagCol=value)
    def setKernelReal(self, value): return self._set(kernelReal=value)
    def setKernelImag(self, value): return self._set(kernelImag=value)
    def setMode(self, value): return self._set(mode=value)
    def getIdCol(self): return self.getOrDefault(self.idCol)
    def getRealCol(self): return self.getOrDefault(self.realCol)
    def getImagCol(self): return self.getOrDefault(self.imagCol)
    def getKernelReal(self): return self.getOrDefault(self.kernelReal)
    def getKernelImag(self): return self.getOrDefault(self.kernelImag)
    def getMode(self): return self.getOrDefault(self.mode)

    def kernel(self) -> np.ndarray:
        """The kernel as complex128, after checking the params."""
        if not self.isDefined(self.kernelReal) or not self.getKernelReal():
            raise InvalidParamsError("Convolve needs kernelReal with at least one tap: setKernelReal([...])")
        real, imag = self.getKernelReal(), self.getKernelImag()
        if imag and len(imag) != len(real):
            raise InvalidParamsError(f"kernelImag has {len(imag)} taps but kernelReal has {len(real)}; give both "
                                     "parts for every tap, or leave kernelImag empty for a real kernel")
        if self.getMode() not in MODES:
            raise InvalidParamsError(f"mode must be one of {', '.join(MODES)}, got {self.getMode()!r}")
        return complex_from_columns(np.asarray(real, np.float64), np.asarray(imag, np.float64) if imag else None)

    def outputSchema(self, schema: T.StructType) -> T.StructType:
        """Checks the input schema and params; the output schema (raised on the driver, before any job)."""
        self.kernel()
        numeric = (T.DoubleType, T.FloatType)
        wanted = [(self.getIdCol(), (T.LongType, T.IntegerType), "long")]
        wanted += [(self.getRealCol(), numeric, "double")]
        if self.getImagCol():
            wanted += [(self.getImagCol(), numeric, "double")]
        for name, types, label in wanted:
            if name not in schema.names:
                raise SchemaError(f"Convolve needs a column {name!r} ({label}); the DataFrame has {schema.names}")
            found = schema[name].dataType
            if not isinstance(found, types):
                raise SchemaError(f"Convolve: column {name!r} must be {label}, found {found.simpleString()}; "
                                  "cast it first")
        return T.StructType([T.StructField(self.getIdCol(), T.LongType(), False),
                             T.StructField(self.getRealCol(), T.DoubleType(), False),
                             T.StructField(self.getImagCol() or "imag", T.DoubleType(), False)])

    def _transform(self, dataset: DataFrame) -> DataFrame:
        out_schema = self.outputSchema(dataset.schema)
        if dataset.isStreaming:
            raise InputError("Convolve needs the whole series, so it cannot run on a streaming DataFrame; "
                             "convolve each micro-batch with foreachBatch, or collect the series first")
        kernel, mode = self.kernel(), self.getMode()
        imag = F.col(self.getImagCol()).cast("double") if self.getImagCol() else F.lit(0.0)
        selected = dataset.select(F.col(self.getIdCol()).cast("long").alias("id"),
                                  F.col(self.getRealCol()).cast("double").alias("real"),
                                  imag.alias("imag"))
        # A scan of files reads the same rows into the same partitions each time: one aggregate
        # query plans it, Spark reading the columns without Python, and nothing is pinned.
        runs = _plan_file_scan(selected, kernel.size) if reads_files_only(selected) else None
        series = selected
        if runs is None:
            # The planning and the computing pass must see the same rows in the same partitions,
            # which any other DataFrame evaluated twice does not promise (repartitionByRange seeds
            # its sampler with the RDD id, for one): pin the series; the planning pass materializes it.
            series = selected.localCheckpoint(eager=False)
            runs = _plan(series, kernel.size)
        if runs is None:
            # Not laid out contiguously (e.g. after repartition(n)): lay it out by id range once.
            series = series.repartitionByRange(max(series.rdd.getNumPartitions(), 1), "id") \
                           .sortWithinPartitions("id").localCheckpoint(eager=False)
            runs = _plan(series, kernel.size)
        n = check_coverage(runs)
        spark = dataset.sparkSession
        if n == 0:
            return spark.createDataFrame([], out_schema)
        halo_map = halos(runs, n, kernel.size, mode)
        plan = {}
        for r in runs:
            plan.setdefault(r.partition, []).append((r.start, r.length, *halo_map[(r.partition, r.index)]))
        plan_bc = spark.sparkContext.broadcast(plan)
        names = out_schema.names
        compute = functools.partial(convolve_tasks.compute_rows, plan=plan_bc, kernel=kernel, mode=mode, n=n,
                                    names=names)
        arrow_schema = T.StructType([T.StructField(name, f.dataType, False) for name, f in zip(names, out_schema)])
        return series.mapInArrow(compute, arrow_schema)


#: Physical operators between a file scan and the selected columns that keep its rows and partitions.
_ROW_PRESERVING = {"ProjectExec", "ColumnarToRowExec", "WholeStageCodegenExec", "InputAdapter", "FileSourceScanExec"}


def reads_files_only(df: DataFrame) -> bool:
    """Whether df is a file scan with its columns projected (no shuffle, filter or other source):
    then every evaluation reads the same rows into the same partitions in the same order."""
    try:
        nodes, scans = [df._jdf.queryExecution().executedPlan()], 0
        while nodes:
            node = nodes.pop()
            name = node.getClass().getSimpleName()
            if name not in _ROW_PRESERVING:
                return False
            scans += name == "FileSourceScanExec"
            children = node.children()
            nodes.extend(children.apply(i) for i in range(children.size()))
        return scans == 1
    except Exception:  # a plan this check does not know: plan it the general way
        return False


def _plan_file_scan(series: DataFrame, taps: int) -> list[Run] | None:
    """The runs of a file scan from one aggregate query (None when a file split holds more than
    one run: the general planner then finds them), their edge samples from a second, filtered one.

    A partition reads its file splits one after another, so the query groups rows by partition
    and split: a split is one run when its ids minus their row positions (the low 33 bits of
    monotonically_increasing_id()) are all equal. Splits of a partition that continue each
    other (ids and rows) make one run, as the general planner would find it.
    """
    pos = F.monotonically_increasing_id().bitwiseAND(F.lit((1 << 33) - 1))
    null_id = {c: F.min(F.when(F.col(c).isNull(), F.col("id"))) for c in ("real", "imag")}
    stats = (series.select(F.spark_partition_id().alias("p"), F.input_file_name().alias("file"),
                           F.input_file_block_start().alias("block"), pos.alias("pos"), "id", "real", "imag")
             .groupBy("p", "file", "block")
             .agg(F.min(F.col("id") - F.col("pos")).alias("lo"), F.max(F.col("id") - F.col("pos")).alias("hi"),
                  F.min("id").alias("start"), F.min("pos").alias("first"), F.count(F.lit(1)).alias("rows"),
                  F.count("id").alias("ids"), null_id["real"].alias("null_real"), null_id["imag"].alias("null_imag"))
             .collect())
    stats.sort(key=lambda r: (r.p, r.first))
    for row in stats:
        if row.ids < row.rows:
            raise InputError(f"Convolve: column 'id' holds null values (the first in partition {row.p}); drop or "
                             "fill them")
        for c in ("real", "imag"):
            if row[f"null_{c}"] is not None:
                raise InputError(f"Convolve: column {c!r} holds null values (the first at id {row[f'null_{c}']}); "
                                 "drop or fill them")
    if any(row.lo != row.hi for row in stats):
        return None
    spans: list[list[int]] = []     # [partition, start id, rows, first row position]
    for row in stats:
        last = spans[-1] if spans else None
        if last and last[0] == row.p and last[1] + last[2] == row.start and last[3] + last[2] == row.first:
            last[2] += row.rows
        elif row.rows:
            spans.append([row.p, row.start, row.rows, row.first])
    per_partition = np.bincount([sp[0] for sp in spans]) if spans else np.zeros(0, int)
    if per_partition.size and per_partition.max() > MAX_RUNS_PER_PARTITION:
        return None
    keep = taps - 1
    ids, vals = np.zeros(0, np.int64), np.zeros(0, np.complex128)
    if keep and spans:
        # The first and last K = taps - 1 samples of every run, in one filtered scan (Parquet skips
        # the row groups outside them).
        cond = None
        for _, start, length, _ in spans:
            for lo, hi in ((start, start + min(keep, length)), (start + length - min(keep, length), start + length)):
                c = (F.col("id") >= lo) & (F.col("id") < hi)
                cond = c if cond is None else cond | c
        t = series.where(cond).toArrow()
        ids = t.column("id").to_numpy()
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        vals = complex_from_columns(t.column("real").to_numpy(), t.column("imag").to_numpy())[order]

    def samples(lo: int, hi: int) -> np.ndarray:
        a, b = np.searchsorted(ids, [lo, hi])
        if b - a != hi - lo:
            raise InputError(f"The input changed between the planning queries (ids {lo}..{hi - 1}: planned "
                             f"{hi - lo} rows, found {b - a}); cache or checkpoint it")
        return vals[a:b]

    index: dict[int, int] = {}
    runs = []
    for p, start, length, _ in spans:
        index[p] = index.get(p, -1) + 1
        runs.append(Run(p, index[p], start, length, samples(start, start + min(keep, length)),
                        samples(start + length - min(keep, length), start + length)))
    return runs


def _plan(series: DataFrame, taps: int) -> list[Run] | None:
    """The runs of every partition (None when some partition is too fragmented); raises on nulls."""
    task = functools.partial(convolve_tasks.plan_partition, keep=taps - 1, max_runs=MAX_RUNS_PER_PARTITION)
    rows = series.mapInArrow(task, _PLAN_SCHEMA).collect()
    runs = []
    for row in rows:
        if row.problem == "fragmented":
            return None
        if row.problem:
            raise InputError(f"Convolve: {row.problem}")
        runs.append(Run(row.partition, row.index, row.start, row.length,
                        complex_from_columns(np.asarray(row.head_real), np.asarray(row.head_imag)),
                        complex_from_columns(np.asarray(row.tail_real), np.asarray(row.tail_imag))))
    return runs
