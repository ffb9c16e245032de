"""`ferry lopq pca|pca-prepare|train|codes`, run as the real console script on small files."""
import base64
import os
import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ferry.lopq import PCA, LOPQModel, fit, write_fvecs
from ferry.stages.lopq import train as T
from tests.paths import ROOT
from tests.synthetic import mixture

TRAIN = ["--V", "4", "--M", "4", "--subquantizer_clusters", "16", "--coarse_iters", "3", "--sub_iters", "2",
         "--seed", "7"]


def ferry(*args, ok=True):
    # This checkout's python/ first: the console script must run this code, not another installed ferry.
    path = os.pathsep.join([os.path.join(ROOT, "python"), ROOT])
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYTHONPATH": path, "SPARK_LOCAL_IP": "127.0.0.1"}
    p = subprocess.run([sys.executable, "-m", "ferry", "lopq", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=300)
    if ok:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lopq_cli")
    X = mixture(2000, 16, 8, seed=1)
    offsets = pa.array(np.arange(0, X.size + 1, 16, dtype=np.int32))
    pq.write_table(pa.table({"id": np.arange(len(X)), "vector": pa.ListArray.from_arrays(offsets, pa.array(X.ravel()))}),
                   d / "data.parquet")
    write_fvecs(d / "data.fvecs", X)
    X32 = X.astype(np.float32).astype(np.float64)
    with open(d / "data.txt", "w") as f:
        for i, x in enumerate(X):
            f.write(f"item{i}\t{base64.b64encode(pickle.dumps(x, protocol=2)).decode()}\n")
    return d, X, X32


@pytest.mark.spark
@pytest.mark.slow
def test_pca_prepare_train_and_codes_as_the_reference_scripts_chain(files):
    d, X, X32 = files
    # PCA over Spark equals numpy's.
    ferry("pca", "--data", d / "data.parquet", "--output", d / "pca.npz", "--agg_depth", 2, "--master", "local[1]")
    with np.load(d / "pca.npz", allow_pickle=False) as z:
        p = {k: z[k] for k in z.files}
    assert int(p["count"]) == len(X)
    np.testing.assert_allclose(p["mean"], X.mean(0), rtol=1e-12)
    np.testing.assert_allclose(p["eigenvalues"], np.linalg.eigvalsh(np.cov(X, rowvar=False)), rtol=1e-9)

    ferry("pca-prepare", "--pca_params", d / "pca.npz", "--D", 8, "--output", d / "prep.npz")
    with np.load(d / "prep.npz", allow_pickle=False) as z:
        prep = PCA(z["mean"], z["projection"])
    want = T.prepare_pca(p["mean"], p["eigenvalues"], p["eigenvectors"], 8)
    np.testing.assert_array_equal(prep.projection, want.projection)
    assert prep.output_dim == 8

    # Training from .fvecs (float32 values) with the prepared PCA equals in-process training.
    ferry("train", "--data", d / "data.fvecs", "--pca_params", d / "prep.npz", *TRAIN, "--agg_depth", 3,
          "--model", d / "model.lopq", "--master", "local[1]")
    model = LOPQModel.load(d / "model.lopq")
    ref = fit(X32, V=4, M=4, subquantizer_clusters=16, coarse_iters=3, sub_iters=2, seed=7, existing=prep)
    for name in ("Cs", "Rs", "mus", "subs"):
        np.testing.assert_allclose(getattr(model, name), getattr(ref, name), rtol=0, atol=1e-9)

    # Codes of the reference's text format: `id<TAB>[[c0, c1], [f0, ...]]`, as the model encodes.
    ferry("codes", "--data", d / "data.txt", "--model", d / "model.lopq", "--output", d / "codes",
          "--master", "local[1]")
    lines = []
    for f in sorted(os.listdir(d / "codes")):
        if f.startswith("part-"):
            with open(d / "codes" / f) as part:
                lines += part.readlines()
    lines.sort(key=lambda s: int(s.split("\t")[0][4:]))
    coarse, fine = model.encode(X)
    assert len(lines) == len(X)
    assert lines[5] == f"item5\t[[{coarse[5, 0]}, {coarse[5, 1]}], [{', '.join(map(str, fine[5]))}]]\n"
    assert [line.split("\t")[1] for line in lines] == [
        f"[[{c[0]}, {c[1]}], [{', '.join(map(str, f))}]]\n" for c, f in zip(coarse, fine)]


@pytest.mark.spark
@pytest.mark.slow
def test_codes_from_parquet_to_parquet(files):
    d, X, _ = files
    model = fit(X, V=4, M=4, subquantizer_clusters=16, coarse_iters=2, sub_iters=2, seed=1)
    model.save(d / "given.lopq")
    ferry("codes", "--data", d / "data.parquet", "--model", d / "given.lopq", "--output", d / "codes.parquet",
          "--output_format", "parquet", "--master", "local[1]")
    t = pq.read_table(d / "codes.parquet").sort_by("id")
    coarse, fine = model.encode(X)
    np.testing.assert_array_equal(np.array(t.column("coarse").to_pylist()), coarse)
    np.testing.assert_array_equal(np.array(t.column("fine").to_pylist()), fine)


def test_errors_say_what_is_wrong_before_spark_starts(files, tmp_path):
    d, X, _ = files
    out = ["--model", tmp_path / "m.lopq"]
    cases = [
        (["train", "--data", d / "data.fvecs", "--V", 4, "--M", 3, *out], r"M \(subquantizers in total\) must be even"),
        (["train", "--data", d / "data.fvecs", "--V", 4, "--M", 4, "--steps", "1,2", *out],
         r"skip step 0 \(coarse clustering\): give an existing model"),
        (["train", "--data", d / "data.fvecs", "--V", 4, "--M", 4, "--steps", "0,x", *out], r"--steps takes"),
        (["train", "--data", tmp_path / "missing.fvecs", "--V", 4, "--M", 4, *out], r"does not exist"),
        (["train", "--data", d / "data.fvecs", "--V", 4, "--M", 4, "--sampling_ratio", 0, *out],
         r"sampling ratio must lie in \(0, 1\]"),
        (["pca", "--data", d / "data.fvecs", "--agg_depth", 0, "--output", tmp_path / "p.npz"], r"agg_depth"),
        (["pca-prepare", "--pca_params", d / "data.fvecs", "--D", 8, "--output", tmp_path / "p.npz"],
         r"is not an npz file of PCA parameters"),
    ]
    pca = T.prepare_pca(X.mean(0), *np.linalg.eigh(np.cov(X, rowvar=False)), 6)
    np.savez(tmp_path / "prep6.npz", mean=pca.mean, projection=pca.projection)
    cases.append((["train", "--data", d / "data.fvecs", "--pca_params", tmp_path / "prep6.npz", "--V", 4, "--M", 4,
                   *out], r"D=6 must be divisible by M=4"))
    cases.append((["pca-prepare", "--pca_params", d / "pca_full.npz", "--D", 7, "--output", tmp_path / "p.npz"],
                  r"D must be even"))
    eig = np.linalg.eigh(np.cov(X, rowvar=False))
    np.savez(d / "pca_full.npz", count=np.array(len(X)), mean=X.mean(0), eigenvalues=eig[0], eigenvectors=eig[1])

    (tmp_path / "model.pkl").write_bytes(pickle.dumps({"Cs": X[:4]}))
    good = fit(X, V=4, M=4, subquantizer_clusters=16, coarse_iters=1, sub_iters=1)
    good.save(tmp_path / "good.lopq")
    (tmp_path / "cut.lopq").write_bytes(good.to_bytes()[:-9])
    nan = X.copy()
    nan[17, 3] = np.nan
    write_fvecs(tmp_path / "nan.fvecs", nan)
    write_fvecs(tmp_path / "d12.fvecs", X[:, :12])
    cases += [
        (["codes", "--data", d / "data.fvecs", "--model", tmp_path / "model.pkl", "--output", tmp_path / "c"],
         r"is a Python pickle, not an LOPQModelParams protobuf"),
        (["train", "--data", d / "data.fvecs", "--existing_model", tmp_path / "model.pkl", "--steps", "1,2", *out],
         r"is a Python pickle"),
        (["codes", "--data", d / "data.fvecs", "--model", tmp_path / "cut.lopq", "--output", tmp_path / "c"],
         r"truncated"),
        (["train", "--data", tmp_path / "nan.fvecs", "--V", 4, "--M", 4, *out],
         r"must be finite; row 17 has nan at dimension 3"),
        (["codes", "--data", tmp_path / "d12.fvecs", "--model", tmp_path / "good.lopq", "--output", tmp_path / "c"],
         r"must have dimension 16 \(the model's input dimension\), got 12"),
        (["train", "--data", d / "data.fvecs", "--existing_model", tmp_path / "good.lopq", "--V", 5, *out],
         r"V=5 but the existing model has V=4"),
    ]
    cases += [
        (["train", "--data", "x", "--data_udf", "no_such_module_here", "--V", 4, "--M", 4, *out],
         r"--data_udf no_such_module_here: cannot import it"),
        (["train", "--data", "x", "--data_udf", "tests.synthetic", "--V", 4, "--M", 4, *out],
         r"the module has no function named udf"),
    ]
    for args, match in cases:
        p = ferry(*args, ok=False)
        assert p.returncode == 2, (args, p.stderr[-2000:])
        assert "Traceback" not in p.stderr, p.stderr[-2000:]
        import re
        assert re.search(match, p.stderr), (args, match, p.stderr[-2000:])
        assert not os.path.exists(tmp_path / "m.lopq")


def test_train_help_states_fits_schedule():
    # The schedule's options default to None (fit's own defaults apply); their help quotes them.
    out = " ".join(ferry("train", "--help").stdout.split())
    cfg = T.TrainConfig
    for option, value in (("coarse_iters", cfg.coarse_iters), ("sub_iters", cfg.sub_iters),
                          ("sample_iters", cfg.sample_iters), ("rotation_iters", cfg.rotation_iters)):
        help_text = out.split(f"--{option} {option.upper()}")[-1].split(" --")[0]     # [-1]: past the usage line
        assert f"default {value}" in help_text, (option, help_text)
