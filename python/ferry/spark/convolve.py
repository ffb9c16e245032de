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
        # The planning and the computing pass must see the same rows in the same partitions, which
        # a DataFrame evaluated twice does not promise (repartitionByRange seeds its sampler with
        # the RDD id, for one): pin the series once; the planning pass materializes it.
        series = dataset.select(F.col(self.getIdCol()).cast("long").alias("id"),
                                F.col(self.getRealCol()).cast("double").alias("real"),
                                imag.alias("imag")).localCheckpoint(eager=False)
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
