#!/usr/bin/env python
"""The reference LOPQ implementation (Yahoo's lopq 1.0.35, Python 2 only) run on the benchmark's own data.

    .venv/bin/python benchmarks/lopq/reference.py [--dataset synthetic|oxford] [--quick] [--queries 200] [--V 16] [--M 8]

The reference's code is never part of this repository. `prepare()` downloads its sdist from PyPI into a
cache outside git (~/.cache/ferry-bench, or $FERRY_BENCH_CACHE), checks its sha256, converts the package
to Python 3 with lib2to3 and applies the few textual fixes in FIXES (each says why it is needed); the
algorithm measured is the reference's. pip refuses that sdist (its metadata says 1.0.0, not 1.0.35), so
the file is fetched directly, at the address the package index pip uses lists for it (its simple API:
$PIP_INDEX_URL, else pip's default). The reference needs scikit-learn (the `bench` extra); lmdb is not.

`measure()` runs the reference in a subprocess (its imports and any failure stay there), single-threaded
(OMP/BLAS threads 1 and threadpoolctl), on the arrays it is given, passed through temporary .npy files:
`LOPQModel(V, M).fit(X, n_init=1, random_state=seed)` (timed, one run), `predict` on every database
vector (the reference's encoder, one vector at a time; timed over all of them), `LOPQSearcher.add_codes`,
and `search(q, quota)` for every query (timed). The ranked ids come back to the caller, which computes
recall with the benchmark's own definition. Run as a script, it measures the reference alone on one of
the benchmark's data sets and prints that row.
"""
from __future__ import annotations

import hashlib
import html
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import re
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

VERSION = "1.0.35"
NAME = f"reference lopq {VERSION} (PyPI, 2to3)"
FILENAME = f"lopq-{VERSION}.tar.gz"
SHA256 = "0221d9ba46388c4cb66672dc19a826421b832668de1bbbd027d2988e5cdce2d7"
#: A worker still running after this long is stopped (the full synthetic set takes about 30 s on one core).
TIMEOUT_S = 3600

#: The textual fixes applied after lib2to3, as (file, old, new, occurrences, why). lib2to3 converts the
#: syntax and the library renames (print, xrange, map, reduce, implicit relative imports) but not Python 2's
#: integer division, and the reference was written against a scikit-learn of 2015. Only what the code
#: path the benchmark runs (fit, predict, reconstruct, LOPQSearcher) needs is fixed; each fix must match
#: exactly `occurrences` times, so a different sdist fails loudly instead of running half-fixed.
FIXES = [
    ("utils.py", "split_size = len(x) / splits", "split_size = len(x) // splits", 1,
     "Python 2 integer division: iterate_splits slices with it, and a float slice bound is a TypeError"),
    ("model.py", "dims_per_bucket = D / num_buckets", "dims_per_bucket = D // num_buckets", 1,
     "Python 2 integer division: eigenvalue_allocation uses it as an array shape"),
    ("model.py", "M / 2", "M // 2", 6,
     "Python 2 integer division of M (subquantizers per half): a range bound, a shape and np.split's count "
     "in fit and predict; the sixth, in load_mat, is the same expression"),
    ("model.py", "n_jobs=1, ", "", 2,
     "scikit-learn 1.0 removed KMeans's n_jobs (a TypeError now); the benchmark limits threads to 1 instead"),
]


class ReferenceUnavailable(RuntimeError):
    """The reference could not be downloaded, converted or run; the message says which and why."""


def cache_dir() -> Path:
    root = os.environ.get("FERRY_BENCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ferry-bench"
    return Path(root) / f"lopq-{VERSION}"


def _stamp() -> str:
    """Names what a converted copy was made from, so that a change to FIXES converts again."""
    return hashlib.sha256(json.dumps([SHA256, FIXES]).encode()).hexdigest()


def prepare() -> Path:
    """The directory to put on sys.path to import the converted reference (`lopq`); downloads and converts once."""
    root = cache_dir()
    src = root / "py3"
    stamp = root / "py3.stamp"
    if stamp.exists() and stamp.read_text() == _stamp() and (src / "lopq" / "__init__.py").exists():
        return src
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / FILENAME
    if not sdist.exists() or hashlib.sha256(sdist.read_bytes()).hexdigest() != SHA256:
        try:
            url = sdist_url()
            with urllib.request.urlopen(url, timeout=120) as r:
                data = r.read()
        except OSError as e:
            raise ReferenceUnavailable(f"download of {FILENAME} failed: {e}") from e
        digest = hashlib.sha256(data).hexdigest()
        if digest != SHA256:
            raise ReferenceUnavailable(f"{FILENAME} has sha256 {digest}, expected {SHA256}")
        sdist.write_bytes(data)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix="py3."))
    try:
        with tarfile.open(fileobj=io.BytesIO(sdist.read_bytes()), mode="r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(f"lopq-{VERSION}/lopq/")]
            for m in members:
                out = tmp / "lopq" / Path(m.name).name
                out.parent.mkdir(exist_ok=True)
                out.write_bytes(tar.extractfile(m).read())
        _2to3(tmp / "lopq")
        for name, old, new, count, _why in FIXES:
            path = tmp / "lopq" / name
            text = path.read_text()
            if text.count(old) != count:
                raise ReferenceUnavailable(f"fix {old!r} -> {new!r} expects {count} occurrence(s) in {name}, "
                                           f"found {text.count(old)}")
            path.write_text(text.replace(old, new))
        if src.exists():
            shutil.rmtree(src)
        tmp.rename(src)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    stamp.write_text(_stamp())
    return src


def sdist_url() -> str:
    """Where the package index pip uses ($PIP_INDEX_URL, else pip's default: PyPI) serves FILENAME."""
    index = os.environ.get("PIP_INDEX_URL")
    if not index:
        try:
            from pip._internal.models.index import PyPI
        except ImportError as e:
            raise ReferenceUnavailable(f"no PIP_INDEX_URL and no pip to name its default index: {e}") from e
        index = PyPI.simple_url
    request = urllib.request.Request(f"{index.rstrip('/')}/lopq/", headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    with urllib.request.urlopen(request, timeout=60) as r:
        page, base, kind = r.read().decode(), r.url, r.headers.get_content_type()
    if kind.endswith("json"):       # PEP 691
        urls = [f["url"] for f in json.loads(page)["files"] if f["filename"] == FILENAME]
    else:                           # PEP 503: an anchor per file
        urls = [html.unescape(u) for u in re.findall(r'href="([^"]*)"', page) if
                urllib.parse.urlsplit(html.unescape(u)).path.endswith("/" + FILENAME)]
    if not urls:
        raise ReferenceUnavailable(f"the package index at {index} lists no {FILENAME}")
    return urllib.parse.urljoin(base, urls[0])


def _2to3(package: Path) -> None:
    """Converts every .py file of the package in place with lib2to3's default fixers."""
    with warnings.catch_warnings():
        # lib2to3 is deprecated (removed in Python 3.13) and says so on import and use.
        warnings.simplefilter("ignore")
        try:
            from lib2to3 import refactor
        except ImportError as e:
            raise ReferenceUnavailable(f"lib2to3 is not available in Python {sys.version.split()[0]}: {e}") from e
        tool = refactor.RefactoringTool(refactor.get_fixers_from_package("lib2to3.fixes"))
        files = sorted(str(p) for p in package.glob("*.py"))
        tool.refactor(files, write=True)
        if tool.errors:
            raise ReferenceUnavailable(f"lib2to3 failed: {tool.errors[:3]}")


def measure(X, Q, V: int = 16, M: int = 8, seed: int = 0, quota: int = 1000, keep: int = 100) -> dict:
    """The reference trained and searched on X (database and training set) and queries Q, in a subprocess.

    Returns the timings and counts, and "ranked": the first `keep` ids of each query's results (-1 pads).
    Raises ReferenceUnavailable if the reference cannot be prepared or its run fails.
    """
    import numpy as np

    src = prepare()
    with tempfile.TemporaryDirectory(prefix="ferry-lopq-ref.") as tmp:
        np.save(f"{tmp}/X.npy", np.ascontiguousarray(X, dtype=np.float64))
        np.save(f"{tmp}/Q.npy", np.ascontiguousarray(Q, dtype=np.float64))
        env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   MKL_NUM_THREADS="1")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tmp, str(V), str(M), str(seed), str(quota),
               str(keep)]
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise ReferenceUnavailable(f"the reference's run took more than {TIMEOUT_S} s") from e
        if p.returncode != 0:
            tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
            raise ReferenceUnavailable(f"the reference's run failed (exit {p.returncode}): {tail}")
        out = json.loads(Path(tmp, "result.json").read_text())
        out["ranked"] = np.load(f"{tmp}/ranked.npy")
    return out


def row(X, Q, nn, recalls, V: int = 16, M: int = 8, seed: int = 0, quota: int = 1000) -> dict:
    """A row of the benchmark's tables for the reference (recalls: the benchmark's recall function)."""
    import math

    r = measure(X, Q, V, M, seed, quota)
    ranked = [ids[ids >= 0] for ids in r.pop("ranked")]
    return {"method": NAME, "spec": f"V={V}, M={M}", "V": V, "M": M, "code_bytes": M + 2 * math.log2(V) / 8,
            "train_s": r["train_s"], "encode_per_s": r["encoded"] / r["encode_s"], "encoded": r["encoded"],
            "query_ms": 1e3 * r["query_s"] / len(Q), "candidates": r["candidates"], "mse": r["mse"],
            "sklearn": r["sklearn"], **recalls(ranked, nn)}


# --- the worker (runs in the subprocess: imports only numpy, scikit-learn and the converted reference) ------

def worker(tmp: str, V: int, M: int, seed: int, quota: int, keep: int) -> None:
    import numpy as np
    import sklearn
    from threadpoolctl import threadpool_limits

    import lopq
    from lopq import LOPQModel, LOPQSearcher

    assert Path(lopq.__file__).resolve().is_relative_to(Path(os.environ["PYTHONPATH"]).resolve()), lopq.__file__
    X, Q = np.load(f"{tmp}/X.npy"), np.load(f"{tmp}/Q.npy")
    with threadpool_limits(1):
        t0 = time.perf_counter()
        model = LOPQModel(V=V, M=M)
        model.fit(X, n_init=1, random_state=seed)
        train_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        codes = [model.predict(x) for x in X]
        encode_s = time.perf_counter() - t0

        searcher = LOPQSearcher(model)
        searcher.add_codes(codes)
        t0 = time.perf_counter()
        results = [searcher.search(q, quota=quota)[0] for q in Q]
        query_s = time.perf_counter() - t0

        # Untimed: what each search ranked (search returns only the first `quota` of them), and the error.
        candidates = float(np.mean([len(searcher.get_result_quota(q, quota)[0]) for q in Q]))
        mse = float(np.mean([((model.reconstruct(c) - x) ** 2).sum() for c, x in zip(codes, X)]))
    ranked = np.full((len(Q), keep), -1, dtype=np.int64)
    for i, res in enumerate(results):
        ids = [int(r.id) for r in res[:keep]]
        ranked[i, :len(ids)] = ids
    np.save(f"{tmp}/ranked.npy", ranked)
    Path(tmp, "result.json").write_text(json.dumps(
        {"train_s": train_s, "encode_s": encode_s, "encoded": len(X), "query_s": query_s, "candidates": candidates,
         "mse": mse, "sklearn": sklearn.__version__}))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        tmp, V, M, seed, quota, keep = sys.argv[2], *map(int, sys.argv[3:8])
        worker(tmp, V, M, seed, quota, keep)
        return 0
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("synthetic", "oxford"), default="synthetic")
    p.add_argument("--quick", action="store_true", help="the benchmark's quick synthetic set (10,000 vectors)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--V", type=int, default=16)
    p.add_argument("--M", type=int, default=8)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run  # the benchmark: its data sets, ground truth and recall definition

    for name, desc, X, Q in run.datasets(args.queries, args.quick, args.queries):
        if name == args.dataset:
            break
    print(f"{name}: {desc}", file=sys.stderr)
    t0 = time.perf_counter()
    r = row(X, Q, run.true_nn(Q, X), run.recalls, args.V, args.M, seed=0, quota=run.QUOTA)
    print(json.dumps(r, indent=1))
    print(f"({time.perf_counter() - t0:.0f} s in all)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
