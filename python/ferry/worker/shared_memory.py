"""Run batches through shared memory, for a client on the worker's host (``SharedMemory`` in
proto/ferry/v1/worker.proto).

A gRPC stream over loopback copies a batch several times on each side (into protobuf, HTTP/2
frames, the socket and back) and spends most of a local worker's transport time doing so. With
shared memory the client writes each input message into a file it created under /dev/shm and
the worker writes each output message into a second one; the stream carries only offsets. Both
sides copy a message out of the file as soon as it arrives, so no stage ever holds a view of
memory the other process may overwrite.
"""
from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass, field

import pyarrow as pa

from ferry.errors import ProtocolError

#: Shared-memory pairs a worker keeps mapped (one per client connection; the oldest idle ones go).
MAX_PAIRS = 16


class Regions:
    """Which parts of a file hold messages the reader has not yet copied out.

    Allocation goes round the file: right after the newest live region, else from the start;
    a region is freed by its owner's acknowledgement, in any order across owners.
    """

    def __init__(self, size: int):
        self.size = size
        self._live: list[tuple[int, int, object, int]] = []  # (start, end, owner, index)
        self._head = 0

    def alloc(self, n: int, owner: object, index: int) -> int | None:
        if n <= 0 or n > self.size:
            return None
        if not self._live:
            self._head = 0
        for start in (self._head, 0):
            end = start + n
            if end <= self.size and all(end <= a or start >= b for a, b, _, _ in self._live):
                self._live.append((start, end, owner, index))
                self._head = end
                return start
        return None

    def release(self, owner: object, below: int | None = None) -> None:
        """Frees ``owner``'s regions with index < ``below`` (all of them when ``below`` is None)."""
        self._live = [r for r in self._live if not (r[2] is owner and (below is None or r[3] < below))]

    @property
    def live(self) -> int:
        return len(self._live)


@dataclass(eq=False)
class SharedPair:
    """One client's two files, mapped in this worker."""

    id: str
    input: mmap.mmap
    output: mmap.mmap
    regions: Regions
    lock: threading.Lock = field(default_factory=threading.Lock)
    streams: int = 0  # Run streams using the pair now

    def read_input(self, offset: int, length: int) -> pa.Buffer:
        """A private copy of the input message at [offset, offset + length)."""
        if offset < 0 or length <= 0 or offset + length > len(self.input):
            raise ProtocolError(f"A batch lies at [{offset}, {offset + length}) of a {len(self.input)}-byte "
                                "shared-memory input; the client and the worker disagree on the file")
        buf = pa.allocate_buffer(length)
        memoryview(buf).cast("B")[:] = memoryview(self.input)[offset:offset + length]
        return buf

    def write_output(self, data, owner: object, index: int) -> int | None:
        """Copies an output message into the output file; its offset, or None when it does not fit now."""
        view = memoryview(data).cast("B")
        with self.lock:
            offset = self.regions.alloc(view.nbytes, owner, index)
        if offset is not None:
            memoryview(self.output)[offset:offset + view.nbytes] = view
        return offset

    def acknowledge(self, owner: object, outputs_read: int) -> None:
        with self.lock:
            self.regions.release(owner, outputs_read)

    def end_stream(self, owner: object) -> None:
        with self.lock:
            self.regions.release(owner)
            self.streams -= 1

    def close(self) -> None:
        self.input.close()
        self.output.close()


class SharedMemoryTable:
    """The shared-memory pairs of a worker, by id."""

    def __init__(self, limit: int = MAX_PAIRS):
        self._pairs: dict[str, SharedPair] = {}
        self._lock = threading.Lock()
        self._limit = limit

    def attach(self, offer) -> SharedPair | None:
        """The pair an Open offers (``SharedMemory``), mapped on first use; None when this worker
        cannot use it (the files are on another host, or gone): the stream then carries the bytes."""
        with self._lock:
            pair = self._pairs.get(offer.id)
            if pair is None:
                pair = self._map(offer)
                if pair is None:
                    return None
                self._pairs[offer.id] = pair
                self._evict()
            pair.streams += 1
            return pair

    def _map(self, offer) -> SharedPair | None:
        if not (offer.id and offer.input_path and offer.output_path and offer.input_bytes > 0
                and offer.output_bytes > 0):
            return None
        maps = []
        try:
            for path, size in ((offer.input_path, offer.input_bytes), (offer.output_path, offer.output_bytes)):
                fd = os.open(path, os.O_RDWR)
                try:
                    if os.fstat(fd).st_size != size:
                        raise OSError(f"{path} is not {size} bytes")
                    maps.append(mmap.mmap(fd, size))
                finally:
                    os.close(fd)
        except (OSError, ValueError):
            for m in maps:
                m.close()
            return None
        return SharedPair(offer.id, maps[0], maps[1], Regions(offer.output_bytes))

    def _evict(self) -> None:
        for pid in [p for p, pair in self._pairs.items() if pair.streams == 0][:max(0, len(self._pairs) - self._limit)]:
            self._pairs.pop(pid).close()

    def __len__(self) -> int:
        return len(self._pairs)
