"""``ferry.spark.LopqEncoder`` / ``LopqModel``: LOPQ training on Spark and encoding in-process."""
from __future__ import annotations

import functools
import hashlib
import logging

from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.util import DefaultParamsReader, DefaultParamsWriter, MLReadable, MLReader, MLWritable, MLWriter
from pyspark.sql import DataFrame
from pyspark.sql import types as ST

from ferry.errors import InvalidParamsError, SchemaError
from ferry.spark import lopq_tasks, lopq_train
from ferry.stages.lopq import train as T
from ferry.stages.lopq.model import LOPQModel

log = logging.getLogger("ferry.lopq")


class _LopqParams(Params):
    """Params shared by LopqEncoder and LopqModel."""

    vectorCol = Param(Params._dummy(), "vectorCol", "vector column, array<float> or array<double> (default 'vector')",
                      typeConverter=TypeConverters.toString)
    idCol = Param(Params._dummy(), "idCol", "id column, checked by the encoding stage (default 'id')",
                  typeConverter=TypeConverters.toString)
    coarseCol = Param(Params._dummy(), "coarseCol", "output column of coarse codes [c0, c1] (default 'coarse')",
                      typeConverter=TypeConverters.toString)
    fineCol = Param(Params._dummy(), "fineCol", "output column of fine codes [f0..fM-1] (default 'fine')",
                    typeConverter=TypeConverters.toString)

    def __init__(self):
        super().__init__()
        self._setDefault(vectorCol="vector", idCol="id", coarseCol="coarse", fineCol="fine")

    def getVectorCol(self): return self.getOrDefault(self.vectorCol)
    def getIdCol(self): return self.getOrDefault(self.idCol)
    def getCoarseCol(self): return self.getOrDefault(self.coarseCol)
    def getFineCol(self): return self.getOrDefault(self.fineCol)
    def setVectorCol(self, value): return self._set(vectorCol=value)
    def setIdCol(self, value): return self._set(idCol=value)
    def setCoarseCol(self, value): return self._set(coarseCol=value)
    def setFineCol(self, value): return self._set(fineCol=value)


class LopqEncoder(Estimator, _LopqParams, MLReadable, MLWritable):
    """Trains an LOPQ model on Spark: every training pass is a tree reduction over the data.

    Examples
    --------
    >>> from ferry.spark import LopqEncoder
    >>> enc = LopqEncoder(V=16, M=8, seed=1)
    >>> (enc.getV(), enc.getM(), enc.getSubquantizerClusters(), enc.getAggDepth())
    (16, 8, 256, 4)
    """

    V = Param(Params._dummy(), "V", "coarse clusters per half (>= 1)", typeConverter=TypeConverters.toInt)
    M = Param(Params._dummy(), "M", "subquantizers in total (even, dividing D)", typeConverter=TypeConverters.toInt)
    subquantizerClusters = Param(Params._dummy(), "subquantizerClusters", "clusters per subquantizer (default 256)",
                                 typeConverter=TypeConverters.toInt)
    seed = Param(Params._dummy(), "seed", "seed of sampling and k-means++ (default 0)",
                 typeConverter=TypeConverters.toInt)
    pca = Param(Params._dummy(), "pca", "PCA and variance balancing first (default true)",
                typeConverter=TypeConverters.toBoolean)
    pcaDim = Param(Params._dummy(), "pcaDim", "principal axes kept; 0 keeps all (default 0)",
                   typeConverter=TypeConverters.toInt)
    # The schedule's defaults are fit()'s (TrainConfig), in the docs as in _DEFAULTS.
    coarseIters = Param(Params._dummy(), "coarseIters",
                        f"coarse Lloyd steps at most (default {T.TrainConfig.coarse_iters})",
                        typeConverter=TypeConverters.toInt)
    subIters = Param(Params._dummy(), "subIters",
                     f"subquantizer Lloyd steps over all the data at most (default {T.TrainConfig.sub_iters})",
                     typeConverter=TypeConverters.toInt)
    rotationIters = Param(Params._dummy(), "rotationIters", "of the sampleIters and of the subIters steps, the last "
                          f"ones that also refine the local rotations (default {T.TrainConfig.rotation_iters} each; "
                          "0: the reference's eigenvector rotations)",
                          typeConverter=TypeConverters.toInt)
    sampleIters = Param(Params._dummy(), "sampleIters", "subquantizer Lloyd steps on the k-means++ sample first, "
                        "on the driver; the last rotationIters of them also refine the rotations "
                        f"(default {T.TrainConfig.sample_iters})", typeConverter=TypeConverters.toInt)
    samplingRatio = Param(Params._dummy(), "samplingRatio", "fraction of rows trained on, in (0, 1] (default 1)",
                          typeConverter=TypeConverters.toFloat)
    subquantizerSamplingRatio = Param(Params._dummy(), "subquantizerSamplingRatio",
                                      "fraction of those rows the subquantizers train on (default 1)",
                                      typeConverter=TypeConverters.toFloat)
    aggDepth = Param(Params._dummy(), "aggDepth", "depth of the tree aggregation (default 4)",
                     typeConverter=TypeConverters.toInt)

    _DEFAULTS = dict(subquantizerClusters=256, seed=0, pca=True, pcaDim=0, coarseIters=T.TrainConfig.coarse_iters,
                     subIters=T.TrainConfig.sub_iters, rotationIters=T.TrainConfig.rotation_iters,
                     sampleIters=T.TrainConfig.sample_iters, samplingRatio=1.0, subquantizerSamplingRatio=1.0,
                     aggDepth=lopq_train.DEFAULT_AGG_DEPTH)

    @keyword_only
    def __init__(self, *, V=None, M=None, subquantizerClusters=256, seed=0, pca=True, pcaDim=0, coarseIters=None,
                 subIters=None, rotationIters=None, sampleIters=None, samplingRatio=1.0, subquantizerSamplingRatio=1.0,
                 aggDepth=4,
                 vectorCol="vector", idCol="id", coarseCol="coarse", fineCol="fine"):
        super().__init__()
        self._setDefault(**self._DEFAULTS)
        self._set(**{k: v for k, v in self._input_kwargs.items() if v is not None})

    @keyword_only
    def setParams(self, *, V=None, M=None, subquantizerClusters=None, seed=None, pca=None, pcaDim=None,
                  coarseIters=None, subIters=None, rotationIters=None, sampleIters=None, samplingRatio=None,
                  subquantizerSamplingRatio=None, aggDepth=None, vectorCol=None, idCol=None, coarseCol=None,
                  fineCol=None):
        return self._set(**{k: v for k, v in self._input_kwargs.items() if v is not None})

    def getV(self): return self.getOrDefault(self.V)
    def getM(self): return self.getOrDefault(self.M)
    def getSubquantizerClusters(self): return self.getOrDefault(self.subquantizerClusters)
    def getSeed(self): return self.getOrDefault(self.seed)
    def getPca(self): return self.getOrDefault(self.pca)
    def getPcaDim(self): return self.getOrDefault(self.pcaDim)
    def getCoarseIters(self): return self.getOrDefault(self.coarseIters)
    def getSubIters(self): return self.getOrDefault(self.subIters)
    def getRotationIters(self): return self.getOrDefault(self.rotationIters)
    def getSampleIters(self): return self.getOrDefault(self.sampleIters)
    def getSamplingRatio(self): return self.getOrDefault(self.samplingRatio)
    def getSubquantizerSamplingRatio(self): return self.getOrDefault(self.subquantizerSamplingRatio)
    def getAggDepth(self): return self.getOrDefault(self.aggDepth)
    def setV(self, value): return self._set(V=value)
    def setM(self, value): return self._set(M=value)
    def setSubquantizerClusters(self, value): return self._set(subquantizerClusters=value)
    def setSeed(self, value): return self._set(seed=value)
    def setAggDepth(self, value): return self._set(aggDepth=value)

    def fit_kwargs(self) -> dict:
        """The params as keyword arguments of ferry.lopq.fit (and lopq_train.fit)."""
        for name in ("V", "M"):
            if not self.isDefined(getattr(self, name)):
                raise InvalidParamsError(f"LopqEncoder needs {name}: set{name}(...)")
        return dict(V=self.getV(), M=self.getM(), subquantizer_clusters=self.getSubquantizerClusters(),
                    seed=self.getSeed(), pca=self.getPca(), pca_dim=self.getPcaDim() or None,
                    coarse_iters=self.getCoarseIters(), sub_iters=self.getSubIters(),
                    rotation_iters=self.getRotationIters(), sample_iters=self.getSampleIters(),
                    sampling_ratio=self.getSamplingRatio(),
                    subquantizer_sampling_ratio=self.getSubquantizerSamplingRatio(), agg_depth=self.getAggDepth())

    def _fit(self, dataset: DataFrame) -> "LopqModel":
        kwargs = self.fit_kwargs()
        lopq_train.check_agg_depth(kwargs["agg_depth"])
        blocks, dim = lopq_train.blocks_from_dataframe(dataset, self.getVectorCol())
        self._check_by_the_stage(dataset.schema, dim, kwargs)
        state = lopq_train.fit(blocks, dim, **kwargs)
        model = LopqModel.from_lopq(state.model())
        return self._copyValues(model)

    def _check_by_the_stage(self, schema: ST.StructType, dim: int, kwargs: dict) -> None:
        """The lopq_train stage's contract (the one the JVM side validates by) judges the params
        and the input schema, on the driver, before any pass runs."""
        from pyspark.sql.pandas.types import to_arrow_schema

        from ferry import registry

        stage = registry.get("lopq_train")
        params = stage.resolve_params({
            "step": "pca", "phase": "chunk", "dim": dim, "V": kwargs["V"], "M": kwargs["M"],
            "subquantizer_clusters": kwargs["subquantizer_clusters"], "pca": kwargs["pca"],
            "pca_dim": kwargs["pca_dim"] or 0, "seed": kwargs["seed"], "vector_col": self.getVectorCol()})
        stage.output_schema(to_arrow_schema(schema.__class__([schema[self.getVectorCol()]])), params)

    def write(self) -> MLWriter:
        return DefaultParamsWriter(self)

    @classmethod
    def read(cls) -> MLReader:
        return DefaultParamsReader(cls)


class LopqModel(Model, _LopqParams, MLReadable, MLWritable):
    """Appends LOPQ codes (coarseCol, fineCol) to every row, encoding in the Python workers.

    The model is the LOPQModelParams protobuf (ferry's and the reference's `.lopq` format); it
    is saved as those bytes beside the params metadata, never pickled.
    """

    def __init__(self, model_bytes: bytes | None = None):
        super().__init__()
        self._bytes = None
        self._model = None
        if model_bytes is not None:
            self._set_bytes(model_bytes)

    @classmethod
    def from_lopq(cls, model: LOPQModel) -> "LopqModel":
        return cls(model.to_bytes())

    @classmethod
    def from_file(cls, path) -> "LopqModel":
        """A LopqModel of a `.lopq` file (written by ferry or by the reference)."""
        with open(path, "rb") as f:
            return cls(f.read())

    def _set_bytes(self, data: bytes) -> None:
        self._model = LOPQModel.from_bytes(bytes(data), source="the LopqModel's model")
        self._bytes = bytes(data)

    @property
    def lopq(self) -> LOPQModel:
        """The ferry.lopq.LOPQModel (encode, decode, search in-process)."""
        if self._model is None:
            raise InvalidParamsError("this LopqModel holds no model: create it with LopqModel(bytes), "
                                     "LopqModel.from_file(path) or LopqEncoder.fit")
        return self._model

    def modelBytes(self) -> bytes:
        self.lopq
        return self._bytes

    def _stage_params(self, digest: str = "0" * 64) -> dict:
        from ferry import registry
        return registry.get("lopq_encode").resolve_params(
            {"model": digest, "id_col": self.getIdCol(), "vector_col": self.getVectorCol()})

    def transformSchema(self, schema: ST.StructType) -> ST.StructType:
        """Checks the input through the lopq_encode stage's contract; the output schema."""
        from pyspark.sql.pandas.types import to_arrow_schema

        from ferry import registry

        self.lopq
        registry.get("lopq_encode").output_schema(to_arrow_schema(schema), self._stage_params())
        for col in (self.getCoarseCol(), self.getFineCol()):
            if col in schema.names:
                raise SchemaError(f"Output column {col} already exists.")
        codes = ST.ArrayType(ST.IntegerType(), False)
        return ST.StructType([*schema.fields, ST.StructField(self.getCoarseCol(), codes, True),
                              ST.StructField(self.getFineCol(), codes, True)])

    def _transform(self, dataset: DataFrame) -> DataFrame:
        out_schema = self.transformSchema(dataset.schema)
        digest = hashlib.sha256(self._bytes).hexdigest()
        model_bc = dataset.sparkSession.sparkContext.broadcast(self._bytes)
        encode = functools.partial(lopq_tasks.encode_batches, params=self._stage_params(digest), model_bc=model_bc,
                                   coarse_col=self.getCoarseCol(), fine_col=self.getFineCol())
        return dataset.mapInArrow(encode, out_schema)

    def write(self) -> MLWriter:
        return _LopqModelWriter(self)

    @classmethod
    def read(cls) -> MLReader:
        return _LopqModelReader(cls)


class _LopqModelWriter(MLWriter):
    def __init__(self, instance: LopqModel):
        super().__init__()
        self.instance = instance

    def saveImpl(self, path: str) -> None:
        DefaultParamsWriter.saveMetadata(self.instance, path, self.sparkSession)
        data = self.instance.modelBytes()
        self.sparkSession.createDataFrame([(bytearray(data),)], "model binary").coalesce(1) \
            .write.parquet(f"{path}/data")


class _LopqModelReader(MLReader):
    def __init__(self, cls):
        super().__init__()
        self.cls = cls

    def load(self, path: str) -> LopqModel:
        metadata = DefaultParamsReader.loadMetadata(path, self.sparkSession)
        row = self.sparkSession.read.parquet(f"{path}/data").head()
        if row is None:
            raise SchemaError(f"{path}/data holds no model: the saved LopqModel is incomplete")
        model = self.cls(bytes(row["model"]))
        model._resetUid(metadata["uid"])
        DefaultParamsReader.getAndSetParams(model, metadata)
        return model
