"""ferry.spark.Convolve in a real local[2] Spark: any partitioning gives numpy's answer."""
import numpy as np
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.sql import functions as F

from ferry.errors import InputError, InvalidParamsError, SchemaError
from ferry.spark import Convolve

pytestmark = pytest.mark.spark


def frame(spark, x, layout, parts):
    rows = [(i, float(v.real), float(v.imag)) for i, v in enumerate(x)]
    df = spark.createDataFrame(rows, "id long, real double, imag double")
    return {
        "round_robin": lambda: df.repartition(parts),        # ids scattered: forces the re-layout
        "range": lambda: df.repartitionByRange(parts, "id"),  # contiguous runs, no shuffle needed
        "reversed": lambda: df.repartition(parts).orderBy(F.desc("id")),  # descending ids: runs of one
        "coalesced": lambda: df.coalesce(parts),
    }[layout]()


def collect_series(out, id_col="id", real="real", imag="imag"):
    rows = sorted(out.collect(), key=lambda r: r[id_col])
    ids = np.array([r[id_col] for r in rows], dtype=np.int64)
    return ids, np.array([r[real] + 1j * r[imag] for r in rows])


def assert_numpy_equal(out, x, k, mode, **cols):
    ids, got = collect_series(out, **cols)
    want = np.convolve(x, k, mode)
    np.testing.assert_array_equal(ids, np.arange(want.size))
    assert np.max(np.abs(got - want)) <= 1e-9 * np.max(np.abs(want))


@pytest.mark.parametrize("parts", [1, 3, 7])
@pytest.mark.parametrize("layout", ["round_robin", "range", "coalesced"])
@pytest.mark.parametrize("taps,mode", [(1, "same"), (2, "full"), (5, "same"), (64, "valid"), (1000, "same")])
def test_any_partitioning_equals_numpy(spark, parts, layout, taps, mode):
    rng = np.random.default_rng(parts * 100 + taps)
    n = 3000
    x = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    k = rng.standard_normal(taps) + 1j * rng.standard_normal(taps)
    out = Convolve(kernelReal=k.real.tolist(), kernelImag=k.imag.tolist(), mode=mode).transform(
        frame(spark, x, layout, parts))
    assert_numpy_equal(out, x, k, mode)


def test_large_series_from_range(spark):
    n = 200_000
    df = spark.range(0, n, numPartitions=7).select(
        "id", F.sin(F.col("id") * 0.01).alias("real"), F.cos(F.col("id") * 0.003).alias("imag"))
    i = np.arange(n)
    x = np.sin(i * 0.01) + 1j * np.cos(i * 0.003)
    k = np.array([0.229397, -0.080817, 0.132327, -0.212555, 0.313648]) * (1 + 1j)
    out = Convolve(kernelReal=k.real.tolist(), kernelImag=k.imag.tolist()).transform(df)
    assert_numpy_equal(out, x, k, "same")


def test_descending_ids_take_the_relayout(spark):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(500) + 0j
    out = Convolve(kernelReal=[1.0, -2.0, 0.5], mode="full").transform(frame(spark, x, "reversed", 3))
    assert_numpy_equal(out, x, np.array([1.0, -2.0, 0.5]), "full")


def test_runs_whose_ids_minus_rows_coincide_are_told_apart(spark):
    # One partition holding four runs in this order; ids 5..7 at rows 0..2 and ids 13..19 at
    # rows 8..14 even share id - row = 5: a planner grouping rows by it must still see two runs.
    order = [5, 6, 7, 0, 1, 2, 3, 4, 13, 14, 15, 16, 17, 18, 19, 8, 9, 10, 11, 12]
    rng = np.random.default_rng(11)
    x = rng.standard_normal(20) + 1j * rng.standard_normal(20)
    df = spark.createDataFrame([(i, float(x[i].real), float(x[i].imag)) for i in order],
                               "id long, real double, imag double").coalesce(1)
    assert [r.id for r in df.collect()] == order
    k = np.array([0.5, -1.0, 0.25, 2.0])
    for mode in ("full", "same", "valid"):
        assert_numpy_equal(Convolve(kernelReal=k.tolist(), mode=mode).transform(df), x, k, mode)


def test_real_series_and_custom_columns(spark):
    rng = np.random.default_rng(9)
    x = rng.standard_normal(777)
    df = spark.createDataFrame([(i, float(v), "tag") for i, v in enumerate(x)], "t int, v float, tag string")
    conv = Convolve(idCol="t", realCol="v", imagCol="", kernelReal=[0.5, 0.25, 0.125, 0.0625], mode="valid")
    out = conv.transform(df.repartition(3))
    assert out.columns == ["t", "v", "imag"]
    xs = x.astype(np.float32).astype(np.float64)  # the float column was single precision
    ids, got = collect_series(out, id_col="t", real="v")
    want = np.convolve(xs, [0.5, 0.25, 0.125, 0.0625], "valid")
    np.testing.assert_array_equal(ids, np.arange(want.size))
    assert np.max(np.abs(got - want)) <= 1e-9 * np.max(np.abs(want))


def test_series_shorter_than_kernel(spark):
    x = np.array([1 + 2j, 3 - 1j, 0.5j])
    k = np.arange(10) * (1 - 0.5j)
    for mode in ("full", "same", "valid"):
        out = Convolve(kernelReal=k.real.tolist(), kernelImag=k.imag.tolist(), mode=mode).transform(
            frame(spark, x, "round_robin", 2))
        assert_numpy_equal(out, x, k, mode)


def test_empty_input_gives_empty_output(spark):
    df = spark.createDataFrame([], "id long, real double, imag double")
    out = Convolve(kernelReal=[1.0]).transform(df)
    assert out.count() == 0 and out.columns == ["id", "real", "imag"]


@pytest.mark.parametrize("rows,match", [
    ([(0, 1.0, 0.0), (1, 1.0, 0.0), (3, 1.0, 0.0)], r"ids 2\.\.2 are missing"),
    ([(0, 1.0, 0.0), (1, 1.0, 0.0), (1, 1.0, 0.0), (2, 1.0, 0.0)], r"ids 1\.\.1 occur more than once"),
    ([(5, 1.0, 0.0), (6, 1.0, 0.0)], "the smallest id is 5"),
    ([(0, 1.0, 0.0), (1, None, 0.0)], "column 'real' holds null values"),
    ([(0, 1.0, 0.0), (None, 1.0, 0.0)], "column 'id' holds null values"),
])
def test_bad_ids_and_nulls_raise_on_the_driver(spark, rows, match):
    df = spark.createDataFrame(rows, "id long, real double, imag double")
    with pytest.raises(InputError, match=match):
        Convolve(kernelReal=[1.0, 2.0]).transform(df)


@pytest.mark.parametrize("kwargs,schema,error,match", [
    ({"kernelReal": []}, "id long, real double, imag double", InvalidParamsError, "at least one tap"),
    ({}, "id long, real double, imag double", InvalidParamsError, "at least one tap"),
    ({"kernelReal": [1.0], "mode": "middle"}, "id long, real double, imag double", InvalidParamsError,
     "mode must be one of full, same, valid"),
    ({"kernelReal": [1.0, 2.0], "kernelImag": [1.0]}, "id long, real double, imag double", InvalidParamsError,
     "kernelImag has 1 taps but kernelReal has 2"),
    ({"kernelReal": [1.0]}, "id long, real double", SchemaError, "needs a column 'imag'"),
    ({"kernelReal": [1.0]}, "id string, real double, imag double", SchemaError, "column 'id' must be long"),
    ({"kernelReal": [1.0]}, "id long, real string, imag double", SchemaError, "column 'real' must be double"),
])
def test_bad_params_and_schema_fail_before_any_job(spark, kwargs, schema, error, match):
    df = spark.createDataFrame([], schema)
    with pytest.raises(error, match=match):
        Convolve(**kwargs).transform(df)


def test_streaming_frame_is_refused(spark, tmp_path):
    spark.createDataFrame([(0, 1.0, 0.0)], "id long, real double, imag double").write.parquet(str(tmp_path / "s"))
    stream = spark.readStream.schema("id long, real double, imag double").parquet(str(tmp_path / "s"))
    with pytest.raises(InputError, match="cannot run on a streaming DataFrame"):
        Convolve(kernelReal=[1.0]).transform(stream)


def test_save_load_round_trip_in_a_pipeline(spark, tmp_path):
    conv = Convolve(kernelReal=[1.0, 2.0, 3.0], kernelImag=[0.0, -1.0, 0.5], mode="full", idCol="id")
    path = str(tmp_path / "pipe")
    Pipeline(stages=[conv]).fit(spark.createDataFrame([], "id long, real double, imag double")).save(path)
    loaded = PipelineModel.load(path).stages[0]
    assert isinstance(loaded, Convolve)
    assert loaded.getKernelImag() == [0.0, -1.0, 0.5] and loaded.getMode() == "full"
    x = np.arange(20) * (1 + 1j)
    out = loaded.transform(frame(spark, x, "range", 3))
    assert_numpy_equal(out, x, np.array([1.0, 2 - 1j, 3 + 0.5j]), "full")


# --- a scan of Parquet files: planned by queries, nothing pinned -------------------------------------------

def write_parquet_series(path, x, files, shuffle_within=None, chunks=(1,)):
    """x as `files` Parquet files of consecutive ids (file i holds the i-th slice); the rows of
    file `shuffle_within` in random order; each file in row groups of len/chunks rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir()
    bounds = np.linspace(0, x.size, files + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        ids = np.arange(a, b)
        if i == shuffle_within:
            ids = np.random.default_rng(i).permutation(ids)
        t = pa.table({"id": ids, "real": x.real[ids], "imag": x.imag[ids]})
        pq.write_table(t, path / f"part-{i:03d}.parquet", row_group_size=max(1, (b - a) // chunks[i % len(chunks)]))
    return str(path)


@pytest.fixture
def file_splits(spark, request):
    """Spark's file split settings for one test: "split" cuts each file into about 4 KB splits (one
    per partition), "packed" packs several whole files into each partition (many runs in one)."""
    keys = ("spark.sql.files.maxPartitionBytes", "spark.sql.files.openCostInBytes")
    old = {k: spark.conf.get(k) for k in keys}
    values = {"split": ("4096", "1024"), "packed": ("1m", "1")}.get(request.param)
    if values:
        for k, v in zip(keys, values):
            spark.conf.set(k, v)
    yield request.param
    for k, v in old.items():
        spark.conf.set(k, v)


@pytest.mark.parametrize("files,file_splits", [(1, "default"), (2, "split"), (9, "packed")], indirect=["file_splits"])
@pytest.mark.parametrize("taps,mode", [(1, "same"), (2, "full"), (5, "same"), (64, "valid"), (1000, "same")])
def test_parquet_scan_is_planned_by_queries_and_equals_numpy(spark, tmp_path, files, file_splits, taps, mode):
    from ferry.spark.convolve import _plan_file_scan, reads_files_only

    rng = np.random.default_rng(files * 1000 + taps)
    x = rng.standard_normal(5000) + 1j * rng.standard_normal(5000)
    k = rng.standard_normal(taps) + 1j * rng.standard_normal(taps)
    df = spark.read.parquet(write_parquet_series(tmp_path / "s", x, files, chunks=(7, 3)))
    assert reads_files_only(df)
    runs = _plan_file_scan(df, taps)
    assert runs is not None and sum(r.length for r in runs) == x.size
    per_partition = np.bincount([r.partition for r in runs])
    if file_splits == "split":
        assert df.rdd.getNumPartitions() > 10 and per_partition.max() == 1
    if file_splits == "packed":
        assert per_partition.max() > 1     # files packed out of id order make several runs per partition
    assert_numpy_equal(Convolve(kernelReal=k.real.tolist(), kernelImag=k.imag.tolist(), mode=mode).transform(df),
                       x, k, mode)


def test_parquet_file_with_shuffled_rows_takes_the_general_planner(spark, tmp_path):
    from ferry.spark.convolve import _plan_file_scan

    rng = np.random.default_rng(3)
    x = rng.standard_normal(3000) + 1j * rng.standard_normal(3000)
    df = spark.read.parquet(write_parquet_series(tmp_path / "s", x, 3, shuffle_within=1))
    assert _plan_file_scan(df, 5) is None
    k = np.array([1.0, -0.5, 0.25, 2.0, 1.0])
    assert_numpy_equal(Convolve(kernelReal=k.tolist(), mode="full").transform(df), x, k, "full")


def test_only_a_plain_file_scan_skips_pinning(spark, tmp_path):
    from ferry.spark.convolve import reads_files_only

    x = np.arange(100.0) + 0j
    df = spark.read.parquet(write_parquet_series(tmp_path / "s", x, 2))
    assert reads_files_only(df) and reads_files_only(df.select("id", (F.col("real") * 2).alias("real"), "imag"))
    assert not reads_files_only(df.where("id > 3"))
    assert not reads_files_only(df.repartition(2))
    assert not reads_files_only(df.union(df))
    assert not reads_files_only(spark.createDataFrame([(0, 1.0, 0.0)], "id long, real double, imag double"))


@pytest.mark.parametrize("column,match", [
    ("real", "column 'real' holds null values \\(the first at id 7\\)"),
    ("imag", "column 'imag' holds null values \\(the first at id 7\\)"),
    ("id", "column 'id' holds null values"),
])
def test_parquet_nulls_raise_on_the_driver(spark, tmp_path, column, match):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"id": pa.array(np.arange(20)), "real": pa.array(np.ones(20)), "imag": pa.array(np.zeros(20))}
    values = cols[column].to_pylist()
    values[7] = values[12] = None
    cols[column] = pa.array(values, cols[column].type)
    (tmp_path / "s").mkdir()
    pq.write_table(pa.table(cols), tmp_path / "s" / "part-0.parquet")
    with pytest.raises(InputError, match=match):
        Convolve(kernelReal=[1.0, 2.0]).transform(spark.read.parquet(str(tmp_path / "s")))


@pytest.mark.parametrize("ids,match", [
    ([0, 1, 3, 4], r"ids 2\.\.2 are missing"),
    ([0, 1, 1, 2], r"ids 1\.\.1 occur more than once"),
    ([5, 6, 7], "the smallest id is 5"),
])
def test_parquet_bad_ids_raise_on_the_driver(spark, tmp_path, ids, match):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "s").mkdir()
    pq.write_table(pa.table({"id": ids, "real": [1.0] * len(ids), "imag": [0.0] * len(ids)}),
                   tmp_path / "s" / "part-0.parquet")
    with pytest.raises(InputError, match=match):
        Convolve(kernelReal=[1.0, 2.0]).transform(spark.read.parquet(str(tmp_path / "s")))
