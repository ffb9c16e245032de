"""`ferry tiles reconstruct | preview`, run as the real console command in a subprocess."""
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.ndimage
import scipy.signal
from PIL import Image

from ferry.cli_tiles import to_grey_levels
from ferry.stages.tiles import reconstruct
from ferry.tiles_store import TileStore, read_output, write_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = [[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]]


def ferry(*args, ok=True):
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYTHONPATH=os.path.join(ROOT, "python"))
    proc = subprocess.run([sys.executable, "-m", "ferry", "tiles", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(21)
    images = {"a": rng.standard_normal((50, 70)), "b": rng.integers(-99, 99, (30, 20, 3)).astype(np.int16)}
    path = tmp_path_factory.mktemp("cli") / "store.parquet"
    write_images(path, images, (16, 16))
    return path, images


def test_reconstruct_in_process_equals_scipy_and_the_core(store, tmp_path):
    path, images = store
    proc = ferry("reconstruct", "--input", path, "--output", tmp_path / "out", "--operator", "convolve2d",
                 "--kernel", KERNEL, "--codec", "npz")
    assert "wrote 24 output tiles" in proc.stdout and "read 24 source tiles once each" in proc.stdout
    got = read_output(tmp_path / "out")
    want = reconstruct(TileStore(path), "convolve2d", kernel=np.array(KERNEL)).tiles
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert sorted(os.listdir(tmp_path / "out")) == ["image_id=a", "image_id=b"]
    a = np.zeros((50, 70))
    for k, t in got.items():
        if k.image_id == "a":
            a[k.y:k.y + t.shape[0], k.x:k.x + t.shape[1]] = t
    want_a = scipy.signal.convolve2d(images["a"], KERNEL, mode="same")
    assert np.max(np.abs(a - want_a)) <= 1e-9 * np.max(np.abs(want_a))


@pytest.mark.spark
def test_reconstruct_on_spark_equals_in_process(store, tmp_path):
    path, _ = store
    args = ["--input", path, "--operator", "median", "--params", '{"size": [3, 2]}', "--radius", "2"]
    ferry("reconstruct", *args, "--output", tmp_path / "core")
    proc = ferry("reconstruct", *args, "--output", tmp_path / "spark", "--spark", "--partitions", "3",
                 "--driver-memory", "1g")
    assert "(spark); read 24 source tiles once each for 24 targets" in proc.stdout
    core, spark = read_output(tmp_path / "core"), read_output(tmp_path / "spark")
    assert set(core) == set(spark) and len(core) == 24
    for k in core:
        assert spark[k].dtype == core[k].dtype
        np.testing.assert_array_equal(spark[k], core[k])


def test_preview_of_a_store_and_of_an_output(store, tmp_path):
    path, images = store
    proc = ferry("preview", "--input", path, "--output", tmp_path / "a.png", "--max-size", 20)
    assert "image 'a' z=0, 50x70 pixels at 1/4 scale (13x18)" in proc.stdout
    png = np.asarray(Image.open(tmp_path / "a.png"))
    np.testing.assert_array_equal(png, to_grey_levels(images["a"][::4, ::4]))
    ferry("preview", "--input", path, "--output", tmp_path / "b.png", "--image", "b")
    assert np.asarray(Image.open(tmp_path / "b.png")).shape == (30, 20, 3)
    ferry("preview", "--input", path, "--output", tmp_path / "b1.png", "--image", "b", "--channel", 1)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b1.png")), to_grey_levels(images["b"][..., 1]))

    ferry("reconstruct", "--input", path, "--output", tmp_path / "out", "--operator", "median")
    ferry("preview", "--input", tmp_path / "out", "--output", tmp_path / "m.png", "--image", "a", "--max-size", 25)
    want = scipy.ndimage.median_filter(images["a"], size=3, mode="constant")[::3, ::3]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m.png")), to_grey_levels(want))


def test_errors_are_one_clear_line(store, tmp_path):
    path, _ = store
    proc = ferry("reconstruct", "--input", path, "--output", tmp_path / "o", "--operator", "convolve2d",
                 "--kernel", KERNEL, "--radius", "0", ok=False)
    assert proc.stderr.strip().splitlines()[-1].startswith("ferry tiles reconstruct: Operator 'convolve2d' reads")
    assert "needs radius >= 1 with the 16x16 tiles of image 'a'" in proc.stderr
    proc = ferry("reconstruct", "--input", path, "--output", tmp_path / "o", "--operator", "convolve2d",
                 "--kernel", np.ones((17, 3)).tolist(), ok=False)
    assert "Kernel 17x3 is larger than the 16x16 tiles" in proc.stderr
    proc = ferry("preview", "--input", path, "--output", tmp_path / "x.png", "--image", "nope", ok=False)
    assert "holds no image 'nope'" in proc.stderr
    proc = ferry("reconstruct", "--input", tmp_path / "missing.parquet", "--output", tmp_path / "o",
                 "--operator", "median", ok=False)
    assert "ferry tiles reconstruct:" in proc.stderr and "missing.parquet" in proc.stderr


def test_output_dtype_option(tmp_path):
    image = np.random.default_rng(3).integers(-3000, 3000, (30, 20, 2)).astype(np.int16)
    write_images(tmp_path / "int.parquet", {"i": image}, (16, 16))
    ferry("reconstruct", "--input", tmp_path / "int.parquet", "--output", tmp_path / "o", "--operator",
          "threshold_sum", "--output-dtype", "int32", "--no-progress")
    got = read_output(tmp_path / "o")
    want = reconstruct(TileStore(tmp_path / "int.parquet"), "threshold_sum").tiles
    assert set(got) == set(want)
    assert all(got[k].dtype == np.int32 and want[k].dtype == np.int64 and np.array_equal(got[k], want[k])
               for k in want)
    proc = ferry("reconstruct", "--input", tmp_path / "int.parquet", "--output", tmp_path / "o2", "--operator",
                 "threshold_sum", "--output-dtype", "int12", ok=False)
    assert proc.stderr.strip().splitlines()[-1].startswith("ferry tiles reconstruct:")
    assert "output_dtype must be one of operator, int8" in proc.stderr
