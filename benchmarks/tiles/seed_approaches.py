#!/usr/bin/env python
"""The tile-reconstruction notebook's three approaches (shared/seeds/tile-reconstruction-notebook.txt),
as close to the seed as runs today:

    python seed_approaches.py APPROACH IMAGES IM_SIZE TILE_SIZE TIMES_JSON     APPROACH: naive|grouped|partial

Changed only so that it runs and can be measured: the delays are 0; ``stack`` uses np.stack
(``np.vstack(map(...))`` fails on numpy 2); a SparkContext is made (the notebook had one);
``pull_input_tile`` counts its calls in an accumulator. Everything else is the seed's, its
edge check included (it reads tiles at x or y equal to the image size).
"""
import json
import sys
import time
from collections import namedtuple

import numpy as np
import pyspark

approach, images, size, tile, times_path = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4]), \
    sys.argv[5]
sc = pyspark.SparkContext(conf=pyspark.SparkConf().setMaster("local[2]").setAppName(f"seed-{approach}")
                          .set("spark.ui.enabled", "false"))
sc.setLogLevel("ERROR")
READS = sc.accumulator(0)

tile_id = namedtuple('tile_id', ['img_id', 'z', 'x', 'y', 'type'])
tile_item = namedtuple('tile_item', ['request', 'target_tile_id', 'source_tile_id', 'source_tile_data', 'out_tile_data'])

IM_W, IM_H = size, size
TILE_W, TILE_H = tile, tile


def stack(arr_list, axis=0):
    assert axis == 0, "Only works for axis 0"
    return np.stack(list(arr_list), 0)


def get_output_tiles(req_str):
    return [(req_str, tile_id(req_str, -1, x, y, "out")) for x in np.arange(0, IM_W, TILE_W)
            for y in np.arange(0, IM_H, TILE_H)]


def calc_input_tiles(o_tile, n_size=1, delay=0):
    time.sleep(delay)
    return [(o_tile, o_tile._replace(type="in", x=ix, y=iy))
            for ix in np.arange(o_tile.x - n_size * TILE_W, o_tile.x + (n_size + 1) * TILE_W, TILE_W) if ix >= 0
            for iy in np.arange(o_tile.y - n_size * TILE_H, o_tile.y + (n_size + 1) * TILE_H, TILE_H) if iy >= 0]


def pull_input_tile(i_tile, delay=0):
    assert i_tile.type.find("in") == 0
    time.sleep(delay)
    READS.add(1)
    np.random.seed(i_tile.__hash__() % 4294967295)
    return np.random.uniform(-127, 127, size=(TILE_W, TILE_H, 4)).astype(np.int16)


RECON_TIME = 0


def partial_reconstruction(src_tile, targ_tile, tile_data, delay=RECON_TIME):
    time.sleep(delay)
    out_data = tile_data.copy()
    out_data[out_data > 20] = 0
    return out_data


def combine_reconstructions(many_slices):
    return np.sum(stack(many_slices, 0), 0)


def full_reconstruction(src_tiles, pr_delay=RECON_TIME / 2):
    out_images = [partial_reconstruction(src.source_tile_id, src.target_tile_id, src.source_tile_data,
                                         delay=pr_delay) for src in src_tiles]
    return combine_reconstructions(out_images)


req_rdd = sc.parallelize(images)
out_tile_rdd = req_rdd.flatMap(get_output_tiles).repartition(100)
all_tile_rdd = out_tile_rdd.flatMapValues(calc_input_tiles).map(lambda x: tile_item(x[0], x[1][0], x[1][1], None, None))


def ti_full_reconstruction(x):
    k, src_tiles = x
    return k, full_reconstruction(src_tiles)


def grp_tile_read(x):
    src_tile_id, tile_items = x
    tile_data = pull_input_tile(src_tile_id)
    return [i._replace(source_tile_data=tile_data) for i in tile_items]


def ti_partial_reconstruction(in_tile_item):
    return in_tile_item._replace(
        out_tile_data=partial_reconstruction(in_tile_item.source_tile_id, in_tile_item.target_tile_id,
                                             in_tile_item.source_tile_data),
        source_tile_data=None)


def ti_partial_collect(x):
    k, in_tile_items = x
    assert len(in_tile_items) > 0, "Cannot provide empty partial collecton set"
    all_part_recon = map(lambda x: x.out_tile_data, in_tile_items)
    return (k, combine_reconstructions(all_part_recon))


if approach == "naive":
    all_tile_rdd_data = all_tile_rdd.map(lambda i: i._replace(source_tile_data=pull_input_tile(i.source_tile_id)))
    result = all_tile_rdd_data.groupBy(lambda x: x.target_tile_id).map(ti_full_reconstruction)
elif approach == "grouped":
    single_read_tiles_rdd = all_tile_rdd.groupBy(lambda x: x.source_tile_id).flatMap(grp_tile_read)
    result = single_read_tiles_rdd.groupBy(lambda x: x.target_tile_id).map(ti_full_reconstruction)
elif approach == "partial":
    single_read_tiles_rdd = all_tile_rdd.groupBy(lambda x: x.source_tile_id).flatMap(grp_tile_read)
    partial_recon_tiles_rdd = single_read_tiles_rdd.map(ti_partial_reconstruction)
    result = partial_recon_tiles_rdd.groupBy(lambda x: x.target_tile_id).map(ti_partial_collect)
else:
    raise SystemExit(f"unknown approach {approach!r}: naive, grouped or partial")

t0 = time.perf_counter()
all_shapes = result.mapValues(lambda x: x.shape).collect()   # the notebook's %%time cell
seconds = time.perf_counter() - t0
with open(times_path, "w") as f:
    json.dump({"job_s": seconds, "reads": READS.value, "outputs": len(all_shapes)}, f)
sc.stop()
