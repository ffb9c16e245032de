"""ferry.spark.TileReconstruct in a real local[2] Spark: the in-process job's answer, scipy's on the
whole image, one read per source tile, and ferry's own errors."""
import numpy as np
import pytest
import scipy.ndimage
import scipy.signal
from pyspark.errors import PythonException
from pyspark.ml import Pipeline, PipelineModel
from pyspark.sql import functions as F

from ferry.errors import InputError, InvalidParamsError, SchemaError
from ferry.spark import TileReconstruct, ferry_errors
from ferry.stages.tiles import (Grid, MemorySource, TileError, TileKey, assemble, decode_tile, encode_tile,
                                reconstruct, SyntheticSource)
from ferry.tiles_store import write_images
from tests.test_tiles import seed_reconstruction

pytestmark = pytest.mark.spark

GEOMETRY = ("image_height", "image_width", "tile_height", "tile_width")


def frame(spark, src, parts=2, geometry=True):
    """One row per tile of a MemorySource, with its image's grid as columns (as a tile store has)."""
    rows = []
    for k in sorted(src.tiles):
        g = src.grids[k.image]
        rows.append((k.image_id, k.z, k.x, k.y, bytearray(encode_tile(src.tiles[k])),
                     g.height, g.width, g.tile_height, g.tile_width))
    schema = "image_id string, z int, x long, y long, pixels binary, " + ", ".join(f"{c} long" for c in GEOMETRY)
    df = spark.createDataFrame(rows, schema).repartition(parts)
    return df if geometry else df.drop(*GEOMETRY)


def collect_tiles(df, names=("image_id", "z", "x", "y", "pixels")):
    i, z, x, y, p = names
    return {TileKey(r[i], r[z], r[x], r[y]): decode_tile(bytes(r[p])) for r in df.collect()}


def rel_err(got, want):
    return float(np.max(np.abs(got - want))) / max(float(np.max(np.abs(want))), 1e-300)


def run_both(spark, src, parts, shuffle_parts=0, **params):
    """The Spark job and the in-process job on the same tiles; asserts one read per source tile."""
    op_params = params.pop("op_params", {})
    rec = TileReconstruct(operatorParams=op_params, numPartitions=shuffle_parts, **params)
    got = collect_tiles(rec.transform(frame(spark, src, parts)))
    assert rec.getSourceReads() == len(src.tiles)
    direct = {k: np.asarray(v) for k, v in op_params.items()}
    if "kernel" in params:
        direct["kernel"] = np.asarray(params["kernel"])
    core = reconstruct(src, params["operator"], strategy=params.get("strategy", "auto"),
                       radius=None if params.get("radius", -1) < 0 else params["radius"], **direct)
    assert core.reads == len(src.tiles)
    assert set(got) == set(core.tiles)
    for k, want in core.tiles.items():
        assert got[k].dtype == want.dtype, k
        np.testing.assert_array_equal(got[k], want)
    return got


CONVOLVE_CASES = [  # image shape, tile shape, kernel shape, strategy, radius, input partitions, shuffle partitions
    ((19, 23), (6, 8), (3, 3), "scatter", -1, 3, 0),
    ((30, 17), (7, 5), (4, 2), "gather", 2, 1, 5),
    ((9, 40), (9, 7), (1, 6), "auto", -1, 2, 3),   # auto: gather (region 9x12 <= 2 x 9x7)
    ((20, 21), (4, 5), (4, 5), "auto", -1, 2, 0),  # auto: scatter (region 7x9 > 2 x 4x5)
]


@pytest.mark.parametrize("shape,tile,kshape,strategy,radius,parts,shuffle", CONVOLVE_CASES)
def test_convolve2d_equals_core_and_scipy(spark, shape, tile, kshape, strategy, radius, parts, shuffle):
    rng = np.random.default_rng(hash((shape, tile, kshape)) % 2**32)
    image = rng.standard_normal(shape)
    kernel = rng.standard_normal(kshape)
    got = run_both(spark, MemorySource.from_images({"img": image}, tile), parts, shuffle, operator="convolve2d",
                   kernel=kernel.tolist(), strategy=strategy, radius=radius)
    assert rel_err(assemble(got), scipy.signal.convolve2d(image, kernel, mode="same")) <= 1e-9


@pytest.mark.parametrize("shape,tile,size,channels,parts", [
    ((20, 20), (6, 6), 3, None, 4),
    ((13, 22), (5, 9), [5, 2], 3, 2),
])
def test_median_equals_core_and_scipy(spark, shape, tile, size, channels, parts):
    rng = np.random.default_rng(sum(shape) + parts)
    image = rng.integers(-50, 50, shape + ((channels,) if channels else ())).astype(np.float32)
    got = run_both(spark, MemorySource.from_images({"m": image}, tile), parts, operator="median",
                   op_params={"size": size})
    fsize = (size, size) if np.ndim(size) == 0 else tuple(size)
    want = scipy.ndimage.median_filter(image, size=fsize + ((1,) if channels else ()), mode="constant", cval=0)
    np.testing.assert_array_equal(assemble(got), want)


@pytest.mark.parametrize("dims,n_size,strategy", [((60, 60, 20, 20), 1, "scatter"), ((48, 30, 12, 10), 2, "gather")])
def test_threshold_sum_equals_the_seeds_fixed_result(spark, dims, n_size, strategy):
    im_w, im_h, tile_w, tile_h = dims
    images = ["test1", "test2"]
    grids = {(i, -1): Grid(im_h, im_w, tile_h, tile_w) for i in images}
    src = SyntheticSource(grids, channels=4)  # the seed's int16 tiles, drawn the same in every process
    pull = lambda t: src.read(TileKey(t.img_id, t.z, t.x, t.y))  # noqa: E731
    want, seed_reads = seed_reconstruction(images, im_w, im_h, tile_w, tile_h, n_size=n_size, pull=pull)
    tiles = dict(src.read_many(k for g in sorted(grids) for k in grids[g].keys(*g)))
    got = run_both(spark, MemorySource(tiles, grids), 3, operator="threshold_sum", strategy=strategy,
                   radius=n_size)
    assert seed_reads == len(tiles)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype == np.int64
        np.testing.assert_array_equal(got[k], v)


@pytest.mark.parametrize("combine_mb", [-1, 0])
def test_integer_partials_summed_in_the_emit_or_not_give_the_in_process_answer(spark, combine_mb):
    rng = np.random.default_rng(17)
    images = {"u": rng.integers(0, 65535, size=(22, 25, 3), endpoint=True).astype(np.uint16),
              "s": rng.integers(-32768, 32767, size=(13, 19), endpoint=True).astype(np.int16)}
    src = MemorySource.from_images(images, (5, 6), drop=[TileKey("u", 0, 6, 5)])
    for parts in (1, 3):
        run_both(spark, src, parts, operator="threshold_sum", op_params={"threshold": 30000}, radius=2,
                 combineMb=combine_mb)
    assert TileReconstruct(combineMb=combine_mb).getCombineMb() == combine_mb


def test_output_dtype_gives_the_in_process_values_in_the_dtype_asked_for(spark):
    image = np.random.default_rng(5).integers(-3000, 3000, size=(23, 29, 2)).astype(np.int16)
    src = MemorySource.from_images({"i": image}, (6, 7), drop=[TileKey("i", 0, 7, 6)])
    want = reconstruct(src, "threshold_sum", threshold=1000).tiles
    df = frame(spark, src, 2)
    for dtype in ("int32", "int16"):
        rec = TileReconstruct(operator="threshold_sum", operatorParams={"threshold": 1000}, outputDtype=dtype)
        assert rec.getOutputDtype() == dtype
        got = collect_tiles(rec.transform(df))
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == np.dtype(dtype) and want[k].dtype == np.int64
            np.testing.assert_array_equal(got[k], want[k])
    assert TileReconstruct().getOutputDtype() == "operator"
    with pytest.raises(InvalidParamsError, match="output_dtype"):
        TileReconstruct(operator="threshold_sum", outputDtype="int12").transform(df)
    with pytest.raises(TileError, match="outside output_dtype int8"), ferry_errors():
        TileReconstruct(operator="threshold_sum", operatorParams={"threshold": 1000},
                        outputDtype="int8").transform(df).collect()


def test_several_images_ragged_and_missing_tiles(spark):
    rng = np.random.default_rng(31)
    images = {"a": rng.standard_normal((17, 26)), "b": rng.standard_normal((11, 9)),
              ("a", 1): rng.standard_normal((8, 8))}
    src = MemorySource.from_images(images, (5, 7), drop=[TileKey("a", 0, 7, 5), TileKey("b", 0, 0, 0)])
    run_both(spark, src, 3, 2, operator="convolve2d", kernel=[[1.0, -1.0, 2.0], [0.5, 3.0, 1.0]])
    run_both(spark, src, 2, 0, operator="median", op_params={"size": 3})


@pytest.mark.parametrize("operator,params,strategy", [
    ("threshold_sum", {"op_params": {"threshold": 0.5}, "radius": 0}, "gather"),
    ("convolve2d", {"kernel": [[2.0]]}, "auto"),
])
def test_a_target_with_no_source_is_zeros_as_in_process(spark, operator, params, strategy):
    image = np.random.default_rng(4).standard_normal((12, 12)).astype(np.float32)
    src = MemorySource.from_images({"img": image}, (4, 4), drop=[TileKey("img", 0, 4, 4), TileKey("img", 0, 8, 0)])
    got = run_both(spark, src, 2, operator=operator, strategy=strategy, **params)
    assert not got[TileKey("img", 0, 4, 4)].any() and not got[TileKey("img", 0, 8, 0)].any()


def test_image_size_from_params_and_custom_columns(spark):
    rng = np.random.default_rng(8)
    image = rng.standard_normal((14, 10))
    src = MemorySource.from_images({"p": image}, (4, 4))
    df = frame(spark, src, 2, geometry=False).select(F.col("image_id").alias("img"), F.col("z").cast("long"),
                                                     F.col("x").cast("int").alias("col"), F.col("y").alias("row"),
                                                     F.col("pixels").alias("npy"))
    names = dict(imageIdCol="img", xCol="col", yCol="row", pixelsCol="npy")
    rec = TileReconstruct(operator="convolve2d", kernel=[[1.0, 2.0], [3.0, 4.0]], imageHeight=14, imageWidth=10,
                          tileHeight=4, tileWidth=4, **names)
    out = rec.transform(df)
    assert out.columns == ["img", "z", "col", "row", "npy"]
    got = collect_tiles(out, ("img", "z", "col", "row", "npy"))
    assert rel_err(assemble(got), scipy.signal.convolve2d(image, [[1, 2], [3, 4]], mode="same")) <= 1e-9
    with pytest.raises(InvalidParamsError, match="needs each image's size and tile size"):
        TileReconstruct(operator="median", **names).transform(df)


def test_save_load_and_pipeline(spark, tmp_path):
    rec = TileReconstruct(operator="median", operatorParams={"size": [3, 2]}, strategy="gather", radius=1,
                          numPartitions=3)
    rec.save(str(tmp_path / "rec"))
    loaded = TileReconstruct.load(str(tmp_path / "rec"))
    assert loaded.stageParams() == rec.stageParams()
    assert loaded.getNumPartitions() == 3
    image = np.random.default_rng(2).standard_normal((9, 11))
    df = frame(spark, MemorySource.from_images({"i": image}, (4, 4)))
    model = Pipeline(stages=[loaded]).fit(df)
    model.save(str(tmp_path / "pipe"))
    got = collect_tiles(PipelineModel.load(str(tmp_path / "pipe")).transform(df))
    np.testing.assert_array_equal(assemble(got), scipy.ndimage.median_filter(image, size=(3, 2), mode="constant"))


# --- Errors ----------------------------------------------------------------------------------------

def small(spark, tiles=None, parts=2):
    image = np.arange(64.0).reshape(8, 8)
    src = MemorySource.from_images({"img": image}, (4, 4))
    if tiles:
        src = MemorySource({**src.tiles, **tiles}, src.grids)
    return frame(spark, src, parts)


def test_params_are_checked_by_the_stage_contract_before_data_moves(spark):
    df = small(spark)
    with pytest.raises(InvalidParamsError, match="needs an operator"):
        TileReconstruct().transform(df)
    with pytest.raises(InvalidParamsError, match="No operator named 'blur'"):
        TileReconstruct(operator="blur").transform(df)
    with pytest.raises(InvalidParamsError, match="'median' is not linear"):
        TileReconstruct(operator="median", strategy="scatter").transform(df)
    with pytest.raises(InvalidParamsError, match="param 'strategy' must be one of"):
        TileReconstruct(operator="median", strategy="best").transform(df)
    with pytest.raises(InvalidParamsError, match=r"Kernel 5x5 is larger than the 4x4 tiles of image 'img'"):
        TileReconstruct(operator="convolve2d", kernel=np.ones((5, 5)).tolist()).transform(df)
    with pytest.raises(InvalidParamsError, match="kernel is given twice"):
        TileReconstruct(operator="convolve2d", kernel=[[1.0]], operatorParams={"kernel": [[1]]}).transform(df)
    with pytest.raises(InvalidParamsError, match=r"needs radius >= 1 with the 4x4 tiles of image 'img'"):
        TileReconstruct(operator="median", radius=0).transform(df)
    with pytest.raises(InputError, match="needs a column 'pixels'"):
        TileReconstruct(operator="median").transform(df.drop("pixels"))
    with pytest.raises(SchemaError, match="column 'pixels' must be of type binary"):
        TileReconstruct(operator="median").transform(df.withColumn("pixels", F.lit("text")))


def test_duplicate_and_off_grid_tiles_fail_on_the_driver(spark):
    df = small(spark)
    with pytest.raises(TileError, match=r"\(image 'img', z=0, x=4, y=0\): appears twice in the input"):
        TileReconstruct(operator="median").transform(df.union(df.where("x = 4 and y = 0")))
    with pytest.raises(TileError, match=r"x=3, y=0\): is not on the grid of its image"):
        TileReconstruct(operator="median").transform(df.withColumn("x", F.when(F.col("x") == 4, 3).otherwise(F.col("x"))))


def expect_task_error(df, cls, match):
    """A task's ferry error: pyspark's PythonException names the tile; ferry_errors() gives the ferry type."""
    with pytest.raises(cls, match=match) as info:
        with ferry_errors():
            df.collect()
    assert isinstance(info.value.__cause__, PythonException)
    assert info.value.args[0] in str(info.value.__cause__)
    return info.value


def test_corrupt_bytes_wrong_shapes_and_dtypes_name_the_tile(spark):
    rec = TileReconstruct(operator="convolve2d", kernel=[[1.0, 1.0], [1.0, 1.0]])
    bad = small(spark).withColumn("pixels", F.when((F.col("x") == 4) & (F.col("y") == 0), F.lit(b"\x93NUMPYjunk"))
                                  .otherwise(F.col("pixels")))
    err = expect_task_error(rec.transform(bad), TileError,
                            r"tile \(image 'img', z=0, x=4, y=0\): pixels are not valid \.npy bytes")
    assert err.key == TileKey("img", 0, 4, 0)
    wrong_shape = small(spark, {TileKey("img", 0, 0, 4): np.zeros((3, 4))})
    expect_task_error(rec.transform(wrong_shape), TileError,
                      r"x=0, y=4\): has 3x4 pixels but its cell of the grid \(8x8 pixels in 4x4 tiles\) is 4x4")
    # One tile per partition: no emit task sees both dtypes, the target's reduce does.
    wrong_dtype = small(spark, {TileKey("img", 0, 4, 4): np.zeros((4, 4), np.float32)}, parts=4)
    expect_task_error(rec.transform(wrong_dtype), TileError,
                      r"has dtype (float32|float64), 2-D but tile \(image 'img', z=0, x=\d, y=\d\) of the same "
                      r"image has dtype (float64|float32)")


def test_ferry_errors_passes_other_errors_through(spark):
    def boom(_):
        raise ZeroDivisionError("not ferry's")
    df = spark.range(2).mapInPandas(lambda it: map(boom, it), "id long")
    with pytest.raises(PythonException, match="not ferry's"):
        with ferry_errors():
            df.collect()


# --- Light keys, heavy values ---------------------------------------------------------------------

def read_schema(df):
    """What the Parquet scan of a query reads (the plan's ReadSchema, which its text truncates)."""
    leaves = df._jdf.queryExecution().executedPlan().collectLeaves()
    assert leaves.length() == 1 and leaves.head().getClass().getSimpleName() == "FileSourceScanExec"
    return leaves.head().requiredSchema().simpleString()


def test_key_queries_never_read_pixels(spark, tmp_path):
    image = np.random.default_rng(6).standard_normal((24, 36))
    store = write_images(tmp_path / "t.parquet", {"a": image}, (8, 12))
    df = spark.read.parquet(store.path)
    # The seed's "x > 99" query on the store: Parquet is asked for the key columns only.
    hits = df.where(F.col("x") > 12).select("image_id", "x", "y", "height", "width")
    schema = read_schema(hits)
    assert "x:bigint" in schema and "pixels" not in schema
    assert sorted((r.x, r.y) for r in hits.collect()) == [(24, 0), (24, 8), (24, 16)]
    assert "pixels:binary" in read_schema(df.where(F.col("x") > 12))   # the control: a query that needs them

    # Pixels made by a counted function (the seed's pull_input_tile): planning calls it never, the
    # job once per source tile.
    calls = spark.sparkContext.accumulator(0)
    tiles = MemorySource.from_images({"a": image}, (8, 12)).tiles

    def pull(x, y):
        calls.add(1)
        return encode_tile(tiles[TileKey("a", 0, x, y)])

    lazy = df.drop("pixels").withColumn("pixels", F.udf(pull, "binary")("x", "y"))
    rec = TileReconstruct(operator="convolve2d", kernel=[[1.0, 2.0, 1.0]] * 3)
    plan = rec.plan(lazy)
    out = rec.transform(lazy)
    assert calls.value == 0 and plan.reads == len(tiles) == 9
    got = collect_tiles(out)
    assert calls.value == rec.getSourceReads() == len(tiles)
    assert rel_err(assemble(got), scipy.signal.convolve2d(image, [[1, 2, 1]] * 3, mode="same")) <= 1e-9
