"""The main job end to end: a Scala Spark pipeline (spark-submit + the assembly jar, workers
started by the executors) and the PySpark path, each checked against numpy by `ferry demo`."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JARS = sorted(glob.glob(os.path.join(ROOT, "target", "scala-2.13", "ferry-assembly-*.jar")))

pytestmark = [pytest.mark.spark, pytest.mark.jvm, pytest.mark.slow]


@pytest.fixture(scope="module")
def jar():
    if not JARS:
        if os.environ.get("CI"):
            pytest.fail("The assembly jar is missing: dev/test builds it with `build/sbt assembly` before pytest")
        pytest.skip("no assembly jar: run `build/sbt assembly` (dev/test does)")
    return JARS[-1]


@pytest.mark.parametrize("args", [
    ["--samples", "30000", "--mode", "same"],
    ["--samples", "20000", "--taps", "1000", "--mode", "full", "--partitions", "3"],
])
def test_demo_scala_and_pyspark_equal_numpy(jar, tmp_path, args):
    proc = subprocess.run([sys.executable, "-m", "ferry", "demo", "--jar", jar, "--workdir", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYSPARK_PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "RESULT: every path equals numpy within 1e-9" in proc.stdout
    assert "ferry via Scala" in proc.stdout and "ferry via PySpark" in proc.stdout
