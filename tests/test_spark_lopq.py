"""ferry.spark.LopqEncoder / LopqModel in a real local[2] Spark: training as tree reductions gives
the in-process model for any partitioning; encoding gives LOPQModel.encode's codes."""
import numpy as np
import pytest

from ferry.errors import InputError, InvalidParamsError, SchemaError
from ferry.lopq import LOPQModel, ModelFormatError, fit
from ferry.spark import LopqEncoder, LopqModel
from tests.synthetic import mixture

pytestmark = pytest.mark.spark

SMALL = dict(V=4, M=4, subquantizerClusters=16, coarseIters=2, subIters=1, seed=3)
SMALL_FIT = dict(V=4, M=4, subquantizer_clusters=16, coarse_iters=2, sub_iters=1, seed=3)


@pytest.fixture(scope="module")
def data():
    return mixture(3000, 16, 12, seed=1)


def frame(spark, X, parts=None, value_type=None):
    """X as a DataFrame (id, vector) read from a Parquet file, as users hold vectors."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    X = np.asarray(X)
    values = pa.array(X.ravel(), type=value_type or pa.float64())
    vectors = pa.ListArray.from_arrays(pa.array(np.arange(0, X.size + 1, X.shape[1], dtype=np.int32)), values)
    path = tempfile.mkdtemp(dir=frame.tmp) + "/data.parquet"
    pq.write_table(pa.table({"id": pa.array(np.arange(len(X))), "vector": vectors}), path)
    df = spark.read.parquet(path)
    return df.repartition(parts) if parts else df


@pytest.fixture(scope="module", autouse=True)
def _frames_dir(tmp_path_factory):
    frame.tmp = str(tmp_path_factory.mktemp("frames"))


def assert_same_model(a: LOPQModel, b: LOPQModel, atol=1e-9):
    for name in ("Cs", "Rs", "mus", "subs"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=0, atol=atol, err_msg=name)
    np.testing.assert_allclose(a.pca.projection, b.pca.projection, rtol=0, atol=atol)
    np.testing.assert_allclose(a.pca.mean, b.pca.mean, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def in_process(data):
    return fit(data, **SMALL_FIT)


@pytest.mark.parametrize("parts,depth", [(1, 4), (3, 2), (7, 3)])
def test_spark_training_equals_in_process_training(spark, data, in_process, parts, depth):
    model = LopqEncoder(**SMALL, aggDepth=depth).fit(frame(spark, data, parts))
    assert_same_model(model.lopq, in_process)


def test_sampling_and_float_vectors_equal_in_process(spark, data):
    import pyarrow as pa

    X32 = data.astype(np.float32)
    df = frame(spark, X32, value_type=pa.float32())
    kw = dict(sampling_ratio=0.6, subquantizer_sampling_ratio=0.5)
    model = LopqEncoder(**SMALL, samplingRatio=0.6, subquantizerSamplingRatio=0.5).fit(df.repartition(3))
    assert_same_model(model.lopq, fit(X32.astype(np.float64), **SMALL_FIT, **kw))
    # A sample really is smaller: the model differs from one trained on everything.
    assert np.abs(model.lopq.subs - fit(X32.astype(np.float64), **SMALL_FIT).subs).max() > 1e-3


def test_sample_iters_equal_in_process(spark, data):
    model = LopqEncoder(**SMALL, sampleIters=3).fit(frame(spark, data, 3))
    want = fit(data, **SMALL_FIT, sample_iters=3)
    assert_same_model(model.lopq, want)
    # The sample steps ran: the model differs from one trained without them.
    assert np.abs(want.subs - fit(data, **SMALL_FIT).subs).max() > 1e-3


def test_transform_equals_lopq_encode_and_keeps_columns(spark, data, in_process):
    model = LopqModel.from_lopq(in_process)
    df = frame(spark, data, 3).withColumnRenamed("vector", "v").withColumn("tag", __import__(
        "pyspark.sql.functions", fromlist=["lit"]).lit("x"))
    out = model.setVectorCol("v").setFineCol("codes").transform(df)
    assert out.columns == ["id", "v", "tag", "coarse", "codes"]
    rows = sorted(out.collect(), key=lambda r: r.id)
    coarse, fine = in_process.encode(data)
    np.testing.assert_array_equal(np.array([r.coarse for r in rows]), coarse)
    np.testing.assert_array_equal(np.array([r.codes for r in rows]), fine)


def test_save_load_round_trip(spark, data, in_process, tmp_path):
    model = LopqModel.from_lopq(in_process).setVectorCol("v")
    model.write().save(str(tmp_path / "model"))
    back = LopqModel.load(str(tmp_path / "model"))
    assert back.modelBytes() == in_process.to_bytes()
    assert back.getVectorCol() == "v" and back.uid == model.uid
    assert_same_model(back.lopq, in_process, atol=0)
    enc = LopqEncoder(**SMALL, aggDepth=2)
    enc.write().save(str(tmp_path / "encoder"))
    again = LopqEncoder.load(str(tmp_path / "encoder"))
    assert again.fit_kwargs() == enc.fit_kwargs()
    # No pickle anywhere: the data file holds the protobuf bytes as they are.
    (row,) = spark.read.parquet(str(tmp_path / "model" / "data")).collect()
    assert LOPQModel.from_bytes(bytes(row.model)).to_bytes() == in_process.to_bytes()


def test_bad_training_data_raises_the_ferry_error_on_the_driver(spark, data):
    bad = data.copy()
    bad[1234, 5] = np.nan
    with pytest.raises(InputError, match=r"must be finite.*nan at dimension 5"):
        LopqEncoder(**SMALL).fit(frame(spark, bad, 3))
    rows = [(i, x.tolist()) for i, x in enumerate(data[:50])] + [(50, data[50, :15].tolist())]
    df = spark.createDataFrame(rows, "id long, vector array<double>")
    with pytest.raises(InputError, match=r"has 15 values, row 0 has 16|must have dimension 16"):
        LopqEncoder(**SMALL).fit(df)
    with pytest.raises(InputError, match=r"at least as many points as coarse clusters per half \(V\): found 3"):
        LopqEncoder(**SMALL).fit(frame(spark, data[:3], 2))
    with pytest.raises(SchemaError, match=r"must be array<float> or array<double>, found string"):
        LopqEncoder(**SMALL).fit(spark.createDataFrame([(1, "x")], "id long, vector string"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(M=3), r"M \(subquantizers in total\) must be even"),
    (dict(M=6), r"D=16 must be divisible by M=6"),
    (dict(aggDepth=0), r"agg_depth .* must be an integer >= 1"),
    (dict(samplingRatio=1.5), r"sampling ratio must lie in \(0, 1\]"),
])
def test_bad_params_raise_before_any_job(spark, data, kwargs, match):
    with pytest.raises(InvalidParamsError, match=match):
        LopqEncoder(**{**SMALL, **kwargs}).fit(frame(spark, data[:100]))
    with pytest.raises(InvalidParamsError, match="LopqEncoder needs V"):
        LopqEncoder(M=4).fit(frame(spark, data[:100]))


def test_encoding_errors(spark, data, in_process, tmp_path):
    model = LopqModel.from_lopq(in_process)
    with pytest.raises(SchemaError, match=r"needs an id column 'id'"):
        model.transform(frame(spark, data[:5]).withColumnRenamed("id", "key"))
    with pytest.raises(SchemaError, match="Output column coarse already exists"):
        model.transform(frame(spark, data[:5]).withColumnRenamed("id", "coarse").withColumn("id", __import__(
            "pyspark.sql.functions", fromlist=["lit"]).lit(1)))
    with pytest.raises(Exception, match=r"have dimension 15, the model takes 16"):
        model.transform(frame(spark, data[:5, :15])).collect()
    pickled = tmp_path / "model.pkl"
    import pickle
    pickled.write_bytes(pickle.dumps({"Cs": data[:4]}))
    with pytest.raises(ModelFormatError, match="is a Python pickle"):
        LopqModel.from_file(pickled)
    truncated = tmp_path / "model.lopq"
    truncated.write_bytes(in_process.to_bytes()[:-7])
    with pytest.raises(ModelFormatError, match="truncated"):
        LopqModel.from_file(truncated)


def test_text_lines_and_udf_arrays_feed_the_same_reductions(spark, data, tmp_path):
    """The reference's inputs: text lines of base64 pickled arrays, and a data UDF's RDD of arrays."""
    import base64
    import pickle

    from ferry.spark import lopq_train
    from ferry.stages.lopq import train as T

    path = tmp_path / "vectors.txt"
    path.write_text("".join(f"{i}\t{base64.b64encode(pickle.dumps(x, protocol=2)).decode()}\n"
                            for i, x in enumerate(data[:500])))
    sc = spark.sparkContext
    for blocks, dim in (lopq_train.blocks_from_text(sc, str(path)),
                        lopq_train.blocks_from_arrays(sc.parallelize(list(data[:500]), 3))):
        assert dim == 16
        m = lopq_train.pca_moments(blocks, agg_depth=2)
        assert m.n == 500
        np.testing.assert_allclose(m.mean, data[:500].mean(0), rtol=1e-12)
        np.testing.assert_allclose(T.covariance(m), np.cov(data[:500], rowvar=False), rtol=1e-9, atol=1e-12)
    # A pickle naming anything but a numpy array is refused on the executor, and nothing runs.
    evil = tmp_path / "evil.txt"
    evil.write_text(path.read_text().splitlines(keepends=True)[0] + "2\t" +
                    base64.b64encode(b"cos\nsystem\n(S'echo pwned'\ntR.").decode() + "\n")
    blocks, _ = lopq_train.blocks_from_text(sc, str(evil))
    with pytest.raises(InputError, match=r"the pickle names os.system"):
        lopq_train.pca_moments(blocks)
