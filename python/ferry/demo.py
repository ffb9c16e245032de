"""The main job (`ferry demo`): one series, convolved by a Scala Spark pipeline and by PySpark.

Generates N complex samples (seeded) as Parquet, runs
  - the Scala pipeline: `spark-submit --class ferry.examples.ConvolveDemo` with the assembly
    jar; its executors start ferry workers from this interpreter automatically;
  - the PySpark path: `ferry.spark.Convolve` in-process;
then reads each output back, compares it with numpy.convolve over the whole series, and prints
each path's max error and throughput. Exits non-zero if a path is not exact to 1e-9.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("ferry.demo")

#: The kernel of the convolution seed.
SEED_KERNEL = np.array([0.229397, -0.080817, 0.132327, -0.212555, 0.313648]) * (1 + 1j)
RESULT_PREFIX = "FERRY_DEMO_RESULT "
TOLERANCE = 1e-9


def add_arguments(parser):
    parser.add_argument("--samples", type=float, default=1e6, help="series length (default 1e6)")
    parser.add_argument("--taps", type=int, default=0, help="random kernel of this many taps (default: the seed's 5)")
    parser.add_argument("--mode", default="same", choices=("full", "same", "valid"))
    parser.add_argument("--partitions", type=int, default=4, help="Parquet files the series is written as")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--jar", default=os.environ.get("FERRY_JAR"), help="ferry assembly jar (default: found "
                        "under target/scala-2.13/)")
    parser.add_argument("--paths", default="scala,pyspark", help="which paths to run (default scala,pyspark)")
    parser.add_argument("--workdir", help="keep inputs and outputs here (default: a temporary directory)")


def find_jar(explicit: str | None) -> str:
    if explicit:
        if not os.path.exists(explicit):
            raise SystemExit(f"ferry demo: --jar {explicit} does not exist")
        return explicit
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    jars = sorted(glob.glob(os.path.join(root, "target", "scala-2.13", "ferry-assembly-*.jar")), key=os.path.getmtime)
    if not jars:
        raise SystemExit("ferry demo: no ferry assembly jar found under target/scala-2.13/; build it with "
                         "`build/sbt assembly` (dev/demo does) or pass --jar")
    return jars[-1]


def spark_home() -> str:
    import pyspark
    return os.path.dirname(pyspark.__file__)


def write_series(path: str, x: np.ndarray, files: int) -> None:
    os.makedirs(path)
    for i, idx in enumerate(np.array_split(np.arange(x.size, dtype=np.int64), files)):
        pq.write_table(pa.table({"id": idx, "real": x.real[idx], "imag": x.imag[idx]}),
                       os.path.join(path, f"part-{i:05d}.parquet"))


def read_series(path: str) -> tuple[np.ndarray, np.ndarray]:
    t = pq.read_table(path).sort_by("id")
    return t.column("id").to_numpy(), t.column("real").to_numpy() + 1j * t.column("imag").to_numpy()


def check(path: str, want: np.ndarray) -> tuple[float, float]:
    ids, got = read_series(path)
    if ids.size != want.size or not np.array_equal(ids, np.arange(want.size)):
        raise SystemExit(f"ferry demo: output {path} has ids {ids[:5]}... ({ids.size} rows); "
                         f"expected 0..{want.size - 1}")
    err = float(np.max(np.abs(got - want)))
    return err, err / float(np.max(np.abs(want)))


def run_scala(jar: str, inp: str, out: str, kernel: np.ndarray, mode: str, master: str) -> float:
    cmd = [os.path.join(spark_home(), "bin", "spark-submit"), "--master", master,
           "--conf", f"spark.ferry.python={sys.executable}", "--conf", "spark.ui.enabled=false",
           "--conf", "spark.plugins=ferry.FerryPlugin",  # the workers start with the executor
           "--driver-memory", "2g", "--class", "ferry.examples.ConvolveDemo", jar, inp, out, "--mode", mode,
           "--kernel-real", ",".join(repr(float(v)) for v in kernel.real),
           "--kernel-imag", ",".join(repr(float(v)) for v in kernel.imag)]
    log.info("running %s", " ".join(cmd))
    env = {**os.environ, "SPARK_HOME": spark_home(), "PYSPARK_PYTHON": sys.executable}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    result = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not result:
        raise SystemExit(f"ferry demo: the Scala pipeline failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-6000:]}\n{proc.stdout[-2000:]}")
    return float(json.loads(result[-1][len(RESULT_PREFIX):])["seconds"])


def run_pyspark(inp: str, out: str, kernel: np.ndarray, mode: str, master: str) -> float:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession
    from ferry.spark import Convolve

    spark = (SparkSession.builder.master(master).appName("ferry-demo-pyspark")
             .config("spark.ui.enabled", "false").config("spark.driver.memory", "2g")
             .config("spark.sql.execution.arrow.maxRecordsPerBatch", "65536").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    try:
        t0 = time.perf_counter()
        conv = Convolve(kernelReal=kernel.real.tolist(), kernelImag=kernel.imag.tolist(), mode=mode)
        conv.transform(spark.read.parquet(inp)).write.parquet(out)
        return time.perf_counter() - t0
    finally:
        spark.stop()


def main(args) -> int:
    n = int(args.samples)
    rng = np.random.default_rng(20261122)
    kernel = SEED_KERNEL if args.taps <= 0 else rng.standard_normal(args.taps) + 1j * rng.standard_normal(args.taps)
    x = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(paths) - {"scala", "pyspark"}
    if unknown:
        raise SystemExit(f"ferry demo: unknown --paths {sorted(unknown)}; choose from scala, pyspark")
    jar = find_jar(args.jar) if "scala" in paths else None
    work = args.workdir or tempfile.mkdtemp(prefix="ferry-demo-")
    inp = os.path.join(work, "series")
    if not os.path.exists(inp):
        write_series(inp, x, args.partitions)
    t0 = time.perf_counter()
    want = np.convolve(x, kernel, args.mode)
    numpy_s = time.perf_counter() - t0

    print(f"ferry demo: {n:,} complex samples, {kernel.size}-tap kernel, mode {args.mode!r}, {args.master}")
    rows = [("numpy.convolve (one process)", numpy_s, 0.0, 0.0)]
    failed = False
    for path in paths:
        out = os.path.join(work, f"out-{path}")
        if os.path.exists(out):
            shutil.rmtree(out)
        print(f"  running the {path} path ...", flush=True)
        seconds = (run_scala(jar, inp, out, kernel, args.mode, args.master) if path == "scala"
                   else run_pyspark(inp, out, kernel, args.mode, args.master))
        err, rel = check(out, want)
        failed |= not rel <= TOLERANCE
        rows.append((f"ferry via {'Scala' if path == 'scala' else 'PySpark'}", seconds, err, rel))
    print(f"\n{'path':32} {'seconds':>9} {'samples/s':>13} {'max |error|':>12} {'max rel error':>14}")
    for name, seconds, err, rel in rows:
        print(f"{name:32} {seconds:9.2f} {n / seconds:13,.0f} {err:12.3g} {rel:14.3g}")
    print(f"\noutputs in {work}" if args.workdir else "")
    print("RESULT: every path equals numpy within 1e-9" if not failed else
          "RESULT: FAILED: a path differs from numpy by more than 1e-9 relative")
    return 1 if failed else 0
