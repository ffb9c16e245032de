"""The Parquet tile store: light metadata columns beside one heavy column of .npy pixels.

One row per tile::

    image_id string, z int32, x int64, y int64          where the tile sits (ferry.stages.tiles.TileKey)
    height, width int64, channels int32 (0 for 2-D), dtype string      what the pixels are
    image_height, image_width, tile_height, tile_width int64            the grid of the tile's image
    pixels binary                                       the tile as .npy bytes

Queries on the metadata read only the metadata columns (Parquet is columnar: the pixel
column's pages are never fetched), so planning a job over a store of any size costs
kilobytes. Rows are sorted by (image_id, z, x, y) and cut into row groups of about
``row_group_bytes`` of pixels, so reading tiles fetches one row group's pixels at a time.

Image files: PNG and the other Pillow formats through Pillow, TIFF through tifffile (memory
mapped when the file is uncompressed, so tiles are cut without loading the whole image).
Both are optional: ``pip install pillow tifffile``.
"""
from __future__ import annotations

import io
import os
from typing import Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ferry.errors import InputError, InvalidParamsError
from ferry.stages.tiles import (DEFAULT_CODEC, Grid, TileError, TileKey, check_tile, compress_tile, cut_tiles,
                                decode_tile, decompress_tile, encode_tile, infer_grid)

METADATA_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("z", pa.int32()), ("x", pa.int64()), ("y", pa.int64()),
    ("height", pa.int64()), ("width", pa.int64()), ("channels", pa.int32()), ("dtype", pa.string()),
    ("image_height", pa.int64()), ("image_width", pa.int64()),
    ("tile_height", pa.int64()), ("tile_width", pa.int64()),
])
METADATA_COLUMNS = tuple(METADATA_SCHEMA.names)
PIXELS = "pixels"
SCHEMA = METADATA_SCHEMA.append(pa.field(PIXELS, pa.binary()))

#: Most pixel bytes per row group (a tile larger than this gets a row group of its own): large
#: enough for fast scans, small enough that one tile read does not fetch much more than itself,
#: and small enough for a small JVM heap. Spark's vectorized Parquet reader holds a row group's
#: pixels in one on-heap array, grown by doubling; on JDK 17 a large allocation that needs a GC
#: while another thread holds the GC locker (zstd and lz4 JNI calls do) fails with
#: OutOfMemoryError after two retries ("Retried waiting for GCLocker too often", in a G1 log)
#: though the heap has room. With 36 MB groups of 4 MB tiles, ferry.TileReconstruct on a
#: 20000^2 float32 store with a 1 GiB driver failed that way in 2 of 12 runs; see README.
DEFAULT_ROW_GROUP_BYTES = 8 << 20


class TileStoreWriter:
    """Writes a tile store, image by image or tile by tile; checks every tile on the way.

    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "tiles.parquet")
    >>> with TileStoreWriter(path) as w:
    ...     w.add_image("a", np.zeros((5, 7), np.float32), (4, 4))
    >>> TileStore(path).keys()[:2]
    [TileKey(image_id='a', z=0, x=0, y=0), TileKey(image_id='a', z=0, x=0, y=4)]
    """

    def __init__(self, path: str, row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES, compression: str = "zstd"):
        self.path = os.fspath(path)
        self.row_group_bytes = int(row_group_bytes)
        # No dictionary for the pixels: the writer falls back from dictionary encoding only after
        # a page, so a row group's tiles (all distinct) would all land in one dictionary page,
        # which Spark's reader decodes whole and then copies each tile out of again.
        self._writer = pq.ParquetWriter(self.path, SCHEMA, compression=compression,
                                        use_dictionary=[n for n in SCHEMA.names if n != PIXELS])
        self._rows: list[dict] = []
        self._bytes = 0
        self._grids: dict[tuple[str, int], Grid] = {}
        self._profiles: dict[tuple[str, int], dict] = {}
        self._keys: set[TileKey] = set()
        self._last: TileKey | None = None
        self.tiles_written = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def add_image(self, image_id: str, image: np.ndarray, tile_shape: tuple[int, int], z: int = 0) -> None:
        """Cuts a whole image (an array, or a numpy memmap of one) into tiles and writes them."""
        image = image if isinstance(image, np.ndarray) else np.asarray(image)
        if image.ndim not in (2, 3):
            raise InputError(f"Image {image_id!r} has shape {image.shape}; an image is (rows, cols) or "
                             "(rows, cols, channels)")
        grid = Grid(image.shape[0], image.shape[1], *tile_shape)
        for key, tile in sorted(cut_tiles(image, grid, image_id, z).items()):
            self.add_tile(key, np.ascontiguousarray(tile), grid)

    def add_file(self, image_id: str, file: str, tile_shape: tuple[int, int], z: int = 0) -> None:
        """Reads a PNG, TIFF or any image Pillow reads, and writes its tiles."""
        self.add_image(image_id, read_image_file(file), tile_shape, z)

    def add_tiles(self, tiles: Mapping[TileKey, np.ndarray], grids: Mapping[tuple[str, int], Grid] | None = None,
                  tile_shape: tuple[int, int] | None = None) -> None:
        """Writes loose tiles; each image's grid is given, or inferred from its tiles."""
        by_image: dict[tuple[str, int], dict] = {}
        for k, t in tiles.items():
            by_image.setdefault(k.image, {})[k] = t
        for img in sorted(by_image):
            grid = (grids or {}).get(img) or self._grids.get(img) or infer_grid(
                {k: np.shape(t) for k, t in by_image[img].items()}, tile_shape)
            for k in sorted(by_image[img]):
                self.add_tile(k, by_image[img][k], grid)

    def add_tile(self, key: TileKey, tile: np.ndarray, grid: Grid) -> None:
        if key in self._keys:
            raise TileError(key, "is written twice: duplicate tile coordinates; keep one tile per "
                                 "(image_id, z, x, y)")
        known = self._grids.setdefault(key.image, grid)
        if known != grid:
            raise TileError(key, f"comes with grid {grid.describe()} but its image was written with "
                                 f"{known.describe()}; one image has one grid")
        tile = check_tile(key, tile, grid, self._profiles.setdefault(key.image, {}))
        if self._last is not None and key < self._last:
            # Row-group statistics prune reads only when rows are sorted; keep them sorted.
            self._flush()
        self._last = key
        self._keys.add(key)
        pixels = encode_tile(tile)
        # A group is written when the next tile would not fit (or at close), so it holds at most
        # row_group_bytes of pixels, or one larger tile.
        if self._rows and self._bytes + len(pixels) > self.row_group_bytes:
            self._flush()
        self._rows.append({
            "image_id": key.image_id, "z": key.z, "x": key.x, "y": key.y,
            "height": tile.shape[0], "width": tile.shape[1], "channels": tile.shape[2] if tile.ndim == 3 else 0,
            "dtype": tile.dtype.str, "image_height": grid.height, "image_width": grid.width,
            "tile_height": grid.tile_height, "tile_width": grid.tile_width, PIXELS: pixels,
        })
        self._bytes += len(pixels)
        self.tiles_written += 1

    def _flush(self):
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=SCHEMA),
                                     row_group_size=len(self._rows))
        self._rows, self._bytes = [], 0

    def close(self):
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._writer = None


def write_images(path: str, images: Mapping, tile_shape: tuple[int, int], z: int = 0,
                 **writer_args) -> "TileStore":
    """A store of whole images ``{image_id or (image_id, z): array}`` cut into tiles."""
    with TileStoreWriter(path, **writer_args) as w:
        for name in sorted(images, key=str):
            image_id, level = name if isinstance(name, tuple) else (name, z)
            w.add_image(image_id, images[name], tile_shape, level)
    return TileStore(path)


def write_tiles(path: str, tiles: Mapping[TileKey, np.ndarray], grids=None, tile_shape=None,
                **writer_args) -> "TileStore":
    """A store of loose tiles (missing ones are simply absent)."""
    with TileStoreWriter(path, **writer_args) as w:
        w.add_tiles(tiles, grids, tile_shape)
    return TileStore(path)


def write_image_files(path: str, files: Mapping[str, str], tile_shape: tuple[int, int], z: int = 0,
                      **writer_args) -> "TileStore":
    """A store of image files ``{image_id: file}`` (PNG, TIFF, ...) cut into tiles."""
    with TileStoreWriter(path, **writer_args) as w:
        for image_id in sorted(files):
            w.add_file(image_id, files[image_id], tile_shape, z)
    return TileStore(path)


def read_image_file(file: str) -> np.ndarray:
    """The pixels of an image file: (rows, cols) or (rows, cols, channels)."""
    file = os.fspath(file)
    if file.lower().endswith((".tif", ".tiff")):
        try:
            import tifffile
        except ImportError:
            raise ImportError("Reading TIFF files needs tifffile: pip install tifffile") from None
        try:
            # Uncompressed contiguous TIFFs map without loading; tiles are then cut page-lazily.
            return tifffile.memmap(file, mode="r")
        except ValueError:
            return tifffile.imread(file)
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("Reading PNG and other image files needs Pillow: pip install pillow") from None
    with Image.open(file) as im:
        return np.asarray(im)


class _CountingFile(io.RawIOBase):
    """A read-only file that counts the bytes read through it."""

    def __init__(self, path):
        self._f = open(path, "rb")
        self.bytes_read = 0
        self.ranges: list[tuple[int, int]] = []  # (offset, length) of every read

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, b):
        at = self._f.tell()
        n = self._f.readinto(b)
        self._count(at, n or 0)
        return n

    def read(self, size=-1):
        at = self._f.tell()
        data = self._f.read(size)
        self._count(at, len(data))
        return data

    def _count(self, at, n):
        self.bytes_read += n
        if n:
            self.ranges.append((at, n))

    def seek(self, offset, whence=0):
        return self._f.seek(offset, whence)

    def tell(self):
        return self._f.tell()

    def close(self):
        self._f.close()
        super().close()


class TileStore:
    """A Parquet tile store, opened for reading; a tile source for ``tiles.reconstruct``.

    Opening reads the metadata columns only and checks them: one dtype, channel count and grid
    per image, shapes that fit the grid, no duplicate coordinates. ``count_bytes=True`` reads
    through a counting file so ``bytes_read`` shows what each query cost.
    """

    def __init__(self, path: str, count_bytes: bool = False):
        self.path = os.fspath(path)
        self._counter = _CountingFile(self.path) if count_bytes else None
        self._file = pq.ParquetFile(self._counter if count_bytes else self.path)
        names = self._file.schema_arrow.names
        missing = [c for c in METADATA_COLUMNS + (PIXELS,) if c not in names]
        if missing:
            raise InputError(f"{self.path} is not a tile store: it lacks the column(s) {missing}; its columns "
                             f"are {names}. Write it with ferry.tiles_store.TileStoreWriter")
        self._meta = self.metadata()
        self._index = self._check(self._meta)

    @property
    def bytes_read(self) -> int:
        if self._counter is None:
            raise InvalidParamsError("Open the store with count_bytes=True to count the bytes read")
        return self._counter.bytes_read

    def reset_counts(self) -> None:
        """Starts counting read bytes afresh (opening reads the footer: pyarrow fetches up to the
        file's last 64 KiB at once, which may include the end of the pixel column)."""
        if self._counter is None:
            raise InvalidParamsError("Open the store with count_bytes=True to count the bytes read")
        self._counter.bytes_read = 0
        self._counter.ranges.clear()

    def close(self):
        if self._counter is not None:
            self._counter.close()

    def metadata(self, columns: Iterable[str] = METADATA_COLUMNS, filter=None) -> pa.Table:
        """The metadata of every tile (or of those matching a pyarrow.compute filter).

        Only the requested columns are read; asking for ``pixels`` here is refused, use
        :meth:`read_many` for pixels.
        """
        columns = list(columns)
        if PIXELS in columns:
            raise InvalidParamsError("metadata() reads metadata only; read pixels with read() or read_many()")
        table = self._file.read(columns=columns)
        return table.filter(filter) if filter is not None else table

    def pixel_column_ranges(self) -> list[tuple[int, int]]:
        """The (offset, length) in the file of every row group's pixel column chunk."""
        md = self._file.metadata
        idx = self._file.schema_arrow.get_field_index(PIXELS)
        out = []
        for i in range(md.num_row_groups):
            col = md.row_group(i).column(idx)
            start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
            out.append((start, col.total_compressed_size))
        return out

    def pixel_bytes_read(self) -> int:
        """How many of the bytes read so far lie inside the pixel column (needs count_bytes=True)."""
        if self._counter is None:
            raise InvalidParamsError("Open the store with count_bytes=True to count the bytes read")
        return sum(max(0, min(a + n, p + m) - max(a, p))
                   for a, n in self._counter.ranges for p, m in self.pixel_column_ranges())

    def _check(self, meta: pa.Table) -> dict[TileKey, tuple[int, int]]:
        cols = {c: meta.column(c).to_pylist() for c in METADATA_COLUMNS}
        index: dict[TileKey, tuple[int, int]] = {}
        self.grids: dict[tuple[str, int], Grid] = {}
        self.shapes: dict[TileKey, tuple[int, ...]] = {}
        self.dtypes: dict[TileKey, np.dtype] = {}
        profiles: dict[tuple[str, int], tuple] = {}
        row_group_of = np.repeat(np.arange(self._file.num_row_groups),
                                 [self._file.metadata.row_group(i).num_rows
                                  for i in range(self._file.num_row_groups)])
        starts = np.concatenate(([0], np.cumsum([self._file.metadata.row_group(i).num_rows
                                                 for i in range(self._file.num_row_groups)])))
        for row in range(meta.num_rows):
            key = TileKey(cols["image_id"][row], cols["z"][row], cols["x"][row], cols["y"][row])
            if key in index:
                raise TileError(key, f"appears twice in {self.path} (rows {self._row_of(index[key], starts)} and "
                                     f"{row}): duplicate tile coordinates; rewrite the store with one tile each")
            grid = Grid(cols["image_height"][row], cols["image_width"][row],
                        cols["tile_height"][row], cols["tile_width"][row])
            known = self.grids.setdefault(key.image, grid)
            if known != grid:
                raise TileError(key, f"says its image is {grid.describe()} but other tiles of it say "
                                     f"{known.describe()}; rewrite the store with one grid per image")
            channels = cols["channels"][row]
            shape = (cols["height"][row], cols["width"][row]) + ((channels,) if channels else ())
            dtype = np.dtype(cols["dtype"][row])
            # check_tile reads shape and dtype only: a zero-stride stand-in costs no memory.
            check_tile(key, np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * len(shape)), grid)
            prof = profiles.setdefault(key.image, (dtype, shape[2:], key))
            if (dtype, shape[2:]) != prof[:2]:
                raise TileError(key, f"has dtype {dtype} and {shape[2:] or 'no'} channels but {prof[2]} has "
                                     f"{prof[0]} and {prof[1] or 'no'}; all tiles of one image need one dtype "
                                     "and channel count: rewrite the store")
            rg = int(row_group_of[row])
            index[key] = (rg, row - int(starts[rg]))
            self.shapes[key] = shape
            self.dtypes[key] = dtype
        return index

    @staticmethod
    def _row_of(pos, starts):
        return int(starts[pos[0]]) + pos[1]

    def keys(self) -> list[TileKey]:
        return sorted(self._index)

    def exists(self, key: TileKey) -> bool:
        return key in self._index

    def read(self, key: TileKey) -> np.ndarray:
        return next(self.read_many([key]))[1]

    def read_many(self, keys: Iterable[TileKey]) -> Iterator[tuple[TileKey, np.ndarray]]:
        """Yields (key, tile) for each key, one row group's pixel column at a time.

        Every key is decoded once; the order is the store's, not the given one.
        """
        wanted: dict[int, list[tuple[int, TileKey]]] = {}
        for k in dict.fromkeys(keys):
            try:
                rg, row = self._index[k]
            except KeyError:
                raise TileError(k, f"is not in the store {self.path}") from None
            wanted.setdefault(rg, []).append((row, k))
        for rg in sorted(wanted):
            pixels = self._file.read_row_group(rg, columns=[PIXELS]).column(0)
            for row, k in sorted(wanted[rg]):
                value = pixels[row]
                if not value.is_valid:
                    raise TileError(k, "has no pixels (null); rewrite the tile")
                tile = decode_tile(value.as_buffer(), k)
                if tile.shape != self.shapes[k] or tile.dtype != self.dtypes[k]:
                    raise TileError(k, f"pixels are {tile.shape} of {tile.dtype} but its metadata says "
                                       f"{self.shapes[k]} of {self.dtypes[k]}; rewrite the tile")
                yield k, tile

    def to_batches(self, columns: Iterable[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The store's rows as Arrow batches (the input of the tiles stages)."""
        yield from self._file.iter_batches(columns=list(columns) if columns else None)


# --- Output, grouped by image ----------------------------------------------------------------------

OUTPUT_SCHEMA = pa.schema([("image_id", pa.string()), ("z", pa.int32()), ("x", pa.int64()), ("y", pa.int64()),
                           ("height", pa.int64()), ("width", pa.int64()), ("codec", pa.string()),
                           ("data", pa.binary())])


def write_output(path: str, tiles: Iterable[tuple[TileKey, np.ndarray]], codec: str = DEFAULT_CODEC,
                 batch_rows: int = 256) -> int:
    """Writes output tiles compressed, grouped by image: ``path/image_id=<id>/part-0.parquet``.

    Takes any iterable of (key, tile), e.g. ``tiles.iter_reconstruct(...)``, and holds only
    ``batch_rows`` tiles at a time. Returns the number of tiles written.
    """
    count = 0
    failure: list[Exception] = []

    def batches():
        nonlocal count
        rows = []
        try:
            for key, tile in tiles:
                tile = np.asarray(tile)
                rows.append({"image_id": key.image_id, "z": key.z, "x": key.x, "y": key.y,
                             "height": tile.shape[0], "width": tile.shape[1], "codec": codec,
                             "data": compress_tile(tile, codec)})
                count += 1
                if len(rows) >= batch_rows:
                    yield pa.RecordBatch.from_pylist(rows, schema=OUTPUT_SCHEMA)
                    rows = []
        except Exception as e:
            # write_dataset pulls this generator from its own threads: an exception raised into
            # them can leave a C++ thread joinable at interpreter exit ("terminate called without
            # an active exception", an abort after the error was reported). End the stream instead
            # and raise the error here once the writer has finished.
            failure.append(e)
            return
        if rows:
            yield pa.RecordBatch.from_pylist(rows, schema=OUTPUT_SCHEMA)

    ds.write_dataset(batches(), path, schema=OUTPUT_SCHEMA, format="parquet",
                     partitioning=ds.partitioning(pa.schema([("image_id", pa.string())]), flavor="hive"),
                     basename_template="part-{i}.parquet", existing_data_behavior="overwrite_or_ignore")
    if failure:
        raise failure[0]
    return count


def _output_dataset(path: str) -> ds.Dataset:
    return ds.dataset(path, format="parquet",
                      partitioning=ds.partitioning(pa.schema([("image_id", pa.string())]), flavor="hive"))


def output_metadata(path: str) -> pa.Table:
    """image_id, z, x, y, height, width of every tile written by :func:`write_output` (no tile bytes read)."""
    return _output_dataset(path).to_table(columns=["image_id", "z", "x", "y", "height", "width"])


def iter_output(path: str, image_id: str | None = None, z: int | None = None) -> Iterator[tuple[TileKey, np.ndarray]]:
    """The tiles written by :func:`write_output` (of one image and level, or all), decompressed one
    Parquet batch at a time."""
    filt = None
    for name, value in (("image_id", image_id), ("z", z)):
        if value is not None:
            cond = ds.field(name) == value
            filt = cond if filt is None else filt & cond
    for batch in _output_dataset(path).to_batches(filter=filt):
        cols = {c: batch.column(c).to_pylist() for c in ("image_id", "z", "x", "y")}
        data = batch.column("data")
        for i in range(batch.num_rows):
            key = TileKey(cols["image_id"][i], cols["z"][i], cols["x"][i], cols["y"][i])
            yield key, decompress_tile(data[i].as_py(), key)


def read_output(path: str, image_id: str | None = None) -> dict[TileKey, np.ndarray]:
    """The tiles written by :func:`write_output` (of one image, or all), decompressed."""
    return dict(iter_output(path, image_id))
