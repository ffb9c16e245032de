"""``ferry tiles``: reconstruct a tile store, in this process or on local PySpark, and preview images.

    ferry tiles reconstruct --input STORE --output DIR --operator NAME [--radius R] [--spark]
    ferry tiles preview --input STORE_OR_DIR --output FILE.png [--image ID] [--max-size PX]

Heavy imports (numpy, pyspark, Pillow) happen inside the commands, so ``ferry --help`` stays quick.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys


def add_parser(sub) -> None:
    """Registers ``ferry tiles`` and its subcommands on the main parser's subparsers."""
    tiles = sub.add_parser("tiles", help="tiled image reconstruction over a tile store")
    tsub = tiles.add_subparsers(dest="tiles_command", required=True)

    r = tsub.add_parser("reconstruct", help="every output tile of every image in a tile store",
                        description="Reads each source tile of STORE once, reconstructs every output tile and "
                                    "writes them compressed, grouped by image, under DIR.")
    r.add_argument("--input", required=True, metavar="STORE", help="a Parquet tile store (ferry.tiles_store)")
    r.add_argument("--output", required=True, metavar="DIR", help="where the output goes: DIR/image_id=<id>/")
    r.add_argument("--operator", required=True, metavar="NAME", help="threshold_sum, convolve2d, median, ...")
    r.add_argument("--radius", type=int, default=-1, metavar="R",
                   help="neighbourhood radius in tiles (default: the operator's)")
    r.add_argument("--strategy", default="auto", choices=("auto", "scatter", "gather"))
    r.add_argument("--output-dtype", default="operator", metavar="DTYPE",
                   help="output tiles' dtype: operator (default: the operator's own, e.g. int64 for threshold_sum "
                        "on int16), int8..int64, uint8..uint64 (every value must fit, else the run fails naming "
                        "the tile) or float32/float64 for float results")
    r.add_argument("--params", default="{}", metavar="JSON", help='operator params, e.g. \'{"size": 3}\'')
    r.add_argument("--kernel", metavar="JSON", help="convolve2d's kernel, e.g. '[[1, 2], [3, 4]]'")
    r.add_argument("--codec", default=None, choices=("zstd", "npz"), help="output compression (default zstd)")
    r.add_argument("--engine", default="core", choices=("core", "spark"),
                   help="core: this process (default); spark: PySpark local, in-process stages")
    r.add_argument("--spark", dest="engine", action="store_const", const="spark", help="same as --engine spark")
    r.add_argument("--master", default="local[2]", help="Spark master for --spark (default local[2])")
    r.add_argument("--driver-memory", help="spark.driver.memory for --spark, e.g. 1g")
    r.add_argument("--partitions", type=int, default=0,
                   help="shuffle partitions for --spark (default: Spark's, coalesced by adaptive execution)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_reconstruct)

    p = tsub.add_parser("preview", help="a PNG of one image at reduced scale",
                        description="Assembles one image of a tile store or of a reconstruct output at reduced "
                                    "scale (every Nth pixel) and writes it as a PNG, grey levels stretched "
                                    "from its minimum to its maximum.")
    p.add_argument("--input", required=True, help="a tile store file or a reconstruct output directory")
    p.add_argument("--output", required=True, metavar="FILE.png")
    p.add_argument("--image", help="image id (default: the first)")
    p.add_argument("--z", type=int, help="level (default: the first of the image)")
    p.add_argument("--max-size", type=int, default=1024, metavar="PX",
                   help="longest side of the preview in pixels (default 1024)")
    p.add_argument("--channel", type=int, help="channel to show (default: RGB for 3 or more, else the first)")
    p.set_defaults(func=cmd_preview)


def _fail(command: str, e: Exception) -> SystemExit:
    return SystemExit(f"ferry tiles {command}: {e}")


def _operator_params(args) -> dict:
    from ferry import registry

    params = registry.params_from_json(args.params)
    if args.kernel:
        if "kernel" in params:
            raise ValueError("the kernel is given twice, in --kernel and in --params; give it once")
        try:
            params["kernel"] = json.loads(args.kernel)
        except json.JSONDecodeError as e:
            raise ValueError(f"--kernel must be JSON rows of numbers, e.g. [[1, 2], [3, 4]]: {e}") from None
    return params


def cmd_reconstruct(args) -> int:
    from ferry.errors import FerryError

    try:
        if args.engine == "spark":
            reads, written, targets = _reconstruct_spark(args)
        else:
            reads, written, targets = _reconstruct_core(args)
    except (FerryError, ValueError, OSError) as e:
        raise _fail("reconstruct", e) from None
    print(f"wrote {written} output tiles to {args.output} ({args.engine}); read {reads} source tiles once each "
          f"for {targets} targets", flush=True)
    return 0


def _progress(args, total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="tile", desc="reconstruct", disable=args.no_progress or None, file=sys.stderr)


def _tracked(items, bar):
    with bar:
        for item in items:
            yield item
            bar.update(1)


def _reconstruct_core(args) -> tuple[int, int, int]:
    import numpy as np

    from ferry.stages.tiles import iter_reconstruct
    from ferry.tiles_store import DEFAULT_CODEC, TileStore, write_output

    store = TileStore(args.input)
    try:
        params = _operator_params(args)
        if "kernel" in params:
            params["kernel"] = np.asarray(params["kernel"], dtype=np.float64)
        total = sum(len(g.offsets()) for g in store.grids.values())
        stats: dict = {}
        tiles = iter_reconstruct(store, args.operator, strategy=args.strategy,
                                 radius=None if args.radius < 0 else args.radius, stats=stats,
                                 output_dtype=args.output_dtype, **params)
        written = write_output(args.output, _tracked(tiles, _progress(args, total)), args.codec or DEFAULT_CODEC)
        return stats["reads"], written, total
    finally:
        store.close()


def _reconstruct_spark(args) -> tuple[int, int, int]:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    from ferry.spark import TileReconstruct, ferry_errors
    from ferry.stages.tiles import TileKey, decode_tile
    from ferry.tiles_store import DEFAULT_CODEC, TileStore, write_output

    store = TileStore(args.input)   # the metadata alone: the progress bar's total
    total = sum(len(g.offsets()) for g in store.grids.values())
    store.close()
    builder = (SparkSession.builder.master(args.master).appName("ferry tiles reconstruct")
               .config("spark.ui.showConsoleProgress", "false"))
    if args.driver_memory:
        builder = builder.config("spark.driver.memory", args.driver_memory)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    try:
        rec = TileReconstruct(operator=args.operator, operatorParams=_operator_params(args), strategy=args.strategy,
                              radius=args.radius, numPartitions=args.partitions, outputDtype=args.output_dtype)
        with ferry_errors():
            out = rec.transform(spark.read.parquet(os.path.abspath(args.input)))
            # One partition at a time reaches the driver: its memory holds a few output tiles, not the image.
            rows = ((TileKey(r.image_id, r.z, r.x, r.y), decode_tile(bytes(r.pixels)))
                    for r in out.toLocalIterator())
            written = write_output(args.output, _tracked(rows, _progress(args, total)), args.codec or DEFAULT_CODEC)
        return rec.getSourceReads(), written, total
    finally:
        spark.stop()


def cmd_preview(args) -> int:
    from ferry.errors import FerryError

    try:
        image, (key, shape, step) = _preview(args)
        _write_png(image, args.output, args.channel)
    except (FerryError, ValueError, OSError) as e:
        raise _fail("preview", e) from None
    print(f"wrote {args.output}: image {key[0]!r} z={key[1]}, {shape[0]}x{shape[1]} pixels at 1/{step} scale "
          f"({image.shape[0]}x{image.shape[1]})", flush=True)
    return 0


def _preview(args):
    """The image at 1/step scale (every step-th pixel), assembled one tile at a time."""
    import numpy as np

    from ferry.errors import InputError
    from ferry.tiles_store import TileStore, iter_output, output_metadata

    output = os.path.isdir(args.input)
    if output:
        meta = output_metadata(args.input).to_pylist()
        images = sorted({(m["image_id"], m["z"]) for m in meta})
    else:
        store = TileStore(args.input)
        images = sorted(store.grids)
    images = [i for i in images if args.image in (None, i[0]) and args.z in (None, i[1])]
    if not images:
        raise InputError(f"{args.input} holds no image {args.image!r}" + (f" at z={args.z}" if args.z is not None
                                                                         else ""))
    image = images[0]
    if output:
        mine = [m for m in meta if (m["image_id"], m["z"]) == image]
        shape = (max(m["y"] + m["height"] for m in mine), max(m["x"] + m["width"] for m in mine))
        source = iter_output(args.input, *image)
    else:
        shape = store.grids[image].shape
        source = store.read_many(k for k in store.keys() if k.image == image)
    step = max(1, math.ceil(max(shape) / args.max_size))
    out = None
    for k, t in source:
        # Rows and columns of the whole image that are multiples of step, inside this tile.
        oy, ox = (-k.y) % step, (-k.x) % step
        part = np.asarray(t)[oy::step, ox::step]
        if out is None:
            out = np.zeros((-(-shape[0] // step), -(-shape[1] // step)) + part.shape[2:], part.dtype)
        out[(k.y + oy) // step:(k.y + oy) // step + part.shape[0],
            (k.x + ox) // step:(k.x + ox) // step + part.shape[1]] = part
    return out, (image, shape, step)


def to_grey_levels(values):
    """0..255 stretched from the minimum to the maximum of the finite values (NaN and inf are 0)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    if not finite.any():
        return np.zeros(v.shape, np.uint8)
    lo, hi = float(v[finite].min()), float(v[finite].max())
    scaled = (v - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(v)
    return np.where(finite, np.rint(scaled), 0).astype(np.uint8)


def _write_png(image, path: str, channel: int | None) -> None:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("ferry tiles preview writes PNGs with Pillow: pip install pillow") from None
    if image.ndim == 3:
        if channel is not None:
            if not 0 <= channel < image.shape[2]:
                raise ValueError(f"--channel {channel} is out of range: the image has {image.shape[2]} channels")
            image = image[..., channel]
        elif image.shape[2] >= 3:
            image = image[..., :3]
        else:
            image = image[..., 0]
    if image.dtype.kind == "c":
        image = abs(image)
    Image.fromarray(to_grey_levels(image)).save(path, format="PNG")

