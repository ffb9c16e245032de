"""``ferry.spark.TileReconstruct``: tiled image reconstruction of a DataFrame of tiles, in-process
on PySpark (no gRPC), with the answer of ``ferry.stages.tiles.reconstruct``."""
from __future__ import annotations

import functools
import io
from typing import Iterator

import numpy as np
import pyarrow as pa
from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import DataFrame, functions as F, types as T
from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

from ferry import registry
from ferry.errors import InputError, InvalidParamsError
from ferry.spark import tiles_tasks
from ferry.stages import tiles
from ferry.stages.tiles import TILE_SCHEMA, Grid, ReadPlan, TileError, TileKey

KEYS = ("image_id", "z", "x", "y")
GEOMETRY = ("image_height", "image_width", "tile_height", "tile_width")
#: Bytes of a tile read to learn its dtype when a target has no source (a .npy header is 128 bytes
#: for any tile shape numpy writes in format 1.0; format 2.0 headers are read up to this).
HEADER_BYTES = 4096


def _to_kernel(value):
    rows = [list(r) for r in value]
    return [[float(v) for v in r] for r in rows]


class TileReconstruct(Transformer, DefaultParamsReadable, DefaultParamsWritable):
    """Each output tile of an image from the neighbourhood of its input tiles.

    The input has one row per source tile: image id, level z, pixel offsets x (column) and y
    (row), and the pixels as ``.npy`` bytes; the image size comes from ``image_height`` /
    ``image_width`` (and the tile size from ``tile_height`` / ``tile_width``) columns when the
    DataFrame has them, as a ferry tile store does, else from the params of the same names.
    The output has one row per output tile with the same key and pixel column names.

    Every source tile is decoded once, in a ``mapInArrow`` that emits its partial (scatter) or
    its piece of each target's halo region (gather); the rows are shuffled by target and each
    target is combined in ``applyInArrow``. Missing tiles count as zeros. What crosses the
    shuffle depends on the strategy: scatter sends one target-sized partial per (source, target)
    pair, (2r+1)^2 per source, mostly zeros for a small kernel, except that integer partials of
    one task bound for the same target travel as one sum (up to ``combineMb`` of sums held per
    task); gather sends only the part of each source inside each target's halo region, about the
    input's size. ``auto`` (the default) gathers unless the operator is linear and its halo
    region is over twice the tile (threshold_sum's whole neighbour tiles). Params are checked by
    the ``tiles_emit`` stage contract on the driver, before data moves; so are duplicate and
    off-grid keys (a query on the key columns only). Errors inside tasks (corrupt bytes, a tile
    of the wrong shape or dtype) reach the driver as ``PythonException``; run the action inside
    :func:`ferry.spark.ferry_errors` to get ferry's own exception.

    Examples
    --------
    >>> from ferry.spark import TileReconstruct
    >>> rec = TileReconstruct(operator="convolve2d", kernel=[[0.0, 1.0], [1.0, 0.0]])
    >>> rec.stageParams()["operator_params"]
    {'kernel': [[0.0, 1.0], [1.0, 0.0]]}
    """

    operator = Param(Params._dummy(), "operator",
                     "operator name: threshold_sum, convolve2d, median, or one added with register_operator",
                     typeConverter=TypeConverters.toString)
    operatorParams = Param(Params._dummy(), "operatorParams",
                           'the operator\'s params as a JSON object, e.g. {"size": 3} or {"threshold": 20}',
                           typeConverter=TypeConverters.toString)
    kernel = Param(Params._dummy(), "kernel", "convolve2d's kernel as rows of numbers (instead of operatorParams)",
                   typeConverter=_to_kernel)
    strategy = Param(Params._dummy(), "strategy",
                     "scatter, gather or auto (default: gather, or scatter for a linear operator whose halo "
                     "region is over twice the tile, as threshold_sum's)",
                     typeConverter=TypeConverters.toString)
    radius = Param(Params._dummy(), "radius", "neighbourhood radius in tiles; -1 (default) = the operator's",
                   typeConverter=TypeConverters.toInt)
    tileHeight = Param(Params._dummy(), "tileHeight", "tile rows when there is no tile_height column; -1 = unset",
                       typeConverter=TypeConverters.toInt)
    tileWidth = Param(Params._dummy(), "tileWidth", "tile columns when there is no tile_width column; -1 = unset",
                      typeConverter=TypeConverters.toInt)
    imageHeight = Param(Params._dummy(), "imageHeight", "image rows when there is no image_height column; -1 = unset",
                        typeConverter=TypeConverters.toInt)
    imageWidth = Param(Params._dummy(), "imageWidth", "image columns when there is no image_width column; -1 = unset",
                       typeConverter=TypeConverters.toInt)
    combineMb = Param(Params._dummy(), "combineMb",
                      "scatter: MB of integer partial sums each emit task may hold to send one row per target "
                      "instead of one per (source, target); 0 = off, -1 (default) = the stage's default",
                      typeConverter=TypeConverters.toInt)
    outputDtype = Param(Params._dummy(), "outputDtype",
                        "output tiles' dtype: operator (default: the operator's own, e.g. int64 for threshold_sum "
                        "on int16 tiles), an integer dtype for integer results (every value must fit, else an "
                        "error naming the tile), or float32 / float64 for float results",
                        typeConverter=TypeConverters.toString)
    numPartitions = Param(Params._dummy(), "numPartitions",
                          "partitions of the shuffle by target; 0 (default) = spark.sql.shuffle.partitions",
                          typeConverter=TypeConverters.toInt)
    imageIdCol = Param(Params._dummy(), "imageIdCol", "image id column (string)", typeConverter=TypeConverters.toString)
    zCol = Param(Params._dummy(), "zCol", "level column (int)", typeConverter=TypeConverters.toString)
    xCol = Param(Params._dummy(), "xCol", "column offset column (int or long)", typeConverter=TypeConverters.toString)
    yCol = Param(Params._dummy(), "yCol", "row offset column (int or long)", typeConverter=TypeConverters.toString)
    pixelsCol = Param(Params._dummy(), "pixelsCol", "pixels column (binary, .npy bytes)",
                      typeConverter=TypeConverters.toString)

    _DEFAULTS = dict(operatorParams="{}", strategy="auto", radius=-1, tileHeight=-1, tileWidth=-1, imageHeight=-1,
                     imageWidth=-1, combineMb=-1, outputDtype="operator", numPartitions=0, imageIdCol="image_id",
                     zCol="z", xCol="x", yCol="y", pixelsCol="pixels")

    @keyword_only
    def __init__(self, *, operator=None, operatorParams=None, kernel=None, strategy=None, radius=None,
                 tileHeight=None, tileWidth=None, imageHeight=None, imageWidth=None, combineMb=None, outputDtype=None,
                 numPartitions=None, imageIdCol=None, zCol=None, xCol=None, yCol=None, pixelsCol=None):
        super().__init__()
        self._setDefault(**self._DEFAULTS)
        self._reads = None
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, operator=None, operatorParams=None, kernel=None, strategy=None, radius=None,
                  tileHeight=None, tileWidth=None, imageHeight=None, imageWidth=None, combineMb=None, outputDtype=None,
                  numPartitions=None, imageIdCol=None, zCol=None, xCol=None, yCol=None, pixelsCol=None):
        kwargs = {k: v for k, v in self._input_kwargs.items() if v is not None}
        if isinstance(kwargs.get("operatorParams"), dict):
            kwargs["operatorParams"] = registry.to_json(kwargs["operatorParams"])
        return self._set(**kwargs)

    def setOperator(self, value): return self._set(operator=value)
    def setOperatorParams(self, value):
        return self._set(operatorParams=registry.to_json(value) if isinstance(value, dict) else value)
    def setKernel(self, value): return self._set(kernel=value)
    def setStrategy(self, value): return self._set(strategy=value)
    def setRadius(self, value): return self._set(radius=value)
    def setTileHeight(self, value): return self._set(tileHeight=value)
    def setTileWidth(self, value): return self._set(tileWidth=value)
    def setImageHeight(self, value): return self._set(imageHeight=value)
    def setImageWidth(self, value): return self._set(imageWidth=value)
    def setCombineMb(self, value): return self._set(combineMb=value)
    def setOutputDtype(self, value): return self._set(outputDtype=value)
    def setNumPartitions(self, value): return self._set(numPartitions=value)
    def getOperator(self): return self.getOrDefault(self.operator)
    def getOperatorParams(self): return self.getOrDefault(self.operatorParams)
    def getKernel(self): return self.getOrDefault(self.kernel)
    def getStrategy(self): return self.getOrDefault(self.strategy)
    def getRadius(self): return self.getOrDefault(self.radius)
    def getCombineMb(self): return self.getOrDefault(self.combineMb)
    def getOutputDtype(self): return self.getOrDefault(self.outputDtype)
    def getNumPartitions(self): return self.getOrDefault(self.numPartitions)

    def getSourceReads(self) -> int:
        """Source tiles decoded by every action so far on the DataFrame of the last transform()."""
        if self._reads is None:
            raise InvalidParamsError("getSourceReads() counts the reads of a transformed DataFrame's actions; "
                                     "call transform() and run an action first")
        return self._reads.value

    def stageParams(self) -> dict:
        """The params of the tiles_emit / tiles_reduce stages, resolved and checked by the stage contract."""
        if not self.isDefined(self.operator):
            raise InvalidParamsError("TileReconstruct needs an operator: setOperator('convolve2d'), 'median', "
                                     f"'threshold_sum' or a registered one ({', '.join(tiles.operators())})")
        op_params = registry.params_from_json(self.getOperatorParams())
        if self.isDefined(self.kernel):
            if "kernel" in op_params:
                raise InvalidParamsError("TileReconstruct: the kernel is given twice, as the kernel param and in "
                                         "operatorParams; give it once")
            op_params["kernel"] = self.getKernel()
        given = {"operator": self.getOperator(), "operator_params": op_params, "strategy": self.getStrategy(),
                 "radius": self.getRadius(), "output_dtype": self.getOutputDtype()}
        for name, param in (("tile_height", self.tileHeight), ("tile_width", self.tileWidth),
                            ("image_height", self.imageHeight), ("image_width", self.imageWidth)):
            given[name] = self.getOrDefault(param)
        if self.getCombineMb() >= 0:
            given["combine_mb"] = self.getCombineMb()
        return registry.get("tiles_emit").resolve_params(given)

    def _source(self, dataset: DataFrame) -> DataFrame:
        names = {"image_id": self.getOrDefault(self.imageIdCol), "z": self.getOrDefault(self.zCol),
                 "x": self.getOrDefault(self.xCol), "y": self.getOrDefault(self.yCol),
                 "pixels": self.getOrDefault(self.pixelsCol)}
        types = {"image_id": "string", "z": "int", "x": "long", "y": "long"}
        cols = []
        for canon, name in names.items():
            if name not in dataset.columns:
                kind = "binary .npy bytes" if canon == "pixels" else types[canon]
                raise InputError(f"TileReconstruct needs a column {name!r} ({kind}); the DataFrame has "
                                 f"{dataset.columns}. Set {canon if canon != 'image_id' else 'imageId'}Col to "
                                 "the right name")
            c = F.col(name)
            cols.append((c if canon == "pixels" else c.cast(types[canon])).alias(canon))
        cols += [F.col(g).cast("long").alias(g) for g in GEOMETRY if g in dataset.columns]
        return dataset.select(*cols)

    def outputSchema(self, schema: T.StructType) -> T.StructType:
        names = [self.getOrDefault(p) for p in (self.imageIdCol, self.zCol, self.xCol, self.yCol, self.pixelsCol)]
        return T.StructType([T.StructField(n, f.dataType) for n, f in zip(names, from_arrow_schema(TILE_SCHEMA))])

    def _check_schema(self, source: DataFrame, params: dict) -> None:
        arrow = to_arrow_schema(source.schema)
        registry.get("tiles_emit").output_schema(arrow, params)
        registry.get("tiles_reduce").output_schema(tiles_tasks.SHUFFLE_SCHEMA, params)

    def plan(self, dataset: DataFrame) -> ReadPlan:
        """The read plan of a job over this DataFrame, from its key columns only (no pixel byte is read)."""
        params = self.stageParams()
        source = self._source(dataset)
        self._check_schema(source, params)
        return self._plan(source, params)[0]

    def _plan(self, source: DataFrame, params: dict) -> tuple[ReadPlan, dict]:
        meta = source.select(*KEYS, *[g for g in GEOMETRY if g in source.columns]).collect()
        op = tiles._operator_from(params)
        grids: dict[tuple[str, int], Grid] = {}
        seen: set[TileKey] = set()
        for row in meta:
            d = row.asDict()
            key = TileKey(d["image_id"], d["z"], d["x"], d["y"])
            if key in seen:
                raise TileError(key, "appears twice in the input: duplicate tile coordinates; keep one tile per "
                                     "(image_id, z, x, y)")
            seen.add(key)
            size = [d.get(g) if d.get(g) is not None else params[g] for g in GEOMETRY]
            if min(size) < 1:
                raise InvalidParamsError(
                    "TileReconstruct needs each image's size and tile size: give the DataFrame image_height, "
                    "image_width, tile_height and tile_width columns (a ferry tile store has them), or set "
                    f"imageHeight, imageWidth, tileHeight and tileWidth; {key} has {dict(zip(GEOMETRY, size))}")
            grid = Grid(*size)
            known = grids.setdefault(key.image, grid)
            if known != grid:
                raise TileError(key, f"says its image is {grid.describe()} but other tiles of it say "
                                     f"{known.describe()}; one image has one grid")
            grid.check_key(key)
        radii = {}
        for img, grid in grids.items():
            op.check(grid, img)
            radii[img] = tiles._radius(op, grid, img, None if params["radius"] < 0 else params["radius"])
        targets = [k for img in sorted(grids) for k in grids[img].keys(*img)]
        return tiles.plan_reads(targets, grids, radii, seen.__contains__), grids

    def _transform(self, dataset: DataFrame) -> DataFrame:
        if dataset.isStreaming:
            raise InputError("TileReconstruct needs every tile of an image, so it cannot run on a streaming "
                             "DataFrame; reconstruct each micro-batch with foreachBatch")
        params = self.stageParams()
        source = self._source(dataset)
        self._check_schema(source, params)
        plan, grids = self._plan(source, params)
        spark = dataset.sparkSession
        self._reads = spark.sparkContext.accumulator(0)
        shuffle_schema = from_arrow_schema(tiles_tasks.SHUFFLE_SCHEMA)
        emitted = source.mapInArrow(functools.partial(tiles_tasks.emit_partition, params=params, reads=self._reads),
                                    shuffle_schema)
        orphans = [t for t in plan.targets if not plan.needs[t]]
        if orphans:
            emitted = emitted.unionByName(self._orphan_rows(spark, source, orphans, grids, shuffle_schema))
        if self.getNumPartitions() > 0:
            emitted = emitted.repartition(self.getNumPartitions(), *KEYS)

        def reduce_target(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            yield from tiles_tasks.reduce_target(batches, params)

        out = emitted.groupBy(*KEYS).applyInArrow(reduce_target, from_arrow_schema(TILE_SCHEMA))
        return out.select(*[F.col(c).alias(f.name) for c, f in zip(TILE_SCHEMA.names, self.outputSchema(dataset.schema))])

    def _orphan_rows(self, spark, source: DataFrame, orphans, grids, schema: T.StructType) -> DataFrame:
        """One marker row per target that no existing source reaches, with its image's dtype."""
        kinds = {}
        for img in sorted({t.image for t in orphans}):
            head = (source.where((F.col("image_id") == img[0]) & (F.col("z") == img[1]))
                    .select(F.substring("pixels", 1, HEADER_BYTES).alias("head")).limit(1).collect())
            kinds[img] = _kind_from_header(bytes(head[0].head), TileKey(img[0], img[1], 0, 0))
        rows = []
        for t in orphans:
            g = grids[t.image]
            h, w = g.shape_at(t.x, t.y)
            rows.append((t.image_id, t.z, t.x, t.y, h, w, tiles_tasks.ORPHAN, tiles_tasks.ORPHAN, b"",
                         g.tile_height, g.tile_width, kinds[t.image]))
        return spark.createDataFrame(rows, schema)


def _kind_from_header(head: bytes, key: TileKey) -> str:
    f = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version[0] == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    except (ValueError, SyntaxError, TypeError) as e:
        raise TileError(key, f"pixels are not valid .npy bytes ({e}); write them with numpy.save(file, tile, "
                             "allow_pickle=False)") from None
    return f"{dtype.str}/{shape[2] if len(shape) == 3 else '-'}"
