"""Planning the halo exchange of a series spread over Spark partitions (driver-side, numpy only).

A partition holds *runs*: maximal sequences of rows whose ids rise by one in arrival order.
The planning pass records each run's start, length, and its first and last K samples
(K = taps - 1); the driver checks the runs tile 0..N-1 exactly and gives each run the samples
before and after it that its outputs read.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ferry.errors import InputError
from ferry.stages.convolve import halo_sizes


@dataclasses.dataclass
class Run:
    partition: int
    index: int          # position of the run within its partition, in arrival order
    start: int
    length: int
    head: np.ndarray    # complex samples of ids [start, start + len(head))
    tail: np.ndarray    # complex samples of ids [end - len(tail), end)

    @property
    def end(self) -> int:
        return self.start + self.length


def check_coverage(runs: list[Run]) -> int:
    """Returns N after checking that the runs tile 0..N-1 exactly; raises InputError otherwise."""
    if not runs:
        return 0
    ordered = sorted(runs, key=lambda r: (r.start, r.end))
    if ordered[0].start != 0:
        raise InputError(f"ids must be a dense range 0..N-1, but the smallest id is {ordered[0].start}; "
                         "renumber the samples from 0")
    end = ordered[0].end
    for r in ordered[1:]:
        if r.start > end:
            raise InputError(f"ids must be a dense range 0..N-1: ids {end}..{r.start - 1} are missing")
        if r.start < end:
            raise InputError(f"ids must be a dense range 0..N-1: ids {r.start}..{min(end, r.end) - 1} occur "
                             "more than once; drop the duplicates")
        end = r.end
    return end


def halos(runs: list[Run], n: int, taps: int, mode: str) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """(partition, run index) -> (samples of ids [a - hl, a), samples of ids [b, b + hr)), clipped to 0..n-1."""
    hl, hr = halo_sizes(n, taps, mode)
    ordered = sorted(runs, key=lambda r: r.start)
    starts = np.array([r.start for r in ordered], dtype=np.int64)

    def samples(lo: int, hi: int) -> np.ndarray:
        lo, hi = max(lo, 0), min(hi, n)
        out = np.empty(max(hi - lo, 0), np.complex128)
        i = int(np.searchsorted(starts, lo, side="right")) - 1
        pos = lo
        while pos < hi:
            r = ordered[i]
            take_to = min(hi, r.end)
            # Every sample a halo needs lies within K = taps - 1 of a run edge, so in its head or tail.
            if pos - r.start < r.head.size:
                src, first = r.head, r.start
            else:
                src, first = r.tail, r.end - r.tail.size
            take_to = min(take_to, first + src.size)
            out[pos - lo: take_to - lo] = src[pos - first: take_to - first]
            pos = take_to
            if pos >= r.end:
                i += 1
        return out

    return {(r.partition, r.index): (samples(r.start - hl, r.start), samples(r.end, r.end + hr)) for r in runs}
