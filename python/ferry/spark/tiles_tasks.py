"""What the executors run for ferry.spark.TileReconstruct: the emit of one partition and the
reduce of one target. Kept apart from the pyspark.ml classes so a Python worker imports only
numpy, pyarrow and the tiles stages.

Both wrap the registered stages ``tiles_emit`` and ``tiles_reduce``; they add only what the
stages cannot know inside one partition or one target: each source's dtype and channels, so a
target whose sources disagree fails naming them (one partition's emit sees only its own tiles).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

import ferry.stages.tiles as tiles  # registers the tiles stages without importing every other stage
from ferry import registry
from ferry.spark.zip_imports import keep_spark_zip_directories
from ferry.stages.tiles import EMIT_SCHEMA, TileError, TileKey, binary_cells, decode_tile

#: Columns the emit adds to tiles_emit's rows for the reduce.
EXTRA = pa.schema([("source_kind", pa.string())])
SHUFFLE_SCHEMA = pa.schema(list(EMIT_SCHEMA) + list(EXTRA))
#: source_x and source_y of a row that only says "this target exists and has no source".
ORPHAN = -1


def kind_of(tile: np.ndarray) -> str:
    """dtype and channel count as one comparable string, e.g. '<i2/4' or '<f8/-'."""
    return f"{tile.dtype.str}/{tile.shape[2] if tile.ndim == 3 else '-'}"


def parse_kind(kind: str) -> tuple[np.dtype, int | None]:
    dtype, channels = kind.split("/")
    return np.dtype(dtype), None if channels == "-" else int(channels)


def emit_partition(batches: Iterator[pa.RecordBatch], params: dict, reads) -> Iterator[pa.RecordBatch]:
    """tiles_emit over one partition's source tiles; each tile decoded once, counted in ``reads``."""
    keep_spark_zip_directories()
    proc = registry.get("tiles_emit").open(params)
    # What the reduce needs of each source (an emitted row may carry a source of an earlier
    # batch: tiles_emit holds integer partials back to send their sums).
    extras: dict[TileKey, str] = {}
    for batch in batches:
        # One source at a time: its rows (up to (2r+1)^2 target-sized partials) are the largest
        # batch this task holds, whatever spark.sql.execution.arrow.maxRecordsPerBatch says.
        for i in range(batch.num_rows):
            one = batch.slice(i, 1)
            out = proc.process(one)
            reads.add(1)
            extras.update(_source_extras(one))
            if out.num_rows:
                yield _with_extras(out, extras)
    for tail in registry.finish_results(proc):
        if tail.num_rows:
            yield _with_extras(tail, extras)


def _source_extras(src: pa.RecordBatch) -> dict[TileKey, str]:
    cols = {c: src.column(c).to_pylist() for c in ("image_id", "z", "x", "y")}
    pixels = binary_cells(src.column("pixels"))
    per_source = {}
    for i in range(src.num_rows):
        key = TileKey(cols["image_id"][i], cols["z"][i], cols["x"][i], cols["y"][i])
        # tiles_emit has checked the bytes already: this re-reads the header only (no copy).
        per_source[key] = kind_of(decode_tile(pixels[i], key))
    return per_source


def _with_extras(out: pa.RecordBatch, per_source: dict[TileKey, str]) -> pa.RecordBatch:
    ids, zs = out.column("image_id").to_pylist(), out.column("z").to_pylist()
    sx, sy = out.column("source_x").to_pylist(), out.column("source_y").to_pylist()
    kinds = [per_source[TileKey(ids[i], zs[i], sx[i], sy[i])] for i in range(out.num_rows)]
    return pa.RecordBatch.from_arrays(list(out.columns) + [tiles.string_column(kinds)], schema=SHUFFLE_SCHEMA)


def reduce_target(batches: Iterator[pa.RecordBatch], params: dict) -> Iterator[pa.RecordBatch]:
    """tiles_reduce over the rows of one target; zeros (as the in-process job gives) for a
    target that no existing source reaches."""
    keep_spark_zip_directories()
    proc = registry.get("tiles_reduce").open(params)
    first: tuple[TileKey, str] | None = None
    orphan = None
    for batch in batches:
        ids, zs = batch.column("image_id").to_pylist(), batch.column("z").to_pylist()
        sx, sy = batch.column("source_x").to_pylist(), batch.column("source_y").to_pylist()
        kinds = batch.column("source_kind").to_pylist()
        real = []
        for i in range(batch.num_rows):
            if sx[i] == ORPHAN:
                orphan = batch.slice(i, 1)
                continue
            real.append(i)
            source = TileKey(ids[i], zs[i], sx[i], sy[i])
            if first is None:
                first = (source, kinds[i])
            elif kinds[i] != first[1]:
                raise TileError(source, _mismatch(kinds[i], first))
        if real and len(real) == batch.num_rows:
            proc.process(batch)  # take() would copy every partial
        elif real:
            proc.process(batch.take(tiles.int_column(real)))
    if first is None and orphan is not None:
        yield _zeros(orphan, params)
        return
    yield proc.finish()


def _mismatch(kind: str, first: tuple[TileKey, str]) -> str:
    def what(k):
        dtype, channels = parse_kind(k)
        return f"dtype {dtype}" + (f" with {channels} channels" if channels is not None else ", 2-D")
    return (f"has {what(kind)} but {first[0]} of the same image has {what(first[1])}; all tiles of one image "
            "need one dtype and channel count: cast them when writing the store")


def _zeros(row: pa.RecordBatch, params: dict) -> pa.RecordBatch:
    """The output of a target whose whole neighbourhood is missing, exactly as iter_reconstruct's."""
    r = {c: row.column(c)[0].as_py() for c in row.schema.names if c != "pixels"}
    key = TileKey(r["image_id"], r["z"], r["x"], r["y"])
    shape = (r["height"], r["width"])
    dtype, channels = parse_kind(r["source_kind"])
    op = tiles._operator_from(params)
    grid, radius, how = tiles._reduce_plan(op, params, (r["tile_height"], r["tile_width"]), key.image)
    if how == "scatter":
        out = np.zeros(shape + ((channels,) if channels else ()), op.out_dtype(dtype))
    else:
        halo = op.halo(grid.tile_shape, radius)
        region = tiles.stitch(key, shape, {}, halo, dtype=dtype, channels=channels)
        out = tiles.apply(lambda reg: op.region(reg, shape, grid, radius), region, halo, shape)
    return tiles._tile_batch([(key, tiles.cast_output(key, out, params["output_dtype"]))])
