#!/usr/bin/env python
"""Convolution benchmark: ferry (PySpark, Scala, in-process) vs the seed's Spark SQL method, Spark's
read/write floor, numpy and scipy, on the same seeded data, in one run.

    .venv/bin/python benchmarks/convolve/run.py [--sizes 1e6,1e7] [--taps 5,1024] [--quick]
                                               [--skip-seed] [--skip-scala]

Every Spark case runs in its own fresh process (its own SparkSession), one after another; its
peak memory is the largest sum of RSS over that process tree, sampled every 0.2 s. Results go
to benchmarks/results/convolve.json and convolve.md (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = REPO / "benchmarks" / "results"
SEED_SCRIPT = HERE / "seed_method.py"
SEED = 20260509
PARQUET_FILES = 4
SWEEP_TAPS = (2, 4, 8, 16, 32, 48, 64, 96, 128, 256, 1024)
SEED_BATCH = 2048
RESULT_TAG = "FERRY_DEMO_RESULT"


# --- data -------------------------------------------------------------------------------------

def make_series(n: int) -> np.ndarray:
    rng = np.random.default_rng([SEED, n])
    x = np.empty(n, np.complex128)
    x.real = rng.standard_normal(n)
    x.imag = rng.standard_normal(n)
    return x


def make_kernel(taps: int) -> np.ndarray:
    rng = np.random.default_rng([SEED, 1, taps])
    return (rng.standard_normal(taps) + 1j * rng.standard_normal(taps)) / math.sqrt(taps)


def write_series(x: np.ndarray, path: Path, files: int = PARQUET_FILES) -> None:
    """id long, real double, imag double, as `files` Parquet files of contiguous ids, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.mkdir(parents=True)
    bounds = np.linspace(0, x.size, files + 1).astype(np.int64)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        t = pa.table({"id": pa.array(np.arange(a, b, dtype=np.int64)),
                      "real": pa.array(np.ascontiguousarray(x.real[a:b])),
                      "imag": pa.array(np.ascontiguousarray(x.imag[a:b]))})
        pq.write_table(t, path / f"part-{i:05d}.parquet", compression="snappy")


def read_series(path: Path) -> np.ndarray:
    import pyarrow.parquet as pq
    t = pq.read_table(path, columns=["id", "real", "imag"])
    ids = t.column("id").to_numpy()
    order = np.argsort(ids, kind="stable")
    x = np.empty(len(ids), np.complex128)
    x.real = t.column("real").to_numpy()[order]
    x.imag = t.column("imag").to_numpy()[order]
    return x


def rel_error(y: np.ndarray, ref: np.ndarray) -> float:
    """max |y - ref| / max |ref| (normwise: elementwise relative error is undefined near zeros)."""
    scale = float(np.max(np.abs(ref))) or 1.0
    return float(np.max(np.abs(y - ref))) / scale


def check_output(out_dir: Path, ref: np.ndarray, seed_layout: bool = False) -> dict:
    """Reads a written Parquet output back, sorts it by id and compares it with numpy's."""
    import pyarrow.parquet as pq
    t = pq.read_table(out_dir)
    if seed_layout:   # the seed writes (batch_id, i, real, imag)
        ids = t.column("batch_id").to_numpy().astype(np.int64) * SEED_BATCH + t.column("i").to_numpy()
    else:
        ids = t.column("id").to_numpy()
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    y = np.empty(len(ids), np.complex128)
    y.real = t.column("real").to_numpy()[order]
    y.imag = t.column("imag").to_numpy()[order]
    res = {"rows": int(len(ids)), "ids_ok": bool(len(ids) == ref.size and np.array_equal(ids, np.arange(ref.size)))}
    if res["ids_ok"]:
        res["max_rel_error"] = rel_error(y, ref)
        if seed_layout:
            bad = np.abs(y - ref) > 1e-9 * (np.max(np.abs(ref)) or 1.0)
            res["wrong_outputs"] = int(bad.sum())
            pos = np.flatnonzero(bad) % SEED_BATCH
            res["wrong_positions_in_batch"] = sorted({int(p) for p in pos[:100000]})[:12]
    return res


# --- process-tree memory sampling -------------------------------------------------------------

class TreeSampler(threading.Thread):
    """Largest sum of RSS over a process and all its descendants, sampled every `interval` s."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak, self._halt = pid, interval, 0, threading.Event()

    def sample(self) -> int:
        import psutil
        try:
            root = psutil.Process(self.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, self.sample())
            self._halt.wait(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


def kill_tree(proc: subprocess.Popen) -> None:
    import psutil
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        kids = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # the child was started in its own process group
    except ProcessLookupError:
        pass
    for k in kids:
        try:
            k.kill()
        except psutil.Error:
            pass
    proc.wait()


def run_process(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> dict:
    """Runs cmd in a new process group; wall time, peak tree RSS, exit code, whether it timed out."""
    with open(log, "w") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_tree(proc)
        except BaseException:
            kill_tree(proc)
            raise
        wall = time.perf_counter() - t0
        peak = sampler.stop()
        try:   # whatever the case left running in its process group (e.g. workers of a crashed JVM)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return {"wall_s": wall, "peak_mb": peak / 2**20, "returncode": proc.returncode, "timed_out": timed_out}


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    keep = [l for l in text if "WARN" not in l or "Exception" in l]
    return "\n".join(keep[-lines:])


# --- children ---------------------------------------------------------------------------------

def child_spark(a: dict) -> None:
    """One Spark case in a fresh SparkSession: floor, arrow identity, or ferry via PySpark."""
    from pyspark.sql import SparkSession
    t0 = time.perf_counter()
    b = SparkSession.builder.master(a["master"]).appName(f"bench-{a['kind']}")
    for k, v in a["conf"].items():
        b = b.config(k, v)
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    t1 = time.perf_counter()
    times = {"session_s": t1 - t0, "runs_s": []}
    # Run 1 is the job as a fresh spark-submit meets it (JIT warm-up, class loading, the first
    # Python workers); the later runs repeat it in the same session: the steady state.
    for run in range(a.get("repeats", 1)):
        out = a["output"] if run == 0 else f"{a['output']}-run{run}"
        shutil.rmtree(out, ignore_errors=True)
        t1 = time.perf_counter()
        df = spark.read.parquet(a["input"])
        if a["kind"] == "floor":
            df.write.parquet(out)
        elif a["kind"] == "arrow_identity":
            df.mapInArrow(lambda batches: batches, df.schema).write.parquet(out)
        elif a["kind"] == "ferry_pyspark":
            from ferry.spark import Convolve
            k = np.load(a["kernel"])
            conv = Convolve(kernelReal=k.real.tolist(), kernelImag=k.imag.tolist(), mode="same")
            result = conv.transform(df)       # runs the planning pass (a collect of each run's edges)
            t2 = time.perf_counter()
            result.write.parquet(out)         # the computing pass
            if run == 0:
                times["plan_s"] = t2 - t1
                times["compute_write_s"] = time.perf_counter() - t2
        else:
            raise SystemExit(f"unknown kind {a['kind']}")
        times["runs_s"].append(time.perf_counter() - t1)
        if run > 0:
            shutil.rmtree(out, ignore_errors=True)
    times["job_s"] = times["runs_s"][0]
    times["partitions"] = df.rdd.getNumPartitions()
    Path(a["times"]).write_text(json.dumps(times))
    spark.stop()


def child_inprocess(a: dict) -> None:
    """numpy.convolve, scipy.signal.oaconvolve and ferry.convolve on the in-memory series."""
    import psutil
    import scipy.signal
    import ferry

    x = read_series(Path(a["input"]))
    k = np.load(a["kernel"])
    me = psutil.Process()
    methods = [
        ("numpy.convolve", lambda: np.convolve(x, k, mode="same")),
        ("scipy.signal.oaconvolve", lambda: scipy.signal.oaconvolve(x, k, mode="same")),
        ("ferry.convolve", lambda: ferry.convolve(x, k, mode="same")),
        ("ferry.convolve(block_size=65536)", lambda: ferry.convolve(x, k, mode="same", block_size=65536)),
    ]
    results, ref = [], None
    for name, fn in methods:
        peak = [0]
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                peak[0] = max(peak[0], me.memory_info().rss)
                stop.wait(0.01)
        th = threading.Thread(target=watch, daemon=True)
        base = me.memory_info().rss
        th.start()
        best, y, runs = math.inf, None, 0
        while runs < 3:
            t = time.perf_counter()
            y = fn()
            best = min(best, time.perf_counter() - t)
            runs += 1
            if best > 1.0:
                break
        stop.set()
        th.join()
        peak[0] = max(peak[0], me.memory_info().rss)
        if ref is None:
            ref = y
            np.save(a["reference"], ref)
        results.append({"method": name, "seconds": best, "runs": runs, "peak_mb": peak[0] / 2**20,
                        "baseline_mb": base / 2**20, "max_rel_error": rel_error(y, ref)})
        del y
    Path(a["times"]).write_text(json.dumps(results))


def child_sweep(a: dict) -> None:
    """numpy.convolve vs ferry's FFT path (and scipy.signal.oaconvolve), mode 'full', complex128,
    over kernel lengths: where DIRECT_MAX_TAPS should switch from the first to the second."""
    import scipy.signal
    from ferry.stages.convolve import _overlap_save_full
    out = []
    for n in a["lengths"]:
        x = make_series(n)
        for taps in a["taps"]:
            k = make_kernel(taps)
            row = {"n": n, "taps": taps}
            for name, fn in (("numpy", lambda: np.convolve(x, k, mode="full")),
                             ("fft", lambda: _overlap_save_full(x, k, {})),
                             ("oaconvolve", lambda: scipy.signal.oaconvolve(x, k, mode="full"))):
                best, runs, t_all = math.inf, 0, time.perf_counter()
                most = a.get("repeats", 5)
                while runs < most and (runs < 3 or time.perf_counter() - t_all < 2.0 * most / 5):
                    t = time.perf_counter()
                    fn()
                    best = min(best, time.perf_counter() - t)
                    runs += 1
                    if best > 2.0:
                        break
                row[name + "_s"] = best
            out.append(row)
            print(json.dumps(row), flush=True)
    Path(a["times"]).write_text(json.dumps(out))


# --- the orchestrator -------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.python = sys.executable
        self.tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-", dir=args.tmp))
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        self.env = dict(os.environ, PYSPARK_PYTHON=self.python, PYSPARK_DRIVER_PYTHON=self.python)
        import pyspark
        self.spark_home = os.path.dirname(pyspark.__file__)
        self.env["SPARK_HOME"] = self.spark_home
        self.spark_conf = {
            "spark.sql.execution.arrow.maxRecordsPerBatch": "65536",
            "spark.driver.memory": args.driver_memory,
        }
        self.counter = 0

    def say(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def child(self, kind: str, payload: dict, timeout: float) -> tuple[dict, object]:
        self.counter += 1
        tag = f"{self.counter:02d}-{kind}"
        times = self.tmp / f"{tag}.json"
        payload = dict(payload, kind=kind, times=str(times))
        log = self.logs / f"{tag}.log"
        proc = run_process([self.python, str(Path(__file__).resolve()), "--child", json.dumps(payload)],
                           log, timeout, self.env)
        data = json.loads(times.read_text()) if times.exists() else None
        if data is None:
            proc["error"] = log_tail(log)
        return proc, data

    def out_dir(self, name: str) -> Path:
        self.counter += 1
        return self.tmp / "out" / f"{self.counter:02d}-{name}"

    # individual cases

    def spark_case(self, kind: str, n_dir: Path, kernel: Path, ref: np.ndarray | None,
                   repeats: int | None = None) -> dict:
        out = self.out_dir(kind)
        load = os.getloadavg()[0]
        repeats = self.args.repeats if repeats is None else repeats
        proc, t = self.child(kind, {"master": "local[2]", "conf": self.spark_conf, "input": str(n_dir),
                                    "output": str(out), "kernel": str(kernel), "repeats": repeats},
                             self.args.timeout)
        res = {"method": kind, "load1_before": load, **proc}
        if t:
            res.update(t)
            res["seconds"] = t["job_s"]
            if kind == "ferry_pyspark" and ref is not None:
                res["check"] = check_output(out, ref)
        shutil.rmtree(out, ignore_errors=True)
        return res

    def seed_case(self, n_dir: Path, kernel: Path, ref: np.ndarray) -> dict:
        out = self.out_dir("seed")
        times = self.tmp / f"seed-{self.counter}.json"
        log = self.logs / f"{self.counter:02d}-seed.log"
        load = os.getloadavg()[0]
        proc = run_process([self.python, str(SEED_SCRIPT), str(n_dir), str(out), str(kernel), str(times),
                            str(self.args.seed_repeats)], log, self.args.timeout, self.env)
        res = {"method": "seed_spark_sql", "load1_before": load, **proc}
        if times.exists():
            t = json.loads(times.read_text())
            res.update(t)
            res["seconds"] = t["job_s"]
            res["check"] = check_output(out, ref, seed_layout=True)
        elif proc["timed_out"]:
            res["note"] = f"did not finish in {self.args.timeout:.0f} s"
        else:
            res["error"] = log_tail(log)
        shutil.rmtree(out, ignore_errors=True)
        return res

    def find_assembly(self) -> Path | None:
        if self.args.assembly:
            return Path(self.args.assembly)
        found = sorted(glob.glob(str(REPO / "target" / "scala-2.13" / "*assembly*.jar")) +
                       glob.glob(str(REPO / "scala" / "target" / "scala-2.13" / "*assembly*.jar")),
                       key=os.path.getmtime)
        return Path(found[-1]) if found else None

    def scala_case(self, jar: Path, n_dir: Path, kernel: Path, taps: int, ref: np.ndarray | None,
                   repeats: int | None = None, plugin: bool = True) -> dict:
        """ConvolveDemo under spark-submit; with `plugin`, ferry.FerryPlugin starts the workers with
        the executor (the README's recommended setup), else the first task's borrow starts them."""
        repeats = self.args.repeats if repeats is None else repeats
        out = self.out_dir("scala")
        k = np.load(kernel)
        fields = {"input": str(n_dir), "output": str(out), "kernel_npy": str(kernel),
                  "kernel_real": ",".join(repr(float(v)) for v in k.real),
                  "kernel_imag": ",".join(repr(float(v)) for v in k.imag), "taps": taps, "mode": "same"}
        demo_args = [s.format(**fields) for s in self.args.scala_args.split()]
        cmd = [os.path.join(self.spark_home, "bin", "spark-submit"), "--master", "local[2]",
               "--driver-memory", self.args.driver_memory,
               "--conf", f"spark.ferry.python={self.python}",
               "--conf", "spark.sql.execution.arrow.maxRecordsPerBatch=65536",
               *(["--conf", "spark.plugins=ferry.FerryPlugin"] if plugin else []),
               "--class", "ferry.examples.ConvolveDemo", "--jars", str(jar), str(jar), *demo_args,
               "--repeat", str(repeats)]
        self.counter += 1
        log = self.logs / f"{self.counter:02d}-scala.log"
        load = os.getloadavg()[0]
        proc = run_process(cmd, log, self.args.timeout, self.env)
        res = {"method": "ferry_scala" if plugin else "ferry_scala_noplugin", "load1_before": load, **proc}
        demos = [json.loads(line[len(RESULT_TAG):]) for line in log.read_text(errors="replace").splitlines()
                 if line.startswith(RESULT_TAG)]
        if demos:
            res["demo"] = demos[0]
            res["runs_s"] = [float(d["seconds"]) for d in demos]
            res["seconds"] = res["runs_s"][0]
            res["plan_s"] = demos[0].get("plan_seconds")
            if ref is not None:
                res["check"] = check_output(out, ref)
        if demos and len(demos) < repeats:
            res["note"] = f"{len(demos)} of {repeats} runs finished"
        elif not demos and proc["timed_out"]:
            res["note"] = f"did not finish in {self.args.timeout:.0f} s"
        elif not demos:
            res["error"] = log_tail(log, 25)
        shutil.rmtree(out, ignore_errors=True)
        return res

    def sweep(self) -> dict:
        a = self.args
        taps = sorted(set(SWEEP_TAPS) | set(a.sweep_extra_taps))
        proc, rows = self.child("sweep", {"lengths": a.sweep_lengths, "taps": taps, "repeats": a.sweep_repeats}, 3600)
        return {"rows": rows or [], "error": proc.get("error"), "repeats": a.sweep_repeats}

    # the whole run

    def run(self) -> dict:
        a = self.args
        result = {"started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "machine": machine_facts(), "settings": {
                      "sizes": a.sizes, "taps": a.taps, "timeout_s": a.timeout, "master": "local[2]",
                      "spark_conf": self.spark_conf, "parquet_files": PARQUET_FILES, "seed": SEED,
                      "seed_shortcut": not a.seed_all}, "cases": [], "sweep": None, "notes": list(a.note)}
        jar = None
        if not a.skip_scala:
            jar = self.find_assembly()
            if jar is None:
                result["notes"].append("ferry via Scala not run: no assembly jar found (build/sbt assembly)")
            else:
                import zipfile
                with zipfile.ZipFile(jar) as z:
                    if "ferry/examples/ConvolveDemo.class" not in z.namelist():
                        result["notes"].append(f"ferry via Scala not run: {jar.name} has no ferry.examples.ConvolveDemo")
                        jar = None
                if jar is not None:
                    result["settings"]["assembly"] = str(jar)
                    result["settings"]["assembly_built"] = _dt.datetime.fromtimestamp(
                        jar.stat().st_mtime).astimezone().isoformat(timespec="seconds")
        else:
            result["notes"].append("ferry via Scala skipped (--skip-scala)")
        seed_timed_out_taps = set()
        for n in a.sizes:
            n_dir = self.tmp / f"series-{n}"
            self.say(f"N={n:.0e}: writing the series to Parquet ({PARQUET_FILES} files)")
            write_series(make_series(n), n_dir)
            for taps in a.taps:
                kernel = self.tmp / f"kernel-{taps}.npy"
                np.save(kernel, make_kernel(taps))
                case = {"n": n, "taps": taps, "results": []}
                result["cases"].append(case)
                ref_path = self.tmp / f"ref-{n}-{taps}.npy"
                self.say(f"N={n:.0e} taps={taps}: in-process numpy / scipy / ferry.convolve")
                proc, rows = self.child("inprocess", {"input": str(n_dir), "kernel": str(kernel),
                                                      "reference": str(ref_path)}, a.timeout)
                if rows:
                    for r in rows:
                        case["results"].append({**r, "process_peak_mb": proc["peak_mb"], "inprocess": True})
                else:
                    case["results"].append({"method": "inprocess", **proc})
                ref = np.load(ref_path) if ref_path.exists() else make_reference(n, taps)
                # The target pair, Spark's floor and ferry via Scala, in --cold-runs fresh processes
                # each, interleaved: one cold run on this machine varies by +-20%. The first round
                # also makes the warm runs; its Scala output is checked against numpy.
                floors, scalas = [], []
                for round_ in range(max(1, a.cold_runs)):
                    reps = a.repeats if round_ == 0 else 1
                    self.say(f"N={n:.0e} taps={taps}: floor (cold run {round_ + 1})")
                    floors.append(self.spark_case("floor", n_dir, kernel, ref, repeats=reps))
                    self.say(f"  -> {brief(floors[-1])}")
                    if jar is not None:
                        self.say(f"N={n:.0e} taps={taps}: ferry via Scala (cold run {round_ + 1})")
                        scalas.append(self.scala_case(jar, n_dir, kernel, taps, ref if round_ == 0 else None,
                                                      repeats=reps))
                        self.say(f"  -> {brief(scalas[-1])}")
                case["results"].append(median_of_cold_runs(floors))
                for kind in ("arrow_identity", "ferry_pyspark"):
                    if kind == "arrow_identity" and a.skip_identity:
                        continue
                    self.say(f"N={n:.0e} taps={taps}: {kind}")
                    case["results"].append(self.spark_case(kind, n_dir, kernel, ref))
                    self.say(f"  -> {brief(case['results'][-1])}")
                if jar is not None:
                    case["results"].append(median_of_cold_runs(scalas))
                    self.say(f"N={n:.0e} taps={taps}: ferry via Scala without ferry.FerryPlugin (one cold run)")
                    case["results"].append(self.scala_case(jar, n_dir, kernel, taps, None, repeats=1, plugin=False))
                    self.say(f"  -> {brief(case['results'][-1])}")
                if not a.skip_seed:
                    if taps in seed_timed_out_taps and not a.seed_all:
                        case["results"].append({"method": "seed_spark_sql", "skipped": True, "note": (
                            f"not run: the seed method did not finish in {a.timeout:.0f} s at a smaller N "
                            "with this kernel, and its work grows with N")})
                    else:
                        self.say(f"N={n:.0e} taps={taps}: the seed's Spark SQL method (cap {a.timeout:.0f} s)")
                        r = self.seed_case(n_dir, kernel, ref)
                        case["results"].append(r)
                        self.say(f"  -> {brief(r)}")
                        if r.get("timed_out"):
                            seed_timed_out_taps.add(taps)
                del ref
                write_outputs(result)   # keep partial results if a later case fails
            shutil.rmtree(n_dir, ignore_errors=True)
        if not a.skip_sweep:
            self.say("kernel-length sweep: numpy.convolve vs the FFT path (ferry overlap-save, scipy oaconvolve)")
            result["sweep"] = self.sweep()
        result["finished"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        result["machine"]["load_at_end"] = list(os.getloadavg())
        shutil.rmtree(self.tmp, ignore_errors=True)
        return result


def median_of_cold_runs(runs: list[dict]) -> dict:
    """One result from fresh-process runs of a case: the first's (warm runs, output check), with
    seconds and process seconds their medians, peak memory their maximum, and every run listed."""
    ok = [r for r in runs if r.get("seconds") is not None]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    out["cold_runs_s"] = [r["seconds"] for r in ok]
    out["seconds"] = float(np.median(out["cold_runs_s"]))
    out["wall_s"] = float(np.median([r["wall_s"] for r in ok]))
    out["peak_mb"] = max(r.get("peak_mb", 0) for r in ok)
    if ok[0].get("plan_s") is not None:
        out["plan_runs_s"] = [r.get("plan_s") for r in ok]
    return out


def make_reference(n: int, taps: int) -> np.ndarray:
    return np.convolve(make_series(n), make_kernel(taps), mode="same")


def brief(r: dict) -> str:
    if "seconds" in r:
        err = r.get("check", {}).get("max_rel_error")
        return (f"{r['seconds']:.2f} s (process {r['wall_s']:.1f} s), peak {r['peak_mb']:.0f} MB"
                + (f", max rel error {err:.2e}" if err is not None else ""))
    return r.get("note") or (r.get("error") or "failed")[-400:]


def machine_facts() -> dict:
    import psutil
    facts = {"nproc": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
             "platform": platform.platform(), "python": platform.python_version(),
             "load_at_start": list(os.getloadavg())}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for mod in ("numpy", "scipy", "pyarrow", "pyspark", "psutil", "ferry"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:   # noqa: BLE001 - a missing module is reported, not fatal
            versions[mod] = f"unavailable ({e.__class__.__name__})"
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
        versions["java"] = (out.stderr or out.stdout).splitlines()[0]
    except Exception:   # noqa: BLE001
        versions["java"] = "unavailable"
    try:
        versions["ferry_git"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                               capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "python", "scala", "build.sbt"],
                               capture_output=True, text=True).stdout.splitlines()
        if dirty:
            versions["ferry_git"] += f" + {len(dirty)} uncommitted change(s) in python/, scala/"
    except Exception:   # noqa: BLE001
        pass
    facts["versions"] = versions
    facts["OPENBLAS_CORETYPE"] = os.environ.get("OPENBLAS_CORETYPE")
    return facts


# --- the report -------------------------------------------------------------------------------

LABELS = {
    "numpy.convolve": "numpy.convolve (in-process)",
    "scipy.signal.oaconvolve": "scipy.signal.oaconvolve (in-process)",
    "ferry.convolve": "ferry.convolve (in-process)",
    "ferry.convolve(block_size=65536)": "ferry.convolve, blocks of 65536 (in-process)",
    "floor": "Spark floor: read + write Parquet",
    "arrow_identity": "Spark read + mapInArrow identity + write",
    "ferry_pyspark": "ferry via PySpark (ferry.spark.Convolve)",
    "ferry_scala": "ferry via Scala (ConvolveDemo, ferry.FerryPlugin)",
    "ferry_scala_noplugin": "ferry via Scala (ConvolveDemo, no plugin: workers start in transform)",
    "seed_spark_sql": "seed's Spark SQL method",
}


def _fmt_s(v):
    return "—" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def _load(r):
    return "—" if r.get("load1_before") is None else f"{r['load1_before']:.1f}"


def _get(case, method):
    for r in case["results"]:
        if r.get("method") == method:
            return r
    return None


def _warm(r: dict | None) -> float | None:
    """Best of the runs after the first in the same session (None when there were none)."""
    runs = (r or {}).get("runs_s") or []
    return min(runs[1:]) if len(runs) > 1 else None


PROTOCOLS = (("cold", lambda r: (r or {}).get("seconds")), ("warm", _warm))


def targets(result: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the two stated targets, cold and warm, plus the same for PySpark."""
    rows = []
    big = max(result["settings"]["sizes"]) if result["settings"]["sizes"] else None
    for path, label in (("ferry_scala", "ferry via Scala"), ("ferry_pyspark", "ferry via PySpark (reference only)")):
        for proto, sec in PROTOCOLS:
            for case in result["cases"]:
                if case["n"] != 10_000_000:
                    continue
                r, floor = _get(case, path), _get(case, "floor")
                what = f"{label} within 1.5x of Spark's floor, N=1e7, {case['taps']} taps ({proto})"
                if sec(r) and sec(floor):
                    ratio = sec(r) / sec(floor)
                    rows.append((what, f"{ratio:.2f}x ({sec(r):.2f} s vs {sec(floor):.2f} s)",
                                 "PASS" if ratio <= 1.5 else "FAIL"))
                else:
                    rows.append((what, "not measured", "not measured"))
            for case in result["cases"]:
                if case["n"] != 1_000_000 or case["taps"] != 5:
                    continue
                r, seed = _get(case, path), _get(case, "seed_spark_sql")
                what = f"{label} at least 5x faster than the seed's method, N=1e6, 5 taps ({proto})"
                if sec(r) and sec(seed):
                    sp = sec(seed) / sec(r)
                    rows.append((what, f"{sp:.1f}x ({sec(seed):.2f} s vs {sec(r):.2f} s)",
                                 "PASS" if sp >= 5 else "FAIL"))
                elif sec(r) and seed and seed.get("timed_out"):
                    rows.append((what, f"> {result['settings']['timeout_s'] / sec(r):.0f}x (seed did not finish)",
                                 "PASS"))
                else:
                    rows.append((what, "not measured", "not measured"))
    # The seed target's ceiling: ferry's job reads and writes the same Parquet as the floor does,
    # so no ferry path can be more times faster than the seed's method than the floor itself is.
    for proto, sec in PROTOCOLS:
        for case in result["cases"]:
            if case["n"] != 1_000_000 or case["taps"] != 5:
                continue
            floor, seed = _get(case, "floor"), _get(case, "seed_spark_sql")
            if sec(floor) and sec(seed):
                rows.append((f"(ceiling) Spark's floor itself against the seed's method, N=1e6, 5 taps ({proto})",
                             f"{sec(seed) / sec(floor):.1f}x ({sec(seed):.2f} s vs {sec(floor):.2f} s)",
                             "the most any job that reads and writes this Parquet can reach"))
    if not rows:
        rows.append(("targets (N=1e7 and N=1e6 cases)", f"not in this run (largest N {big})", "not measured"))
    return rows


def sweep_summary(sweep: dict | None) -> list[str]:
    if not sweep or not sweep.get("rows"):
        return ["Not run." if not sweep else f"Failed: {sweep.get('error')}"]
    lines = []
    by_n: dict[int, list] = {}
    for r in sweep["rows"]:
        by_n.setdefault(r["n"], []).append(r)
    for n, rows in by_n.items():
        lines += [f"N = {n:,} (complex128, mode 'full', best of up to {sweep.get('repeats', 5)} runs):", "",
                  "| taps | numpy.convolve s | M samples/s | ferry FFT s | M samples/s | oaconvolve s | faster |",
                  "|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            fft = _fft_s(r)
            faster = "numpy" if r["numpy_s"] <= fft else "FFT"
            oa = f"{r['oaconvolve_s']:.4f}" if "fft_s" in r else "(same)"
            lines.append(f"| {r['taps']} | {r['numpy_s']:.4f} | {n / r['numpy_s'] / 1e6:.1f} | "
                         f"{fft:.4f} | {n / fft / 1e6:.1f} | {oa} | {faster} |")
        lines += ["", crossover_text(rows), ""]
    return lines


def _fft_s(row: dict) -> float:
    # Runs before ferry had its own overlap-save timed scipy.signal.oaconvolve as the FFT path.
    return row.get("fft_s", row["oaconvolve_s"])


def crossover_text(rows: list[dict]) -> str:
    rows = sorted(rows, key=lambda r: r["taps"])
    # The smallest taps from which the FFT path stays faster for every larger kernel measured.
    idx = len(rows)
    for i in range(len(rows) - 1, -1, -1):
        if _fft_s(rows[i]) < rows[i]["numpy_s"]:
            idx = i
        else:
            break
    if idx == len(rows):
        return "numpy.convolve was faster at every kernel length measured."
    if idx == 0:
        return "The FFT path was faster at every kernel length measured."
    lo, hi = rows[idx - 1]["taps"], rows[idx]["taps"]
    return (f"Crossover: numpy.convolve is faster up to {lo} taps, the FFT path from {hi} taps on; "
            f"DIRECT_MAX_TAPS (largest kernel convolved directly) is supported anywhere in [{lo}, {hi - 1}].")


def render_md(result: dict) -> str:
    m = result["machine"]
    s = result["settings"]
    v = m.get("versions", {})
    L = ["# Convolution benchmark: ferry vs the seed's Spark SQL method", "",
         f"Run {result['started']} to {result.get('finished', '(unfinished)')}, "
         f"by `benchmarks/convolve/run.py` (see benchmarks/README.md).", "",
         f"Machine: {m.get('nproc')} cores ({m.get('cpu', '?')}), {m.get('memory_gib')} GiB; "
         f"load average at start {m['load_at_start'][0]:.2f}"
         + (f", at end {m['load_at_end'][0]:.2f}" if m.get("load_at_end") else "")
         + ". The machine is shared and noisy (colleagues compile on it): compare ratios within this run.", "",
         "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
         f"Data: seeded random complex128 series and kernels (seed {s['seed']}), written once per N as "
         f"{s['parquet_files']} Parquet files (id long, real double, imag double, ids in order); every "
         "method convolves the same data, mode 'same'.", "",
         "Spark cases: each in a fresh process and SparkSession, `local[2]`, "
         + ", ".join(f"`{k}={val}`" for k, val in s["spark_conf"].items())
         + "; the seed's method keeps its own settings (`local[*]` = 2 cores here, 16g driver, "
         "1000 shuffle partitions).", "",
         "Columns: **seconds** = the job, end to end from the first read to the last Parquet file "
         "written, excluding SparkSession start (measured separately: *session s*); for the Scala "
         "path the seconds ConvolveDemo prints; for in-process methods the call on the in-memory "
         "array (best of up to 3); for Spark's floor and ferry via Scala the median of `--cold-runs` "
         "fresh processes run in turn (listed under each table). The Scala path runs with "
         "`spark.plugins=ferry.FerryPlugin`, which starts the workers while the SparkContext starts (so "
         "outside *seconds*, inside *process s*); the row without it starts them in the job. "
         "**process s** = the whole process, JVM start included. **peak MB** = "
         "largest sum of RSS over the case's process tree (driver, JVM, Python workers; sampled every "
         "0.2 s; forked workers' shared pages count once per process); for in-process methods, that "
         "process's peak RSS during the call (input array and libraries included). **x floor** = "
         "seconds / the Spark floor's seconds (same N and taps). **seed ÷ this** = the seed "
         "method's seconds / this method's seconds. **warm s** = the best of the later runs of the same "
         "job in the same session (runs 2.. of `--repeats`; the seed: of `--seed-repeats`): JIT-compiled, "
         "classes loaded, Python workers up, as in a long-lived pipeline; *warm x floor* and *warm seed ÷ "
         "this* compare warm with warm. **max rel error** = max|y − numpy| / max|numpy|, "
         "from the written Parquet read back and sorted by id. **load** = the 1-minute load average "
         "just before the case started (2 cores: above 2, other work was competing).", ""]
    L += ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    L += [f"| {t} | {meas} | {verdict} |" for t, meas, verdict in targets(result)]
    L += [""]
    if s.get("assembly"):
        L += [f"Scala path: `spark-submit --master local[2] --class ferry.examples.ConvolveDemo` with "
              f"`{s['assembly']}` (built {s.get('assembly_built', '?')}), `spark.ferry.python` = the run's Python.", ""]
    if result.get("notes"):
        L += ["Notes: " + " ".join(result["notes"]), ""]
    for case in result["cases"]:
        n, taps = case["n"], case["taps"]
        floor, seed = _get(case, "floor"), _get(case, "seed_spark_sql")
        fs = floor.get("seconds") if floor else None
        ss = seed.get("seconds") if seed else None
        L += [f"## N = {n:,}, {taps} taps", "",
              "| method | seconds | M samples/s | peak MB | x floor | seed ÷ this | warm s | warm x floor | "
              "warm seed ÷ this | max rel error | session s | process s | load |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in case["results"]:
            name = LABELS.get(r.get("method"), r.get("method"))
            sec = r.get("seconds")
            if sec is None:
                why = r.get("note") or ("failed: " + (r.get("error") or "?").strip().splitlines()[-1][:160]
                                        if r.get("error") else "failed")
                if r.get("timed_out") or r.get("skipped"):
                    extra = ""
                else:
                    extra = ""
                L.append(f"| {name} | {why}{extra} | | {r.get('peak_mb', 0):.0f} | | | | | | | | "
                         f"{_fmt_s(r.get('wall_s'))} | {_load(r)} |")
                continue
            err = r.get("max_rel_error")
            chk = r.get("check")
            if chk is not None:
                err = chk.get("max_rel_error") if chk.get("ids_ok") else None
                err_txt = f"{err:.1e}" if err is not None else f"ids wrong ({chk['rows']} rows)"
                if chk.get("wrong_outputs"):
                    err_txt += f" ({chk['wrong_outputs']:,} outputs wrong)"
            else:
                err_txt = "—" if err is None else f"{err:.1e}"
            if r.get("method") == "numpy.convolve":
                err_txt = "(reference)"
            xfloor = f"{sec / fs:.2f}" if fs and not r.get("inprocess") else "—"
            if ss:
                vs_seed = f"{ss / sec:.1f}"
            elif seed and (seed.get("timed_out") or seed.get("skipped")):
                vs_seed = f"> {s['timeout_s'] / sec:.0f}"
            else:
                vs_seed = "—"
            w, fw, sw = _warm(r), _warm(floor), _warm(seed)
            warm_cols = (f"{_fmt_s(w)} | {w / fw:.2f} | " if w and fw else (f"{_fmt_s(w)} | — | " if w else "— | — | "))
            warm_cols += f"{sw / w:.1f}" if w and sw else "—"
            L.append(f"| {name} | {_fmt_s(sec)} | {n / sec / 1e6:.2f} | {r.get('peak_mb', 0):.0f} | {xfloor} | "
                     f"{vs_seed} | {warm_cols} | {err_txt} | {_fmt_s(r.get('session_s'))} | {_fmt_s(r.get('wall_s'))} | {_load(r)} |")
        cold = [(LABELS[m], _get(case, m)) for m in ("floor", "ferry_scala")]
        cold = [(label, r) for label, r in cold if r and r.get("cold_runs_s")]
        if cold:
            L += ["", "Cold runs (fresh processes, in turn; *seconds* is their median): " + "; ".join(
                f"{label} {' / '.join(f'{x:.2f}' for x in r['cold_runs_s'])} s" for label, r in cold) + "."]
        fsc = _get(case, "ferry_scala")
        if fsc and fsc.get("plan_runs_s") and all(x is not None for x in fsc["plan_runs_s"]):
            L += ["", "ferry via Scala split: `spark.read.parquet` + `transform` (the planning job) "
                      f"{' / '.join(f'{x:.2f}' for x in fsc['plan_runs_s'])} s of those cold runs."]
        fp = _get(case, "ferry_pyspark")
        if fp and fp.get("plan_s") is not None:
            L += ["", f"ferry via PySpark split: planning pass (`transform`, a read + collect of run edges) "
                      f"{fp['plan_s']:.2f} s, computing pass (read + convolve + write) {fp['compute_write_s']:.2f} s; "
                      f"{fp.get('partitions')} input partitions."]
        if seed and seed.get("check", {}).get("wrong_positions_in_batch"):
            L += ["", f"Seed method: wrong outputs sit at positions "
                      f"{seed['check']['wrong_positions_in_batch']} of the 2048-sample batches "
                      f"({seed['check']['wrong_outputs']:,} of {n:,} outputs differ from numpy by > 1e-9 relative)."]
        L += [""]
    L += ["## Kernel-length sweep: direct vs FFT (for `DIRECT_MAX_TAPS`)", ""]
    L += sweep_summary(result.get("sweep"))
    return "\n".join(L) + "\n"


def write_outputs(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "convolve.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (RESULTS / "convolve.md").write_text(render_md(result))


def parse_list(text: str, conv) -> list:
    return [conv(float(t)) if conv is int else conv(t) for t in text.split(",") if t.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1e6,1e7", help="series lengths, comma-separated (default 1e6,1e7)")
    p.add_argument("--taps", default="5,1024", help="kernel lengths, comma-separated (default 5,1024)")
    p.add_argument("--quick", action="store_true", help="N=1e5, taps 5 and 64, short sweep")
    p.add_argument("--skip-seed", action="store_true", help="do not run the seed's Spark SQL method")
    p.add_argument("--seed-all", action="store_true",
                   help="run the seed's method even where it timed out at a smaller N with the same taps")
    p.add_argument("--skip-scala", action="store_true", help="do not run ferry via Scala (spark-submit)")
    p.add_argument("--skip-identity", action="store_true", help="do not run the mapInArrow identity case")
    p.add_argument("--skip-sweep", action="store_true", help="do not run the kernel-length sweep")
    p.add_argument("--sweep-only", action="store_true",
                   help="run only the kernel-length sweep; writes results/convolve_sweep.{json,md}")
    p.add_argument("--sweep-repeats", type=int, default=5, help="best of up to this many runs per point (default 5)")
    p.add_argument("--sweep-taps", default="", help="kernel lengths to add to the sweep's list")
    p.add_argument("--assembly", help="ferry assembly jar (default: newest target/scala-2.13/*assembly*.jar)")
    p.add_argument("--scala-args", default="{input} {output} {kernel_npy} {mode}",
                   help="ConvolveDemo's arguments, with {input} {output} {kernel_npy} {kernel_real} "
                        "{kernel_imag} {taps} {mode} filled in")
    p.add_argument("--timeout", type=float, default=600.0, help="cap per case in seconds (default 600)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each Spark case in one session: run 1 = cold, best of the rest = warm (default 3)")
    p.add_argument("--cold-runs", type=int, default=3,
                   help="fresh processes of Spark's floor and of ferry via Scala per case, interleaved; their "
                        "median is the cold time (default 3)")
    p.add_argument("--seed-repeats", type=int, default=2,
                   help="runs of the seed's method in one session (default 2: it is slow)")
    p.add_argument("--driver-memory", default="4g", help="spark.driver.memory for ferry/floor cases (default 4g)")
    p.add_argument("--tmp", default=None, help="directory for the temporary Parquet data")
    p.add_argument("--note", action="append", default=[], help="a line to add to the report's notes (repeatable)")
    p.add_argument("--from-json", help="only re-render convolve.md from this results JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        a = json.loads(args.child)
        {"inprocess": child_inprocess, "sweep": child_sweep}.get(a["kind"], child_spark)(a)
        return 0
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        (RESULTS / "convolve.md").write_text(render_md(result))
        return 0
    if args.quick:
        args.sizes, args.taps = "1e5", "5,64"
    args.sizes, args.taps = parse_list(args.sizes, int), parse_list(args.taps, int)
    args.sweep_lengths = [65536] if args.quick else [1_000_000, 65536]
    args.sweep_extra_taps = parse_list(args.sweep_taps, int)
    bench = Bench(args)
    if args.sweep_only:
        try:
            sweep = {"started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "machine": machine_facts(), **bench.sweep()}
        finally:
            shutil.rmtree(bench.tmp, ignore_errors=True)
        sweep["machine"]["load_at_end"] = list(os.getloadavg())
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "convolve_sweep.json").write_text(json.dumps(sweep, indent=1) + "\n")
        text = "\n".join([f"# Kernel-length sweep (separate run, {sweep['started']})", "",
                          f"Load average at start {sweep['machine']['load_at_start'][0]:.2f}, at end "
                          f"{sweep['machine']['load_at_end'][0]:.2f}; {sweep['machine']['nproc']} cores.", ""]
                         + sweep_summary(sweep)) + "\n"
        (RESULTS / "convolve_sweep.md").write_text(text)
        print(text)
        return 0
    try:
        result = bench.run()
    finally:
        shutil.rmtree(bench.tmp, ignore_errors=True)
    write_outputs(result)
    print(render_md(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
