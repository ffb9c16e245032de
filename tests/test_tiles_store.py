"""The Parquet tile store: round trips, metadata without pixel bytes, validation, image files, output."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import scipy.signal

from ferry.errors import InputError, InvalidParamsError
from ferry.stages import tiles as T
from ferry.stages.tiles import Grid, TileError, TileKey, assemble, encode_tile, reconstruct
from ferry.tiles_store import (METADATA_COLUMNS, SCHEMA, TileStore, TileStoreWriter, read_output, write_image_files,
                               write_images, write_output, write_tiles)


def images(rng):
    return {
        "f64": rng.standard_normal((37, 50)),
        "f32": rng.standard_normal((16, 16)).astype(np.float32),
        "i16x4": rng.integers(-127, 127, size=(21, 40, 4)).astype(np.int16),
        ("u8", 2): rng.integers(0, 255, size=(9, 5)).astype(np.uint8),
    }


def test_round_trip_of_images_of_many_dtypes(tmp_path):
    imgs = images(np.random.default_rng(0))
    store = write_images(tmp_path / "t.parquet", imgs, (8, 16), row_group_bytes=3000)
    assert store._file.num_row_groups > 3
    assert set(store.grids) == {("f64", 0), ("f32", 0), ("i16x4", 0), ("u8", 2)}
    assert store.grids[("f64", 0)] == Grid(37, 50, 8, 16)
    for name, image in imgs.items():
        img = name if isinstance(name, tuple) else (name, 0)
        keys = [k for k in store.keys() if k.image == img]
        assert len(keys) == len(store.grids[img].offsets())
        tiles = dict(store.read_many(keys))
        assert all(t.dtype == image.dtype for t in tiles.values())
        np.testing.assert_array_equal(assemble(tiles), image)
    assert store.keys() == sorted(store.keys())


@pytest.mark.parametrize("limit_tiles, per_group", [(1, 1), (2, 2), (2.5, 2), (3.99, 3), (0.5, 1)])
def test_row_groups_hold_at_most_row_group_bytes_of_pixels(tmp_path, limit_tiles, per_group):
    # 10 tiles of 8x8 float64 (.npy: 512 bytes of pixels + the header); a tile over the limit
    # gets a row group of its own.
    tile_bytes = len(T.encode_tile(np.zeros((8, 8))))
    image = np.random.default_rng(7).standard_normal((16, 40))
    store = write_images(tmp_path / "t.parquet", {"a": image}, (8, 8), row_group_bytes=int(limit_tiles * tile_bytes))
    meta = store._file.metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sum(sizes) == 10 and max(sizes) == per_group and all(n == per_group for n in sizes[:-1]), sizes
    np.testing.assert_array_equal(assemble(dict(store.read_many(store.keys()))), image)


def test_a_job_over_the_store_reads_each_tile_once(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.standard_normal((45, 38))
    store = write_images(tmp_path / "t.parquet", {"a": image, "b": image[:20]}, (10, 10), row_group_bytes=2000)
    reads = []
    inner = store.read_many
    store.read_many = lambda keys: ((reads.append(k), (k, t))[1] for k, t in inner(keys))
    k = rng.standard_normal((5, 4))
    job = reconstruct(store, "convolve2d", kernel=k)
    assert job.reads == len(reads) == len(set(reads)) == len(store.keys()) == 20 + 8
    a = {key: t for key, t in job.tiles.items() if key.image_id == "a"}
    assert np.abs(assemble(a) - scipy.signal.convolve2d(image, k, "same")).max() < 1e-12


def test_metadata_queries_read_no_pixel_bytes(tmp_path):
    rng = np.random.default_rng(2)
    # Incompressible 64x64 float64 tiles: each row group's pixel chunk dwarfs the metadata.
    store = write_images(tmp_path / "t.parquet", {"a": rng.standard_normal((320, 256)),
                                                  "b": rng.standard_normal((130, 70))}, (64, 64),
                         row_group_bytes=200_000)
    store = TileStore(store.path, count_bytes=True)
    pixel_bytes = sum(n for _, n in store.pixel_column_ranges())
    assert store._file.num_row_groups >= 4 and pixel_bytes > 500_000
    store.reset_counts()
    meta = store.metadata()
    assert meta.column_names == list(METADATA_COLUMNS) and meta.num_rows == 20 + 6
    assert store.pixel_bytes_read() == 0
    assert store.bytes_read < pixel_bytes / 20
    # The seed's query, "x > 99", answered from metadata alone.
    hits = store.metadata(filter=pc.field("x") > 99)
    assert sorted(zip(hits.column("image_id").to_pylist(), hits.column("x").to_pylist())) == \
        [("a", 128)] * 5 + [("a", 192)] * 5
    assert store.pixel_bytes_read() == 0
    # ...and the counter does see pixel reads: one tile costs about its row group's pixels.
    store.read(TileKey("a", 0, 64, 64))
    assert 64 * 64 * 8 <= store.pixel_bytes_read() < pixel_bytes / 2
    with pytest.raises(InvalidParamsError, match="metadata\\(\\) reads metadata only"):
        store.metadata(["x", "pixels"])
    store.close()


def test_metadata_projection_in_plain_pyarrow(tmp_path):
    store = write_images(tmp_path / "t.parquet", {"a": np.zeros((40, 40))}, (8, 8))
    table = pq.read_table(store.path, columns=["image_id", "x", "y"])
    assert table.column_names == ["image_id", "x", "y"] and table.num_rows == 25


def test_pixels_are_stored_plain_not_in_a_dictionary(tmp_path):
    # Distinct tiles dictionary-encoded would all sit in one dictionary page per row group,
    # which Spark's reader decodes whole and copies each tile out of again.
    rng = np.random.default_rng(0)
    store = write_images(tmp_path / "t.parquet", {"a": rng.standard_normal((40, 40))}, (8, 8))
    md = pq.ParquetFile(store.path).metadata
    pixels = md.schema.names.index("pixels")
    for g in range(md.num_row_groups):
        col = md.row_group(g).column(pixels)
        assert not col.has_dictionary_page and "RLE_DICTIONARY" not in col.encodings, col.encodings
    assert md.row_group(0).column(md.schema.names.index("image_id")).has_dictionary_page


def test_store_without_count_bytes_refuses_to_count(tmp_path):
    store = write_images(tmp_path / "t.parquet", {"a": np.zeros((8, 8))}, (8, 8))
    with pytest.raises(InvalidParamsError, match="count_bytes=True"):
        store.bytes_read


def test_writer_rejects_duplicates_and_mismatches(tmp_path):
    grid = Grid(16, 16, 8, 8)
    with TileStoreWriter(tmp_path / "a.parquet") as w:
        w.add_tile(TileKey("a", 0, 0, 0), np.zeros((8, 8)), grid)
        with pytest.raises(TileError, match=r"tile \(image 'a', z=0, x=0, y=0\): is written twice: duplicate"):
            w.add_tile(TileKey("a", 0, 0, 0), np.zeros((8, 8)), grid)
        with pytest.raises(TileError, match=r"x=8, y=0\): has dtype float32, 2-D but tile \(image 'a', z=0, x=0, "
                                            r"y=0\) of the same image has dtype float64"):
            w.add_tile(TileKey("a", 0, 8, 0), np.zeros((8, 8), np.float32), grid)
        with pytest.raises(TileError, match=r"x=8, y=8\): has 8x5 pixels but its cell of the grid \(16x16 pixels "
                                            r"in 8x8 tiles\) is 8x8"):
            w.add_tile(TileKey("a", 0, 8, 8), np.zeros((8, 5)), grid)
        with pytest.raises(TileError, match=r"x=0, y=8\): comes with grid 17x16 .* but its image was written with "
                                            r"16x16"):
            w.add_tile(TileKey("a", 0, 0, 8), np.zeros((8, 8)), Grid(17, 16, 8, 8))
    with pytest.raises(TileError, match=r"x=4, y=0\): has 4x3 pixels but its cell of the grid \(4x8 pixels in 4x4 "
                                        r"tiles\) is 4x4"):
        write_tiles(tmp_path / "b.parquet", {TileKey("b", 0, 0, 0): np.zeros((4, 4)),
                                             TileKey("b", 0, 4, 0): np.zeros((4, 3)),
                                             TileKey("b", 0, 8, 0): np.zeros((4, 4))},
                    grids={("b", 0): Grid(4, 8, 4, 4)})
    with pytest.raises(InputError, match=r"Image 'c' has shape \(4,\); an image is \(rows, cols\)"):
        write_images(tmp_path / "c.parquet", {"c": np.zeros(4)}, (2, 2))


def test_loose_tiles_with_some_missing(tmp_path):
    tiles = T.cut_tiles(np.arange(120.0).reshape(10, 12), Grid(10, 12, 4, 5), "a")
    del tiles[TileKey("a", 0, 5, 4)]
    store = write_tiles(tmp_path / "t.parquet", tiles, grids={("a", 0): Grid(10, 12, 4, 5)})
    assert len(store.keys()) == 8 and not store.exists(TileKey("a", 0, 5, 4))
    with pytest.raises(TileError, match=r"x=5, y=4\): is not in the store"):
        store.read(TileKey("a", 0, 5, 4))
    job = reconstruct(store, "median", size=3)
    assert job.reads == 8 and len(job.tiles) == 9


def handmade_store(path, rows):
    """A Parquet file with the store's columns written by hand, as another tool might."""
    cols = {name: [r[name] for r in rows] for name in SCHEMA.names}
    pq.write_table(pa.table(cols, schema=SCHEMA), path)
    return path


def row(x, y, tile, image_id="a", grid=(8, 8, 4, 4), pixels=None):
    return {"image_id": image_id, "z": 0, "x": x, "y": y, "height": tile.shape[0], "width": tile.shape[1],
            "channels": tile.shape[2] if tile.ndim == 3 else 0, "dtype": tile.dtype.str,
            "image_height": grid[0], "image_width": grid[1], "tile_height": grid[2], "tile_width": grid[3],
            "pixels": encode_tile(tile) if pixels is None else pixels}


def test_opening_a_store_checks_it(tmp_path):
    z = np.zeros((4, 4))
    with pytest.raises(TileError, match=r"x=4, y=0\): appears twice in .* \(rows 1 and 2\): duplicate tile"):
        TileStore(handmade_store(tmp_path / "d.parquet", [row(0, 0, z), row(4, 0, z), row(4, 0, z)]))
    with pytest.raises(TileError, match=r"x=4, y=0\): has dtype int16 and no channels but .* has float64"):
        TileStore(handmade_store(tmp_path / "t.parquet", [row(0, 0, z), row(4, 0, z.astype(np.int16))]))
    with pytest.raises(TileError, match=r"x=4, y=0\): says its image is 9x8 pixels .* other tiles of it say 8x8"):
        TileStore(handmade_store(tmp_path / "g.parquet", [row(0, 0, z), row(4, 0, z, grid=(9, 8, 4, 4))]))
    with pytest.raises(TileError, match=r"x=4, y=0\): has 4x3 pixels but its cell"):
        TileStore(handmade_store(tmp_path / "s.parquet", [row(0, 0, z), row(4, 0, z[:, :3])]))
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(InputError, match="is not a tile store: it lacks the column"):
        TileStore(tmp_path / "other.parquet")


def test_corrupt_pixels_in_a_store_name_the_tile(tmp_path):
    z = np.zeros((4, 4))
    path = handmade_store(tmp_path / "c.parquet", [row(0, 0, z), row(4, 0, z, pixels=encode_tile(z)[:-8])])
    store = TileStore(path)
    assert store.read(TileKey("a", 0, 0, 0)).shape == (4, 4)
    with pytest.raises(TileError, match=r"tile \(image 'a', z=0, x=4, y=0\): pixels are not valid \.npy bytes"):
        store.read(TileKey("a", 0, 4, 0))
    path = handmade_store(tmp_path / "m.parquet", [row(0, 0, z, pixels=encode_tile(np.zeros((4, 4), np.float32)))])
    with pytest.raises(TileError, match=r"x=0, y=0\): pixels are \(4, 4\) of float32 but its metadata says"):
        TileStore(path).read(TileKey("a", 0, 0, 0))


def test_store_batches_feed_the_stages(tmp_path):
    from ferry import registry

    rng = np.random.default_rng(4)
    image = rng.standard_normal((30, 20)).astype(np.float32)
    store = write_images(tmp_path / "t.parquet", {"a": image}, (8, 8), row_group_bytes=1000)
    params = {"operator": "convolve2d", "operator_params": {"kernel": [[1, 2], [3, 4]]},
              "tile_height": 8, "tile_width": 8}
    emit, red = registry.get("tiles_emit"), registry.get("tiles_reduce")
    e = emit.open(emit.resolve_params(params))
    r = red.open(red.resolve_params(params))
    for b in store.to_batches():
        r.process(e.process(b))
    out = r.finish()
    tiles = {TileKey("a", 0, x, y): T.decode_tile(p.as_buffer()) for x, y, p in
             zip(out.column("x").to_pylist(), out.column("y").to_pylist(), out.column("pixels"))}
    want = scipy.signal.convolve2d(image, np.array([[1, 2], [3, 4]], float), "same")
    assert np.abs(assemble(tiles) - want).max() < 1e-9


# --- Image files --------------------------------------------------------------------------------------

def test_png_files(tmp_path):
    from PIL import Image  # the test extra installs pillow
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 255, size=(23, 31, 3)).astype(np.uint8)
    gray16 = rng.integers(0, 65535, size=(17, 9)).astype(np.uint16)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(gray16).save(tmp_path / "gray.png")
    store = write_image_files(tmp_path / "t.parquet", {"rgb": tmp_path / "rgb.png", "gray": tmp_path / "gray.png"},
                              (8, 8))
    for name, image in (("rgb", rgb), ("gray", gray16)):
        tiles = dict(store.read_many(k for k in store.keys() if k.image_id == name))
        got = assemble(tiles)
        assert got.dtype == image.dtype
        np.testing.assert_array_equal(got, image)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_tiff_files(tmp_path, compression):
    import tifffile  # the test extra installs it
    rng = np.random.default_rng(6)
    f32 = rng.standard_normal((40, 33)).astype(np.float32)
    i16 = rng.integers(-1000, 1000, size=(12, 20, 4)).astype(np.int16)
    tifffile.imwrite(tmp_path / "f32.tif", f32, compression=compression)
    tifffile.imwrite(tmp_path / "i16.tiff", i16, compression=compression, photometric="minisblack",
                     planarconfig="contig")
    store = write_image_files(tmp_path / "t.parquet", {"f32": tmp_path / "f32.tif", "i16": tmp_path / "i16.tiff"},
                              (16, 16))
    for name, image in (("f32", f32), ("i16", i16)):
        got = assemble(dict(store.read_many(k for k in store.keys() if k.image_id == name)))
        assert got.dtype == image.dtype
        np.testing.assert_array_equal(got, image)


# --- Output grouped by image --------------------------------------------------------------------------

@pytest.mark.parametrize("codec", ["zstd", "npz"])
def test_output_is_compressed_and_grouped_by_image(tmp_path, codec):
    rng = np.random.default_rng(7)
    src = T.MemorySource.from_images({"one": rng.standard_normal((20, 30)),
                                      "two/with slash": rng.integers(-99, 99, size=(9, 9, 4)).astype(np.int16)},
                                     (8, 8))
    job = reconstruct(src, "threshold_sum")
    out = tmp_path / "out"
    n = write_output(out, T.iter_reconstruct(src, "threshold_sum"), codec=codec, batch_rows=3)
    assert n == len(job.tiles) == 12 + 4
    dirs = sorted(os.listdir(out))
    assert len(dirs) == 2 and all(d.startswith("image_id=") for d in dirs)
    back = read_output(out)
    assert set(back) == set(job.tiles)
    for k, v in job.tiles.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)
    only = read_output(out, "two/with slash")
    assert {k.image_id for k in only} == {"two/with slash"} and len(only) == 4
    table = pq.read_table(out)
    assert set(table.column("codec").to_pylist()) == {codec}


def test_write_output_raises_the_error_of_its_tiles_after_the_writer_stops(tmp_path):
    # The writer pulls the tiles from its own threads; an operator's error must still reach the
    # caller as itself (and the process must not abort at exit, which a subprocess checks).
    boom = TileError(TileKey("a", 0, 16, 0), "corrupt bytes")

    def tiles():
        for i in range(5):
            yield TileKey("a", 0, 16 * i, 0), np.full((4, 4), i, dtype=np.int16)
        raise boom

    with pytest.raises(TileError) as e:
        write_output(str(tmp_path / "out"), tiles(), batch_rows=2)
    assert e.value is boom
    code = ("import numpy as np, sys; from ferry.tiles_store import write_output; from ferry.stages.tiles import TileKey\n"
            "def t():\n    yield TileKey('a', 0, 0, 0), np.zeros((4, 4))\n    raise ValueError('stop')\n"
            "try:\n    write_output(sys.argv[1], t())\nexcept ValueError as e:\n    sys.exit(f'failed: {e}')\n")
    import subprocess
    import sys
    for _ in range(5):
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "sub")], capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == "failed: stop", proc.stderr
