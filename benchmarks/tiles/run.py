#!/usr/bin/env python
"""Tiled reconstruction benchmark: the seed notebook's three approaches, ferry via PySpark, via Scala
(with --assembly) and in-process, against numpy/scipy on the whole image, in one run.

    .venv/bin/python benchmarks/tiles/run.py [--quick] [--skip-seed] [--skip-large] [--assembly JAR]

Case "seed": the notebook's 6000x6000x4 int16 image(s) in 2000x2000 tiles, threshold_sum (the seed's
operator) and a 5x5 convolve2d. Case "large": a 20000x20000 float32 image in 1000x1000 tiles from a
tile store on disk, 5x5 convolve2d, the PySpark and Scala paths with spark.driver.memory below the
image size. The Scala path (spark-submit of ferry.examples.TileDemo) reads a tile store: for the
seed case one is written from the same synthetic tiles first.
Every case runs in its own fresh process; peak memory is the largest sum of RSS over its process
tree. Results go to benchmarks/results/tiles.json and tiles.md (see benchmarks/tiles/README.md).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = REPO / "benchmarks" / "results"
SEED_SCRIPT = HERE / "seed_approaches.py"
KERNEL_SEED = 20261122


def _convolve_bench():
    # The process-tree sampling and child running of the convolution benchmark, reused as is.
    spec = importlib.util.spec_from_file_location("convolve_bench", HERE.parent / "convolve" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def kernel5() -> list[list[float]]:
    return (np.random.default_rng(KERNEL_SEED).standard_normal((5, 5)) / 5).tolist()


# --- data -------------------------------------------------------------------------------------

def grids_of(c: dict) -> dict:
    from ferry.stages.tiles import Grid
    return {(img, c["z"]): Grid(c["size"], c["size"], c["tile"], c["tile"]) for img in c["images"]}


def synthetic(c: dict):
    from ferry.stages.tiles import SyntheticSource
    return SyntheticSource(grids_of(c), channels=c["channels"], dtype=np.dtype(c["dtype"]))


def source_of(c: dict):
    if c.get("store"):
        from ferry.tiles_store import TileStore
        return TileStore(c["store"])
    return synthetic(c)


def write_store(c: dict, path: str) -> None:
    """The synthetic tiles of a case as a tile store, one tile at a time (never the whole image)."""
    from ferry.tiles_store import TileStoreWriter
    src = synthetic(c)
    with TileStoreWriter(path) as w:
        for img, grid in sorted(src.grids.items()):
            for k in grid.keys(*img):
                w.add_tile(k, src.read(k), grid)


_PROJECTIONS: dict[int, np.ndarray] = {}


def fingerprint(tile: np.ndarray) -> list[float]:
    """(projection on a fixed random vector, L2 norm): any changed pixel moves the projection."""
    t = np.asarray(tile, dtype=np.float64).ravel()
    w = _PROJECTIONS.get(t.size)
    if w is None:
        w = _PROJECTIONS[t.size] = np.random.default_rng(t.size).standard_normal(t.size)
    return [float(t @ w), float(np.linalg.norm(t))]


def key_str(k) -> str:
    return f"{k.image_id}/{k.z}/{k.x}/{k.y}"


def compare(fp: dict, ref: dict) -> dict:
    """Normwise relative error of each tile's projection against the reference's, and missing tiles."""
    missing = sorted(set(ref) - set(fp))
    extra = sorted(set(fp) - set(ref))
    worst = 0.0
    for k in set(fp) & set(ref):
        worst = max(worst, abs(fp[k][0] - ref[k][0]) / max(ref[k][1], 1e-300))
    return {"tiles": len(fp), "missing": len(missing), "extra": len(extra), "max_rel_error": worst}


# --- children ---------------------------------------------------------------------------------

def op_args(a: dict) -> dict:
    return {"kernel": np.asarray(a["kernel"])} if a["operator"] == "convolve2d" else {}


def child_floor(a: dict) -> dict:
    """The whole image in memory, then numpy/scipy on it: the single-machine floor."""
    import scipy.ndimage
    c = a["case"]
    src = source_of(c)
    out = {"load_s": 0.0, "compute_s": 0.0}
    fps = {}
    for img, grid in sorted(src.grids.items()):
        t0 = time.perf_counter()
        image = None
        for k, t in src.read_many(grid.keys(*img)):
            if image is None:
                image = np.empty(grid.shape + t.shape[2:], t.dtype)
            image[k.y:k.y + t.shape[0], k.x:k.x + t.shape[1]] = t
        t1 = time.perf_counter()
        if a["operator"] == "threshold_sum":
            # The seed's operator on the whole image: each tile plus its tile-aligned neighbours,
            # values above 20 set to 0, summed in int64 (np.sum of int16).
            kept = np.where(image > 20, np.zeros((), image.dtype), image).astype(np.int64)
            result = kept.copy()
            th, tw = grid.tile_shape
            for dy in (-th, 0, th):
                for dx in (-tw, 0, tw):
                    if dy or dx:
                        ys, yd = (slice(dy, None), slice(0, -dy)) if dy > 0 else (slice(0, dy or None), slice(-dy, None))
                        xs, xd = (slice(dx, None), slice(0, -dx)) if dx > 0 else (slice(0, dx or None), slice(-dx, None))
                        result[yd, xd] += kept[ys, xs]
        else:
            k = np.asarray(a["kernel"])
            weights = k if image.ndim == 2 else k[:, :, None]
            result = scipy.ndimage.convolve(image, weights, output=np.float64, mode="constant", cval=0.0)
        t2 = time.perf_counter()
        out["load_s"] += t1 - t0
        out["compute_s"] += t2 - t1
        for k in grid.keys(*img):
            h, w = grid.shape_at(k.x, k.y)
            fps[key_str(k)] = fingerprint(result[k.y:k.y + h, k.x:k.x + w])
        del image, result
    out["seconds"] = out["compute_s"]
    Path(a["fingerprints"]).write_text(json.dumps(fps))
    return out


def child_core(a: dict) -> dict:
    """ferry in-process: iter_reconstruct over the tile source, one read per source tile."""
    from ferry.stages.tiles import iter_reconstruct
    c = a["case"]
    src = source_of(c)
    stats: dict = {}
    fps, fp_s = {}, 0.0
    t0 = time.perf_counter()
    for k, t in iter_reconstruct(src, a["operator"], strategy=a["core_strategy"], stats=stats,
                                 output_dtype=a["output_dtype"], **op_args(a)):
        t1 = time.perf_counter()
        fps[key_str(k)] = fingerprint(t)
        fp_s += time.perf_counter() - t1
    seconds = time.perf_counter() - t0 - fp_s
    Path(a["fingerprints"]).write_text(json.dumps(fps))
    return {"seconds": seconds, "reads": stats["reads"], "outputs": len(fps)}


def child_pyspark(a: dict) -> dict:
    """ferry.spark.TileReconstruct on local[2]: tiles in, output tiles written as Parquet."""
    from pyspark.sql import SparkSession, functions as F

    from ferry.spark import TileReconstruct, ferry_errors
    from ferry.stages.tiles import encode_tile, synthetic_tile, TileKey
    c = a["case"]
    t0 = time.perf_counter()
    b = SparkSession.builder.master("local[2]").appName("bench-tiles-pyspark")
    for k, v in a["conf"].items():
        b = b.config(k, v)
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    t_session = time.perf_counter() - t0
    pulls = spark.sparkContext.accumulator(0)
    if c.get("store"):
        df = spark.read.parquet(c["store"])
    else:
        # The seed's pull_input_tile as a column: tiles are drawn inside the tasks, when read.
        grids = grids_of(c)
        rows = [(k.image_id, k.z, k.x, k.y, g.height, g.width, g.tile_height, g.tile_width)
                for img, g in sorted(grids.items()) for k in g.keys(*img)]
        keys = spark.createDataFrame(rows, "image_id string, z int, x long, y long, image_height long, "
                                           "image_width long, tile_height long, tile_width long")
        channels, dtype = c["channels"], np.dtype(c["dtype"])

        def pull(image_id, z, x, y, h, w):
            pulls.add(1)
            shape = (min(h, c["size"] - y), min(w, c["size"] - x)) + ((channels,) if channels else ())
            return encode_tile(synthetic_tile(TileKey(image_id, z, x, y), shape, dtype))

        df = keys.repartition(2).withColumn("pixels", F.udf(pull, "binary")(
            "image_id", "z", "x", "y", "tile_height", "tile_width"))
    rec = TileReconstruct(operator=a["operator"], operatorParams=op_args_json(a), strategy=a["spark_strategy"],
                          numPartitions=a["partitions"], outputDtype=a["output_dtype"])
    runs = []
    for _ in range(a.get("runs", 1)):
        pulled = pulls.value
        t1 = time.perf_counter()
        with ferry_errors():
            out = rec.transform(df)
            t2 = time.perf_counter()
            # Output tiles are single multi-MB values. Parquet's writer checks a page's size only every
            # 100 rows by default (800 MB of 1000x1000 float64 tiles) and keeps a dictionary of them:
            # check every row, no dictionary, small row groups, so a small heap holds a writer; and no
            # min/max statistics of the pixels (the writer copies every value to compare it).
            (out.write.mode("overwrite").option("parquet.enable.dictionary", "false")
             .option("parquet.column.statistics.enabled#pixels", "false")
             .option("parquet.page.size.row.check.min", 1).option("parquet.page.size.row.check.max", 1)
             .option("parquet.block.size", 16 << 20).option("compression", "none").parquet(a["output"]))
        t3 = time.perf_counter()
        runs.append({"seconds": t3 - t1, "plan_s": t2 - t1, "compute_write_s": t3 - t2, "reads": rec.getSourceReads(),
                     "pulls": pulls.value - pulled if not c.get("store") else None})
    # seconds, reads and the split: the first run, in a fresh JVM; warm_s: the best later run.
    res = {"session_s": t_session, **runs[0], "run_seconds": [r["seconds"] for r in runs],
           "warm_s": min((r["seconds"] for r in runs[1:]), default=None),
           "warm_reads": [r["reads"] for r in runs[1:]], "input_partitions": df.rdd.getNumPartitions()}
    jvm = getattr(spark.sparkContext._gateway, "proc", None)
    spark.stop()
    if a.get("wait_for_jvm") and jvm is not None:
        # The JVM dumps its class-data archive as it exits, which it does at EOF on its stdin.
        jvm.stdin.close()
        jvm.wait(timeout=300)
    res["outputs"] = write_fingerprints(a["output"], a["fingerprints"])
    return res


def write_fingerprints(output: str, path: str) -> int:
    """Fingerprints of every tile of an output Parquet directory, a few tiles at a time."""
    import pyarrow.parquet as pq
    from ferry.stages.tiles import TileKey, decode_tile
    fps = {}
    for f in sorted(Path(output).glob("*.parquet")):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=4):
            cols = batch.to_pydict()
            for i in range(batch.num_rows):
                k = TileKey(cols["image_id"][i], cols["z"][i], cols["x"][i], cols["y"][i])
                fps[key_str(k)] = fingerprint(decode_tile(cols["pixels"][i]))
    Path(path).write_text(json.dumps(fps))
    return len(fps)


def op_args_json(a: dict) -> dict:
    return {"kernel": a["kernel"]} if a["operator"] == "convolve2d" else {}


CHILDREN = {"floor": child_floor, "core": child_core, "pyspark": child_pyspark, "pyspark_udf": child_pyspark,
            "pyspark_tuned": child_pyspark, "pyspark_archive": child_pyspark}
#: The README's recipe for short jobs: classes from an archive a first run dumped, and C1 only.
TUNED_JVM = "-XX:SharedArchiveFile={archive} -XX:TieredStopAtLevel=1"


# --- the orchestrator -------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.cb = _convolve_bench()
        self.python = sys.executable
        self.tmp = Path(tempfile.mkdtemp(prefix="ferry-tiles-bench-", dir=args.tmp))
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        self.env = dict(os.environ, PYSPARK_PYTHON=self.python, PYSPARK_DRIVER_PYTHON=self.python)
        self.counter = 0
        self.store_stats: dict[str, dict] = {}

    def say(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def run(self, cmd: list[str], tag: str) -> tuple[dict, Path]:
        self.counter += 1
        log = self.logs / f"{self.counter:02d}-{tag}.log"
        load = os.getloadavg()[0]
        proc = self.cb.run_process(cmd, log, self.args.timeout, self.env)
        proc["load1_before"] = load
        return proc, log

    def child(self, kind: str, payload: dict) -> dict:
        tag = f"{kind}-{payload['case']['name']}-{payload['operator']}"
        result_path = self.tmp / f"{tag}.json"
        payload = dict(payload, kind=kind, result=str(result_path),
                       fingerprints=str(self.tmp / f"{tag}.fp.json"))
        proc, log = self.run([self.python, str(Path(__file__).resolve()), "--child", json.dumps(payload)], tag)
        res = self.outcome(kind, proc, log, result_path)
        if result_path.exists():
            res["fingerprints"] = payload["fingerprints"]
        self.say(f"  {tag}: {summary(res)}")
        return res

    def outcome(self, method: str, proc: dict, log: Path, result_path: Path) -> dict:
        """What a finished case process measured, or why it measured nothing."""
        res = {"method": method, **proc}
        if result_path.exists():
            res.update(json.loads(result_path.read_text()))
        elif proc["timed_out"]:
            res["note"] = f"did not finish in {self.args.timeout:.0f} s"
        else:
            res["error"] = self.cb.log_tail(log)
        return res

    def seed(self, approach: str, case: dict) -> dict:
        times = self.tmp / f"seed-{approach}.json"
        proc, log = self.run([self.python, str(SEED_SCRIPT), approach, ",".join(case["images"]), str(case["size"]),
                              str(case["tile"]), str(times)], f"seed-{approach}")
        res = self.outcome(f"seed_{approach}", proc, log, times)
        if "job_s" in res:
            res["seconds"] = res["job_s"]
        self.say(f"  seed {approach}: {summary(res)}")
        return res

    def operator_runs(self, case: dict, operator: str, conf: dict, spark_strategy: str,
                      output_dtype: str = "operator") -> list[dict]:
        base = {"case": case, "operator": operator, "kernel": kernel5(), "core_strategy": "auto",
                "spark_strategy": spark_strategy, "conf": conf, "partitions": case["partitions"],
                "output_dtype": output_dtype, "runs": self.args.runs}
        floor = self.child("floor", base)
        core = self.child("core", base)
        out = self.tmp / "out" / f"{case['name']}-{operator}"
        # Both Spark paths read the same tile store, as a user's job does; the seed case's tiles
        # drawn inside the job (its pull_input_tile as a UDF) are a row of their own.
        spark = self.child("pyspark", self.on_store(base, case, str(out)))
        shutil.rmtree(out, ignore_errors=True)
        results = [floor, core, spark]
        if not case.get("store"):
            results.append(self.child("pyspark_udf", dict(base, output=str(out))))
            shutil.rmtree(out, ignore_errors=True)
        if self.args.assembly:
            results.append(self.scala(case, base, conf, spark_strategy))
        if self.args.tuned_jvm:
            results += self.tuned(case, base, conf, spark_strategy, str(out))
        ref = json.loads(Path(floor["fingerprints"]).read_text()) if floor.get("fingerprints") else None
        out = "" if output_dtype == "operator" else f", output {output_dtype}"
        core["strategy"] = f"strategy auto{out}"
        for r in results[2:]:
            r["strategy"] = f"strategy {spark_strategy}{out}"
        for r in results:
            r["operator"] = operator
            if r is not floor and ref is not None and r.get("fingerprints"):
                r["check"] = compare(json.loads(Path(r["fingerprints"]).read_text()), ref)
            r.pop("fingerprints", None)
        return results


    def store_of(self, case: dict) -> str:
        """The case's tile store; for the seed case, written once from the same synthetic tiles."""
        store = case.get("store") or str(self.tmp / f"{case['name']}.parquet")
        if not os.path.exists(store):
            self.say(f"  writing a tile store of case {case['name']} for the Spark paths")
            t = time.perf_counter()
            write_store(case, store)
            self.store_stats[case["name"]] = {"store_write_s": time.perf_counter() - t,
                                              "store_bytes": os.path.getsize(store)}
        return store

    def on_store(self, base: dict, case: dict, out: str, **extra) -> dict:
        """A PySpark child's payload that reads the case's tile store."""
        return dict(base, case=dict(case, store=self.store_of(case)), output=out, **extra)

    def tuned(self, case: dict, base: dict, conf: dict, strategy: str, out: str) -> list[dict]:
        """Both Spark paths again with the README's JVM options for short jobs (TUNED_JVM), each with
        a class-data archive that one untimed run of the same path dumped at its exit."""
        results = []
        for method in ("pyspark", "scala") if self.args.assembly else ("pyspark",):
            archive = self.tmp / f"{method}.jsa"
            if not archive.exists():
                dump = dict(conf, **{"spark.driver.extraJavaOptions": f"-XX:ArchiveClassesAtExit={archive}"})
                if method == "pyspark":
                    self.child("pyspark_archive", self.on_store(base, case, out, conf=dump, runs=1, wait_for_jvm=True))
                else:
                    self.scala(case, dict(base, runs=1), dump, strategy, method="scala_archive")
                shutil.rmtree(out, ignore_errors=True)
                if not archive.exists():
                    self.say(f"  no class-data archive from the {method} path: its tuned run is left out")
                    continue
            tuned = dict(conf, **{"spark.driver.extraJavaOptions": TUNED_JVM.format(archive=archive)})
            if method == "pyspark":
                results.append(self.child("pyspark_tuned", self.on_store(base, case, out, conf=tuned)))
                shutil.rmtree(out, ignore_errors=True)
            else:
                results.append(self.scala(case, base, tuned, strategy, method="scala_tuned"))
        return results

    def scala(self, case: dict, base: dict, conf: dict, strategy: str, method: str = "scala") -> dict:
        """ferry.TileReconstruct via spark-submit (ferry.examples.TileDemo) over the case's tile store."""
        import pyspark
        store = self.store_of(case)
        out = self.tmp / "out" / f"{case['name']}-{base['operator']}-{method}"
        tag = f"{method}-{case['name']}-{base['operator']}"
        settings = [x for k, v in conf.items() if k.startswith("spark.") and k != "spark.driver.memory"
                    for x in ("--conf", f"{k}={v}")]
        cmd = [os.path.join(os.path.dirname(pyspark.__file__), "bin", "spark-submit"), "--master", "local[2]",
               "--driver-memory", conf.get("spark.driver.memory", "4g"), *settings,
               "--conf", f"spark.ferry.python={self.python}",
               # As the convolve benchmark and the README advise: the workers start with the
               # executor (outside the job's seconds), not inside the first run's job.
               "--conf", "spark.plugins=ferry.FerryPlugin", "--class", "ferry.examples.TileDemo",
               "--jars", self.args.assembly, self.args.assembly, store, str(out),
               "--operator", base["operator"], "--operator-params", json.dumps(op_args_json(base)),
               "--strategy", strategy, "--output-dtype", base["output_dtype"], "--runs", str(base["runs"])]
        proc, log = self.run(cmd, tag)
        res = {"method": method, **proc}
        runs = [json.loads(l.split(" ", 1)[1]) for l in log.read_text(errors="replace").splitlines()
                if l.startswith("FERRY_TILES_RESULT")]
        if len(runs) == base["runs"]:
            res.update(runs[0], run_seconds=[r["seconds"] for r in runs],
                       warm_s=min((r["seconds"] for r in runs[1:]), default=None),
                       warm_reads=[r["reads"] for r in runs[1:]])
            fp = self.tmp / f"{tag}.fp.json"
            write_fingerprints(str(out), str(fp))
            res["fingerprints"] = str(fp)
        elif proc["timed_out"]:
            res["note"] = f"did not finish in {self.args.timeout:.0f} s"
        else:
            res["error"] = self.cb.log_tail(log)
        shutil.rmtree(out, ignore_errors=True)
        self.say(f"  {tag}: {summary(res)}")
        return res


def summary(r: dict) -> str:
    if "seconds" not in r:
        return r.get("note") or "failed: " + (r.get("error") or "")[-300:]
    extra = f", reads {r['reads']}" if r.get("reads") is not None else ""
    chk = f", max rel err {r['check']['max_rel_error']:.1e}" if r.get("check") else ""
    return f"{r['seconds']:.1f} s, peak {r['peak_mb']:.0f} MB{extra}{chk}"


def machine() -> dict:
    import pyarrow
    import pyspark
    import scipy
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0]
    except (OSError, IndexError):
        java = None
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    import psutil
    return {"nproc": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "versions": {"numpy": np.__version__, "scipy": scipy.__version__, "pyarrow": pyarrow.__version__,
                         "pyspark": pyspark.__version__, "java": java, "ferry_git": git},
            "load_at_start": list(os.getloadavg())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="small images (600 in 200 tiles, 2000 in 100): a smoke run")
    p.add_argument("--seed-images", type=int, default=1, help="images in the seed case (the notebook has 2)")
    p.add_argument("--skip-seed", action="store_true", help="do not run the notebook's approaches")
    p.add_argument("--skip-large", action="store_true", help="do not run the 20000x20000 case")
    p.add_argument("--large-driver-memory", default="1g", help="spark.driver.memory of the large case (default 1g)")
    p.add_argument("--driver-memory", default="4g", help="spark.driver.memory of the seed case (default 4g)")
    p.add_argument("--timeout", type=float, default=600, help="cap per case in seconds (default 600)")
    p.add_argument("--runs", type=int, default=3,
                   help="runs of each Spark job in one session (default 3): the first is cold, the best of the "
                        "others is reported as warm")
    p.add_argument("--tmp", help="where stores and outputs go (the large case needs ~6 GB)")
    p.add_argument("--assembly", help="ferry's assembly jar: also run ferry via Scala (ferry.TileReconstruct)")
    p.add_argument("--threshold-sum-dtype", default="int32",
                   help="output_dtype of ferry's threshold_sum runs (default int32: the int16 sums' exact values in "
                        "half of int64's bytes; 'operator' for the seed's int64)")
    p.add_argument("--tuned-jvm", action="store_true",
                   help="also run each Spark path with a class-data archive and C1 only (the README's advice for "
                        "short jobs; the archive is dumped by one untimed run of the path first)")
    p.add_argument("--results-name", default="tiles",
                   help="names of the results files under benchmarks/results (default tiles: tiles.json, tiles.md)")
    p.add_argument("--note", default="", help="a line for the report")
    p.add_argument("--from-json", help="re-render the Markdown from a results JSON")
    args = p.parse_args()
    if args.child:
        a = json.loads(args.child)
        res = CHILDREN[a["kind"]](a)
        Path(a["result"]).write_text(json.dumps(res))
        return
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        if args.note:
            data["settings"]["note"] = args.note
            Path(args.from_json).write_text(json.dumps(data, indent=1))
        (RESULTS / f"{args.results_name}.md").write_text(render(data))
        return
    bench = Bench(args)
    seed_size, seed_tile, large_size, large_tile = (600, 200, 2000, 100) if args.quick else (6000, 2000, 20000, 1000)
    data = {"started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "settings": {"quick": args.quick, "timeout_s": args.timeout, "master": "local[2]", "runs": args.runs,
                         "kernel": "5x5, seeded normal / 5", "note": args.note}, "cases": []}
    arrow = {"spark.sql.execution.arrow.maxRecordsPerBatch": "16", "spark.ui.enabled": "false"}

    seed_case = {"name": "seed", "images": ["test1", "test2"][:args.seed_images] if args.seed_images <= 2 else
                 [f"test{i + 1}" for i in range(args.seed_images)], "z": -1, "size": seed_size, "tile": seed_tile,
                 "channels": 4, "dtype": "int16", "partitions": 0}
    bench.say(f"seed case: {len(seed_case['images'])} x {seed_size}^2 x 4 int16 in {seed_tile}^2 tiles")
    results = []
    conf = dict(arrow, **{"spark.driver.memory": args.driver_memory})
    if not args.skip_seed:
        for approach in ("naive", "grouped", "partial"):
            r = bench.seed(approach, seed_case)
            r["operator"] = "threshold_sum"
            results.append(r)
    results += bench.operator_runs(seed_case, "threshold_sum", conf, "auto", args.threshold_sum_dtype)
    results += bench.operator_runs(seed_case, "convolve2d", conf, "auto")
    data["cases"].append({"case": seed_case, "spark_conf": conf, "results": results,
                          **bench.store_stats.get(seed_case["name"], {})})

    if not args.skip_large:
        large = {"name": "large", "images": ["big"], "z": 0, "size": large_size, "tile": large_tile,
                 "channels": None, "dtype": "float32", "partitions": 0}
        large["store"] = str(bench.tmp / "large.parquet")
        bench.say(f"large case: {large_size}^2 float32 ({large_size ** 2 * 4 / 2**30:.2f} GiB) in {large_tile}^2 "
                  f"tiles; writing the store")
        t = time.perf_counter()
        write_store(large, large["store"])
        store_s = time.perf_counter() - t
        conf = dict(arrow, **{"spark.driver.memory": args.large_driver_memory})
        results = bench.operator_runs(large, "convolve2d", conf, "auto")
        data["cases"].append({"case": large, "spark_conf": conf, "store_write_s": store_s,
                              "store_bytes": os.path.getsize(large["store"]), "results": results})
        os.remove(large["store"])
    data["machine"]["load_at_end"] = list(os.getloadavg())
    data["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.results_name}.json").write_text(json.dumps(data, indent=1))
    (RESULTS / f"{args.results_name}.md").write_text(render(data))
    shutil.rmtree(bench.tmp, ignore_errors=True)
    bench.say(f"wrote {RESULTS / (args.results_name + '.md')}")


# --- the report -------------------------------------------------------------------------------

LABELS = {"floor": "numpy/scipy on the whole image (floor)", "core": "ferry in-process (iter_reconstruct)",
          "pyspark": "ferry via PySpark (TileReconstruct)",
          "pyspark_udf": "ferry via PySpark, tiles drawn in a UDF (the seed's pull_input_tile)",
          "scala": "ferry via Scala (ferry.TileReconstruct)",
          "pyspark_tuned": "ferry via PySpark, JVM with a class-data archive and C1 only",
          "scala_tuned": "ferry via Scala, JVM with a class-data archive and C1 only", "seed_naive": "seed: naive",
          "seed_grouped": "seed: grouped read", "seed_partial": "seed: partial reconstructions"}


def render(data: dict) -> str:
    m = data["machine"]
    lines = [
        "# Tiled reconstruction benchmark: ferry vs the seed notebook and the whole-image floor", "",
        f"Run {data['started']} to {data.get('finished', '?')}, by `benchmarks/tiles/run.py` "
        "(see benchmarks/tiles/README.md).", "",
        f"Machine: {m['nproc']} cores, {m['memory_gib']} GiB; load average at start "
        f"{m['load_at_start'][0]:.2f}, at end {m.get('load_at_end', [float('nan')])[0]:.2f}. The machine is shared "
        "(two other engineers run builds and tests on it): compare ratios within this run, not seconds across runs.",
        "", f"Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}.", "",
    ]
    if data["settings"].get("note"):
        lines += [f"Notes: {data['settings']['note']}", ""]
    lines += [
        "Columns: **seconds** = the job: for the floor, the computation on the image already in memory "
        "(*load s* = assembling it from its tiles); for ferry in-process, `iter_reconstruct` from the first read "
        "to the last output tile; for PySpark, `transform` (a query of the key columns) plus writing the output "
        "Parquet, SparkSession start excluded; for the Spark paths, the first run in a fresh process (cold: it pays "
        "the JVM's class loading and JIT compilation, which on 2 cores competes with the job; the Scala path runs "
        "with `spark.plugins=ferry.FerryPlugin`, which starts its Python workers as the SparkContext starts), and "
        "**warm s** the best of the later runs in the same session (a new `transform` each, reading the source again; "
        f"{data['settings'].get('runs', 1)} runs in all); for the seed, the notebook's timed `collect` of output shapes. "
        "**reads** = source tiles read (decoded, or drawn by the seed's `pull_input_tile`). **peak MB** = largest "
        "sum of RSS over the case's process tree (driver, JVM, Python workers), sampled every 0.2 s. "
        "**x floor** = seconds / the floor's seconds; **x floor+load** = seconds / (floor + load). "
        "**max rel error** = over output tiles, |p - p_floor| / ||tile_floor|| where p is the tile's projection "
        "on a fixed random vector (any wrong pixel moves it). **load** = 1-minute load average before the case.", ""]
    targets = []
    for case in data["cases"]:
        c = case["case"]
        lines += [f"## {c['name']}: {len(c['images'])} image(s) of {c['size']}x{c['size']}"
                  f"{'x' + str(c['channels']) if c['channels'] else ''} {c['dtype']} in {c['tile']}x{c['tile']} tiles "
                  f"({(c['size'] // c['tile']) ** 2 * len(c['images'])} source tiles)", ""]
        image_mb = c["size"] ** 2 * (c["channels"] or 1) * np.dtype(c["dtype"]).itemsize / 2**20
        lines.append(f"One image is {image_mb:.0f} MB. PySpark: `local[2]`, "
                     + ", ".join(f"`{k}={v}`" for k, v in case["spark_conf"].items())
                     + (f", `numPartitions={c['partitions']}`" if c["partitions"] else "") + ".")
        if "store_write_s" in case:
            readers = ("every ferry path and the floor read it" if c.get("store") else
                       "ferry via PySpark and via Scala read it (the floor and ferry in-process draw the tiles)")
            lines.append(f"The tile store ({case['store_bytes'] / 2**20:.0f} MB) was written once in "
                         f"{case['store_write_s']:.1f} s; {readers}.")
        lines.append("")
        for op in dict.fromkeys(r["operator"] for r in case["results"]):
            rs = [r for r in case["results"] if r["operator"] == op]
            floor = next((r for r in rs if r["method"] == "floor" and "seconds" in r), None)
            lines += [f"### {op}", "", "| method | seconds | warm s | reads | peak MB | x floor | x floor (warm) "
                      "| x floor+load | max rel error | load s | load |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in rs:
                name = LABELS.get(r["method"], r["method"])
                if r.get("strategy"):
                    name += f", {r['strategy']}"
                if "seconds" not in r:
                    lines.append(f"| {name} | {r.get('note') or 'failed'} | | | {r['peak_mb']:.0f} | | | | | | "
                                 f"{r['load1_before']:.1f} |")
                    continue
                xf = xfl = xw = ""
                warm = f"{r['warm_s']:.2f}" if r.get("warm_s") else "—"
                if floor:
                    xf = f"{r['seconds'] / floor['seconds']:.2f}"
                    xfl = f"{r['seconds'] / (floor['seconds'] + floor['load_s']):.2f}"
                    xw = f"{r['warm_s'] / floor['seconds']:.2f}" if r.get("warm_s") else ""
                err = f"{r['check']['max_rel_error']:.1e}" if r.get("check") else ("(reference)" if r is floor else "—")
                if r.get("check") and (r["check"]["missing"] or r["check"]["extra"]):
                    err += f" ({r['check']['missing']} tiles missing, {r['check']['extra']} extra)"
                load_s = f"{r['load_s']:.2f}" if r is floor else "—"
                lines.append(f"| {name} | {r['seconds']:.2f} | {warm} | {r.get('reads', '—')} | {r['peak_mb']:.0f} | "
                             f"{xf} | {xw} | {xfl} | {err} | {load_s} | {r['load1_before']:.1f} |")
            sp = next((r for r in rs if r["method"] == "pyspark" and "seconds" in r), None)
            if sp:
                lines += ["", f"PySpark split (first run): `transform` (key query and plan) {sp['plan_s']:.2f} s, emit + "
                              f"shuffle + reduce + write {sp['compute_write_s']:.2f} s; session start "
                              f"{sp['session_s']:.1f} s; {sp['input_partitions']} input partitions."]
            for r in rs:
                if r.get("run_seconds"):
                    lines.append(f"{LABELS[r['method']]}: runs {', '.join(f'{s:.1f}' for s in r['run_seconds'])} s; "
                                 f"reads of the later runs {r.get('warm_reads')}.")
            lines.append("")
            n_sources = (c["size"] // c["tile"]) ** 2 * len(c["images"])
            for r in rs:
                if r["method"] in ("core", "pyspark", "pyspark_udf", "scala", "pyspark_tuned", "scala_tuned") \
                        and "seconds" in r:
                    reads = [r.get("reads")] + r.get("warm_reads", [])
                    later = f" (later runs: {', '.join(map(str, reads[1:]))})" if len(reads) > 1 else ""
                    targets.append((f"{c['name']}/{op}: {LABELS[r['method']]} reads = source tiles, every run",
                                    f"{reads[0]} of {n_sources}{later}", all(n == n_sources for n in reads)))
                    # The UDF row also pays for drawing every tile, which the floor does not: its
                    # ratios are in the table, the time targets are the store-reading paths'.
                    if floor and r["method"] != "pyspark_udf":
                        ratio = r["seconds"] / floor["seconds"]
                        cold = " (cold: first run in a fresh process)" if r["method"] != "core" else ""
                        targets.append((f"{c['name']}/{op}: {LABELS[r['method']]} within 3x of the floor{cold}",
                                        f"{ratio:.2f}x ({r['seconds']:.1f} s vs {floor['seconds']:.1f} s)",
                                        ratio <= 3))
                        if r.get("warm_s"):
                            ratio = r["warm_s"] / floor["seconds"]
                            targets.append((f"{c['name']}/{op}: {LABELS[r['method']]} within 3x of the floor "
                                            "(warm: best later run in the session)",
                                            f"{ratio:.2f}x ({r['warm_s']:.1f} s vs {floor['seconds']:.1f} s)",
                                            ratio <= 3))
            if c["name"] == "large":
                for method, label in (("pyspark", "PySpark"), ("scala", "Scala")):
                    r = next((r for r in rs if r["method"] == method), None)
                    if r is None:
                        continue
                    ok = "seconds" in r and r.get("check", {}).get("missing") == 0
                    targets.append((f"large/{op}: {label} completes with spark.driver.memory "
                                    f"{case['spark_conf']['spark.driver.memory']} < the {image_mb:.0f} MB image",
                                    "completed" if ok else "did not complete", ok))
    head = ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    head += [f"| {t} | {m_} | {'PASS' if ok else 'FAIL'} |" for t, m_, ok in targets]
    idx = next(i for i, l in enumerate(lines) if l.startswith("## "))
    return "\n".join(lines[:idx] + head + [""] + lines[idx:]) + "\n"


if __name__ == "__main__":
    main()
