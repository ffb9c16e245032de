"""Tiled image reconstruction: each output tile from the neighbourhood of input tiles it needs.

Images far larger than memory are stored as tiles; an output tile is computed from the input
tiles around it. Every source tile is read exactly once (the read plan fans each source out
to all the targets that need it), then one of two strategies runs:

- **scatter / combine** (operators that add up: linear filters, the seed's threshold-and-sum):
  each source tile emits its partial contribution to each target, and a target is the sum of
  its partials;
- **gather** (any operator, e.g. a median filter): a target's halo region is stitched from the
  pieces of its neighbours, then the operator runs on the region and the centre is kept.

Conventions
-----------
- A tile is a 2-D array ``(rows, cols)`` or ``(rows, cols, channels)`` of any numeric dtype.
  ``y`` is the pixel offset of its first row, ``x`` of its first column, as image files lay out
  pixels (the seed's tiles are square, so its ``(TILE_W, TILE_H)`` shape reads the same way).
- An image of ``height x width`` pixels cut into ``tile_height x tile_width`` tiles has tiles at
  every ``y`` in ``range(0, height, tile_height)`` and ``x`` in ``range(0, width, tile_width)``;
  the last row and column are smaller when the image is not a multiple of the tile size.
- Pixels outside the image, and the pixels of missing tiles, count as zeros (the zero boundary
  of ``scipy.signal.convolve2d`` and of ``scipy.ndimage`` filters with ``mode='constant'``).
  A target whose whole neighbourhood is missing is all zeros.
- A *halo* ``(top, bottom, left, right)`` says that output pixel ``(p, q)`` reads the input rows
  ``p - top .. p + bottom`` and the columns ``q - left .. q + right``.

Everything here is plain numpy/scipy; the Arrow stages at the end only convert columns.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import math
import struct
import zipfile
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import numpy as np
import pyarrow as pa

from ferry.errors import InputError, InvalidParamsError
from ferry.registry import Param, require_columns, stage

# --- Tile model --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, order=True)
class TileKey:
    """Where a tile sits: image id, level z and the pixel offsets x (column) and y (row)."""

    image_id: str
    z: int
    x: int
    y: int

    def __post_init__(self):
        # numpy integers would make keys unequal to plain ints in dicts, and their repr changes
        # the synthetic seed (numpy 2 prints np.int64(3)); keys are always plain str and int.
        object.__setattr__(self, "image_id", str(self.image_id))
        for name in ("z", "x", "y"):
            object.__setattr__(self, name, int(getattr(self, name)))

    def __str__(self) -> str:
        return f"tile (image {self.image_id!r}, z={self.z}, x={self.x}, y={self.y})"

    @property
    def image(self) -> tuple[str, int]:
        """The (image_id, z) this tile belongs to: one grid per image and level."""
        return (self.image_id, self.z)

    def moved(self, x: int, y: int) -> "TileKey":
        return TileKey(self.image_id, self.z, x, y)


class TileError(InputError):
    """A tile's bytes, shape or dtype do not fit its image; ``key`` names the tile."""

    def __init__(self, key: TileKey | None, message: str):
        self.key = key
        super().__init__(f"{key if key is not None else 'tile'}: {message}")


class Halo(NamedTuple):
    """Pixels an output tile reads beyond its own edges: above, below, left, right."""

    top: int
    bottom: int
    left: int
    right: int

    def radius(self, tile_shape: tuple[int, int]) -> int:
        """The fewest rings of neighbour tiles that cover this halo."""
        th, tw = tile_shape
        return max(_ceil_div(self.top, th), _ceil_div(self.bottom, th),
                   _ceil_div(self.left, tw), _ceil_div(self.right, tw), 0)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Grid:
    """The tiling of one image (one id and level): its size in pixels and its tile size."""

    height: int
    width: int
    tile_height: int
    tile_width: int

    def __post_init__(self):
        for name in ("height", "width", "tile_height", "tile_width"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise InvalidParamsError(f"Grid {name} must be a positive integer, got {v!r}")
            object.__setattr__(self, name, int(v))

    @property
    def tile_shape(self) -> tuple[int, int]:
        return (self.tile_height, self.tile_width)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    def offsets(self) -> list[tuple[int, int]]:
        """Every tile's (x, y), x varying slowest (the order TileKey sorts in)."""
        return [(x, y) for x in range(0, self.width, self.tile_width)
                for y in range(0, self.height, self.tile_height)]

    def keys(self, image_id: str, z: int = 0) -> list[TileKey]:
        return [TileKey(image_id, z, x, y) for x, y in self.offsets()]

    def on_grid(self, x: int, y: int) -> bool:
        return (0 <= x < self.width and 0 <= y < self.height
                and x % self.tile_width == 0 and y % self.tile_height == 0)

    def shape_at(self, x: int, y: int) -> tuple[int, int]:
        """The (rows, cols) of the tile at (x, y): smaller in the last row and column."""
        return (min(self.tile_height, self.height - y), min(self.tile_width, self.width - x))

    def check_key(self, key: TileKey) -> None:
        if not self.on_grid(key.x, key.y):
            raise TileError(
                key,
                f"is not on the grid of its image ({self.describe()}): x must be a multiple of "
                f"{self.tile_width} below {self.width} and y a multiple of {self.tile_height} below "
                f"{self.height}; cut the image with this tile size, or give the image's real size"
            )

    def neighbourhood(self, x: int, y: int, radius: int) -> list[tuple[int, int]]:
        """The (x, y) of the tiles within ``radius`` tiles of (x, y), inside the image only.

        The seed's check was ``ix >= 0`` alone, so it also listed tiles at x or y equal to the
        image size and beyond (32 source tiles for two 3x3-tile images instead of 18).
        """
        th, tw = self.tile_height, self.tile_width
        return [(x + dx * tw, y + dy * th)
                for dx in range(-radius, radius + 1) if 0 <= x + dx * tw < self.width
                for dy in range(-radius, radius + 1) if 0 <= y + dy * th < self.height]

    def describe(self) -> str:
        return f"{self.height}x{self.width} pixels in {self.tile_height}x{self.tile_width} tiles"


Grids = Mapping[tuple[str, int], Grid]


def grid_for(grids: Grids, key: TileKey) -> Grid:
    try:
        return grids[key.image]
    except KeyError:
        known = ", ".join(f"({i!r}, z={z})" for i, z in sorted(grids)) or "(none)"
        raise TileError(key, f"belongs to no known image; the images are {known}") from None


def infer_grid(shapes: Mapping[TileKey, tuple[int, ...]], tile_shape: tuple[int, int] | None = None) -> Grid:
    """The grid of one image from the tiles present: their extent, and the largest tile size.

    Missing tiles in the last row or column shrink the image; give the size when it is known.
    """
    if not shapes:
        raise InputError("Cannot infer the grid of an image from no tiles; give its size")
    th = tile_shape[0] if tile_shape else max(s[0] for s in shapes.values())
    tw = tile_shape[1] if tile_shape else max(s[1] for s in shapes.values())
    height = max(k.y + s[0] for k, s in shapes.items())
    width = max(k.x + s[1] for k, s in shapes.items())
    return Grid(height, width, th, tw)


def check_tile(key: TileKey, tile: np.ndarray, grid: Grid, profile: dict | None = None) -> np.ndarray:
    """Raises TileError unless tile is numeric, 2-D or 3-D, of the shape its grid cell has,
    and (when ``profile`` holds the image's dtype and channels so far) like its image's other
    tiles; records the first tile's dtype and channels in ``profile``."""
    grid.check_key(key)
    tile = np.asarray(tile)
    if tile.dtype.kind not in "biufc":
        raise TileError(key, f"has dtype {tile.dtype}; tiles must be numeric (bool, integer, float or complex)")
    if tile.ndim not in (2, 3):
        raise TileError(key, f"has shape {tile.shape}; a tile is (rows, cols) or (rows, cols, channels)")
    want = grid.shape_at(key.x, key.y)
    if tile.shape[:2] != want:
        raise TileError(
            key,
            f"has {tile.shape[0]}x{tile.shape[1]} pixels but its cell of the grid ({grid.describe()}) is "
            f"{want[0]}x{want[1]}; only the last row and column may be smaller. Recut the image with one "
            "tile size, or give the image's real size"
        )
    if profile is not None:
        channels = tile.shape[2] if tile.ndim == 3 else None
        if "dtype" not in profile:
            profile.update(dtype=tile.dtype, channels=channels, first=key)
        elif tile.dtype != profile["dtype"] or channels != profile["channels"]:
            def what(d, c):
                return f"dtype {d}" + (f" with {c} channels" if c is not None else ", 2-D")
            raise TileError(
                key,
                f"has {what(tile.dtype, channels)} but {profile['first']} of the same image has "
                f"{what(profile['dtype'], profile['channels'])}; all tiles of one image need one dtype "
                "and channel count: cast them when writing the store"
            )
    return tile


# --- .npy bytes ---------------------------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY"


def encode_tile(tile: np.ndarray) -> bytes:
    """The .npy bytes of a tile (self-describing, loadable without pickle from any language)."""
    tile = np.asarray(tile)
    if tile.dtype.hasobject:
        raise InputError(f"Cannot encode a tile of dtype {tile.dtype}: tiles must be numeric arrays")
    out = io.BytesIO()
    np.save(out, tile, allow_pickle=False)
    return out.getvalue()


_HEADERS: dict[tuple, tuple[bytes, bool]] = {}
#: Above this many bytes in one column, encode_tiles leaves the column to pyarrow (binary's int32 offsets).
_MAX_BINARY_COLUMN = (1 << 31) - 1


def _npy_header(tile: np.ndarray) -> tuple[bytes, bool]:
    """np.save's header for this tile, and whether np.save writes its data in Fortran order."""
    d = np.lib.format.header_data_from_array_1_0(tile)
    key = (d["descr"], d["shape"], d["fortran_order"])
    got = _HEADERS.get(key)
    if got is None:
        # What np.save does: version 1.0 unless the header does not fit it.
        out = io.BytesIO()
        try:
            np.lib.format.write_array_header_1_0(out, d)
        except ValueError:
            out = io.BytesIO()
            np.lib.format.write_array_header_2_0(out, d)
        got = (out.getvalue(), bool(d["fortran_order"]))
        if len(_HEADERS) < 1024:
            _HEADERS[key] = got
    return got


def encode_tiles(tiles: Iterable[np.ndarray | None]) -> pa.Array:
    """The .npy bytes of each tile (as :func:`encode_tile`'s) as one Arrow binary array; None
    gives an empty value.

    Each tile's pixels are copied once, straight into the array's buffer (np.save into a
    BytesIO, then building a binary array from the bytes, copies them three times).
    """
    tiles = [None if t is None else np.asarray(t) for t in tiles]

    def slow():
        return pa.array([b"" if t is None else encode_tile(t) for t in tiles], pa.binary())

    heads = []
    for t in tiles:
        if t is None:
            heads.append((b"", False))
            continue
        if t.dtype.hasobject or t.dtype.fields is not None or t.dtype.itemsize == 0:
            return slow()
        heads.append(_npy_header(t))
    sizes = [len(h) + (0 if t is None else t.nbytes) for (h, _), t in zip(heads, tiles)]
    total = sum(sizes)
    if total > _MAX_BINARY_COLUMN:
        return slow()
    offsets = np.zeros(len(tiles) + 1, np.int32)
    np.cumsum(sizes, out=offsets[1:])
    data = np.empty(total, np.uint8)
    for (head, fortran), t, start in zip(heads, tiles, offsets[:-1].tolist()):
        if t is None:
            continue
        data[start:start + len(head)] = np.frombuffer(head, np.uint8)
        body = data[start + len(head):start + len(head) + t.nbytes].view(t.dtype)
        if fortran:
            np.copyto(body.reshape(t.T.shape), t.T)
        else:
            np.copyto(body.reshape(t.shape), t)
    return pa.Array.from_buffers(pa.binary(), len(tiles), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def decode_tile(data, key: TileKey | None = None) -> np.ndarray:
    """A read-only numpy view of .npy bytes (bytes, memoryview or pyarrow.Buffer), no copy.

    Raises TileError naming ``key`` for bytes that are not a complete .npy array of numbers.
    """
    try:
        buf = memoryview(data).cast("B")
    except TypeError:
        raise TileError(key, f"pixels must be .npy bytes, got {type(data).__name__}") from None

    def bad(why):
        return TileError(key, f"pixels are not valid .npy bytes ({why}); write them with "
                              "numpy.save(file, tile, allow_pickle=False)")

    if len(buf) < 10 or bytes(buf[:6]) != _NPY_MAGIC:
        raise bad(f"they start with {bytes(buf[:8])!r}, not the .npy magic {_NPY_MAGIC!r}")
    major = buf[6]
    if major == 1:
        header_end = 10 + struct.unpack("<H", buf[8:10])[0]
    elif major in (2, 3) and len(buf) >= 12:
        header_end = 12 + struct.unpack("<I", buf[8:12])[0]
    else:
        raise bad(f"unknown .npy format version {major}.{buf[7]}")
    if header_end > len(buf):
        raise bad(f"the header needs {header_end} bytes but there are {len(buf)}")
    try:
        head = io.BytesIO(bytes(buf[:header_end]))
        version = np.lib.format.read_magic(head)
        read_header = np.lib.format.read_array_header_1_0 if version[0] == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(head)
    except (ValueError, SyntaxError, TypeError) as e:
        raise bad(f"unreadable header: {e}") from None
    if dtype.hasobject:
        raise TileError(key, f"pixels hold Python objects (dtype {dtype}); tiles must be numeric arrays "
                             "and are never unpickled")
    count = math.prod(shape)
    body = buf[header_end:]
    if len(body) != count * dtype.itemsize:
        raise bad(f"the header says {shape} of {dtype} = {count * dtype.itemsize} bytes, "
                  f"but {len(body)} follow it (truncated or padded)")
    arr = np.frombuffer(body, dtype=dtype, count=count)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


# --- A deterministic synthetic source -------------------------------------------------------------


def tile_seed(key: TileKey) -> int:
    """A 64-bit seed from a stable hash of the key.

    The seed's ``hash(tile_id) % 4294967295`` changes with PYTHONHASHSEED, so every process
    (every Spark executor) drew a different image.
    """
    text = f"{key.image_id}\x1f{key.z}\x1f{key.x}\x1f{key.y}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def synthetic_tile(key: TileKey, shape: tuple[int, ...], dtype=np.int16, low: float = -127.0,
                   high: float = 127.0) -> np.ndarray:
    """The seed's ``pull_input_tile``: uniform(low, high) cast to dtype, the same in every process."""
    rng = np.random.default_rng(tile_seed(key))
    return rng.uniform(low, high, size=shape).astype(dtype)


class MemorySource:
    """Tiles held in memory: ``{TileKey: array}`` plus the grid of every image.

    Tiles absent from the mapping are missing (zeros as neighbours). Without ``grids``, each
    image's grid is inferred from its tiles (see :func:`infer_grid`).
    """

    def __init__(self, tiles: Mapping[TileKey, np.ndarray], grids: Grids | None = None,
                 tile_shape: tuple[int, int] | None = None):
        self.tiles = dict(tiles)
        if grids is None:
            by_image: dict[tuple[str, int], dict] = {}
            for k, t in self.tiles.items():
                by_image.setdefault(k.image, {})[k] = np.shape(t)
            grids = {img: infer_grid(shapes, tile_shape) for img, shapes in by_image.items()}
        self.grids = dict(grids)

    @classmethod
    def from_images(cls, images: Mapping, tile_shape: tuple[int, int], *, z: int = 0,
                    drop: Iterable[TileKey] = ()) -> "MemorySource":
        """Cuts whole images ``{image_id or (image_id, z): array}`` into tiles; ``drop`` leaves some out."""
        tiles, grids = {}, {}
        for name, image in images.items():
            image_id, level = name if isinstance(name, tuple) else (name, z)
            image = np.asarray(image)
            grid = Grid(image.shape[0], image.shape[1], *tile_shape)
            grids[(str(image_id), int(level))] = grid
            tiles.update(cut_tiles(image, grid, image_id, level))
        for k in drop:
            tiles.pop(k, None)
        return cls(tiles, grids)

    def exists(self, key: TileKey) -> bool:
        return key in self.tiles

    def read(self, key: TileKey) -> np.ndarray:
        return self.tiles[key]

    def read_many(self, keys: Iterable[TileKey]) -> Iterator[tuple[TileKey, np.ndarray]]:
        for k in keys:
            yield k, self.tiles[k]


class SyntheticSource:
    """Every tile of the given grids, drawn by :func:`synthetic_tile` (no tile is missing)."""

    def __init__(self, grids: Grids, channels: int | None = 4, dtype=np.int16, low: float = -127.0,
                 high: float = 127.0):
        self.grids = dict(grids)
        self.channels, self.dtype, self.low, self.high = channels, np.dtype(dtype), low, high

    def exists(self, key: TileKey) -> bool:
        grid = self.grids.get(key.image)
        return grid is not None and grid.on_grid(key.x, key.y)

    def read(self, key: TileKey) -> np.ndarray:
        grid = grid_for(self.grids, key)
        grid.check_key(key)
        shape = grid.shape_at(key.x, key.y) + ((self.channels,) if self.channels else ())
        return synthetic_tile(key, shape, self.dtype, self.low, self.high)

    def read_many(self, keys: Iterable[TileKey]) -> Iterator[tuple[TileKey, np.ndarray]]:
        for k in keys:
            yield k, self.read(k)


def cut_tiles(image: np.ndarray, grid: Grid, image_id: str, z: int = 0) -> dict[TileKey, np.ndarray]:
    """The tiles of a whole image (views, not copies)."""
    image = np.asarray(image)
    if image.shape[:2] != grid.shape:
        raise InputError(f"Image {image_id!r} has shape {image.shape} but its grid is {grid.describe()}")
    return {TileKey(image_id, z, x, y): image[y:y + h, x:x + w]
            for x, y in grid.offsets() for h, w in [grid.shape_at(x, y)]}


# --- The planner --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReadPlan:
    """Which source tiles to read, once each, and where each one goes.

    ``fanout[source]`` lists the targets a source contributes to; ``needs[target]`` the
    existing sources a target waits for. ``reads`` is the number of source tiles read.
    """

    targets: tuple[TileKey, ...]
    fanout: Mapping[TileKey, tuple[TileKey, ...]]
    needs: Mapping[TileKey, tuple[TileKey, ...]]
    radius: Mapping[tuple[str, int], int]

    @property
    def reads(self) -> int:
        return len(self.fanout)


def neighbourhood(target: TileKey, grid: Grid, radius: int) -> list[TileKey]:
    """The tiles within ``radius`` tiles of target, inside its image (target included)."""
    grid.check_key(target)
    return [target.moved(x, y) for x, y in grid.neighbourhood(target.x, target.y, radius)]


def plan_reads(targets: Iterable[TileKey], grids: Grids, radius: int | Mapping[tuple[str, int], int],
               exists: Callable[[TileKey], bool] | None = None) -> ReadPlan:
    """The read plan for ``targets``: each needed source that exists, once, fanned out to its targets."""
    targets = tuple(sorted(set(targets)))
    radii: dict[tuple[str, int], int] = {}
    needs: dict[TileKey, tuple[TileKey, ...]] = {}
    fanout: dict[TileKey, list[TileKey]] = {}
    for t in targets:
        grid = grid_for(grids, t)
        r = radius if isinstance(radius, int) else radius[t.image]
        if isinstance(r, bool) or r < 0:
            raise InvalidParamsError(f"radius must be an integer >= 0 (tiles around a target), got {r!r}")
        radii[t.image] = r
        sources = [s for s in neighbourhood(t, grid, r) if exists is None or exists(s)]
        needs[t] = tuple(sources)
        for s in sources:
            fanout.setdefault(s, []).append(t)
    return ReadPlan(targets, {s: tuple(fanout[s]) for s in sorted(fanout)}, needs, radii)


# --- Strategies as pure functions ---------------------------------------------------------------


def _sum_dtype(dtype) -> np.dtype:
    # np.sum's accumulator: small integers and bool add up in the platform integer (the seed's
    # np.sum(stack(int16 tiles)) is int64), floats stay as they are.
    return np.sum(np.zeros(1, dtype=dtype)).dtype


def _place(dst: np.ndarray, dst_y: int, dst_x: int, src: np.ndarray, src_y: int, src_x: int) -> bool:
    """Copies the overlap of src (its [0, 0] at src_y, src_x) into dst (at dst_y, dst_x)."""
    y0, x0 = max(dst_y, src_y), max(dst_x, src_x)
    y1 = min(dst_y + dst.shape[0], src_y + src.shape[0])
    x1 = min(dst_x + dst.shape[1], src_x + src.shape[1])
    if y0 >= y1 or x0 >= x1:
        return False
    dst[y0 - dst_y:y1 - dst_y, x0 - dst_x:x1 - dst_x] = src[y0 - src_y:y1 - src_y, x0 - src_x:x1 - src_x]
    return True


def _window(origin_y: int, origin_x: int, arr: np.ndarray, target: TileKey, shape: tuple[int, int],
            dtype) -> np.ndarray | None:
    """arr (its [0, 0] at origin) cropped and zero-padded to the target's window, or None if apart."""
    out = np.zeros(tuple(shape) + arr.shape[2:], dtype=dtype)
    return out if _place(out, target.y, target.x, arr, origin_y, origin_x) else None


def partials(op: "Operator", source_key: TileKey, source_tile: np.ndarray, targets: Iterable[TileKey],
             grid: Grid) -> dict[TileKey, np.ndarray]:
    """Scatter: the contribution of one source tile to each target, shaped as the target.

    Targets the source does not reach are left out; the source is transformed once, whatever
    the number of targets. Partials may share memory with each other: treat them as read-only.
    """
    if not op.linear:
        raise InvalidParamsError(
            f"Operator {op.name!r} is not linear, so its partials cannot be summed; use strategy 'gather'"
        )
    return op.partials(source_key, np.asarray(source_tile), list(targets), grid)


def combine(parts: Iterable[np.ndarray], dtype=None) -> np.ndarray:
    """Combine: the sum of a target's partials (np.sum's dtype, then cast to ``dtype`` if given)."""
    acc = None
    for p in parts:
        if acc is None:
            acc = np.array(p, dtype=_sum_dtype(p.dtype), copy=True)
        else:
            acc += p
    if acc is None:
        raise InputError("combine() needs at least one partial")
    return acc if dtype is None else acc.astype(dtype, copy=False)


def _sum_fits(dtypes: Iterable[np.dtype], want: np.dtype) -> bool:
    """Whether every sum of one value of each dtype fits ``want``: then adding in ``want`` is exact."""
    dtypes = [np.dtype(d) for d in dtypes]
    if want.kind not in "iu" or any(d.kind not in "iu" for d in dtypes):
        return False
    info = np.iinfo(want)
    return (info.min <= sum(int(np.iinfo(d).min) for d in dtypes)
            and sum(int(np.iinfo(d).max) for d in dtypes) <= info.max)


def combine_as(parts: list[np.ndarray], dtype: np.dtype, output_dtype: str = "operator") -> np.ndarray:
    """combine(parts, dtype), or, when no sum of the parts' dtypes can leave the integer
    ``output_dtype`` (e.g. int32 for int16 partials), the same sums added in ``output_dtype``
    directly: what cast_output would make of combine's int64 tile, without the int64 tile and
    without a range check."""
    want = None if output_dtype == "operator" else np.dtype(output_dtype)
    if (want is not None and parts and np.dtype(dtype) == _sum_dtype(parts[0].dtype)
            and _sum_fits([p.dtype for p in parts], want)):
        acc = np.array(parts[0], dtype=want, copy=True)
        for p in parts[1:]:
            acc += p
        return acc
    return combine(parts, dtype)


def region_origin(target: TileKey, halo: Halo) -> tuple[int, int]:
    """The (y, x) in the image of a target's halo region's first pixel."""
    return target.y - halo.top, target.x - halo.left


def region_shape(shape: tuple[int, int], halo: Halo) -> tuple[int, int]:
    return shape[0] + halo.top + halo.bottom, shape[1] + halo.left + halo.right


def stitch(target: TileKey, shape: tuple[int, int], neighbours: Mapping[TileKey, np.ndarray], halo: Halo,
           *, dtype=None, channels: int | None = None) -> np.ndarray:
    """Gather: the target's halo region, filled from its neighbours, zeros where none is.

    ``neighbours`` maps keys to arrays whose [0, 0] pixel sits at (key.y, key.x): whole tiles,
    or pieces of them. ``dtype`` and ``channels`` are needed only when there are no neighbours.
    """
    first = next(iter(neighbours.values()), None)
    if first is not None:
        dtype, extra = first.dtype, first.shape[2:]
    elif dtype is None:
        raise InputError(f"{target}: stitching a region with no neighbours needs its dtype")
    else:
        extra = (channels,) if channels else ()
    oy, ox = region_origin(target, halo)
    region = np.zeros(region_shape(shape, halo) + tuple(extra), dtype=dtype)
    for k, arr in neighbours.items():
        _place(region, oy, ox, arr, k.y, k.x)
    return region


def apply(fn: Callable[[np.ndarray], np.ndarray], region: np.ndarray, halo: Halo,
          shape: tuple[int, int]) -> np.ndarray:
    """Runs fn on a halo region and keeps the target's pixels.

    fn may return an array shaped as the region (its centre is kept) or already shaped as the
    target.
    """
    out = np.asarray(fn(region))
    if out.shape[:2] == region.shape[:2]:
        return out[halo.top:halo.top + shape[0], halo.left:halo.left + shape[1]]
    if out.shape[:2] == tuple(shape):
        return out
    raise InputError(
        f"The operator returned shape {out.shape} for a region of shape {region.shape}; it must return "
        f"the region's shape or the target's {tuple(shape)}"
    )


# --- Operators ----------------------------------------------------------------------------------


class Operator:
    """What turns a neighbourhood into an output tile.

    ``linear`` operators add up (the output is the sum of every source's contribution) and run
    by scatter/combine by default; every operator runs by gather. Subclasses give ``halo`` and
    either ``expand`` (the whole output of one zero-embedded source tile) or ``partials``, and
    ``region`` for gather.
    """

    name = "operator"
    linear = False

    def halo(self, tile_shape: tuple[int, int], radius: int) -> Halo:
        return Halo(0, 0, 0, 0)

    def min_radius(self, tile_shape: tuple[int, int]) -> int:
        return self.halo(tile_shape, 0).radius(tile_shape)

    def default_radius(self, tile_shape: tuple[int, int]) -> int:
        return self.min_radius(tile_shape)

    def check(self, grid: Grid, image: tuple[str, int] | None) -> None:
        """Raises InvalidParamsError when this operator cannot run on this grid (of this image)."""

    def out_dtype(self, dtype) -> np.dtype:
        return np.dtype(dtype)

    def expand(self, tile: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def partials(self, source: TileKey, tile: np.ndarray, targets: list[TileKey], grid: Grid) -> dict:
        # The whole output of the zero-embedded source starts `bottom` rows above and `right`
        # columns left of it: output p reads inputs p - top .. p + bottom.
        halo = self.halo(grid.tile_shape, 0)
        full = self.expand(tile)
        oy, ox = source.y - halo.bottom, source.x - halo.right
        out = {}
        for t in targets:
            w = _window(oy, ox, full, t, grid.shape_at(t.x, t.y), full.dtype)
            if w is not None:
                out[t] = w
        return out

    def region(self, region: np.ndarray, shape: tuple[int, int], grid: Grid, radius: int) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<operator {self.name}{' (linear)' if self.linear else ''}>"


def _per_channel(fn, arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        return fn(arr)
    return np.stack([fn(arr[..., c]) for c in range(arr.shape[2])], axis=-1)


class ThresholdSum(Operator):
    """The seed's reconstruction: a target is the sum over its neighbourhood of each source tile
    with the values above ``threshold`` set to 0, aligned tile-to-tile at the top-left corner.

    Ragged tiles (last row or column) are cropped or zero-padded to the target's shape. The
    result has np.sum's dtype (int64 for int16 tiles, as the seed's).
    """

    name = "threshold_sum"
    linear = True

    def __init__(self, threshold: float = 20):
        self.threshold = threshold

    def _keep(self, tile):
        # Same as the seed's `out[out > threshold] = 0` on a copy.
        return np.where(tile > self.threshold, np.zeros((), tile.dtype), tile)

    def halo(self, tile_shape, radius):
        th, tw = tile_shape
        return Halo(radius * th, radius * th, radius * tw, radius * tw)

    def min_radius(self, tile_shape):
        return 0

    def default_radius(self, tile_shape):
        return 1  # the seed's n_size

    def out_dtype(self, dtype):
        return _sum_dtype(dtype)

    def partials(self, source, tile, targets, grid):
        kept = self._keep(tile)
        out = {}
        for t in targets:
            shape = grid.shape_at(t.x, t.y)
            if shape == kept.shape[:2]:
                out[t] = kept  # shared by every target of the same shape: partials are never written
                continue
            p = np.zeros(shape + kept.shape[2:], dtype=kept.dtype)
            _place(p, 0, 0, kept, 0, 0)
            out[t] = p
        return out

    def region(self, region, shape, grid, radius):
        kept = self._keep(region)
        th, tw = grid.tile_shape
        acc = np.zeros(tuple(shape) + region.shape[2:], dtype=_sum_dtype(region.dtype))
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                y0, x0 = (radius + dy) * th, (radius + dx) * tw
                acc += kept[y0:y0 + shape[0], x0:x0 + shape[1]]
        return acc


#: Above this many kernel elements a float convolution runs by FFT (scipy.signal.fftconvolve).
DIRECT_MAX_KERNEL = 64


class Convolve2D(Operator):
    """``scipy.signal.convolve2d(image, kernel, mode='same')`` with a zero boundary, per channel.

    'same' keeps the full convolution from row (kh - 1) // 2 and column (kw - 1) // 2, also for
    even kernels and kernels larger than the image (measured against scipy 1.17). The result
    has dtype ``result_type(tile, kernel)`` as scipy's: integer results wrap as scipy's do.
    """

    name = "convolve2d"
    linear = True

    def __init__(self, kernel):
        k = np.asarray(kernel)
        if k.ndim != 2 or k.size == 0 or k.dtype.kind not in "biufc":
            raise InvalidParamsError(
                f"Operator 'convolve2d' needs a non-empty 2-D numeric kernel, got shape {k.shape} of {k.dtype}"
            )
        self.kernel = k

    def halo(self, tile_shape, radius):
        kh, kw = self.kernel.shape
        oy, ox = (kh - 1) // 2, (kw - 1) // 2
        return Halo(kh - 1 - oy, oy, kw - 1 - ox, ox)

    def check(self, grid, image):
        kh, kw = self.kernel.shape
        if kh > grid.tile_height or kw > grid.tile_width:
            where = ("" if image is None else
                     f" of image {image[0]!r} z={image[1]} (first tile {TileKey(image[0], image[1], 0, 0)})")
            raise InvalidParamsError(
                f"Kernel {kh}x{kw} is larger than the {grid.tile_height}x{grid.tile_width} tiles{where}; use "
                f"tiles at least as large as the kernel, or a kernel of at most {grid.tile_height}x{grid.tile_width}"
            )

    def out_dtype(self, dtype):
        return np.result_type(dtype, self.kernel.dtype)

    def _conv(self, x: np.ndarray, mode: str) -> np.ndarray:
        # Imported here: scipy.signal takes ~0.6 s to import, paid by every Spark Python worker
        # and ferry worker that imports this module, while only FFT and integer kernels use it.
        import scipy.signal
        dtype = self.out_dtype(x.dtype)
        x = x.astype(dtype, copy=False)
        k = self.kernel.astype(dtype, copy=False)
        if dtype.kind in "fc" and k.size > DIRECT_MAX_KERNEL and np.isfinite(x).all():
            # FFT would spread a NaN or inf over the whole tile; scipy's direct method keeps it local.
            kk = k if x.ndim == 2 else k[:, :, None]
            return scipy.signal.fftconvolve(x, kk, mode=mode, axes=(0, 1)).astype(dtype, copy=False)
        if dtype.kind == "b":
            raise InvalidParamsError("convolve2d of a boolean tile with a boolean kernel is not defined "
                                     "(scipy refuses it too); cast the tiles or the kernel to a number")
        if dtype.kind == "f":
            # ndimage's direct loop is several times faster than signal.convolve2d's for the
            # same sums (and keeps a NaN or inf as local).
            return _ndimage_convolve(x, k, mode)
        return _per_channel(lambda a: scipy.signal.convolve2d(a, k, mode=mode), x)

    def expand(self, tile):
        return self._conv(tile, "full")

    def region(self, region, shape, grid, radius):
        return self._conv(region, "valid")


def _ndimage_convolve(a: np.ndarray, k: np.ndarray, mode: str) -> np.ndarray:
    """``scipy.signal.convolve2d(a, k, mode)`` of each channel of a float ``a``, for mode 'full'
    or 'valid', by scipy.ndimage.

    ndimage centres the kernel at (kh // 2, kw // 2) and reads zeros beyond the edges; its
    output at (i, j) is the full convolution's at (i + kh // 2, j + kw // 2). A kernel with a
    trailing axis of length 1 convolves every channel in one call (a quarter faster than one
    call per strided channel, for the same sums).
    """
    import scipy.ndimage  # here, not at the top: see Convolve2D._conv
    kh, kw = k.shape
    if mode == "full":
        a = np.pad(a, ((kh - 1, kh - 1), (kw - 1, kw - 1)) + ((0, 0),) * (a.ndim - 2))
    h, w = a.shape[:2]
    if h < kh or w < kw:
        return np.zeros((max(h - kh + 1, 0), max(w - kw + 1, 0)) + a.shape[2:], a.dtype)
    out = scipy.ndimage.convolve(a, k if a.ndim == 2 else k[:, :, None], mode="constant", cval=0.0)
    return out[kh - 1 - kh // 2:h - kh // 2, kw - 1 - kw // 2:w - kw // 2]


class Median(Operator):
    """``scipy.ndimage.median_filter(image, size, mode='constant')`` on each channel."""

    name = "median"
    linear = False

    def __init__(self, size=3):
        size = (size, size) if np.ndim(size) == 0 else tuple(size)
        if len(size) != 2 or any(isinstance(s, bool) or int(s) != s or s < 1 for s in size):
            raise InvalidParamsError(f"Operator 'median' needs size = a positive int or (rows, cols), got {size!r}")
        self.size = (int(size[0]), int(size[1]))

    def halo(self, tile_shape, radius):
        # scipy centres an even window after the pixel: it reads s // 2 before, s - 1 - s // 2 after.
        sy, sx = self.size
        return Halo(sy // 2, sy - 1 - sy // 2, sx // 2, sx - 1 - sx // 2)

    def region(self, region, shape, grid, radius):
        import scipy.ndimage  # here, not at the top: see Convolve2D._conv
        size = self.size + ((1,) if region.ndim == 3 else ())
        return scipy.ndimage.median_filter(region, size=size, mode="constant", cval=0)


class UserOperator(Operator):
    """A Python function registered with :func:`register_operator`.

    ``fn(region, **params)`` gets a region (2-D, or 2-D x channels) and returns an array of the
    region's shape, or of the target's. A ``linear`` fn must also be shift-invariant with a zero
    boundary (like ``mode='constant'`` filters), so that a tile embedded in zeros gives its
    exact contribution: it then runs by scatter/combine.
    """

    def __init__(self, name, fn, linear, halo, params):
        self.name, self.fn, self.linear, self.params = name, fn, linear, dict(params)
        spec = halo(**self.params) if callable(halo) else halo
        self._halo = _halo_of(spec, name)

    def halo(self, tile_shape, radius):
        return self._halo

    def _call(self, region):
        out = np.asarray(self.fn(region, **self.params))
        return out

    def expand(self, tile):
        h = self._halo
        pad = ((h.bottom, h.top), (h.right, h.left)) + ((0, 0),) * (tile.ndim - 2)
        padded = np.pad(tile, pad)
        out = self._call(padded)
        if out.shape[:2] != padded.shape[:2]:
            raise InputError(f"Linear operator {self.name!r} returned shape {out.shape} for an input of shape "
                             f"{padded.shape}; a linear operator must return its input's shape")
        return out

    def region(self, region, shape, grid, radius):
        return self._call(region)


def _halo_of(spec, name) -> Halo:
    vals = (spec,) * 4 if np.ndim(spec) == 0 else tuple(spec)
    if len(vals) == 2:
        vals = (vals[0], vals[0], vals[1], vals[1])
    if len(vals) != 4 or any(isinstance(v, bool) or int(v) != v or v < 0 for v in vals):
        raise InvalidParamsError(
            f"Operator {name!r}: halo must be an int >= 0, (rows, cols) or (top, bottom, left, right), got {spec!r}"
        )
    return Halo(*(int(v) for v in vals))


_OPERATORS: dict[str, Callable[..., Operator]] = {
    "threshold_sum": ThresholdSum,
    "convolve2d": Convolve2D,
    "median": Median,
}


def register_operator(name: str, fn: Callable[..., np.ndarray], linear: bool = False, halo=0, *,
                      replace: bool = False) -> None:
    """Makes ``fn`` usable as an operator by name (see :class:`UserOperator`).

    ``halo`` is an int, (rows, cols), (top, bottom, left, right), or a function of the
    operator's params returning one of those.
    """
    if not callable(fn):
        raise InvalidParamsError(f"register_operator({name!r}, fn): fn must be callable, got {type(fn).__name__}")
    if name in _OPERATORS and not replace:
        raise InvalidParamsError(f"An operator named {name!r} is already registered; pass replace=True to override it")
    if not callable(halo):
        _halo_of(halo, name)
    _OPERATORS[name] = lambda **params: UserOperator(name, fn, bool(linear), halo, params)


def operators() -> list[str]:
    return sorted(_OPERATORS)


def get_operator(name: str | Operator, **params) -> Operator:
    """The operator ``name`` made with ``params`` (an Operator passes through unchanged)."""
    if isinstance(name, Operator):
        if params:
            raise InvalidParamsError(f"Operator {name.name!r} is already built; give its params when building it")
        return name
    try:
        factory = _OPERATORS[name]
    except KeyError:
        raise InvalidParamsError(
            f"No operator named {name!r}; the operators are {', '.join(operators())}. "
            "Add one with ferry.stages.tiles.register_operator"
        ) from None
    if factory in (ThresholdSum, Convolve2D, Median):
        try:
            inspect.signature(factory).bind(**params)
        except TypeError as e:
            raise InvalidParamsError(f"Operator {name!r}: {e}; its params are "
                                     f"{list(inspect.signature(factory).parameters)}") from None
    return factory(**params)


# --- A job: plan, read once, compute --------------------------------------------------------------


@dataclasses.dataclass
class JobResult:
    tiles: dict[TileKey, np.ndarray]
    reads: int
    plan: ReadPlan


STRATEGIES = ("auto", "scatter", "gather")
#: Values of the output_dtype param: the operator's own dtype, or a numpy dtype the output is cast to.
OUTPUT_DTYPES = ("operator", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float32", "float64")


def _check_output_dtype(output_dtype: str) -> None:
    if output_dtype not in OUTPUT_DTYPES:
        raise InvalidParamsError(f"output_dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {output_dtype!r}")


def cast_output(key: TileKey, out: np.ndarray, output_dtype: str = "operator") -> np.ndarray:
    """An output tile in ``output_dtype``: unchanged for "operator"; integer results go to an
    integer dtype only if every value fits (else a TileError naming the tile and the values' range:
    the cast is exact or fails), float results to float32 (rounded to nearest) or float64."""
    if output_dtype == "operator":
        return out
    _check_output_dtype(output_dtype)     # before np.dtype, which fails on unknown names with a bare TypeError
    want = np.dtype(output_dtype)
    if out.dtype == want:
        return out
    if out.dtype.kind in "biu":
        if want.kind not in "iu":
            raise TileError(key, f"has integer output ({out.dtype}) but output_dtype is {want}; choose an "
                                 "integer output_dtype, or 'operator'")
        if out.size:
            lo, hi, info = int(out.min()), int(out.max()), np.iinfo(want)
            if lo < info.min or hi > info.max:
                raise TileError(key, f"has output values {lo}..{hi}, outside output_dtype {want} "
                                     f"({info.min}..{info.max}); choose a wider output_dtype, or 'operator'")
        return out.astype(want)
    if out.dtype.kind == "f":
        if want.kind != "f":
            raise TileError(key, f"has float output ({out.dtype}) but output_dtype is {want}; choose float32, "
                                 "float64 or 'operator'")
        return out.astype(want)
    raise TileError(key, f"has {out.dtype} output; output_dtype applies to integer and float outputs only: "
                         "use 'operator'")


#: Strategy "auto" runs a linear operator by scatter only when a target's halo region is more than
#: this many times the target's area. Scatter makes (2r+1)^2 target-sized partials per source
#: (and ships them, in the operator's dtype: float64 for convolve2d); gather stitches one region
#: per target and ships about the input. With a thin halo (convolve2d's 5x5 kernel on 2000x2000
#: tiles: a region 1.004 times the tile) gather is the cheaper one: in-process on the seed's
#: image 4.1 s against scatter's 6.4-7.8 s. threshold_sum reads whole neighbour tiles (a region
#: 9 times the tile) and keeps scatter.
SCATTER_MIN_REGION = 2.0


def _check_strategy(op: Operator, strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise InvalidParamsError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "scatter" and not op.linear:
        raise InvalidParamsError(
            f"Operator {op.name!r} is not linear, so its partials cannot be summed; use strategy 'gather'"
        )


def _strategy(op: Operator, strategy: str, tile_shape: tuple[int, int], radius: int) -> str:
    """The strategy an image with this tile size runs: 'auto' resolved (see SCATTER_MIN_REGION).

    Depends only on the operator, the tile size and the radius, so tiles_emit and tiles_reduce
    agree on it for every image without talking to each other.
    """
    _check_strategy(op, strategy)
    if strategy != "auto":
        return strategy
    if not op.linear:
        return "gather"
    th, tw = tile_shape
    halo = op.halo(tile_shape, radius)
    region = (th + halo.top + halo.bottom) * (tw + halo.left + halo.right)
    return "scatter" if region > SCATTER_MIN_REGION * th * tw else "gather"


def _reduce_plan(op: Operator, params: dict, tile_shape: tuple[int, int],
                 image: tuple[str, int]) -> tuple[Grid, int, str]:
    """What a reduce knows of a target's image, its tile size, gives the rest: a grid of one
    tile (only the tile size matters to a region), the radius and the strategy, as the emit
    resolved them from the whole grid."""
    grid = Grid(*tile_shape, *tile_shape)
    r = _radius(op, grid, image, None if params["radius"] < 0 else params["radius"])
    return grid, r, _strategy(op, params["strategy"], grid.tile_shape, r)


def _radius(op: Operator, grid: Grid, image: tuple[str, int] | None, radius: int | None) -> int:
    need = op.min_radius(grid.tile_shape)
    if radius is None:
        return max(op.default_radius(grid.tile_shape), need)
    if isinstance(radius, bool) or int(radius) != radius or radius < 0:
        raise InvalidParamsError(f"radius must be an integer >= 0 (tiles around a target), got {radius!r}")
    if radius < need:
        raise InvalidParamsError(
            f"Operator {op.name!r} reads {op.halo(grid.tile_shape, 0)} pixels around each output, which needs "
            f"radius >= {need} with the {grid.tile_height}x{grid.tile_width} tiles"
            f"{'' if image is None else f' of image {image[0]!r} z={image[1]}'}; got radius {radius}"
        )
    return int(radius)


def iter_reconstruct(source, operator: str | Operator = "threshold_sum", targets: Iterable[TileKey] | None = None,
                     *, strategy: str = "auto", radius: int | None = None, stats: dict | None = None,
                     output_dtype: str = "operator", **params) -> Iterator[tuple[TileKey, np.ndarray]]:
    """Yields (target, output tile) as each target's last source has been read.

    ``source`` has ``grids`` ({(image_id, z): Grid}), ``exists(key)`` and
    ``read_many(keys) -> iterator of (key, array)``: a :class:`MemorySource`,
    :class:`SyntheticSource` or ``ferry.tiles_store.TileStore``. Targets default to every tile
    of every image. Each source tile is read exactly once; ``stats['reads']`` counts the reads,
    ``stats['plan']`` holds the plan and ``stats['strategies']`` the strategy each image ran
    (``strategy="auto"``: see :data:`SCATTER_MIN_REGION`). Memory holds only the targets still
    waiting.
    ``output_dtype`` casts each output tile (see :func:`cast_output`); "operator" keeps the
    operator's own dtype (int64 for threshold_sum on int16 tiles, as the seed's np.sum).
    """
    _check_output_dtype(output_dtype)
    op = get_operator(operator, **params)
    grids = source.grids
    if targets is None:
        targets = [k for img in sorted(grids) for k in grids[img].keys(*img)]
    targets = list(targets)
    _check_strategy(op, strategy)
    radii, hows = {}, {}
    for t in targets:
        if t.image not in radii:
            grid = grid_for(grids, t)
            op.check(grid, t.image)
            radii[t.image] = _radius(op, grid, t.image, radius)
            hows[t.image] = _strategy(op, strategy, grid.tile_shape, radii[t.image])
    plan = plan_reads(targets, grids, radii, source.exists)
    stats = {} if stats is None else stats
    stats.update(reads=0, plan=plan, strategies=hows)

    waiting = {t: len(s) for t, s in plan.needs.items()}
    held: dict[TileKey, Any] = {}
    profiles: dict[tuple[str, int], dict] = {}
    out_dtypes: dict[tuple[str, int], np.dtype] = {}

    def finish(t):
        grid = grids[t.image]
        shape = grid.shape_at(t.x, t.y)
        got = held.pop(t, None)
        prof = profiles.get(t.image)
        if not prof:
            raise TileError(t, "no tile of its image exists in the source, so its dtype and channels are "
                               "unknown; write at least one tile of the image")
        if hows[t.image] == "scatter":
            if got is None:
                dtype = out_dtypes.get(t.image, op.out_dtype(prof["dtype"]))
                return cast_output(t, np.zeros(shape + ((prof["channels"],) if prof["channels"] else ()), dtype),
                                   output_dtype)
            acc, partial_dtype = got
            out = acc.astype(op.out_dtype(partial_dtype), copy=False)
        else:
            halo = op.halo(grid.tile_shape, plan.radius[t.image])
            region = stitch(t, shape, got or {}, halo, dtype=prof["dtype"], channels=prof["channels"])
            out = apply(lambda r: op.region(r, shape, grid, plan.radius[t.image]), region, halo, shape)
        out_dtypes.setdefault(t.image, out.dtype)
        return cast_output(t, out, output_dtype)

    seen = set()
    for s, tile in source.read_many(list(plan.fanout)):
        if s in seen:
            raise TileError(s, "was read twice: the source holds duplicate tiles at these coordinates; "
                               "keep one tile per (image_id, z, x, y)")
        if s not in plan.fanout:
            raise TileError(s, "was returned by the source but not asked for; read_many must return the "
                               "keys it is given")
        seen.add(s)
        stats["reads"] += 1
        grid = grids[s.image]
        tile = check_tile(s, tile, grid, profiles.setdefault(s.image, {}))
        fan = plan.fanout[s]
        if hows[s.image] == "scatter":
            for t, p in op.partials(s, tile, list(fan), grid).items():
                if t in held:
                    held[t][0][...] += p
                else:
                    held[t] = (np.array(p, dtype=_sum_dtype(p.dtype), copy=True), p.dtype)
        else:
            for t in fan:
                halo = op.halo(grid.tile_shape, plan.radius[t.image])
                piece = _piece(s, tile, t, grid.shape_at(t.x, t.y), halo)
                if piece is not None:
                    held.setdefault(t, {})[piece[0]] = piece[1]
        for t in fan:
            waiting[t] -= 1
            if waiting[t] == 0:
                yield t, finish(t)
    missing = sorted(set(plan.fanout) - seen)
    if missing:
        raise TileError(missing[0], f"was planned but the source returned no tile for it ({len(missing)} missing)")
    for t in plan.targets:
        if not plan.needs[t]:
            yield t, finish(t)


def _piece(source: TileKey, tile: np.ndarray, target: TileKey, shape: tuple[int, int],
           halo: Halo) -> tuple[TileKey, np.ndarray] | None:
    """The part of a source tile inside a target's halo region, keyed by where it starts.

    Gather keeps and ships only this: the rest of the source is never read for that target.
    """
    oy, ox = region_origin(target, halo)
    rh, rw = region_shape(shape, halo)
    y0, x0 = max(oy, source.y), max(ox, source.x)
    y1, x1 = min(oy + rh, source.y + tile.shape[0]), min(ox + rw, source.x + tile.shape[1])
    if y0 >= y1 or x0 >= x1:
        return None
    return source.moved(x0, y0), tile[y0 - source.y:y1 - source.y, x0 - source.x:x1 - source.x]


def reconstruct(source, operator: str | Operator = "threshold_sum", targets: Iterable[TileKey] | None = None,
                *, strategy: str = "auto", radius: int | None = None, output_dtype: str = "operator",
                **params) -> JobResult:
    """Runs a whole job in this process and returns every output tile and the number of reads.

    Examples
    --------
    >>> import numpy as np
    >>> from ferry.stages.tiles import MemorySource, reconstruct, assemble
    >>> image = np.arange(30.0).reshape(5, 6)
    >>> job = reconstruct(MemorySource.from_images({"a": image}, (2, 4)), "convolve2d", kernel=np.ones((2, 2)))
    >>> job.reads
    6
    >>> import scipy.signal
    >>> bool(np.allclose(assemble(job.tiles), scipy.signal.convolve2d(image, np.ones((2, 2)), mode="same")))
    True
    """
    stats: dict = {}
    tiles = dict(iter_reconstruct(source, operator, targets, strategy=strategy, radius=radius, stats=stats,
                                  output_dtype=output_dtype, **params))
    return JobResult(tiles, stats["reads"], stats["plan"])


# --- Output -------------------------------------------------------------------------------------

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZIP_MAGIC = b"PK\x03\x04"
CODECS = ("zstd", "npz")


def _zstd():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


#: zstd when the zstandard package is installed (faster, smaller), else npz (numpy alone).
DEFAULT_CODEC = "zstd" if _zstd() is not None else "npz"


def compress_tile(tile: np.ndarray, codec: str = DEFAULT_CODEC, level: int = 3) -> bytes:
    """A tile as compressed bytes: a zstd frame of its .npy bytes, or an .npz archive.

    :func:`decompress_tile` tells the two apart by their magic bytes and loads either exactly.
    """
    if codec == "zstd":
        zstd = _zstd()
        if zstd is None:
            raise InvalidParamsError("codec 'zstd' needs the zstandard package: pip install zstandard, "
                                     "or use codec 'npz'")
        return zstd.ZstdCompressor(level=level).compress(encode_tile(tile))
    if codec == "npz":
        out = io.BytesIO()
        np.savez_compressed(out, tile=np.asarray(tile))
        return out.getvalue()
    raise InvalidParamsError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")


def decompress_tile(data, key: TileKey | None = None) -> np.ndarray:
    data = bytes(data)
    if data[:4] == _ZSTD_MAGIC:
        zstd = _zstd()
        if zstd is None:
            raise TileError(key, "is zstd-compressed; install the zstandard package to read it")
        try:
            raw = zstd.ZstdDecompressor().decompress(data)
        except zstd.ZstdError as e:
            raise TileError(key, f"compressed bytes are corrupt: {e}") from None
        return decode_tile(raw, key)
    if data[:4] == _ZIP_MAGIC:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                return npz["tile"]
        except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise TileError(key, f"compressed bytes are not a readable .npz with a 'tile' array: {e}") from None
    raise TileError(key, f"compressed bytes start with {data[:4]!r}, neither a zstd frame nor an .npz archive")


#: assemble() refuses images above this many pixels: it is for small images and checks.
ASSEMBLE_MAX_PIXELS = 1 << 28


def assemble(tiles: Mapping[TileKey, np.ndarray], shape: tuple[int, int] | None = None,
             max_pixels: int = ASSEMBLE_MAX_PIXELS) -> np.ndarray:
    """The whole image from its tiles (all of one image and level); missing tiles are zeros."""
    if not tiles:
        raise InputError("assemble() needs at least one tile")
    images = sorted({k.image for k in tiles})
    if len(images) > 1:
        raise InputError(f"assemble() takes the tiles of one image and level, got {len(images)}: {images[:5]}; "
                         "select one image's tiles first")
    first_key, first = next(iter(tiles.items()))
    first = np.asarray(first)
    if shape is None:
        shape = (max(k.y + np.shape(t)[0] for k, t in tiles.items()),
                 max(k.x + np.shape(t)[1] for k, t in tiles.items()))
    if shape[0] * shape[1] > max_pixels:
        raise InputError(f"Image {images[0]} would have {shape[0]}x{shape[1]} pixels, above max_pixels={max_pixels}; "
                         "assemble() is for small images: write the tiles out instead, or raise max_pixels")
    out = np.zeros(tuple(shape) + first.shape[2:], dtype=first.dtype)
    for k, t in tiles.items():
        t = np.asarray(t)
        if t.dtype != first.dtype or t.shape[2:] != first.shape[2:]:
            raise TileError(k, f"has dtype {t.dtype} and shape {t.shape}, unlike {first_key} "
                               f"({first.dtype}, {first.shape}); an image needs one dtype and channel count")
        out[k.y:k.y + t.shape[0], k.x:k.x + t.shape[1]] = t
    return out


# --- The stage contract -------------------------------------------------------------------------
# Three thin Arrow adapters over the functions above:
#   tiles_emit (map):      source tiles -> one row per (target, source): a partial (scatter) or the
#                          piece of the source inside the target's halo region (gather);
#   tiles_reduce (group):  the rows of each target -> the target (combine, or stitch + apply);
#   tiles (group):         all the source tiles of a group (e.g. one image) -> every output tile.
# emit -> shuffle by target -> reduce is the way for images larger than one worker's memory.

TILE_SCHEMA = pa.schema([("image_id", pa.string()), ("z", pa.int32()), ("x", pa.int64()), ("y", pa.int64()),
                         ("pixels", pa.binary())])
EMIT_SCHEMA = pa.schema([("image_id", pa.string()), ("z", pa.int32()), ("x", pa.int64()), ("y", pa.int64()),
                         ("height", pa.int64()), ("width", pa.int64()),
                         ("source_x", pa.int64()), ("source_y", pa.int64()), ("pixels", pa.binary()),
                         # The target's image's tile size: the reduce needs no tile-size params.
                         ("tile_height", pa.int64()), ("tile_width", pa.int64())])
_BINARY = (pa.binary(), pa.large_binary())
_INT = (pa.int32(), pa.int64())


def _positive_or_unset(v):
    return None if v == -1 or v >= 1 else "must be >= 1, or -1 for unset"


_PARAMS = [
    Param("operator", "string", "Operator name: threshold_sum, convolve2d, median, or a registered one."),
    Param("operator_params", "json", "The operator's params, e.g. {\"kernel\": [[1, 2], [3, 4]]} or {\"size\": 3}.",
          default={}),
    Param("strategy", "string", "scatter (sum of partials; linear operators), gather (halo regions), or auto "
          "(default: gather, or scatter for a linear operator whose halo region is over twice the tile, as "
          "threshold_sum's).",
          default="auto", choices=STRATEGIES),
    Param("radius", "int", "Neighbourhood radius in tiles; -1 = the operator's default.", default=-1,
          check=lambda v: None if v >= -1 else "must be >= 0, or -1 for the operator's default"),
    Param("tile_height", "int", "Tile rows (the grid's step in y); -1 = from the input.", default=-1,
          check=_positive_or_unset),
    Param("tile_width", "int", "Tile columns (the grid's step in x); -1 = from the input.", default=-1,
          check=_positive_or_unset),
    Param("image_height", "int", "Image rows, unless an image_height column gives it per row; -1 = unset.",
          default=-1, check=_positive_or_unset),
    Param("image_width", "int", "Image columns, unless an image_width column gives it per row; -1 = unset.",
          default=-1, check=_positive_or_unset),
    Param("combine_mb", "int", "scatter: MB of sums tiles_emit may hold to send one row per target per stream "
          "for integer partials, instead of one per (source, target); 0 = one per pair.", default=512,
          check=lambda v: None if v >= 0 else "must be >= 0"),
    Param("output_dtype", "string", "Output tiles' dtype: 'operator' (the operator's own, e.g. int64 for "
          "threshold_sum on int16 tiles), an integer dtype for integer results (every value must fit, else "
          "an error naming the tile), or float32 (rounded) / float64 for float results.", default="operator",
          choices=OUTPUT_DTYPES),
]

_GEOMETRY_COLUMNS = ("image_height", "image_width", "tile_height", "tile_width")


def _operator_from(params: dict) -> Operator:
    op_params = params["operator_params"]
    if not isinstance(op_params, dict):
        raise InvalidParamsError(f"Stage tiles: operator_params must be a JSON object, got {op_params!r}")
    op_params = dict(op_params)
    if "kernel" in op_params:
        op_params["kernel"] = np.asarray(op_params["kernel"], dtype=np.float64)
    op = get_operator(params["operator"], **op_params)
    _check_strategy(op, params["strategy"])
    return op


def _require_tile_columns(name: str, schema: pa.Schema, extra: Mapping = ()) -> None:
    wanted = {"image_id": (pa.string(), pa.large_string()), "z": _INT, "x": _INT, "y": _INT, "pixels": _BINARY}
    wanted.update(extra)
    require_columns(name, schema, wanted)
    for c in _GEOMETRY_COLUMNS:
        require_columns(name, schema, {c: _INT}, optional=(c,))


def _rows(batch: pa.RecordBatch, columns: Iterable[str]) -> Iterator[dict]:
    """One dict per row with the key columns as Python values and pixels as a pa.Buffer."""
    cols = {c: batch.column(batch.schema.get_field_index(c)) for c in columns if c in batch.schema.names}
    for c, col in cols.items():
        if col.null_count:
            first = int(np.flatnonzero(~np.asarray(col.is_valid()))[0])
            raise InputError(f"Column {c!r} has {col.null_count} null value(s), the first at row {first} "
                             "of the batch; every tile needs its image_id, z, x, y and pixels")
    py = {c: col.to_pylist() for c, col in cols.items() if c != "pixels"}
    pix = binary_cells(cols["pixels"]) if "pixels" in cols else None
    for i in range(batch.num_rows):
        row = {c: v[i] for c, v in py.items()}
        if pix is not None:
            row["pixels"] = pix[i]
        yield row


def binary_cells(col: pa.Array) -> list[pa.Buffer]:
    """The values of a binary column as zero-copy slices of its data buffer.

    ``col[i].as_buffer()`` copies the value (a multi-MB tile each time); nulls give empty slices.
    """
    if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
        return [col[i].as_buffer() for i in range(len(col))]
    _, offsets, data = col.buffers()
    width = np.int64 if pa.types.is_large_binary(col.type) else np.int32
    off = np.frombuffer(offsets, width, len(col) + 1, col.offset * np.dtype(width).itemsize).tolist()
    if data is None:
        return [pa.py_buffer(b"") for _ in range(len(col))]
    return [data.slice(off[i], off[i + 1] - off[i]) for i in range(len(col))]


def _grid_of_row(row: dict, params: dict, need_size: bool) -> Grid | tuple[int, int]:
    def get(name):
        v = row.get(name)
        return params[name] if v is None else v
    th, tw = get("tile_height"), get("tile_width")
    if th < 1 or tw < 1:
        raise InvalidParamsError("Stage tiles needs the tile size: set tile_height and tile_width, "
                                 "or send tile_height and tile_width columns")
    if not need_size:
        return (th, tw)
    h, w = get("image_height"), get("image_width")
    if h < 1 or w < 1:
        raise InvalidParamsError("Stage tiles_emit needs each image's size to know its edges: set image_height "
                                 "and image_width, or send image_height and image_width columns (the tile "
                                 "store has them)")
    return Grid(h, w, th, tw)


def _check_params(params: dict) -> None:
    """Fails on the driver, before data moves, for what the params alone show is wrong."""
    op = _operator_from(params)
    th, tw = params["tile_height"], params["tile_width"]
    if th > 0 and tw > 0:
        # A placeholder grid: only the tile size matters to the kernel and radius checks.
        grid = Grid(th, tw, th, tw)
        op.check(grid, None)
        _radius(op, grid, None, None if params["radius"] < 0 else params["radius"])


def _emit_schema(schema: pa.Schema, params: dict) -> pa.Schema:
    _require_tile_columns("tiles_emit", schema)
    _check_params(params)
    return EMIT_SCHEMA


def _reduce_schema(schema: pa.Schema, params: dict) -> pa.Schema:
    _require_tile_columns("tiles_reduce", schema,
                          {"height": _INT, "width": _INT, "source_x": _INT, "source_y": _INT})
    _check_params(params)
    return TILE_SCHEMA


def _tiles_schema(schema: pa.Schema, params: dict) -> pa.Schema:
    _require_tile_columns("tiles", schema)
    _check_params(params)
    return TILE_SCHEMA


# pa.array imports pandas on its first call (~0.5 s), paid by every fresh Spark Python worker
# that runs a tiles stage; these two build the key columns from buffers instead.
_NUMPY_INT = {pa.int32(): np.int32, pa.int64(): np.int64}


def int_column(values: Iterable[int], type_: pa.DataType = pa.int64()) -> pa.Array:
    """Python ints as an Arrow int32 or int64 array, without nulls."""
    arr = np.asarray(list(values), dtype=_NUMPY_INT[type_])
    return pa.Array.from_buffers(type_, len(arr), [None, pa.py_buffer(arr)])


def string_column(values: Iterable[str]) -> pa.Array:
    """Python strings as an Arrow string array, without nulls."""
    encoded = [v.encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, np.int32)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return pa.Array.from_buffers(pa.string(), len(encoded), [None, pa.py_buffer(offsets),
                                                              pa.py_buffer(b"".join(encoded))])


def _tile_batch(tiles: Iterable[tuple[TileKey, np.ndarray]]) -> pa.RecordBatch:
    keys, pixels = [], []
    for k, t in tiles:
        keys.append(k)
        pixels.append(t)
    return pa.RecordBatch.from_arrays(
        [string_column(k.image_id for k in keys), int_column((k.z for k in keys), pa.int32()),
         int_column(k.x for k in keys), int_column(k.y for k in keys), encode_tiles(pixels)], schema=TILE_SCHEMA)


class _Combiner:
    """Sums, within one tiles_emit stream, the integer partials bound for the same target.

    A source's partial goes to each of its (2r+1)^2 targets; shipping each one moves that many
    copies of the image through the shuffle. The sums of the partials a stream has for a target
    travel instead as one row, labelled with one of its sources; each other source it holds gets a
    row with empty pixels, so tiles_reduce still sees every (source, target) pair once (and
    catches duplicate tiles). Only integer partials are combined: integer sums do not depend on
    their order, so the reduce's result is bit for bit the same; float sums would.

    A sum is kept in the narrowest integer dtype its bounds (the sums of its partials' minima and
    maxima) fit, widened when an added partial's bounds would leave it: threshold_sum's int16
    partials add up in int16, at half the memory and bandwidth of an int32 accumulator. It is sent
    in the narrowest dtype that holds its values and that the reduce treats as the partials' own
    (same sum dtype, same output dtype). Past the widest such dtype a sum wraps, as np.sum does.

    Sums are held up to ``budget`` bytes; past it, the least recently updated one is sent first.
    """

    def __init__(self, op: Operator, budget: int):
        self.op, self.budget = op, budget
        # target -> [sum, partial dtype, (h, w), sources, low bound, high bound]; oldest first
        self.held: dict[TileKey, list] = {}
        self.bytes = 0
        self._plans: dict[np.dtype, list | None] = {}
        self._last: tuple | None = None  # (partial, low, high): a source's targets often share one array

    def _plan(self, dtype: np.dtype) -> list | None:
        """The dtypes a sum of these partials may be kept and sent in, narrowest first (the last
        is np.sum's), or None: not combinable."""
        if dtype not in self._plans:
            plan = None
            if dtype.kind in "biu":
                total = _sum_dtype(dtype)
                signed = [np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64)]
                unsigned = [np.dtype(t) for t in (np.uint8, np.uint16, np.uint32, np.uint64)]
                ok = [d for d in (unsigned if total.kind == "u" else signed)
                      if _sum_dtype(d) == total and self.op.out_dtype(d) == self.op.out_dtype(dtype)]
                if ok and ok[-1] == total:
                    plan = ok
            self._plans[dtype] = plan
        return self._plans[dtype]

    def _bounds(self, partial: np.ndarray) -> tuple[int, int]:
        if self._last is None or self._last[0] is not partial:
            lo, hi = (int(partial.min()), int(partial.max())) if partial.size else (0, 0)
            self._last = (partial, lo, hi)
        return self._last[1], self._last[2]

    @staticmethod
    def _fitting(plan: list, lo: int, hi: int) -> np.dtype:
        return next((d for d in plan if np.iinfo(d).min <= lo and hi <= np.iinfo(d).max), plan[-1])

    def add(self, target: TileKey, shape: tuple[int, int], source: TileKey, partial: np.ndarray) -> list | None:
        """Takes the partial (and returns the rows it pushed out), or returns None: send it as is."""
        plan = self._plan(partial.dtype)
        if plan is None:
            return None
        lo, hi = self._bounds(partial)
        out = []
        entry = self.held.get(target)
        if entry is not None and entry[1] != partial.dtype:
            out += self._send(target)
            entry = None
        if entry is None:
            dtype = self._fitting(plan, lo, hi)
            if partial.dtype in plan and partial.dtype.itemsize > dtype.itemsize:
                dtype = partial.dtype  # more partials will come: no narrower copy to widen again
            need = partial.size * dtype.itemsize
            if need > self.budget:
                return None
            while self.held and self.bytes + need > self.budget:
                out += self._send(next(iter(self.held)))
            self.held[target] = [np.array(partial, dtype=dtype), partial.dtype, shape, [source], lo, hi]
            self.bytes += need
            return out
        entry[4] += lo
        entry[5] += hi
        acc = entry[0]
        wider = self._fitting(plan, entry[4], entry[5])
        if wider.itemsize > acc.itemsize:
            self.bytes -= acc.nbytes
            entry[0] = acc = acc.astype(wider)
            self.bytes += acc.nbytes
            while self.bytes > self.budget and len(self.held) > 1:
                out += self._send(next(t for t in self.held if t != target))
        np.add(acc, partial, out=acc, casting="unsafe")  # exact below the widest dtype, wrapping past it
        entry[3].append(source)
        self.held[target] = self.held.pop(target)  # most recently updated last
        return out

    def _send(self, target: TileKey) -> list:
        acc, dtype, shape, sources, lo, hi = self.held.pop(target)
        self.bytes -= acc.nbytes
        plan = self._plans[dtype]
        narrow = self._fitting(plan, lo, hi)
        if narrow.itemsize > dtype.itemsize and acc.size:
            # The bounds allow wider values than the partials': the values themselves may not need it.
            narrow = self._fitting(plan, int(acc.min()), int(acc.max()))
        rows = [(target, shape, sources[0], acc.astype(narrow, copy=False))]
        return rows + [(target, shape, s, None) for s in sources[1:]]

    def drain(self) -> Iterator[list]:
        """The rows of every held sum, one target's at a time, oldest first; each sum's memory
        goes as its rows do."""
        self._last = None
        while self.held:
            yield self._send(next(iter(self.held)))


def _emit_batch(rows: list, tile_shapes: Mapping[tuple[str, int], tuple[int, int]]) -> pa.RecordBatch:
    """tiles_emit's rows (target, (h, w), source, pixels or None) as a batch; ``tile_shapes``:
    each image's tile size."""
    tile = [tile_shapes[t.image] for t, _, _, _ in rows]
    return pa.RecordBatch.from_arrays(
        [string_column(t.image_id for t, _, _, _ in rows), int_column((t.z for t, _, _, _ in rows), pa.int32()),
         int_column(t.x for t, _, _, _ in rows), int_column(t.y for t, _, _, _ in rows),
         int_column(hw[0] for _, hw, _, _ in rows), int_column(hw[1] for _, hw, _, _ in rows),
         int_column(s.x for _, _, s, _ in rows), int_column(s.y for _, _, s, _ in rows),
         encode_tiles(p for _, _, _, p in rows), int_column(th for th, _ in tile), int_column(tw for _, tw in tile)],
        schema=EMIT_SCHEMA)


def _tile_size_mismatch(key: TileKey, got: tuple[int, int], want: tuple[int, int]) -> TileError:
    return TileError(key, f"has tile size {got[0]}x{got[1]} but other tiles of image {key.image_id!r} (z={key.z}) "
                          f"have {want[0]}x{want[1]}; one image has one tile size: fix the tile_height and "
                          "tile_width columns, or run one TileReconstruct per tile size")


@stage("tiles_emit", kind="map", params=_PARAMS, output_schema=_emit_schema,
       input_doc="image_id string, z int32, x int64, y int64, pixels binary (.npy); optional int64 columns "
                 "image_height, image_width, tile_height, tile_width",
       doc="""Reads each source tile once and emits one row per target it reaches: its partial
       (scatter) or its piece inside the target's halo region (gather). Integer partials of
       one stream bound for the same target are summed and sent as one row (see combine_mb);
       the other sources of the sum get rows with empty pixels. Group the output by
       (image_id, z, x, y) and run tiles_reduce with the same params.""")
class EmitStage:
    def __init__(self, **params):
        self.params = params
        self.op = _operator_from(params)
        self.profiles: dict = {}
        self.tile_shapes: dict[tuple[str, int], tuple[int, int]] = {}
        self.combiner = _Combiner(self.op, params["combine_mb"] << 20) if params["combine_mb"] > 0 else None

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        out = []
        for row in _rows(batch, [f.name for f in TILE_SCHEMA] + list(_GEOMETRY_COLUMNS)):
            key = TileKey(row["image_id"], row["z"], row["x"], row["y"])
            grid = _grid_of_row(row, self.params, need_size=True)
            known = self.tile_shapes.setdefault(key.image, grid.tile_shape)
            if known != grid.tile_shape:
                raise _tile_size_mismatch(key, grid.tile_shape, known)
            self.op.check(grid, key.image)
            r = _radius(self.op, grid, key.image, None if self.params["radius"] < 0 else self.params["radius"])
            tile = check_tile(key, decode_tile(row["pixels"], key), grid, self.profiles.setdefault(key.image, {}))
            targets = neighbourhood(key, grid, r)
            scatter = _strategy(self.op, self.params["strategy"], grid.tile_shape, r) == "scatter"
            if scatter:
                emitted = self.op.partials(key, tile, targets, grid)
            else:
                halo = self.op.halo(grid.tile_shape, r)
                emitted = {}
                for t in targets:
                    piece = _piece(key, tile, t, grid.shape_at(t.x, t.y), halo)
                    if piece is not None:
                        emitted[t] = piece[1]
            for t, arr in emitted.items():
                shape = grid.shape_at(t.x, t.y)
                pushed = self.combiner.add(t, shape, key, arr) if scatter and self.combiner else None
                if pushed is None:
                    out.append((t, shape, key, arr))
                else:
                    out += pushed
        return _emit_batch(out, self.tile_shapes)

    def finish(self):
        # A batch per target: each sum travels (and leaves this worker's memory) while the next
        # is narrowed, rather than all of them in one batch at the end.
        return None if self.combiner is None else (_emit_batch(rows, self.tile_shapes)
                                                   for rows in self.combiner.drain())


@stage("tiles_reduce", kind="group", params=_PARAMS, output_schema=_reduce_schema,
       input_doc="tiles_emit's output, all rows of a target in one stream: image_id, z, x, y, height, width, "
                 "source_x, source_y, pixels",
       doc="""Combines each target's rows from tiles_emit into its output tile: the sum of the
       partials (scatter), or the operator on the stitched halo region (gather). Emits the
       targets when the stream ends.""")
class ReduceStage:
    def __init__(self, **params):
        self.params = params
        self.op = _operator_from(params)
        self.held: dict[TileKey, dict] = {}
        self.geometry: dict[TileKey, tuple] = {}

    def process(self, batch: pa.RecordBatch):
        for row in _rows(batch, [f.name for f in EMIT_SCHEMA]):
            t = TileKey(row["image_id"], row["z"], row["x"], row["y"])
            s = t.moved(row["source_x"], row["source_y"])
            geometry = self.geometry.get(t)
            tile_shape = _grid_of_row(row, self.params, need_size=False)
            if geometry is None:
                geometry = self.geometry[t] = ((row["height"], row["width"]),
                                               *_reduce_plan(self.op, self.params, tile_shape, t.image))
            elif geometry[1].tile_shape != tile_shape:
                raise _tile_size_mismatch(s, tile_shape, geometry[1].tile_shape)
            pieces = self.held.setdefault(t, {})
            if s in pieces:
                raise TileError(s, f"reached target {t} twice: the input holds duplicate tiles at these "
                                   "coordinates; keep one tile per (image_id, z, x, y)")
            # Empty pixels: this source's partial is in the sum another row of the same emit carries.
            pieces[s] = decode_tile(row["pixels"], s) if len(row["pixels"]) or geometry[3] == "gather" else None
        return None

    def finish(self):
        def results():
            for t in sorted(self.held):
                pieces = self.held[t]
                shape, grid, r, how = self.geometry[t]
                if how == "scatter":
                    parts = [pieces[s] for s in sorted(pieces) if pieces[s] is not None]
                    if not parts:
                        raise TileError(t, "got only rows whose partials were summed into another row, and "
                                           "not that row: the rows of one tiles_emit stream were split up")
                    out_dtype = self.params["output_dtype"]
                    yield t, cast_output(t, combine_as(parts, self.op.out_dtype(parts[0].dtype), out_dtype),
                                         out_dtype)
                    continue
                halo = self.op.halo(grid.tile_shape, r)
                oy, ox = region_origin(t, halo)
                # A piece starts where its source tile meets the region.
                placed = {s.moved(max(s.x, ox), max(s.y, oy)): p for s, p in pieces.items()}
                region = stitch(t, shape, placed, halo)
                yield t, cast_output(t, apply(lambda reg: self.op.region(reg, shape, grid, r), region, halo, shape),
                                     self.params["output_dtype"])
        return _tile_batch(results())


@stage("tiles", kind="group", params=_PARAMS, output_schema=_tiles_schema,
       input_doc="image_id string, z int32, x int64, y int64, pixels binary (.npy); optional int64 columns "
                 "image_height, image_width, tile_height, tile_width",
       doc="""All the source tiles of a group (e.g. one image) in, every output tile of their
       images out, each source read once. Missing tiles count as zeros. For images larger than
       a worker's memory, use tiles_emit and tiles_reduce.""")
class TilesStage:
    def __init__(self, **params):
        self.params = params
        self.op = _operator_from(params)
        self.tiles: dict[TileKey, np.ndarray] = {}
        self.sizes: dict[tuple[str, int], dict] = {}

    def process(self, batch: pa.RecordBatch):
        for row in _rows(batch, [f.name for f in TILE_SCHEMA] + list(_GEOMETRY_COLUMNS)):
            key = TileKey(row["image_id"], row["z"], row["x"], row["y"])
            if key in self.tiles:
                raise TileError(key, "appears twice in the input; keep one tile per (image_id, z, x, y)")
            self.tiles[key] = decode_tile(row["pixels"], key)
            size = self.sizes.setdefault(key.image, {})
            for c in _GEOMETRY_COLUMNS:
                v = row.get(c)
                if v is None and self.params[c] > 0:
                    v = self.params[c]
                if v is not None:
                    size[c] = v
        return None

    def finish(self):
        grids = {}
        for img in sorted(self.sizes):
            size = self.sizes[img]
            shapes = {k: t.shape for k, t in self.tiles.items() if k.image == img}
            tile_shape = (size["tile_height"], size["tile_width"]) if "tile_height" in size and "tile_width" in size \
                else None
            g = infer_grid(shapes, tile_shape)
            grids[img] = Grid(size.get("image_height", g.height), size.get("image_width", g.width),
                              g.tile_height, g.tile_width)
        src = MemorySource(self.tiles, grids)
        r = None if self.params["radius"] < 0 else self.params["radius"]
        return _tile_batch(sorted(iter_reconstruct(src, self.op, strategy=self.params["strategy"], radius=r,
                                                   output_dtype=self.params["output_dtype"]),
                                  key=lambda kv: kv[0]))
