"""Run batches through shared memory (SharedMemory in worker.proto), against a real worker
process over real gRPC, with the files a client on the worker's host creates."""
import json
import mmap
import os
import queue
import random
import uuid

import grpc
import numpy as np
import pyarrow as pa
import pytest

from ferry import arrow
from ferry.v1 import worker_pb2 as pb
from ferry.v1 import worker_pb2_grpc as pb_grpc
from ferry.worker.shared_memory import Regions

SHM_DIR = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


class SharedClient:
    """What the JVM client does, by hand: two files, offsets on the stream, outputs copied out."""

    def __init__(self, worker, directory, size):
        self.id = uuid.uuid4().hex
        self.size = size
        self.paths = [os.path.join(directory, f"ferry-test-{self.id}-{s}") for s in ("in", "out")]
        for p in self.paths:
            with open(p, "wb") as f:
                f.truncate(size)
        self.files = [open(p, "r+b") for p in self.paths]
        self.maps = [mmap.mmap(f.fileno(), size) for f in self.files]
        self.channel = grpc.insecure_channel(worker.address)
        self.stub = pb_grpc.WorkerStub(self.channel)
        self.md = (("authorization", f"Bearer {worker.token}"),)

    def offer(self, with_paths=True):
        if not with_paths:
            return pb.SharedMemory(id=self.id)
        return pb.SharedMemory(id=self.id, input_path=self.paths[0], input_bytes=self.size,
                               output_path=self.paths[1], output_bytes=self.size)

    def unlink(self):
        for p in self.paths:
            if os.path.exists(p):
                os.unlink(p)

    def close(self):
        self.unlink()
        for m in self.maps:
            m.close()
        for f in self.files:
            f.close()
        self.channel.close()

    def run(self, stage, params, batches, *, offer=None, send_shared=True, in_flight=2):
        """Runs `batches` one at a time (at most `in_flight` unanswered); returns (Opened, outputs,
        how many outputs came through shared memory, how many inputs went that way)."""
        schema = batches[0].schema
        requests: "queue.Queue" = queue.Queue()
        requests.put(pb.RunRequest(open=pb.Open(stage=stage, params_json=json.dumps(params),
                                                input_schema=arrow.schema_to_bytes(schema),
                                                shared_memory=offer if offer is not None else self.offer())))
        responses = self.stub.Run(iter(requests.get, None), metadata=self.md)
        opened = next(responses).opened
        regions, state = Regions(self.size), {"read": 0}
        shared_in = shared_out = 0
        outputs, sent = [], 0
        out_schema = arrow.schema_from_bytes(opened.output_schema)

        def send(i):
            nonlocal shared_in
            data = arrow.batch_to_bytes(batches[i])
            n = len(memoryview(data))
            off = regions.alloc(n, self, i) if (send_shared and opened.shared_memory) else None
            if off is None:
                requests.put(pb.RunRequest(batch=pb.Batch(arrow=bytes(memoryview(data)),
                                                          outputs_read=state["read"])))
            else:
                self.maps[0][off:off + n] = bytes(memoryview(data))
                shared_in += 1
                requests.put(pb.RunRequest(batch=pb.Batch(shared_offset=off, shared_length=n,
                                                          outputs_read=state["read"])))

        while sent < min(in_flight, len(batches)):
            send(sent)
            sent += 1
        if sent == len(batches):
            requests.put(pb.RunRequest(end=pb.End()))
        for r in responses:
            kind = r.WhichOneof("msg")
            if kind != "batch":
                continue
            b = r.batch
            if b.shared_length:
                data = self.maps[1][b.shared_offset:b.shared_offset + b.shared_length]
                shared_out += 1
            else:
                data = b.arrow
            outputs.append(arrow.batch_from_bytes(data, out_schema))
            state["read"] += 1
            regions.release(self, state["read"])
            if sent < len(batches):
                send(sent)
                sent += 1
                if sent == len(batches):
                    requests.put(pb.RunRequest(end=pb.End()))
        requests.put(None)
        return opened, outputs, shared_out, shared_in


@pytest.fixture
def shared(worker):
    if SHM_DIR is None:
        pytest.skip("no writable /dev/shm on this machine")
    clients = []

    def make(size=1 << 20):
        c = SharedClient(worker, SHM_DIR, size)
        clients.append(c)
        return c
    yield make
    for c in clients:
        c.close()


def batches_of(n_batches, rows, seed=0):
    rng = np.random.default_rng(seed)
    return [pa.record_batch({"x": rng.standard_normal(rows)}) for _ in range(n_batches)]


def test_batches_travel_through_shared_memory_and_equal_the_inline_run(shared, client):
    c = shared(1 << 20)
    inputs = batches_of(40, 10_000, seed=1)  # 80 KB each: the 1 MB files are reused many times over
    opened, outputs, shared_out, shared_in = c.run("scale", {"factor": 3.0}, inputs)
    assert opened.shared_memory
    assert shared_in == 40 and shared_out == 40
    inline = client.run_table("scale", {"factor": 3.0}, pa.Table.from_batches(inputs))
    assert pa.Table.from_batches(outputs).equals(inline)
    np.testing.assert_array_equal(pa.Table.from_batches(outputs).column("y").to_numpy(),
                                  3.0 * pa.Table.from_batches(inputs).column("x").to_numpy())


def test_a_message_larger_than_the_file_travels_inline(shared):
    c = shared(64 << 10)
    inputs = batches_of(3, 2_000) + batches_of(2, 20_000, seed=2) + batches_of(3, 2_000, seed=3)  # 160 KB > 64 KB
    opened, outputs, shared_out, shared_in = c.run("identity", {}, inputs)
    assert opened.shared_memory
    assert shared_in == 6 and shared_out == 6  # the two large ones went inline both ways
    assert pa.Table.from_batches(outputs).equals(pa.Table.from_batches(inputs))


def test_outputs_wait_for_the_clients_acknowledgement(shared):
    # Room for two outputs only: with one batch in flight, each output region is acknowledged
    # before the worker needs a third, so every batch can use the file.
    c = shared(2 * 8_300)
    inputs = batches_of(10, 1_000, seed=4)  # ~8.2 KB messages
    opened, outputs, shared_out, _ = c.run("identity", {}, inputs, send_shared=False, in_flight=1)
    assert shared_out == 10
    assert pa.Table.from_batches(outputs).equals(pa.Table.from_batches(inputs))


def test_the_worker_keeps_a_pair_by_id_after_the_files_are_unlinked(shared):
    c = shared()
    inputs = batches_of(4, 1_000, seed=5)
    assert c.run("identity", {}, inputs)[0].shared_memory
    c.unlink()  # as the JVM does once the worker has opened them
    opened, outputs, shared_out, shared_in = c.run("identity", {}, inputs, offer=c.offer(with_paths=False))
    assert opened.shared_memory and shared_out == 4 and shared_in == 4
    assert pa.Table.from_batches(outputs).equals(pa.Table.from_batches(inputs))


def test_files_the_worker_cannot_open_are_refused_and_the_stream_carries_the_bytes(shared):
    c = shared()
    inputs = batches_of(3, 1_000, seed=6)
    gone = pb.SharedMemory(id=uuid.uuid4().hex, input_path="/nonexistent/ferry-in", input_bytes=1 << 20,
                           output_path="/nonexistent/ferry-out", output_bytes=1 << 20)
    for offer in (gone, pb.SharedMemory(id=uuid.uuid4().hex)):  # no such files; an id the worker never saw
        opened, outputs, shared_out, shared_in = c.run("identity", {}, inputs, offer=offer)
        assert not opened.shared_memory and shared_out == 0 and shared_in == 0
        assert pa.Table.from_batches(outputs).equals(pa.Table.from_batches(inputs))
    wrong_size = c.offer()
    wrong_size.input_bytes += 1
    wrong_size.id = uuid.uuid4().hex
    assert not c.run("identity", {}, inputs, offer=wrong_size)[0].shared_memory


def _raw_run(c, offer, batch):
    reqs = [pb.RunRequest(open=pb.Open(stage="identity", params_json="{}",
                                       input_schema=arrow.schema_to_bytes(pa.schema([("x", pa.float64())])),
                                       shared_memory=offer)),
            pb.RunRequest(batch=batch), pb.RunRequest(end=pb.End())]
    return list(c.stub.Run(iter(reqs), metadata=c.md))


def test_a_region_outside_the_file_is_a_protocol_error(shared):
    c = shared(1 << 16)
    with pytest.raises(grpc.RpcError) as e:
        _raw_run(c, c.offer(), pb.Batch(shared_offset=(1 << 16) - 10, shared_length=100))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shared-memory input" in e.value.details() and "disagree" in e.value.details()


def test_a_shared_batch_on_a_stream_without_shared_memory_is_a_protocol_error(shared):
    c = shared()
    with pytest.raises(grpc.RpcError) as e:
        _raw_run(c, pb.SharedMemory(id=uuid.uuid4().hex), pb.Batch(shared_offset=0, shared_length=100))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "did not accept shared memory" in e.value.details()


# --- the allocator both sides use ------------------------------------------------------------

def test_regions_go_round_the_file_and_free_by_owner_and_index():
    r = Regions(100)
    a, b = object(), object()
    assert r.alloc(40, a, 0) == 0
    assert r.alloc(40, a, 1) == 40
    assert r.alloc(40, b, 0) is None  # 20 left at the end, the start is taken
    r.release(a, 1)  # a's index 0 is read
    assert r.alloc(40, b, 0) == 0  # wraps to the freed start
    assert r.alloc(30, b, 1) is None
    r.release(b)
    r.release(a)
    assert r.live == 0 and r.alloc(100, a, 2) == 0 and r.alloc(1, a, 3) is None
    assert r.alloc(0, a, 4) is None and Regions(10).alloc(11, a, 0) is None


def test_regions_never_overlap_under_random_use():
    rnd = random.Random(7)
    for size in (64, 1000, 4096):
        r = Regions(size)
        owners = [object() for _ in range(3)]
        live = {}  # (owner index, index) -> (start, end)
        counters = [0, 0, 0]
        for _ in range(3000):
            o = rnd.randrange(3)
            if rnd.random() < 0.55:
                n = rnd.randint(1, size // 3)
                start = r.alloc(n, owners[o], counters[o])
                if start is not None:
                    assert 0 <= start and start + n <= size
                    for s, e in live.values():
                        assert start + n <= s or start >= e, "overlapping regions"
                    live[(o, counters[o])] = (start, start + n)
                counters[o] += 1
            else:
                below = rnd.randint(0, counters[o])
                r.release(owners[o], below)
                live = {k: v for k, v in live.items() if not (k[0] == o and k[1] < below)}
            assert r.live == len(live)
