"""``ferry lopq pca|pca-prepare|train|codes``: the reference's Spark training scripts, on PySpark.

The arguments are the reference's (train_pca.py, pca_preparation.py, train_model.py,
compute_codes.py), with protobuf models (``--existing_model``, ``--model``) where it took
pickles, and npz files for the PCA parameters. Inputs (``--data``) are Parquet with an id and
an array<float> column (the default), texmex ``.fvecs``, or the reference's text lines
``id<TAB>base64 pickled numpy array`` (read through a numpy-only unpickler); or anything a
``--data_udf`` module's ``udf(sc, data_path, sampling_ratio, seed)`` returns.
"""
from __future__ import annotations

import argparse
import importlib
import io
import os
import sys

import numpy as np

from ferry.errors import FerryError, InputError, InvalidParamsError

PCA_PREPARED_KEYS = ("mean", "projection")
PCA_PARAMS_KEYS = ("count", "mean", "eigenvalues", "eigenvectors")


def add_parser(sub) -> None:
    """Registers ``ferry lopq ...`` on the main parser's subcommands."""
    lopq = sub.add_parser("lopq", help="LOPQ on PySpark: PCA, training, codes (the reference's Spark scripts)")
    cmds = lopq.add_subparsers(dest="lopq_command", required=True)

    p = cmds.add_parser("pca", help="PCA parameters of the data (count, mean, eigenvalues, eigenvectors) as npz")
    _data_args(p)
    p.add_argument("--agg_depth", type=int, default=4, help="depth of tree aggregation for the covariance "
                                                           "(default 4); increase on driver memory issues")
    p.add_argument("--output", required=True, help="output .npz file of PCA parameters")
    p.set_defaults(func=run, lopq_func=cmd_pca)

    p = cmds.add_parser("pca-prepare", help="truncate PCA parameters to D dimensions and balance the halves")
    p.add_argument("--pca_params", required=True, help="npz written by `ferry lopq pca`")
    p.add_argument("--D", type=int, required=True, help="dimension to keep (even)")
    p.add_argument("--output", required=True, help="output .npz (mean, projection) for `train --pca_params`")
    p.set_defaults(func=run, lopq_func=cmd_pca_prepare)

    p = cmds.add_parser("train", help="train an LOPQ model (steps 0 coarse, 1 rotations, 2 subquantizers)")
    _data_args(p)
    p.add_argument("--subquantizer_sampling_ratio", type=float, default=1.0,
                   help="proportion of the data to subsample for subquantizer training (default 1.0)")
    p.add_argument("--existing_model", help="a .lopq model whose parameters are kept (for partial training)")
    p.add_argument("--V", type=int, help="number of coarse clusters")
    p.add_argument("--M", type=int, help="total number of subquantizers")
    p.add_argument("--subquantizer_clusters", type=int, default=256, help="clusters per subquantizer (256)")
    p.add_argument("--steps", default="0,1,2", help="comma-separated training steps: 0 coarse clustering, "
                                                    "1 rotations, 2 subquantizers (default 0,1,2)")
    p.add_argument("--pca_params", help="a prepared PCA (`ferry lopq pca-prepare`) to apply; by default step 0 "
                                        "trains a PCA over all dimensions first")
    p.add_argument("--no_pca", action="store_true", help="quantize the vectors as they are")
    # The schedule's defaults are fit()'s (TrainConfig): None here leaves them to it, and keeps
    # the training module out of every `ferry` command's start-up.
    p.add_argument("--coarse_iters", type=int, help="coarse Lloyd steps at most (default 10)")
    p.add_argument("--sub_iters", type=int, help="subquantizer Lloyd steps over all the data at most (default 4)")
    p.add_argument("--sample_iters", type=int,
                   help="subquantizer Lloyd steps on the k-means++ sample first, on the driver; the last "
                        "rotation_iters of them also refine the rotations (default 8)")
    p.add_argument("--rotation_iters", type=int,
                   help="of the sample_iters steps, and of the sub_iters steps, the last ones that also refine "
                        "the local rotations when step 1 runs (default 4 each; 0: the reference's eigenvector "
                        "rotations)")
    p.add_argument("--agg_depth", type=int, default=4, help="depth of tree aggregation (default 4)")
    p.add_argument("--model", required=True, help="output .lopq file (LOPQModelParams protobuf)")
    p.set_defaults(func=run, lopq_func=cmd_train)

    p = cmds.add_parser("codes", help="LOPQ codes of the data: `id<TAB>[[c0, c1], [f0, ...]]` lines or Parquet")
    _data_args(p)
    p.add_argument("--model", required=True, help="a .lopq model file")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--output_format", choices=("text", "parquet"), default="text",
                   help="text lines as the reference writes (default), or Parquet (id, coarse, fine)")
    p.set_defaults(func=run, lopq_func=cmd_codes)


def _data_args(p) -> None:
    p.add_argument("--data", required=True, help="input: Parquet (file or directory), .fvecs, or text lines "
                                                 "id<TAB>base64 pickled numpy array")
    p.add_argument("--data_udf", help="module with udf(sc, data_path, sampling_ratio, seed) returning an RDD of "
                                      "numpy arrays ((id, array) pairs for codes)")
    p.add_argument("--format", choices=("auto", "parquet", "fvecs", "text"), default="auto",
                   help="input format (default: .fvecs by extension, Parquet for .parquet or a directory of it, "
                        "text otherwise)")
    p.add_argument("--vector_col", default="vector", help="Parquet vector column (default 'vector')")
    p.add_argument("--id_col", default="id", help="Parquet id column (default 'id')")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--sampling_ratio", type=float, default=1.0, help="proportion of data to sample (default 1.0)")
    p.add_argument("--master", default=None, help="Spark master when not set by spark-submit (default local[*])")


def run(args) -> int:
    """Runs a `ferry lopq` command; a ferry error ends it with its message, not a traceback."""
    try:
        return args.lopq_func(args)
    except (FerryError, FileNotFoundError, IsADirectoryError) as e:
        print(f"ferry lopq {args.lopq_command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a Spark job carries the executor's ferry error in its text
        message = _ferry_error_in(e)
        if message is None:
            raise
        print(f"ferry lopq {args.lopq_command}: error: {message}", file=sys.stderr)
        return 2


def _ferry_error_in(e: Exception) -> str | None:
    from ferry.spark.lopq_tasks import ERRORS

    text = str(e)
    for name in ERRORS:
        at = text.rfind(f"{name}: ")
        if at >= 0:
            return text[at:].split("\n")[0]
    return None


# --- the commands -------------------------------------------------------------------------------------

def cmd_pca(args) -> int:
    from ferry.spark import lopq_train
    from ferry.stages.lopq import train as T

    lopq_train.check_agg_depth(args.agg_depth)
    blocks, _ = _blocks(args)
    m = lopq_train.pca_moments(blocks, args.agg_depth, args.sampling_ratio, args.seed)
    eigenvalues, eigenvectors = T.eigen(m)
    _save_npz(args.output, count=np.array(m.n), mean=m.mean, eigenvalues=eigenvalues, eigenvectors=eigenvectors)
    print(f"PCA of {m.n} vectors of dimension {m.mean.size} written to {args.output}", file=sys.stderr)
    return 0


def cmd_pca_prepare(args) -> int:
    from ferry.stages.lopq import train as T

    p = _load_npz(args.pca_params, PCA_PARAMS_KEYS, "PCA parameters (`ferry lopq pca --output`)")
    pca = T.prepare_pca(p["mean"], p["eigenvalues"], p["eigenvectors"], args.D)
    _save_npz(args.output, mean=pca.mean, projection=pca.projection)
    return 0


def cmd_train(args) -> int:
    from ferry.spark import lopq_train
    from ferry.stages.lopq import train as T
    from ferry.stages.lopq.model import PCA, LOPQModel

    steps = _parse_steps(args.steps)
    existing = None
    if args.existing_model and args.pca_params:
        raise InvalidParamsError("give --existing_model or --pca_params, not both: the model holds its PCA")
    if args.existing_model:
        existing = LOPQModel.load(args.existing_model)
    elif args.pca_params:
        p = _load_npz(args.pca_params, PCA_PREPARED_KEYS, "a prepared PCA (`ferry lopq pca-prepare --output`)")
        existing = PCA(p["mean"], p["projection"])
    schedule = dict(coarse_iters=args.coarse_iters, sub_iters=args.sub_iters, rotation_iters=args.rotation_iters,
                    sample_iters=args.sample_iters)
    config = dict(seed=args.seed, pca=not args.no_pca, **{k: v for k, v in schedule.items() if v is not None})
    kwargs = dict(steps=steps, existing=existing, sampling_ratio=args.sampling_ratio,
                  subquantizer_sampling_ratio=args.subquantizer_sampling_ratio, agg_depth=args.agg_depth)
    # What the parameters alone decide is raised before Spark starts.
    lopq_train.check_agg_depth(args.agg_depth)
    T.sample_mask(np.empty((0, 1)), args.sampling_ratio, 0)
    T.sample_mask(np.empty((0, 1)), args.subquantizer_sampling_ratio, 0)
    if existing is not None:
        T.check_steps(steps, T.initial_state(existing.input_dim, args.V, args.M, args.subquantizer_clusters,
                                             existing=existing, **config))
    else:
        _check_config_without_data(args)
        T.check_steps(steps, T.TrainState(T.TrainConfig(D_in=2 * args.M, V=args.V, M=args.M)))
    blocks, dim = _blocks(args)
    with StepBars(steps) as bars:
        state = lopq_train.fit(blocks, dim, args.V, args.M, args.subquantizer_clusters, progress=bars, **kwargs,
                               **config)
    model = state.model()
    model.save(args.model)
    print(f"{model!r} written to {args.model}", file=sys.stderr)
    return 0


def _check_config_without_data(args) -> None:
    from ferry.stages.lopq.model import check_config

    if args.V is None or args.M is None:
        raise InvalidParamsError("--V and --M are required unless --existing_model gives them")
    check_config(2 * args.M, args.V, args.M, args.subquantizer_clusters, what="LOPQ training")


def cmd_codes(args) -> int:
    from pyspark.sql import functions as F

    from ferry.spark.lopq import LopqModel

    model = LopqModel.from_file(args.model)
    df = _id_vectors(args, model.lopq.input_dim)
    out = model.setIdCol("id").setVectorCol("vector").transform(df)
    if args.output_format == "parquet":
        out.select("id", "coarse", "fine").write.parquet(args.output)
    else:
        line = F.concat(F.col("id").cast("string"), F.lit("\t[["), F.array_join("coarse", ", "), F.lit("], ["),
                        F.array_join("fine", ", "), F.lit("]]"))
        out.select(line.alias("value")).write.text(args.output)
    return 0


# --- data --------------------------------------------------------------------------------------------

def _session(args):
    import logging

    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(f"ferry lopq {args.lopq_command}")
    if args.master or not SparkConf().contains("spark.master"):
        builder = builder.master(args.master or "local[*]")
    spark = builder.config("spark.ui.showConsoleProgress", "false").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    return spark


def _format(args) -> str:
    if args.format != "auto":
        return args.format
    path = args.data
    if path.endswith(".fvecs"):
        return "fvecs"
    if path.endswith(".parquet") or (os.path.isdir(path) and any(
            f.endswith(".parquet") for f in os.listdir(path))):
        return "parquet"
    return "text"


def _check_exists(path: str) -> None:
    if "://" not in path and not os.path.exists(path):
        raise FileNotFoundError(f"--data {path} does not exist")


def _blocks(args):
    """(RDD of packed vector blocks, dimension) of --data (or of --data_udf's RDD).

    A local .fvecs file is read and checked before Spark starts, so its errors come at once.
    """
    from ferry.spark import lopq_train

    if args.data_udf:
        udf = _udf(args.data_udf)
        return lopq_train.blocks_from_arrays(udf(_session(args).sparkContext, args.data, args.sampling_ratio,
                                                 args.seed))
    _check_exists(args.data)
    fmt = _format(args)
    if fmt == "fvecs":
        X = _read_fvecs(args.data, None)
        return lopq_train.blocks_from_array(_session(args).sparkContext, X)
    spark = _session(args)
    if fmt == "text":
        return lopq_train.blocks_from_text(spark.sparkContext, args.data)
    return lopq_train.blocks_from_dataframe(spark.read.parquet(args.data), args.vector_col)


def _read_fvecs(path: str, dim: int | None) -> np.ndarray:
    from ferry.stages.lopq.io import read_fvecs
    from ferry.stages.lopq.model import as_vectors

    X = read_fvecs(path)
    if X.shape[0] == 0:
        raise InputError(f"no vectors: {path} is empty")
    return as_vectors(X, dim, what=f"the vectors of {path}")


def _id_vectors(args, dim: int):
    """A DataFrame (id, vector) of --data for encoding."""
    from pyspark.sql import functions as F

    from ferry.stages.lopq.io import parse_text_line

    schema = "id string, vector array<double>"
    if args.data_udf:
        udf = _udf(args.data_udf)
        spark = _session(args)
        rdd = udf(spark.sparkContext, args.data, args.sampling_ratio, args.seed)
        return spark.createDataFrame(rdd.map(lambda kv: (str(kv[0]), np.asarray(kv[1], float).ravel().tolist())),
                                     schema)
    _check_exists(args.data)
    fmt = _format(args)
    if fmt == "fvecs":
        X = _read_fvecs(args.data, dim)
        return _session(args).createDataFrame([(str(i), x.tolist()) for i, x in enumerate(X)], schema)
    spark = _session(args)
    if fmt == "text":
        def parse(line):
            key, vec = parse_text_line(line)
            return key, vec.tolist()
        lines = spark.sparkContext.textFile(args.data).filter(lambda line: line.strip())
        return spark.createDataFrame(lines.map(parse), schema)
    df = spark.read.parquet(args.data)
    return df.select(F.col(args.id_col).alias("id"), F.col(args.vector_col).alias("vector"))


def _udf(name: str):
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise InvalidParamsError(f"--data_udf {name}: cannot import it ({e}); ship it with --py-files and give "
                                 "its module name") from None
    if not callable(getattr(module, "udf", None)):
        raise InvalidParamsError(f"--data_udf {name}: the module has no function named udf(sc, data_path, "
                                 "sampling_ratio, seed)")
    return module.udf


def _parse_steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise InvalidParamsError(f"--steps takes comma-separated integers among 0,1,2, got {text!r}") from None


def _save_npz(path: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def _load_npz(path: str, keys: tuple[str, ...], what: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise InputError(f"{path} is not an npz file of {what} ({e})") from None
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}: it is not {what}")
    return arrays


# --- progress --------------------------------------------------------------------------------------------

class StepBars:
    """A tqdm bar per training step, advanced by the training driver's progress callback."""

    _STEP_OF = {"pca": 0, "coarse_init": 0, "coarse_step": 0, "rotations": 1, "sub_init": 2, "sub_step": 2,
                "sub_rotation_step": 2}

    def __init__(self, steps):
        self._steps = steps
        self._bar = None
        self._step = None

    def __enter__(self):
        return self

    def __call__(self, name, state, seconds) -> None:
        from tqdm import tqdm

        from ferry.stages.lopq.train import STEPS

        step = self._STEP_OF[name]
        if step != self._step:
            self._close()
            cfg = state.config
            total = {0: (name == "pca") + 1 + cfg.coarse_iters, 1: 1, 2: 1 + cfg.sub_iters}[step]
            self._bar = tqdm(total=total, desc=f"step {step}: {STEPS[step]}", unit="pass", file=sys.stderr)
            self._step = step
        self._bar.update(1)
        if state.inertia is not None and name.endswith("_step"):
            self._bar.set_postfix(inertia=f"{state.inertia:.6g}")

    def _close(self):
        if self._bar is not None:
            self._bar.total = self._bar.n    # early stopping ends a step before its last pass
            self._bar.refresh()
            self._bar.close()
            self._bar = None

    def __exit__(self, *exc):
        self._close()
        return False
