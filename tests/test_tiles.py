"""Tiled reconstruction against whole-image numpy/scipy and the seed's own (edge-fixed) algorithm:
planner, read counts, both strategies, every operator, dtypes, errors, the Arrow stages."""
import collections
import hashlib
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import scipy.ndimage
import scipy.signal

from ferry import registry
from ferry.errors import InputError, InvalidParamsError, SchemaError
from ferry.stages import tiles as T
from ferry.stages.tiles import (Grid, Halo, MemorySource, SyntheticSource, TileError, TileKey, assemble, combine,
                                cast_output,
                                compress_tile, decode_tile, decompress_tile, encode_tile, plan_reads, reconstruct,
                                stitch)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(got, want):
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    diff = np.abs(got.astype(np.complex128) - want.astype(np.complex128))
    return float(np.max(diff)) / max(scale, np.finfo(float).tiny) if want.size else 0.0


def source_of(image, tile, image_id="img", drop=()):
    return MemorySource.from_images({image_id: image}, tile, drop=drop)


class CountingSource:
    """Wraps a source and records every tile it hands out, to prove one read per tile."""

    def __init__(self, inner):
        self.inner, self.grids, self.log = inner, inner.grids, []

    def exists(self, key):
        return self.inner.exists(key)

    def read_many(self, keys):
        for k, t in self.inner.read_many(keys):
            self.log.append(k)
            yield k, t


def run(source, *args, **kwargs):
    counting = CountingSource(source)
    job = reconstruct(counting, *args, **kwargs)
    assert len(counting.log) == len(set(counting.log)) == job.reads, "a source tile was read more than once"
    return job


def per_channel(fn, image):
    if image.ndim == 2:
        return fn(image)
    return np.stack([fn(image[..., c]) for c in range(image.shape[2])], axis=-1)


# --- The planner ---------------------------------------------------------------------------------

def seed_calc_input_tiles(x, y, n_size, tile_w, tile_h):
    """The seed's calc_input_tiles, bug included: only ix >= 0 and iy >= 0 are checked."""
    return [(ix, iy) for ix in np.arange(x - n_size * tile_w, x + (n_size + 1) * tile_w, tile_w) if ix >= 0
            for iy in np.arange(y - n_size * tile_h, y + (n_size + 1) * tile_h, tile_h) if iy >= 0]


def test_seed_reads_32_source_tiles_the_fixed_planner_18():
    grid = Grid(6000, 6000, 2000, 2000)
    seed_sources = {(img, int(ix), int(iy)) for img in ("test1", "test2") for x, y in grid.offsets()
                    for ix, iy in seed_calc_input_tiles(x, y, 1, 2000, 2000)}
    assert len(seed_sources) == 32
    targets = grid.keys("test1", -1) + grid.keys("test2", -1)
    plan = plan_reads(targets, {("test1", -1): grid, ("test2", -1): grid}, 1)
    assert plan.reads == 18 and len(plan.targets) == 18
    edges = 2 * (4 * 4 + 4 * 6 + 9)  # per image: corners see 4 tiles, edge middles 6, the centre 9
    assert sum(len(v) for v in plan.fanout.values()) == sum(len(v) for v in plan.needs.values()) == edges


@pytest.mark.parametrize("shape", [(1, 1), (5, 5), (8, 8), (9, 17), (33, 8), (40, 41)])
@pytest.mark.parametrize("tile", [(1, 1), (2, 3), (4, 4), (8, 8), (16, 5)])
@pytest.mark.parametrize("radius", [0, 1, 2])
def test_neighbourhoods_edges_and_ragged_tiles(shape, tile, radius):
    grid = Grid(*shape, *tile)
    keys = grid.keys("a")
    assert sum(np.prod(grid.shape_at(k.x, k.y)) for k in keys) == shape[0] * shape[1]
    for k in keys:
        h, w = grid.shape_at(k.x, k.y)
        assert 1 <= h <= tile[0] and 1 <= w <= tile[1]
        want = {j for j in keys if abs(j.x - k.x) <= radius * tile[1] and abs(j.y - k.y) <= radius * tile[0]}
        assert set(T.neighbourhood(k, grid, radius)) == want
    plan = plan_reads(keys, {("a", 0): grid}, radius)
    assert plan.reads == len(keys)
    assert all(t in plan.needs[t] for t in keys)
    # fanout is the transpose of needs: every (source, target) edge once.
    edges = {(s, t) for s, ts in plan.fanout.items() for t in ts}
    assert edges == {(s, t) for t, ss in plan.needs.items() for s in ss}


def test_a_subset_of_targets_reads_only_its_neighbourhoods():
    grid = Grid(50, 50, 10, 10)
    src = SyntheticSource({("a", 0): grid}, channels=None, dtype=np.float64)
    targets = [TileKey("a", 0, 0, 0), TileKey("a", 0, 40, 40)]
    job = run(src, "threshold_sum", targets, radius=1)
    assert job.reads == 8 and set(job.tiles) == set(targets)
    job = run(src, "convolve2d", [TileKey("a", 0, 20, 20)], kernel=np.ones((1, 1)))
    assert job.reads == 1  # a 1x1 kernel needs no neighbour: radius 0


def test_targets_stream_out_before_every_tile_is_read():
    grid = Grid(80, 80, 8, 8)
    src = CountingSource(SyntheticSource({("a", 0): grid}, channels=None, dtype=np.float32))
    it = T.iter_reconstruct(src, "convolve2d", kernel=np.ones((3, 3)))
    next(it)
    assert len(src.log) < 100 // 4, "the first target waited for far more than its neighbourhood"
    assert len(list(it)) == 99 and len(src.log) == 100


# --- Convolution vs scipy.signal.convolve2d(mode='same') -------------------------------------------

def kernel_shapes(tile):
    th, tw = tile
    shapes = {(1, 1), (1, 2), (2, 1), (2, 2), (3, 3), (2, 5), (4, 3), (th, tw), (th, 1), (1, tw),
              (max(th - 1, 1), tw), (th, max(tw // 2, 1))}
    return sorted(s for s in shapes if s[0] <= th and s[1] <= tw)


IMAGES = [(1, 1), (3, 5), (8, 8), (13, 21), (32, 17), (40, 40)]
TILES = [(2, 3), (4, 4), (5, 3), (8, 8), (16, 16)]


@pytest.mark.parametrize("strategy", ["scatter", "gather"])
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", IMAGES)
def test_convolve2d_equals_scipy_same(shape, tile, strategy):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1] * 10 + tile[0])
    image = rng.standard_normal(shape)
    src = source_of(image, tile)
    n_tiles = len(src.tiles)
    for ks in kernel_shapes(tile):
        k = rng.standard_normal(ks)
        want = scipy.signal.convolve2d(image, k, mode="same")
        job = run(src, "convolve2d", strategy=strategy, kernel=k)
        got = assemble(job.tiles)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert rel_err(got, want) < 1e-9, (shape, tile, ks, strategy)
        assert job.reads == n_tiles


def test_scipy_same_keeps_the_full_convolution_from_half_the_kernel_minus_one():
    """What we match for even kernels and kernels larger than the image (measured, not assumed)."""
    rng = np.random.default_rng(7)
    for n, m, kh, kw in [(7, 7, 2, 4), (5, 9, 8, 9), (3, 3, 6, 1), (6, 4, 5, 5)]:
        x, k = rng.standard_normal((n, m)), rng.standard_normal((kh, kw))
        full = scipy.signal.convolve2d(x, k, "full")
        oy, ox = (kh - 1) // 2, (kw - 1) // 2
        np.testing.assert_allclose(scipy.signal.convolve2d(x, k, "same"), full[oy:oy + n, ox:ox + m], rtol=1e-13)
        assert T.Convolve2D(k).halo((16, 16), 1) == Halo(kh - 1 - oy, oy, kw - 1 - ox, ox)


DTYPE_CASES = [
    # (image dtype, channels, kernel dtype, tolerance: None = exact)
    (np.float64, None, np.float64, 1e-9),
    (np.float32, None, np.float64, 1e-9),
    (np.float32, None, np.float32, 1e-5),
    (np.int16, None, np.float64, 1e-9),
    (np.int16, None, np.int16, None),
    (np.int16, 4, np.float64, 1e-9),
    (np.float32, 3, np.float32, 1e-5),
    (np.uint8, 2, np.int64, None),
    (np.complex128, None, np.complex128, 1e-9),
    # ndimage reads these tiles as they are; byte-swapped and float16 tiles are cast first
    (np.uint16, 4, np.float32, 1e-5),
    (np.dtype(">f8"), 2, np.float64, 1e-9),
    (np.float16, None, np.float32, 1e-5),
]


@pytest.mark.parametrize("strategy", ["scatter", "gather"])
@pytest.mark.parametrize("dtype,channels,kdtype,tol", DTYPE_CASES)
def test_convolve2d_dtypes_and_channels(dtype, channels, kdtype, tol, strategy):
    rng = np.random.default_rng(3)
    shape = (37, 29) + ((channels,) if channels else ())
    if np.dtype(dtype).kind in "iu":
        image = rng.integers(0 if np.dtype(dtype).kind == "u" else -100, 100, size=shape).astype(dtype)
    else:
        image = (rng.standard_normal(shape) + (1j * rng.standard_normal(shape) if np.dtype(dtype).kind == "c" else 0))
        image = image.astype(dtype)
    for ks in [(3, 3), (4, 4), (2, 7), (16, 16), (9, 9)]:  # 9x9 and 16x16 take the FFT path for floats
        if np.dtype(kdtype).kind in "iu":
            k = rng.integers(-3, 4, size=ks).astype(kdtype)
        else:
            k = rng.standard_normal(ks).astype(kdtype)
        want = per_channel(lambda a: scipy.signal.convolve2d(a, k, mode="same"), image)
        job = run(source_of(image, (16, 16)), "convolve2d", strategy=strategy, kernel=k)
        got = assemble(job.tiles)
        assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype)
        if tol is None:
            np.testing.assert_array_equal(got, want)
        else:
            assert rel_err(got, want) < tol, (ks, rel_err(got, want))


def test_int16_convolution_wraps_exactly_as_scipy():
    rng = np.random.default_rng(11)
    image = rng.integers(-30000, 30000, size=(20, 20)).astype(np.int16)
    k = rng.integers(-50, 50, size=(5, 5)).astype(np.int16)
    want = scipy.signal.convolve2d(image, k, mode="same")
    assert np.abs(scipy.signal.convolve2d(image.astype(np.int64), k.astype(np.int64), "same")).max() > 2**15
    for strategy in ("scatter", "gather"):
        np.testing.assert_array_equal(assemble(run(source_of(image, (6, 7)), "convolve2d", strategy=strategy,
                                                   kernel=k).tiles), want)


def test_convolve2d_medium_image_by_fft():
    rng = np.random.default_rng(5)
    image = rng.standard_normal((600, 500)).astype(np.float32)
    k = rng.standard_normal((31, 30))
    want = scipy.signal.fftconvolve(image.astype(np.float64), k, mode="same")
    job = run(source_of(image, (128, 128)), "convolve2d", kernel=k)
    assert job.reads == 20
    assert rel_err(assemble(job.tiles), want) < 1e-9


def test_non_finite_pixels_stay_local_as_in_scipy():
    image = np.arange(400.0).reshape(20, 20)
    image[3, 4] = np.nan
    k = np.ones((9, 9))  # large enough for the FFT path, which would smear the NaN everywhere
    want = scipy.signal.convolve2d(image, k, mode="same")
    got = assemble(run(source_of(image, (10, 10)), "convolve2d", kernel=k).tiles)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert rel_err(got[~np.isnan(got)], want[~np.isnan(want)]) < 1e-12


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_a_larger_radius_changes_nothing_for_a_filter(radius):
    rng = np.random.default_rng(radius)
    image = rng.standard_normal((30, 26))
    k = np.ones((1, 1)) if radius == 0 else rng.standard_normal((5, 4))
    want = scipy.signal.convolve2d(image, k, mode="same")
    for strategy in ("scatter", "gather"):
        assert rel_err(assemble(run(source_of(image, (8, 8)), "convolve2d", strategy=strategy, radius=radius,
                                    kernel=k).tiles), want) < 1e-12


# --- Median vs scipy.ndimage.median_filter(mode='constant') ------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, (2, 3), (5, 1), (7, 7), 9])
@pytest.mark.parametrize("shape,tile", [((23, 31), (8, 8)), ((9, 9), (4, 5)), ((16, 16), (16, 16)), ((7, 40), (3, 9))])
def test_median_equals_scipy(shape, tile, size):
    rng = np.random.default_rng(shape[0] + tile[1])
    image = rng.standard_normal(shape)
    want = scipy.ndimage.median_filter(image, size=size, mode="constant")
    job = run(source_of(image, tile), "median", size=size)
    got = assemble(job.tiles)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    assert job.reads == len(Grid(*shape, *tile).offsets())


@pytest.mark.parametrize("dtype,channels", [(np.int16, None), (np.int16, 4), (np.float32, 3), (np.uint8, None)])
@pytest.mark.parametrize("radius", [None, 2])
def test_median_dtypes_channels_and_radius(dtype, channels, radius):
    rng = np.random.default_rng(2)
    shape = (21, 18) + ((channels,) if channels else ())
    image = (rng.standard_normal(shape) * 50).astype(dtype)
    size = (3, 4)
    want = scipy.ndimage.median_filter(image, size=size + ((1,) if channels else ()), mode="constant")
    got = assemble(run(source_of(image, (5, 6)), "median", radius=radius, size=size).tiles)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, want)


# --- The seed's threshold-and-sum ---------------------------------------------------------------------

SeedTileId = collections.namedtuple("tile_id", ["img_id", "z", "x", "y", "type"])


def seed_pull_input_tile(i_tile, tile_w, tile_h):
    """The seed's pull_input_tile (no delay): its data, valid within this one process only."""
    np.random.seed(i_tile.__hash__() % 4294967295)
    return np.random.uniform(-127, 127, size=(tile_w, tile_h, 4)).astype(np.int16)


class SeedSource:
    """The seed's own data, as a tile source: tile (img, z, x, y) is pull_input_tile of that id."""

    def __init__(self, images, im_w, im_h, tile_w, tile_h, z=-1):
        self.size = (im_w, im_h, tile_w, tile_h)
        self.grids = {(img, z): Grid(im_h, im_w, tile_h, tile_w) for img in images}

    def exists(self, key):
        return self.grids[key.image].on_grid(key.x, key.y)

    def read_many(self, keys):
        for k in keys:
            yield k, seed_pull_input_tile(SeedTileId(k.image_id, k.z, k.x, k.y, "in"), *self.size[2:])


def seed_reconstruction(images, im_w, im_h, tile_w, tile_h, n_size=1, fix_edges=True, threshold=20, pull=None):
    """The seed's grouped-read pipeline, naively: targets, neighbour lists, one read per source,
    partial_reconstruction (values > 20 set to 0) and np.sum of the stack; edge bug optionally fixed."""
    pull = pull or (lambda t: seed_pull_input_tile(t, tile_w, tile_h))
    targets = [SeedTileId(img, -1, x, y, "out") for img in images
               for x in np.arange(0, im_w, tile_w) for y in np.arange(0, im_h, tile_h)]
    pairs = []
    for o in targets:
        for ix, iy in seed_calc_input_tiles(o.x, o.y, n_size, tile_w, tile_h):
            if fix_edges and not (ix < im_w and iy < im_h):
                continue
            pairs.append((o, o._replace(type="in", x=ix, y=iy)))
    data = {s: pull(s) for s in {s for _, s in pairs}}
    out = {}
    for o in targets:
        parts = []
        for oo, s in pairs:
            if oo == o:
                part = data[s].copy()
                part[part > threshold] = 0
                parts.append(part)
        out[TileKey(o.img_id, o.z, o.x, o.y)] = np.sum(np.stack(parts, 0), 0)
    return out, len(data)


@pytest.mark.parametrize("strategy", ["scatter", "gather"])
def test_threshold_sum_equals_the_seed_on_its_own_data(strategy):
    args = (["test1", "test2"], 60, 60, 20, 20)
    want, seed_reads = seed_reconstruction(*args)
    job = run(SeedSource(*args), "threshold_sum", strategy=strategy)
    assert seed_reads == job.reads == 18
    assert set(job.tiles) == set(want)
    for k, v in want.items():
        assert job.tiles[k].dtype == v.dtype == np.int64
        np.testing.assert_array_equal(job.tiles[k], v)
    # The unfixed seed reads tiles past the edge and adds them to the edge targets.
    buggy, buggy_reads = seed_reconstruction(*args, fix_edges=False)
    assert buggy_reads == 32
    assert not np.array_equal(buggy[TileKey("test1", -1, 40, 40)], want[TileKey("test1", -1, 40, 40)])
    np.testing.assert_array_equal(buggy[TileKey("test1", -1, 0, 0)], want[TileKey("test1", -1, 0, 0)])


@pytest.mark.parametrize("n_size", [0, 1, 2])
@pytest.mark.parametrize("dims", [(60, 60, 20, 20), (48, 30, 12, 10), (25, 25, 25, 25)])
def test_threshold_sum_equals_seed_with_stable_synthetic_tiles(dims, n_size):
    im_w, im_h, tile_w, tile_h = dims
    grids = {("a", -1): Grid(im_h, im_w, tile_h, tile_w), ("b", -1): Grid(im_h, im_w, tile_h, tile_w)}
    src = SyntheticSource(grids, channels=4)
    pull = lambda t: src.read(TileKey(t.img_id, t.z, t.x, t.y))  # noqa: E731
    want, seed_reads = seed_reconstruction(["a", "b"], *dims, n_size=n_size, pull=pull)
    for strategy in ("scatter", "gather"):
        job = run(src, "threshold_sum", strategy=strategy, radius=n_size)
        assert job.reads == seed_reads == 2 * (im_w // tile_w) * (im_h // tile_h)
        for k, v in want.items():
            np.testing.assert_array_equal(job.tiles[k], v)


def threshold_sum_oracle(image, tile, radius, threshold=20):
    """Whole-image indexing: each target adds the first h x w pixels (its own shape) of the
    thresholded image at every offset (dy * tile_h, dx * tile_w) within radius; zeros outside."""
    th, tw = tile
    H, W = image.shape[:2]
    kept = np.where(image > threshold, np.zeros((), image.dtype), image)
    out = np.zeros(image.shape, dtype=np.sum(kept[:1, :1]).dtype)
    for ty in range(0, H, th):
        for tx in range(0, W, tw):
            h, w = min(th, H - ty), min(tw, W - tx)
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    sy, sx = ty + dy * th, tx + dx * tw
                    if 0 <= sy < H and 0 <= sx < W:
                        block = kept[sy:sy + h, sx:sx + w]
                        out[ty:ty + block.shape[0], tx:tx + block.shape[1]] += block
    return out


@pytest.mark.parametrize("radius", [0, 1, 2])
@pytest.mark.parametrize("shape,tile", [((23, 31), (8, 8)), ((16, 16), (4, 4)), ((10, 7), (3, 5)), ((5, 5), (8, 8))])
@pytest.mark.parametrize("dtype,channels", [(np.float64, None), (np.int16, 4), (np.float32, None)])
def test_threshold_sum_on_ragged_images(shape, tile, radius, dtype, channels):
    rng = np.random.default_rng(radius + shape[0])
    full_shape = shape + ((channels,) if channels else ())
    image = (rng.uniform(-127, 127, size=full_shape)).astype(dtype)
    want = threshold_sum_oracle(image, tile, radius)
    for strategy in ("scatter", "gather"):
        got = assemble(run(source_of(image, tile), "threshold_sum", strategy=strategy, radius=radius).tiles)
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == np.float32 else 1e-12)


def test_threshold_sum_whole_image_form_on_whole_tiles():
    rng = np.random.default_rng(9)
    image = rng.uniform(-127, 127, size=(24, 30)).astype(np.int16)
    want = threshold_sum_oracle(image, (8, 10), 1)
    # On whole tiles the seed's operator is a sum of the image shifted by whole tiles.
    kept = np.where(image > 20, 0, image).astype(np.int64)
    shifted = sum(np.roll(np.pad(kept, ((8, 8), (10, 10))), (-dy * 8, -dx * 10), (0, 1))[8:32, 10:40]
                  for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    np.testing.assert_array_equal(want, shifted)
    np.testing.assert_array_equal(assemble(run(source_of(image, (8, 10)), "threshold_sum").tiles), shifted)


# --- Missing tiles count as zeros -------------------------------------------------------------------

@pytest.mark.parametrize("op,params", [("convolve2d", {"kernel": np.arange(12.0).reshape(3, 4) - 5}),
                                       ("median", {"size": 3}), ("threshold_sum", {"threshold": 0.0})])
@pytest.mark.parametrize("strategy", ["auto", "gather"])
def test_missing_tiles_count_as_zeros(op, params, strategy):
    rng = np.random.default_rng(4)
    image = rng.standard_normal((26, 22))
    grid = Grid(26, 22, 8, 8)
    drop = [TileKey("img", 0, 8, 8), TileKey("img", 0, 16, 24), TileKey("img", 0, 0, 0)]
    zeroed = image.copy()
    for k in drop:
        h, w = grid.shape_at(k.x, k.y)
        zeroed[k.y:k.y + h, k.x:k.x + w] = 0
    want = assemble(run(source_of(zeroed, (8, 8)), op, strategy=strategy, **params).tiles)
    job = run(source_of(image, (8, 8), drop=drop), op, strategy=strategy, **params)
    assert job.reads == len(grid.offsets()) - len(drop)
    assert set(job.tiles) == set(grid.keys("img"))  # missing tiles are still computed as targets
    np.testing.assert_array_equal(assemble(job.tiles), want)
    if op == "convolve2d":
        assert rel_err(assemble(job.tiles), scipy.signal.convolve2d(zeroed, params["kernel"], "same")) < 1e-12


def test_a_target_with_no_neighbour_at_all_is_zeros():
    image = np.ones((30, 10), np.float32)
    drop = [TileKey("img", 0, 0, y) for y in (0, 10)]
    job = run(source_of(image, (10, 10), drop=drop), "convolve2d", kernel=np.ones((3, 3), np.float32))
    assert job.reads == 1
    np.testing.assert_array_equal(job.tiles[TileKey("img", 0, 0, 0)], np.zeros((10, 10), np.float32))
    assert job.tiles[TileKey("img", 0, 0, 0)].dtype == np.float32
    assert job.tiles[TileKey("img", 0, 0, 10)][0, 0] == 0 and job.tiles[TileKey("img", 0, 0, 10)][-1, 0] == 2


# --- User-registered operators ------------------------------------------------------------------------

def laplacian(region, weight=1.0):
    k = weight * np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], float)
    return scipy.ndimage.correlate(region, k, mode="constant", cval=0)


def test_a_registered_linear_function_runs_by_scatter_and_gather():
    T.register_operator("test_laplacian", laplacian, linear=True, halo=1, replace=True)
    rng = np.random.default_rng(8)
    image = rng.standard_normal((21, 34))
    want = laplacian(image, weight=2.5)
    for strategy in ("auto", "scatter", "gather"):
        job = run(source_of(image, (5, 8)), "test_laplacian", strategy=strategy, weight=2.5)
        assert rel_err(assemble(job.tiles), want) < 1e-12, strategy


def test_a_registered_non_linear_function_with_a_param_dependent_halo():
    T.register_operator("test_max", lambda r, size: scipy.ndimage.maximum_filter(r, size=size, mode="constant"),
                        halo=lambda size: (size // 2, size - 1 - size // 2, size // 2, size - 1 - size // 2),
                        replace=True)
    rng = np.random.default_rng(10)
    image = rng.standard_normal((19, 23))
    for size in (1, 2, 5, 9):
        want = scipy.ndimage.maximum_filter(image, size=size, mode="constant")
        np.testing.assert_array_equal(assemble(run(source_of(image, (6, 6)), "test_max", size=size).tiles), want)
    with pytest.raises(InvalidParamsError, match="'test_max' is not linear.*use strategy 'gather'"):
        reconstruct(source_of(image, (6, 6)), "test_max", strategy="scatter", size=3)


def test_a_registered_function_may_return_the_target_shape():
    # valid-mode correlation returns exactly the target: the halo is consumed.
    T.register_operator("test_box_valid", lambda r: scipy.signal.correlate2d(r, np.ones((3, 3)), "valid"),
                        halo=1, replace=True)
    image = np.random.default_rng(1).standard_normal((17, 12))
    want = scipy.signal.correlate2d(image, np.ones((3, 3)), "same")
    assert rel_err(assemble(run(source_of(image, (4, 5)), "test_box_valid").tiles), want) < 1e-12
    T.register_operator("test_bad_shape", lambda r: r[1:], halo=1, replace=True)
    with pytest.raises(InputError, match=r"returned shape \(.*\) for a region of shape .* must return"):
        reconstruct(source_of(image, (4, 5)), "test_bad_shape")


def test_register_operator_errors():
    with pytest.raises(InvalidParamsError, match="already registered; pass replace=True"):
        T.register_operator("median", np.median)
    with pytest.raises(InvalidParamsError, match="fn must be callable"):
        T.register_operator("test_nope", 3)
    with pytest.raises(InvalidParamsError, match=r"halo must be an int >= 0, \(rows, cols\)"):
        T.register_operator("test_nope", laplacian, halo=(1, 2, 3))
    with pytest.raises(InvalidParamsError, match="halo must be an int >= 0"):
        T.register_operator("test_nope", laplacian, halo=-1)
    assert "test_nope" not in T.operators()


# --- Errors that name the tile ------------------------------------------------------------------------

def test_mismatched_tile_size_within_an_image():
    src = source_of(np.zeros((20, 20)), (8, 8))
    src.tiles[TileKey("img", 0, 8, 0)] = np.zeros((7, 8))
    with pytest.raises(TileError, match=r"tile \(image 'img', z=0, x=8, y=0\): has 7x8 pixels but its cell of the "
                                        r"grid \(20x20 pixels in 8x8 tiles\) is 8x8; only the last row and column"):
        reconstruct(src, "median", size=3)


def test_mismatched_dtype_or_channels_within_an_image():
    src = source_of(np.zeros((20, 20), np.int16), (8, 8))
    src.tiles[TileKey("img", 0, 16, 8)] = np.zeros((8, 4), np.float32)
    with pytest.raises(TileError, match=r"x=16, y=8\): has dtype float32, 2-D but tile \(image 'img', z=0, x=0, "
                                        r"y=0\) of the same image has dtype int16, 2-D; .* cast them"):
        reconstruct(src, "threshold_sum")
    src.tiles[TileKey("img", 0, 16, 8)] = np.zeros((8, 4, 3), np.int16)
    with pytest.raises(TileError, match=r"x=16, y=8\): has dtype int16 with 3 channels but .* has dtype int16, 2-D"):
        reconstruct(src, "threshold_sum")


def test_duplicate_tile_coordinates():
    class Twice(MemorySource):
        def read_many(self, keys):
            for k, t in super().read_many(keys):
                yield k, t
                if k == TileKey("img", 0, 4, 4):
                    yield k, t

    src = Twice(source_of(np.zeros((8, 8)), (4, 4)).tiles)
    with pytest.raises(TileError, match=r"tile \(image 'img', z=0, x=4, y=4\): was read twice: .*duplicate"):
        reconstruct(src, "median")


def test_kernel_larger_than_the_tile():
    src = source_of(np.zeros((30, 30)), (8, 8))
    with pytest.raises(InvalidParamsError, match=r"Kernel 9x3 is larger than the 8x8 tiles of image 'img' z=0 "
                                                 r"\(first tile tile \(image 'img', z=0, x=0, y=0\)\)"):
        reconstruct(src, "convolve2d", kernel=np.ones((9, 3)))


def test_radius_too_small_and_other_param_errors():
    src = source_of(np.zeros((30, 30)), (8, 8))
    with pytest.raises(InvalidParamsError,
                       match=r"needs radius >= 1 with the 8x8 tiles of image 'img' z=0; got radius 0"):
        reconstruct(src, "convolve2d", radius=0, kernel=np.ones((3, 3)))
    with pytest.raises(InvalidParamsError, match=r"needs radius >= 2"):
        reconstruct(src, "median", radius=1, size=19)
    with pytest.raises(InvalidParamsError, match="radius must be an integer >= 0"):
        reconstruct(src, "median", radius=-1)
    with pytest.raises(InvalidParamsError, match="No operator named 'blur'; the operators are .*convolve2d"):
        reconstruct(src, "blur")
    with pytest.raises(InvalidParamsError, match="strategy must be one of auto, scatter, gather, got 'both'"):
        reconstruct(src, "median", strategy="both")
    with pytest.raises(InvalidParamsError, match="'median' is not linear"):
        reconstruct(src, "median", strategy="scatter")
    with pytest.raises(InvalidParamsError, match="needs a non-empty 2-D numeric kernel, got shape \\(3,\\)"):
        reconstruct(src, "convolve2d", kernel=np.ones(3))
    with pytest.raises(InvalidParamsError, match="Operator 'convolve2d': .*kernel"):
        reconstruct(src, "convolve2d")
    with pytest.raises(InvalidParamsError, match="'median' needs size = a positive int"):
        reconstruct(src, "median", size=0)
    with pytest.raises(InvalidParamsError, match="Grid tile_width must be a positive integer, got 0"):
        Grid(10, 10, 5, 0)


def test_targets_off_the_grid_or_of_unknown_images():
    src = source_of(np.zeros((30, 30)), (8, 8))
    with pytest.raises(TileError, match=r"x=3, y=0\): is not on the grid of its image \(30x30 pixels in 8x8 tiles\)"):
        reconstruct(src, "median", [TileKey("img", 0, 3, 0)])
    with pytest.raises(TileError, match=r"x=0, y=32\): is not on the grid"):
        reconstruct(src, "median", [TileKey("img", 0, 0, 32)])
    with pytest.raises(TileError, match=r"image 'other'.*belongs to no known image; the images are \('img', z=0\)"):
        reconstruct(src, "median", [TileKey("other", 0, 0, 0)])


def test_an_image_with_no_tile_at_all():
    src = MemorySource({}, {("img", 0): Grid(8, 8, 4, 4)})
    with pytest.raises(TileError, match=r"x=0, y=0\): no tile of its image exists in the source"):
        reconstruct(src, "median")


def test_non_numeric_and_badly_shaped_tiles():
    src = source_of(np.zeros((8, 8)), (8, 8))
    src.tiles[TileKey("img", 0, 0, 0)] = np.array([["a"] * 8] * 8)
    with pytest.raises(TileError, match=r"x=0, y=0\): has dtype <U1; tiles must be numeric"):
        reconstruct(src, "median")
    src.tiles[TileKey("img", 0, 0, 0)] = np.zeros((8, 8, 1, 1))
    with pytest.raises(TileError, match=r"has shape \(8, 8, 1, 1\); a tile is \(rows, cols\) or \(rows, cols, chan"):
        reconstruct(src, "median")


# --- .npy bytes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("arr", [
    np.arange(12, dtype=np.int16).reshape(3, 4),
    np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    np.arange(6, dtype=">i4").reshape(2, 3),
    np.zeros((0, 5), np.uint8),
    np.array([[1 + 2j]]),
], ids=["int16", "float32x4", "fortran", "big-endian", "empty", "complex"])
def test_npy_round_trip_without_copy(arr):
    data = encode_tile(arr)
    back = decode_tile(data)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    buf = pa.py_buffer(data)
    view = decode_tile(buf)
    if arr.size:
        assert np.shares_memory(view, np.frombuffer(buf, np.uint8))


def test_encode_tiles_gives_encode_tiles_bytes_in_one_column():
    rng = np.random.default_rng(3)
    arrs = [rng.integers(-100, 100, (7, 5, 4)).astype(np.int16), rng.random((6, 9)),
            np.asfortranarray(rng.random((6, 9))), rng.random((8, 10))[::2, 1::3], np.zeros((0, 3), np.float32),
            rng.random((5, 4)) > 0.5, rng.random((3, 4)).astype(">f8"), np.array([[1 + 2j]]),
            np.asfortranarray(rng.integers(0, 9, (4, 5, 3)).astype(np.uint8)), rng.random((4, 6))[:, :3].T]
    col = T.encode_tiles(arrs + arrs[:2])  # repeated shapes reuse a header
    assert col.type == pa.binary() and len(col) == len(arrs) + 2
    for got, arr in zip(col, arrs + arrs[:2]):
        assert got.as_py() == encode_tile(arr)


def test_binary_cells_are_zero_copy_slices():
    col = T.encode_tiles([np.full((30, 20), i, np.int16) for i in range(4)])
    for c in (col, col.slice(1, 2), col.cast(pa.large_binary()).slice(2)):
        cells = T.binary_cells(c)
        assert [bytes(b) for b in cells] == [v.as_py() for v in c]
        data = np.frombuffer(c.buffers()[2], np.uint8)
        assert all(np.shares_memory(decode_tile(b), data) for b in cells)
    nulls = pa.array([b"ab", None, b""], pa.binary())
    assert [bytes(b) for b in T.binary_cells(nulls)] == [b"ab", b"", b""]


def test_npy_version_2_header():
    import io
    out = io.BytesIO()
    np.lib.format.write_array(out, np.arange(6.0).reshape(2, 3), version=(2, 0))
    np.testing.assert_array_equal(decode_tile(out.getvalue()), np.arange(6.0).reshape(2, 3))


def test_corrupt_npy_bytes_name_the_tile():
    key = TileKey("scan-7", 2, 4096, 512)
    good = encode_tile(np.ones((4, 4)))
    where = r"tile \(image 'scan-7', z=2, x=4096, y=512\): pixels are not valid \.npy bytes"
    with pytest.raises(TileError, match=where + r" \(they start with b'PNG"):
        decode_tile(b"PNG\r\n\x1a\n" + good, key)
    with pytest.raises(TileError, match=where + r" \(the header says \(4, 4\) of float64 = 128 bytes, but 127 follow"):
        decode_tile(good[:-1], key)
    with pytest.raises(TileError, match=where + r" \(the header says .* but 129 follow"):
        decode_tile(good + b"\0", key)
    with pytest.raises(TileError, match=where + r" \(the header needs"):
        decode_tile(good[:20], key)
    with pytest.raises(TileError, match=where + r" \(unreadable header"):
        decode_tile(good[:10] + b"{'descr': nonsense}".ljust(len(good) - 10), key)
    with pytest.raises(TileError, match=where + r" \(unknown \.npy format version 9"):
        decode_tile(good[:6] + b"\x09" + good[7:], key)
    with pytest.raises(TileError, match=where):
        decode_tile(b"", key)
    import io
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(TileError, match=r"x=4096, y=512\): pixels hold Python objects .* never unpickled"):
        decode_tile(obj.getvalue(), key)
    with pytest.raises(TileError, match="pixels must be .npy bytes, got int"):
        decode_tile(5, key)


# --- The synthetic source ------------------------------------------------------------------------------

SYNTH_SCRIPT = """
import hashlib, numpy as np
from ferry.stages.tiles import Grid, SyntheticSource, TileKey
src = SyntheticSource({("test1", -1): Grid(60, 60, 20, 20), ("img b", 3): Grid(7, 9, 4, 4)})
h = hashlib.sha256()
for img in sorted(src.grids):
    for k in src.grids[img].keys(*img):
        h.update(np.ascontiguousarray(src.read(k)).tobytes())
print(h.hexdigest())
"""

SEED_SCRIPT = """
import collections, numpy as np
tile_id = collections.namedtuple('tile_id', ['img_id', 'z', 'x', 'y', 'type'])
np.random.seed(tile_id('test1', -1, 0, 0, 'in').__hash__() % 4294967295)
print(np.random.uniform(-127, 127, size=4).astype(np.int16).tolist())
"""


def _python(script, hashseed):
    env = dict(os.environ, PYTHONHASHSEED=str(hashseed), PYTHONPATH=os.path.join(ROOT, "python"))
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_synthetic_tiles_are_the_same_in_every_process():
    here = hashlib.sha256()
    src = SyntheticSource({("test1", -1): Grid(60, 60, 20, 20), ("img b", 3): Grid(7, 9, 4, 4)})
    for img in sorted(src.grids):
        for k in src.grids[img].keys(*img):
            here.update(np.ascontiguousarray(src.read(k)).tobytes())
    assert _python(SYNTH_SCRIPT, 1) == _python(SYNTH_SCRIPT, 12345) == here.hexdigest()
    # ...whereas the seed's hash()-derived seed draws another image in another process.
    assert _python(SEED_SCRIPT, 1) != _python(SEED_SCRIPT, 12345)


def test_synthetic_tiles_look_like_the_seeds():
    key = TileKey("test1", -1, 20, 40)
    t = T.synthetic_tile(key, (20, 20, 4))
    assert t.dtype == np.int16 and t.shape == (20, 20, 4) and -127 <= t.min() and t.max() <= 126
    assert not np.array_equal(t, T.synthetic_tile(TileKey("test1", -1, 40, 20), (20, 20, 4)))
    assert T.tile_seed(TileKey("a", np.int64(1), np.int32(2), 3)) == T.tile_seed(TileKey("a", 1, 2, 3))
    src = SyntheticSource({("a", 0): Grid(10, 7, 4, 4)}, channels=None, dtype=np.float32, low=0, high=1)
    assert src.read(TileKey("a", 0, 4, 8)).shape == (2, 3)
    assert src.exists(TileKey("a", 0, 4, 8)) and not src.exists(TileKey("a", 0, 8, 8))


# --- Strategies as pure functions -------------------------------------------------------------------------

def test_partials_combine_stitch_apply_by_hand():
    rng = np.random.default_rng(6)
    image = rng.standard_normal((12, 12))
    grid = Grid(12, 12, 4, 4)
    tiles = T.cut_tiles(image, grid, "a")
    op = T.get_operator("convolve2d", kernel=rng.standard_normal((3, 3)))
    target = TileKey("a", 0, 4, 4)
    sources = T.neighbourhood(target, grid, 1)
    parts = [T.partials(op, s, tiles[s], [target], grid)[target] for s in sources]
    want = scipy.signal.convolve2d(image, op.kernel, "same")[4:8, 4:8]
    assert rel_err(combine(parts), want) < 1e-12
    halo = op.halo(grid.tile_shape, 1)
    region = stitch(target, (4, 4), {s: tiles[s] for s in sources}, halo)
    np.testing.assert_array_equal(region, image[3:9, 3:9])
    assert rel_err(T.apply(lambda r: scipy.signal.convolve2d(r, op.kernel, "same"), region, halo, (4, 4)), want) < 1e-12
    origin = TileKey("a", 0, 0, 0)
    corner = stitch(origin, (4, 4), {s: tiles[s] for s in T.neighbourhood(origin, grid, 1)}, halo)
    assert corner[0].sum() == 0 and corner[:, 0].sum() == 0  # outside the image is zeros
    np.testing.assert_array_equal(stitch(target, (4, 4), {}, halo, dtype=np.int16, channels=2),
                                  np.zeros((6, 6, 2), np.int16))
    with pytest.raises(InputError, match="combine\\(\\) needs at least one partial"):
        combine([])
    with pytest.raises(InputError, match="stitching a region with no neighbours needs its dtype"):
        stitch(target, (4, 4), {}, halo)
    assert combine([np.ones(2, np.int16)] * 3).dtype == np.int64  # np.sum's dtype, as the seed's
    assert combine([np.ones(2, np.int16)] * 3, np.int16).dtype == np.int16


# --- Compressed output and assemble -------------------------------------------------------------------------

@pytest.mark.parametrize("codec", ["zstd", "npz"])
@pytest.mark.parametrize("arr", [np.arange(60, dtype=np.int16).reshape(3, 5, 4), np.linspace(0, 1, 35).reshape(5, 7),
                                 np.ones((4, 4), np.float32) * np.float32(1 / 3), np.zeros((2, 2), bool)])
def test_compressed_tiles_load_back_exactly(codec, arr):
    data = compress_tile(arr, codec)
    back = decompress_tile(data)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_compression_errors():
    with pytest.raises(InvalidParamsError, match="codec must be one of zstd, npz, got 'gzip'"):
        compress_tile(np.ones(2), "gzip")
    key = TileKey("a", 0, 8, 16)
    for codec in ("zstd", "npz"):
        data = compress_tile(np.ones((50, 50)), codec)
        with pytest.raises(TileError, match=r"tile \(image 'a', z=0, x=8, y=16\): compressed bytes"):
            decompress_tile(data[:len(data) // 2], key)
    with pytest.raises(TileError, match="neither a zstd frame nor an .npz archive"):
        decompress_tile(b"\x93NUMPY...", key)
    assert T.DEFAULT_CODEC == "zstd"


def test_assemble():
    image = np.arange(7 * 9 * 2).reshape(7, 9, 2)
    tiles = T.cut_tiles(image, Grid(7, 9, 3, 4), "a")
    np.testing.assert_array_equal(assemble(tiles), image)
    with pytest.raises(InputError, match="assemble\\(\\) takes the tiles of one image and level, got 2"):
        assemble({**tiles, TileKey("b", 0, 0, 0): image[:3, :4]})
    with pytest.raises(InputError, match="would have 7x9 pixels, above max_pixels=10; assemble\\(\\) is for small"):
        assemble(tiles, max_pixels=10)
    with pytest.raises(TileError, match=r"x=2, y=0\): has dtype int8 and shape \(2, 2\), unlike tile "
                                        r"\(image .a., z=0, x=0, y=0\) \(float64"):
        assemble({TileKey("a", 0, 0, 0): np.zeros((2, 2)), TileKey("a", 0, 2, 0): np.zeros((2, 2), np.int8)})
    with pytest.raises(InputError, match="needs at least one tile"):
        assemble({})


# --- The Arrow stages -----------------------------------------------------------------------------------

def tile_batch(tiles, **geometry):
    keys = sorted(tiles)
    cols = {"image_id": pa.array([k.image_id for k in keys]), "z": pa.array([k.z for k in keys], pa.int32()),
            "x": pa.array([k.x for k in keys], pa.int64()), "y": pa.array([k.y for k in keys], pa.int64()),
            "pixels": pa.array([encode_tile(tiles[k]) for k in keys], pa.binary())}
    for name, values in geometry.items():
        cols[name] = pa.array(values, pa.int64())
    return pa.RecordBatch.from_pydict(cols)


def batch_tiles(batch):
    cols = {n: batch.column(n).to_pylist() for n in ("image_id", "z", "x", "y")}
    pixels = batch.column("pixels")
    return {TileKey(cols["image_id"][i], cols["z"][i], cols["x"][i], cols["y"][i]): decode_tile(pixels[i].as_buffer())
            for i in range(batch.num_rows)}


def run_stage(name, params, batches):
    st = registry.get(name)
    resolved = st.resolve_params(params)
    schema = st.output_schema(batches[0].schema, resolved)
    proc = st.open(resolved)
    outs = [proc.process(b) for b in batches]
    outs = [o for o in outs + list(registry.finish_results(proc)) if o is not None]
    for o in outs:
        assert o.schema.equals(schema)
    return outs


STAGE_CASES = [
    ("convolve2d", {"kernel": [[1, 2, 0.5], [3, -1, 2]]}, "auto"),
    ("convolve2d", {"kernel": [[1, 2, 0.5], [3, -1, 2]]}, "gather"),
    ("convolve2d", {"kernel": [[1, 2, 0.5], [3, -1, 2]]}, "scatter"),
    ("median", {"size": [3, 2]}, "auto"),
    ("threshold_sum", {"threshold": 0.25}, "scatter"),
    ("threshold_sum", {"threshold": 0.25}, "gather"),
]


@pytest.mark.parametrize("op,op_params,strategy", STAGE_CASES)
def test_emit_then_reduce_stages_equal_the_in_process_job(op, op_params, strategy):
    rng = np.random.default_rng(12)
    images = {"a": rng.standard_normal((19, 23)), "b": rng.standard_normal((8, 30)).astype(np.float32)}
    src = MemorySource.from_images(images, (6, 8), drop=[TileKey("a", 0, 8, 6)])
    direct = {k: np.asarray(v) for k, v in op_params.items()}
    want = reconstruct(src, op, strategy=strategy, **direct).tiles
    keys = sorted(src.tiles)
    sizes = {k: images[k.image_id].shape for k in keys}
    # Two batches, split inside an image, with the image size as per-row columns (as the store gives).
    batches = [tile_batch({k: src.tiles[k] for k in part},
                          image_height=[sizes[k][0] for k in part], image_width=[sizes[k][1] for k in part])
               for part in (keys[:7], keys[7:])]
    params = {"operator": op, "operator_params": op_params, "strategy": strategy, "tile_height": 6, "tile_width": 8}
    emitted = run_stage("tiles_emit", params, batches)
    # Shuffle the rows: a reduce sees a target's rows in any order and any batches.
    table = pa.Table.from_batches(emitted)
    table = table.take(np.random.default_rng(0).permutation(table.num_rows))
    reduced = run_stage("tiles_reduce", params, table.to_batches(max_chunksize=11))
    got = {}
    for b in reduced:
        got.update(batch_tiles(b))
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype
        np.testing.assert_array_equal(got[k], want[k])
    whole = {}
    for b in run_stage("tiles", params, batches):
        whole.update(batch_tiles(b))
    assert set(whole) == set(want) and all(np.array_equal(whole[k], want[k]) for k in want)


def test_auto_strategy_per_image_from_its_halo_region():
    """auto gathers where the halo region is at most twice the tile (a 3x3 kernel on 16x16 tiles:
    18^2 <= 2 * 16^2) and scatters where it is wider (on 4x4 tiles: 6^2 > 2 * 4^2); a job with
    both images runs each its own way, in-process and through the emit/reduce stages."""
    rng = np.random.default_rng(21)
    k = rng.standard_normal((3, 3))
    images = {"thin": rng.standard_normal((40, 35)), "wide": rng.standard_normal((10, 13))}
    tiles = {}
    grids = {}
    for name, tile in (("thin", (16, 16)), ("wide", (4, 4))):
        src = source_of(images[name], tile, image_id=name)
        tiles.update(src.tiles)
        grids.update(src.grids)
    src = MemorySource(tiles, grids)
    stats = {}
    got = dict(T.iter_reconstruct(src, "convolve2d", kernel=k, stats=stats))
    assert stats["strategies"] == {("thin", 0): "gather", ("wide", 0): "scatter"}
    assert T._strategy(T.get_operator("threshold_sum"), "auto", (16, 16), 1) == "scatter"
    assert T._strategy(T.get_operator("median", size=3), "auto", (4, 4), 1) == "gather"
    for name in images:
        part = {t: v for t, v in got.items() if t.image_id == name}
        assert rel_err(assemble(part), scipy.signal.convolve2d(images[name], k, "same")) < 1e-12
    keys = sorted(tiles)
    batch = tile_batch(tiles, image_height=[grids[t.image].height for t in keys],
                       image_width=[grids[t.image].width for t in keys],
                       tile_height=[grids[t.image].tile_height for t in keys],
                       tile_width=[grids[t.image].tile_width for t in keys])
    params = {"operator": "convolve2d", "operator_params": {"kernel": k.tolist()}}
    emitted = pa.Table.from_batches(run_stage("tiles_emit", params, [batch]))
    # Gather ships the thin image's neighbours as strips; scatter ships target-sized partials.
    shapes = {(r["image_id"], r["x"], r["y"], r["source_x"], r["source_y"]): decode_tile(r["pixels"]).shape
              for r in emitted.to_pylist()}
    assert shapes[("thin", 16, 0, 0, 0)] == (16, 1)   # column 15 of tile (0, 0): target (16, 0)'s left halo
    assert shapes[("wide", 4, 0, 0, 0)] == (4, 4)
    # Each emitted row carries its image's tile size, so the reduce needs no tile-size params.
    ids = emitted.column("image_id").to_pylist()
    for c in ("tile_height", "tile_width"):
        assert emitted.column(c).to_pylist() == [getattr(grids[(i, 0)], c) for i in ids]
    reduced = run_stage("tiles_reduce", params, emitted.to_batches(max_chunksize=5))
    out = {}
    for b in reduced:
        out.update(batch_tiles(b))
    assert set(out) == set(got) and all(np.array_equal(out[t], got[t]) for t in got)


def test_tiles_of_one_image_with_two_tile_sizes_fail_in_the_emit_and_in_the_reduce():
    image = np.random.default_rng(5).standard_normal((8, 8))
    src = source_of(image, (4, 4))
    keys = sorted(src.tiles)
    sizes = [4, 4, 4, 2]  # the last tile claims another tile size
    batch = tile_batch(src.tiles, image_height=[8] * 4, image_width=[8] * 4, tile_height=sizes, tile_width=[4] * 4)
    params = {"operator": "convolve2d", "operator_params": {"kernel": np.ones((3, 3)).tolist()}}
    with pytest.raises(TileError, match=r"x=4, y=4\): has tile size 2x4 but other tiles of image 'img' \(z=0\) "
                                        "have 4x4; one image has one tile size"):
        run_stage("tiles_emit", params, [batch])
    # Apart in two emit streams (two partitions), the rows of a target they share disagree in the reduce.
    one = run_stage("tiles_emit", params, [batch.slice(0, 3)])
    two = run_stage("tiles_emit", params, [tile_batch({keys[3]: src.tiles[keys[3]]}, image_height=[8], image_width=[8],
                                           tile_height=[4], tile_width=[4])])
    assert two[0].column("tile_height").to_pylist()[0] == 4
    bad = pa.Table.from_batches(two).to_pylist()
    for r in bad:
        r["tile_height"] = 2
    with pytest.raises(TileError, match="has tile size 2x4 but other tiles of image 'img'"):
        run_stage("tiles_reduce", params, one + pa.Table.from_pylist(bad, schema=T.EMIT_SCHEMA).to_batches())


def test_stage_image_size_from_params_and_inferred():
    image = np.random.default_rng(3).standard_normal((10, 13))
    src = source_of(image, (4, 4))
    want = scipy.signal.convolve2d(image, np.ones((3, 3)), "same")
    params = {"operator": "convolve2d", "operator_params": {"kernel": np.ones((3, 3)).tolist()},
              "tile_height": 4, "tile_width": 4}
    em = run_stage("tiles_emit", {**params, "image_height": 10, "image_width": 13}, [tile_batch(src.tiles)])
    red = run_stage("tiles_reduce", params, em)
    assert rel_err(assemble(batch_tiles(red[0])), want) < 1e-12
    whole = run_stage("tiles", {k: v for k, v in params.items() if k.startswith("oper")}, [tile_batch(src.tiles)])
    assert rel_err(assemble(batch_tiles(whole[0])), want) < 1e-12


def test_stages_are_registered_and_describe_their_params():
    names = {s.name for s in registry.stages()}
    assert {"tiles", "tiles_emit", "tiles_reduce"} <= names
    d = registry.get("tiles_emit").describe()
    assert d["kind"] == "map" and registry.get("tiles_reduce").kind == "group"
    assert [p["name"] for p in d["params"]][:3] == ["operator", "operator_params", "strategy"]


def test_stage_errors():
    tiles = source_of(np.zeros((8, 8)), (4, 4)).tiles
    batch = tile_batch(tiles)
    emit = registry.get("tiles_emit")
    with pytest.raises(SchemaError, match="needs an input column 'pixels'"):
        emit.output_schema(batch.schema.remove(4), emit.resolve_params({"operator": "median"}))
    with pytest.raises(SchemaError, match="column 'x' must be of type int32 or int64, found double"):
        emit.output_schema(batch.schema.set(2, pa.field("x", pa.float64())),
                           emit.resolve_params({"operator": "median"}))
    with pytest.raises(InvalidParamsError, match="No operator named 'blur'"):
        emit.output_schema(batch.schema, emit.resolve_params({"operator": "blur"}))
    with pytest.raises(InvalidParamsError, match="'median' is not linear"):
        emit.output_schema(batch.schema, emit.resolve_params({"operator": "median", "strategy": "scatter"}))
    with pytest.raises(InvalidParamsError, match=r"Kernel 5x5 is larger than the 4x4 tiles; use tiles at least"):
        emit.output_schema(batch.schema, emit.resolve_params({"operator": "convolve2d", "tile_height": 4,
                                                              "tile_width": 4,
                                                              "operator_params": {"kernel": np.ones((5, 5)).tolist()}}))
    with pytest.raises(InvalidParamsError, match=r"needs radius >= 1 with the 4x4 tiles"):
        registry.get("tiles").output_schema(batch.schema, emit.resolve_params(
            {"operator": "median", "radius": 0, "tile_height": 4, "tile_width": 4}))
    with pytest.raises(InvalidParamsError, match="param 'tile_height': must be >= 1, or -1"):
        emit.resolve_params({"operator": "median", "tile_height": 0})
    with pytest.raises(InvalidParamsError, match="needs each image's size to know its edges"):
        run_stage("tiles_emit", {"operator": "median", "tile_height": 4, "tile_width": 4}, [batch])
    with pytest.raises(InvalidParamsError, match="needs the tile size"):
        run_stage("tiles_emit", {"operator": "median", "image_height": 8, "image_width": 8}, [batch])
    with pytest.raises(TileError, match=r"x=4, y=0\): appears twice in the input"):
        run_stage("tiles", {"operator": "median"}, [batch, tile_batch({TileKey("img", 0, 4, 0): np.zeros((4, 4))})])
    bad = batch.set_column(4, "pixels", pa.array([b"junk"] * batch.num_rows, pa.binary()))
    with pytest.raises(TileError, match=r"tile \(image 'img', z=0, x=0, y=0\): pixels are not valid \.npy"):
        run_stage("tiles", {"operator": "median"}, [bad])
    nulls = batch.set_column(2, "x", pa.array([None] + [0] * (batch.num_rows - 1), pa.int64()))
    with pytest.raises(InputError, match="Column 'x' has 1 null value"):
        run_stage("tiles", {"operator": "median"}, [nulls])
    params = {"operator": "median", "tile_height": 4, "tile_width": 4, "image_height": 8, "image_width": 8}
    em = run_stage("tiles_emit", params, [batch])
    with pytest.raises(TileError, match=r"reached target .* twice: the input holds duplicate tiles"):
        run_stage("tiles_reduce", params, em + em)


def test_emit_reduce_over_many_small_tiles():
    image = np.random.default_rng(0).standard_normal((160, 160)).astype(np.float32)
    src = source_of(image, (8, 8))
    params = {"operator": "convolve2d", "operator_params": {"kernel": [[1, 1], [1, 1]]}, "tile_height": 8,
              "tile_width": 8, "image_height": 160, "image_width": 160}
    red = run_stage("tiles_reduce", params, run_stage("tiles_emit", params, [tile_batch(src.tiles)]))
    want = scipy.signal.convolve2d(image, np.ones((2, 2)), "same")
    assert rel_err(assemble(batch_tiles(red[0])), want) < 1e-9


def emit_reduce(params, batches):
    emitted = run_stage("tiles_emit", params, batches)
    table = pa.Table.from_batches(emitted)
    # A reduce sees a target's rows in any order.
    table = table.take(np.random.default_rng(1).permutation(table.num_rows))
    got = {}
    for b in run_stage("tiles_reduce", params, table.to_batches(max_chunksize=5)):
        got.update(batch_tiles(b))
    return table, got


def stage_params(op, image, tile, **more):
    return {"operator": op, "tile_height": tile[0], "tile_width": tile[1], "image_height": image.shape[0],
            "image_width": image.shape[1], **more}


@pytest.mark.parametrize("dtype,low,high,radius", [(np.int16, -127, 127, 1), (np.int16, -30000, 30000, 2),
                                                   (np.uint16, 0, 65535, 1), (np.int8, -128, 127, 1),
                                                   (np.int32, -2**31, 2**31 - 1, 1)])
def test_emit_sums_integer_partials_per_target_exactly(dtype, low, high, radius):
    rng = np.random.default_rng(21)
    image = rng.integers(low, high, size=(23, 29, 2), endpoint=True).astype(dtype)
    src = source_of(image, (6, 7))
    want = reconstruct(src, "threshold_sum", radius=radius).tiles
    keys = sorted(src.tiles)
    batches = [tile_batch({k: src.tiles[k]}) for k in keys]  # one source per batch, as the Scala path sends
    params = stage_params("threshold_sum", image, (6, 7), radius=radius)
    table, got = emit_reduce(params, batches)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype
        np.testing.assert_array_equal(got[k], want[k])
    # Every (source, target) pair still has its row, but only one row per target carries pixels.
    pairs = sum(len(reconstruct(src, "threshold_sum", radius=radius).plan.fanout[k]) for k in keys)
    sizes = np.array([len(v) for v in table.column("pixels").to_pylist()])
    assert table.num_rows == pairs
    assert (sizes > 0).sum() == len(want)
    plain, _ = emit_reduce({**params, "combine_mb": 0}, batches)
    assert plain.num_rows == pairs and all(len(v) > 0 for v in plain.column("pixels").to_pylist())


def test_emit_sends_sums_in_the_narrowest_dtype_the_reduce_reads_alike():
    image = np.random.default_rng(4).integers(-127, 20, size=(12, 12)).astype(np.int16)
    src = source_of(image, (4, 4))
    params = stage_params("threshold_sum", image, (4, 4))
    table, got = emit_reduce(params, [tile_batch(src.tiles)])
    sent = [decode_tile(v) for v in table.column("pixels").to_pylist() if v]
    # Up to 9 values in [-127, 20] sum into int16; all of them into int16 too, never int8 here.
    assert {a.dtype for a in sent} <= {np.dtype(np.int16), np.dtype(np.int8)}
    big = (image.astype(np.int64) * 200).clip(-32768, 32767).astype(np.int16)
    table_big, got_big = emit_reduce(params, [tile_batch(source_of(big, (4, 4)).tiles)])
    assert np.dtype(np.int32) in {decode_tile(v).dtype for v in table_big.column("pixels").to_pylist() if v}
    for img, out in ((image, got), (big, got_big)):
        want = reconstruct(source_of(img, (4, 4)), "threshold_sum").tiles
        assert all(out[k].dtype == np.int64 and np.array_equal(out[k], want[k]) for k in want)


@pytest.mark.parametrize("strategy", ["scatter", "gather"])
def test_output_dtype_casts_exactly_in_process_and_through_the_stages(strategy):
    image = np.random.default_rng(8).integers(-3000, 3000, size=(23, 29, 2)).astype(np.int16)
    src = source_of(image, (6, 7), drop=[TileKey("img", 0, 7, 6)])
    want = reconstruct(src, "threshold_sum", strategy=strategy, threshold=1000).tiles
    assert {a.dtype for a in want.values()} == {np.dtype(np.int64)}
    params = stage_params("threshold_sum", image, (6, 7), strategy=strategy, operator_params={"threshold": 1000})
    for dtype in ("int32", "int16"):
        core = reconstruct(src, "threshold_sum", strategy=strategy, threshold=1000, output_dtype=dtype).tiles
        _, staged = emit_reduce({**params, "output_dtype": dtype}, [tile_batch(src.tiles)])
        grouped = batch_tiles(next(iter(run_stage("tiles", {**params, "output_dtype": dtype},
                                                  [tile_batch(src.tiles)]))))
        for got in (core, staged, grouped):
            assert set(got) == set(want)
            for k in want:
                assert got[k].dtype == np.dtype(dtype), (k, got[k].dtype)
                np.testing.assert_array_equal(got[k], want[k])
    # Sums of up to 9 values in -3000..1000 do not fit int8: the error names a tile and the range.
    with pytest.raises(TileError, match=r"tile \(image 'img'.*outside output_dtype int8 \(-128\.\.127\)"):
        reconstruct(src, "threshold_sum", strategy=strategy, threshold=1000, output_dtype="int8")
    with pytest.raises(TileError, match="outside output_dtype int8"):
        emit_reduce({**params, "output_dtype": "int8"}, [tile_batch(src.tiles)])


def test_partials_added_in_the_output_dtype_only_when_no_sum_can_leave_it():
    rng = np.random.default_rng(12)
    key = TileKey("i", 0, 0, 0)
    cases = [([np.int16] * 9, "int32", True), ([np.uint16] * 4, "uint32", True), ([np.int8] * 3, "int16", True),
             ([np.int16, np.int32], "int32", False), ([np.int16] * 2, "int16", False),
             ([np.uint8], "uint16", True), ([np.int8], "uint16", False)]
    for dtypes, want, fits in cases:
        parts = [rng.integers(np.iinfo(d).min, np.iinfo(d).max, size=(7, 5), endpoint=True).astype(d)
                 for d in dtypes]
        parts[0][0, 0] = np.iinfo(dtypes[0]).max  # the bound itself is reached
        assert T._sum_fits([p.dtype for p in parts], np.dtype(want)) == fits, (dtypes, want)
        # Added in the output dtype exactly when it fits, else in the sum dtype and cast (checked) after.
        assert T.combine_as(parts, T._sum_dtype(parts[0].dtype), want).dtype == (np.dtype(want) if fits else
                                                                                  T._sum_dtype(parts[0].dtype))
        total = T._sum_dtype(parts[0].dtype)  # the operator's dtype for threshold_sum
        slow = combine(parts, total)
        if not (np.iinfo(want).min <= slow.min() and slow.max() <= np.iinfo(want).max):
            with pytest.raises(TileError, match=f"outside output_dtype {want}"):
                cast_output(key, T.combine_as(parts, total, want), want)
            continue
        got = cast_output(key, T.combine_as(parts, total, want), want)
        assert got.dtype == np.dtype(want)
        np.testing.assert_array_equal(got, slow)
    # A float output (or the operator's dtype) never takes the integer path.
    f = [rng.standard_normal((3, 3))]
    assert T.combine_as(f, np.float64, "float32").dtype == np.float64
    assert T.combine_as([np.ones((2, 2), np.int16)] * 2, np.int64, "operator").dtype == np.int64


def test_output_dtype_for_float_results_and_bad_values():
    image = np.random.default_rng(9).standard_normal((12, 14))
    src = source_of(image, (5, 5))
    k = np.array([[1.0, 2.0], [0.5, -1.0]])
    want = reconstruct(src, "convolve2d", kernel=k).tiles
    got = reconstruct(src, "convolve2d", kernel=k, output_dtype="float32").tiles
    for key in want:
        assert got[key].dtype == np.float32
        np.testing.assert_array_equal(got[key], want[key].astype(np.float32))
    with pytest.raises(TileError, match="float output .* output_dtype is int32"):
        reconstruct(src, "convolve2d", kernel=k, output_dtype="int32")
    with pytest.raises(InvalidParamsError, match="output_dtype must be one of"):
        reconstruct(src, "convolve2d", kernel=k, output_dtype="int12")
    with pytest.raises(InvalidParamsError, match="output_dtype must be one of"):
        cast_output(next(iter(want)), np.zeros((2, 2), np.int64), "int12")
    with pytest.raises(InvalidParamsError, match="'output_dtype' must be one of"):
        registry.get("tiles_emit").resolve_params({"operator": "median", "output_dtype": "complex128"})
    assert registry.get("tiles_reduce").resolve_params({"operator": "median"})["output_dtype"] == "operator"
    ints = source_of(np.arange(30, dtype=np.int16).reshape(5, 6), (3, 3))
    with pytest.raises(TileError, match="integer output .* output_dtype is float32"):
        reconstruct(ints, "threshold_sum", output_dtype="float32")


def test_emit_leaves_float_partials_alone():
    rng = np.random.default_rng(5)
    image = rng.standard_normal((17, 19))
    kernel = [[1, -2, 3], [4, 5, -6], [7, 8, 9]]
    params = stage_params("convolve2d", image, (5, 6), operator_params={"kernel": kernel})
    src = source_of(image, (5, 6))
    table, got = emit_reduce(params, [tile_batch(src.tiles)])
    # Float sums depend on their order: each partial travels alone and the reduce adds them as in-process.
    assert all(len(v) > 0 for v in table.column("pixels").to_pylist())
    want = reconstruct(src, "convolve2d", kernel=np.array(kernel, float)).tiles
    assert all(np.array_equal(got[k], want[k]) for k in want)


def combiner_rows(op, src, grid, budget):
    comb = T._Combiner(op, budget)
    rows, most = [], 0
    for s in sorted(src.tiles):
        for t, p in op.partials(s, src.tiles[s], T.neighbourhood(s, grid, 1), grid).items():
            pushed = comb.add(t, grid.shape_at(t.x, t.y), s, p)
            assert pushed is not None
            rows += pushed
            most = max(most, comb.bytes)
    for sent in comb.drain():
        rows += sent
    assert comb.bytes == 0 and not comb.held
    sums = {}
    for t, _, s, arr in rows:
        if arr is not None:
            sums.setdefault(t, []).append(arr)
    return rows, sums, most


def test_combiner_sums_integer_convolution_partials_exactly():
    # Integer kernels (in-process; the stages take kernels as floats) give int64 partials that wrap
    # as scipy's: their sums wrap alike in any order.
    rng = np.random.default_rng(6)
    image = rng.integers(-2**62, 2**62, size=(15, 16), dtype=np.int64)
    op = T.get_operator("convolve2d", kernel=np.array([[3, -1], [2, 7]]))
    src, grid = source_of(image, (5, 4)), Grid(15, 16, 5, 4)
    want = reconstruct(src, op).tiles
    rows, sums, _ = combiner_rows(op, src, grid, 1 << 20)
    assert len(sums) == len(want) < len(rows)
    assert all(np.array_equal(combine(sums[t], np.int64), want[t]) for t in want)


def test_combiner_holds_at_most_its_budget_and_stays_exact():
    rng = np.random.default_rng(8)
    image = rng.integers(-5000, 5000, size=(40, 40)).astype(np.int16)
    grid = Grid(40, 40, 8, 8)
    op = T.get_operator("threshold_sum", threshold=1000)
    src = source_of(image, (8, 8))
    want = reconstruct(src, op).tiles
    budget = 3 * 8 * 8 * 4  # three int32 sums of 8x8
    rows, sums, most = combiner_rows(op, src, grid, budget)
    assert most <= budget
    # Evictions split some targets' sums over several rows; adding them gives the target.
    assert max(len(v) for v in sums.values()) > 1
    for t, parts in sums.items():
        np.testing.assert_array_equal(combine(parts, np.int64), want[t])


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.uint8, np.uint16, np.uint32, np.bool_])
def test_combiner_keeps_sums_in_the_dtype_their_bounds_need_and_widens_exactly(dtype):
    rng = np.random.default_rng(14)
    op = T.get_operator("convolve2d", kernel=np.ones((1, 1)))  # any linear operator: add() only sums
    target, shape = TileKey("i", 0, 0, 0), (6, 5)
    info = np.iinfo(dtype) if dtype is not np.bool_ else np.iinfo(np.uint8)
    hi = 1 if dtype is np.bool_ else info.max
    # Partials at the dtype's extremes: each added one can push the bounds past the sum's dtype.
    parts = [rng.integers(info.min, hi, size=shape, endpoint=True).astype(dtype) for _ in range(5)]
    parts[1][:] = hi
    comb = T._Combiner(op, 1 << 20)
    sizes = []
    for i, p in enumerate(parts):
        assert comb.add(target, shape, TileKey("i", 0, i, 0), p) == []
        acc = comb.held[target][0]
        sizes.append(acc.dtype.itemsize)
        assert comb.bytes == acc.nbytes
        np.testing.assert_array_equal(acc, np.sum(np.stack(parts[:i + 1]), axis=0))  # exact all along
    assert sizes == sorted(sizes)  # widened only, and only when the bounds asked for it
    if dtype is not np.bool_:
        assert sizes[0] == np.dtype(dtype).itemsize < sizes[-1]
    else:
        assert sizes == [1] * 5  # 0/1 values: int8 holds five of them
    (sent,) = [rows for rows in comb.drain()]
    assert comb.bytes == 0 and not comb.held
    total = np.sum(np.stack(parts), axis=0)
    arr = sent[0][3]
    np.testing.assert_array_equal(arr, total)
    assert arr.dtype.kind == total.dtype.kind and T._sum_dtype(arr.dtype) == total.dtype
    assert [r[2] for r in sent] == [TileKey("i", 0, i, 0) for i in range(5)] and all(r[3] is None for r in sent[1:])


def test_combiner_sends_a_sum_as_narrow_as_its_values_when_its_bounds_are_wide():
    op = T.get_operator("threshold_sum", threshold=40000)
    target, shape = TileKey("i", 0, 0, 0), (4, 4)
    p = np.arange(-30000, 30000, 3750, dtype=np.int16).reshape(shape)
    comb = T._Combiner(op, 1 << 20)
    comb.add(target, shape, TileKey("i", 0, 0, 0), p)
    comb.add(target, shape, TileKey("i", 0, 1, 0), -p)  # bounds -60000..60000: kept in int32
    assert comb.held[target][0].dtype == np.int32
    (sent,) = list(comb.drain())
    assert sent[0][3].dtype == np.int8 and not sent[0][3].any()  # every sum is 0


def test_emit_finish_yields_a_batch_per_target_sum():
    image = np.random.default_rng(3).integers(-127, 20, size=(12, 12, 2)).astype(np.int16)
    src = source_of(image, (4, 4))
    params = registry.get("tiles_emit").resolve_params(stage_params("threshold_sum", image, (4, 4)))
    emit = registry.get("tiles_emit").open(params)
    assert emit.process(tile_batch(src.tiles)).num_rows == 0  # every partial is held for its sum
    pieces = list(registry.finish_results(emit))
    assert len(pieces) == 9
    for b in pieces:
        targets = set(zip(b.column("x").to_pylist(), b.column("y").to_pylist()))
        assert len(targets) == 1 and sum(len(v) > 0 for v in b.column("pixels").to_pylist()) == 1


def test_user_linear_operator_with_its_own_integer_dtype_is_not_summed_in_the_emit():
    T.register_operator("ident_int", lambda r: r.copy(), linear=True, halo=1, replace=True)
    image = np.random.default_rng(2).integers(-100, 100, size=(9, 9)).astype(np.int16)
    src = source_of(image, (3, 3))
    params = stage_params("ident_int", image, (3, 3), radius=1)
    table, got = emit_reduce(params, [tile_batch(src.tiles)])
    # Its output dtype is its partials' (int16): a sum sent narrower or wider would change it.
    assert all(len(v) > 0 for v in table.column("pixels").to_pylist())
    want = reconstruct(src, "ident_int", radius=1).tiles
    assert all(got[k].dtype == np.int16 and np.array_equal(got[k], want[k]) for k in want)


def test_duplicate_tiles_in_two_emit_streams_still_fail_in_the_reduce():
    image = np.arange(64, dtype=np.int16).reshape(8, 8)
    src = source_of(image, (4, 4))
    params = stage_params("threshold_sum", image, (4, 4))
    dup = TileKey("img", 0, 4, 4)
    first = run_stage("tiles_emit", params, [tile_batch(src.tiles)])
    second = run_stage("tiles_emit", params, [tile_batch({dup: src.tiles[dup]})])
    with pytest.raises(TileError, match=r"x=4, y=4\): reached target .* twice: the input holds duplicate"):
        run_stage("tiles_reduce", params, first + second)


def test_tiles_stages_do_not_import_pandas():
    # pyarrow's pa.array imports pandas on first use: ~0.5 s in every fresh Spark Python worker
    # and ferry worker.
    code = """
import sys, numpy as np
from ferry import registry
import ferry.stages.tiles as T
image = np.arange(12 * 12, dtype=np.int16).reshape(12, 12)
src = T.MemorySource.from_images({"a": image}, (4, 4))
keys = sorted(src.tiles)
batch = T._tile_batch([(k, src.tiles[k]) for k in keys])
for op in ("threshold_sum", "median"):
    p = registry.get("tiles_emit").resolve_params({"operator": op, "tile_height": 4, "tile_width": 4,
                                                   "image_height": 12, "image_width": 12})
    emit = registry.get("tiles_emit").open(p)
    out = [b for b in (emit.process(batch), *registry.finish_results(emit)) if b is not None and b.num_rows]
    reduce = registry.get("tiles_reduce").open(p)
    for b in out:
        reduce.process(b)
    assert reduce.finish().num_rows == 9
    # The worker answers a batch the stage held back (None) with an empty batch of its schema.
    from ferry.worker.server import _as_batch
    held = _as_batch(registry.get("tiles_reduce").open(p).process(out[0]), T.TILE_SCHEMA, "tiles_reduce")
    assert held.num_rows == 0 and held.schema.equals(T.TILE_SCHEMA)
print("pandas" in sys.modules)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_tiles_stages_through_a_real_worker(client):
    rng = np.random.default_rng(13)
    image = rng.standard_normal((20, 27))
    src = source_of(image, (8, 8))
    batch = tile_batch(src.tiles)
    params = {"operator": "median", "operator_params": {"size": 3}, "tile_height": 8, "tile_width": 8,
              "image_height": 20, "image_width": 27}
    emitted = client.run_table("tiles_emit", params, batch)
    reduced = client.run_table("tiles_reduce", params, emitted)
    got = batch_tiles(reduced.combine_chunks().to_batches()[0])
    np.testing.assert_array_equal(assemble(got), scipy.ndimage.median_filter(image, size=3, mode="constant"))
    bad = batch.set_column(4, "pixels", pa.array([b"junk"] * batch.num_rows, pa.binary()))
    with pytest.raises(InputError, match=r"tile \(image 'img', z=0, x=0, y=0\): pixels are not valid \.npy bytes"):
        client.run_table("tiles", {"operator": "median"}, bad)
