#!/usr/bin/env python
"""LOPQ training time against quality: ferry's fit at several iteration counts, on the same data.

    .venv/bin/python benchmarks/lopq/iterations.py [--config "sub_iters=8,rotation_iters=4" ...] [--note TEXT]

Each --config is a set of ``ferry.lopq.fit`` keyword arguments (integers) at V=16, M=8; the
defaults are fit's own defaults, the schedule before them (12 steps over the data, the last 8
refining the rotations), longer and shorter ones, and no refinement. Every config is trained on the
Gaussian mixture of run.py (50,000 x 128, 1,000 queries, seeds 0..2) and on the Oxford5k
features split as the reference's own recall test does (80/20 by a seeded shuffle, splits 0..2,
each trained with its split's seed), single-threaded. Reported per set: mean recall@1/10/100
of the exact nearest neighbour (search quota 1000), mean squared reconstruction error, mean
training seconds and that time over the first config's. Results go to
benchmarks/results/lopq_iterations.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from run import COMPONENTS, OXFORD, QUOTA, SEED, true_nn  # noqa: E402  (run.py's data and ground truth)

DEFAULT_CONFIGS = ("", "sample_iters=0,sub_iters=12,rotation_iters=8", "sample_iters=8,sub_iters=8,rotation_iters=8",
                   "sample_iters=8,sub_iters=6,rotation_iters=6", "sample_iters=8,sub_iters=3,rotation_iters=3",
                   "rotation_iters=0")
SEEDS = (0, 1, 2)


def parse_config(text: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        out[key.strip()] = int(value)
    return out


def datasets():
    from ferry.lopq import read_fvecs
    from tests.synthetic import mixture

    X, Q = mixture(50_000, 128, COMPONENTS, seed=SEED), mixture(1_000, 128, COMPONENTS, seed=SEED + 1)
    nn = true_nn(Q, X)
    yield "synthetic", [(seed, X, Q, nn) for seed in SEEDS]
    if OXFORD.exists():
        O = read_fvecs(str(OXFORD)).astype(np.float64)
        splits = []
        for seed in SEEDS:
            perm = np.random.default_rng(seed).permutation(len(O))
            n_queries = int(np.ceil(0.2 * len(O)))
            B, Qo = O[perm[n_queries:]], O[perm[:n_queries]]
            splits.append((seed, B, Qo, true_nn(Qo, B)))
        yield "oxford", splits


def measure(config: dict, runs) -> dict:
    from threadpoolctl import threadpool_limits

    from ferry.lopq import LOPQSearcher, fit

    rows = []
    for seed, X, Q, nn in runs:
        with threadpool_limits(1), warnings.catch_warnings():
            warnings.simplefilter("ignore")     # Oxford: a cluster or two keeps the identity rotation
            t0 = time.perf_counter()
            model = fit(X, V=16, M=8, seed=seed, **config)
            train_s = time.perf_counter() - t0
            coarse, fine = model.encode(X)
            searcher = LOPQSearcher(model)
            searcher.add_codes(coarse, fine)
            ranked = [searcher.search(q, quota=QUOTA, k=100).ids for q in Q]
        mse = float(((model.decode(coarse, fine) - X) ** 2).sum(1).mean())
        rows.append({"seed": seed, "train_s": train_s, "mse": mse,
                     **{f"recall@{R}": float(np.mean([nn[i] in r[:R] for i, r in enumerate(ranked)]))
                        for R in (1, 10, 100)}})
    keys = ("recall@1", "recall@10", "recall@100", "mse", "train_s")
    return {"runs": rows, **{k: float(np.mean([r[k] for r in rows])) for k in keys}}


def reference_figures() -> dict | None:
    """The reference's mean figures on the mixture (seeds 0..2) from run.py's latest results, if any."""
    path = RESULTS / "lopq.json"
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    ref = r.get("datasets", {}).get("synthetic", {}).get("seeds", {}).get("reference")
    if not ref:
        return None
    out = {k: ref[k]["mean"] if isinstance(ref[k], dict) else ref[k]
           for k in ("recall@1", "recall@10", "recall@100", "mse", "train_s")}
    return {**out, "run": f"{r['started']}, ferry git {r['machine']['git']}"}


def render(report: dict) -> str:
    lines = ["# LOPQ training time against quality", "",
             f"Run {report['started']} to {report['finished']}, by `benchmarks/lopq/iterations.py`; "
             f"ferry git {report['git']}. {report.get('note', '')}".rstrip(), "",
             "V=16, M=8, one thread. Each row is the mean over seeds 0..2 (the mixture) or splits 0..2 (Oxford, "
             "80/20 as the reference's recall test, trained with the split's seed). **x time** is the training time "
             "over the first row's; **x reference** the reference's training time (mixture, seeds 0..2, from the "
             "latest `run.py` results) over the row's.", ""]
    ref = report.get("reference")
    if ref:
        lines += [f"The reference on the mixture in that run ({ref['run']}): recall@1 {ref['recall@1']:.3f}, "
                  f"recall@10 {ref['recall@10']:.3f}, recall@100 {ref['recall@100']:.3f}, mse {ref['mse']:.1f}, "
                  f"training {ref['train_s']:.1f} s.", ""]
    for name, rows in report["sets"].items():
        ref_s = ref["train_s"] if ref and name == "synthetic" else None
        lines += [f"## {name}", "", "| config | recall@1 | recall@10 | recall@100 | mse | train s | x time | x reference |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        base = rows[0]["train_s"]
        for r in rows:
            vs_ref = f"{ref_s / r['train_s']:.1f}x faster" if ref_s else "-"
            lines.append(f"| {r['config'] or 'defaults'} | {r['recall@1']:.3f} | {r['recall@10']:.3f} | "
                         f"{r['recall@100']:.3f} | {r['mse']:.1f} | {r['train_s']:.2f} | {r['train_s'] / base:.2f} | "
                         f"{vs_ref} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", help="fit keyword arguments, e.g. sub_iters=8,rotation_iters=4 "
                   "(repeat; the first is the baseline; default: fit's defaults and five other schedules)")
    p.add_argument("--note", default="")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    configs = args.config or list(DEFAULT_CONFIGS)
    import subprocess
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    report = {"started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "git": git,
              "note": args.note, "reference": reference_figures(), "sets": {}}
    for name, runs in datasets():
        for text in configs:
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {text or 'defaults'}", flush=True)
            report["sets"].setdefault(name, []).append({"config": text, **measure(parse_config(text), runs)})
    report["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lopq_iterations.json").write_text(json.dumps(report, indent=1))
    (out / "lopq_iterations.md").write_text(render(report) + "\n")
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
