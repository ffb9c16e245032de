"""The worker over real gRPC on loopback: round trips and every error case, from a client."""
import os
import subprocess
import sys

import grpc
import numpy as np
import pyarrow as pa
import pytest

from ferry import arrow
from ferry.errors import (AuthenticationError, InputError, InvalidParamsError, MissingResourceError, SchemaError,
                          StageFailedError, UnknownStageError, WorkerUnavailableError)
from ferry.v1 import worker_pb2 as pb
from ferry.v1 import worker_pb2_grpc as pb_grpc
from ferry.worker import WorkerClient, start_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def complex_table(x, halo=None):
    cols = {"id": np.arange(x.size, dtype=np.int64), "real": x.real, "imag": x.imag}
    if halo is not None:
        cols["halo"] = halo
    return pa.table(cols)


def test_health_and_stage_listing(client):
    assert client.health() == "SERVING"
    assert client.health("ferry.v1.Worker") == "SERVING"
    names = {s.name for s in client.list_stages()}
    assert {"convolve", "identity", "scale", "raise_error"} <= names
    spec = client.describe("convolve").spec
    assert spec.kind == pb.STAGE_KIND_MAP
    params = {p.name: p for p in spec.params}
    assert params["kernel_real"].required and params["mode"].default_json == '"same"'
    assert list(params["mode"].choices) == ["full", "same", "valid"]


def test_describe_validates_and_returns_output_schema(client):
    resp = client.describe("scale", {"factor": 2}, pa.schema([("x", pa.float64())]))
    assert arrow.schema_from_bytes(resp.output_schema) == pa.schema([("y", pa.float64())])
    out = client.describe("convolve", {"kernel_real": [1, 2]},
                          pa.schema([("id", pa.int64()), ("real", pa.float64()), ("imag", pa.float64())]))
    assert arrow.schema_from_bytes(out.output_schema).names == ["id", "real", "imag"]
    assert '"mode": "same"' in out.params_json


@pytest.mark.parametrize("mode", ["full", "same", "valid"])
@pytest.mark.parametrize("taps", [1, 4, 5, 1000])
def test_convolve_round_trip_equals_numpy(client, mode, taps):
    rng = np.random.default_rng(taps)
    x = rng.standard_normal(50_000) + 1j * rng.standard_normal(50_000)
    k = rng.standard_normal(taps) + 1j * rng.standard_normal(taps)
    out = client.run_table("convolve", {"kernel_real": k.real, "kernel_imag": k.imag, "mode": mode,
                                        "length": x.size}, complex_table(x))
    want = np.convolve(x, k, mode)
    np.testing.assert_array_equal(out.column("id").to_numpy(), np.arange(want.size))
    got = out.column("real").to_numpy() + 1j * out.column("imag").to_numpy()
    assert np.max(np.abs(got - want)) <= 1e-12 * np.max(np.abs(want))


def test_batches_come_back_in_input_order_and_split_by_caps(worker):
    with worker.client(max_rows=1000, max_bytes=10_000) as c:
        t = pa.table({"x": np.arange(100_000, dtype=np.float64), "s": [f"r{i}" for i in range(100_000)]})
        out = list(c.run("identity", {}, t.to_batches(), schema=t.schema))
        assert len(out) >= 100 and all(b.num_rows <= 1000 and b.nbytes <= 20_000 for b in out)
        assert pa.Table.from_batches(out).equals(t)
        assert c.last_metrics.rows_in == 100_000 and c.last_metrics.batches_in == len(out)


def test_stateful_stage_emits_at_end(client):
    out = client.run_table("running_sum", {}, pa.table({"x": [1.0, 2.0, 3.5]}))
    assert out.column("total").to_pylist() == [6.5]


def test_finish_may_yield_several_batches_each_sent_as_its_own(client):
    out = list(client.run("running_sums", {"pieces": 4}, [pa.record_batch({"x": [1.0, 2.0]})] * 3))
    # An empty batch answers each input; then the four pieces, one message each.
    assert [b.num_rows for b in out] == [0, 0, 0, 1, 1, 1, 1]
    assert [b.column("piece")[0].as_py() for b in out[3:]] == [0, 1, 2, 3]
    assert {b.column("total")[0].as_py() for b in out[3:]} == {9.0}
    assert client.last_metrics.batches_out == 7
    assert client.run_table("running_sums", {"pieces": 0}, pa.table({"x": [1.0]})).num_rows == 0


def test_resources_are_content_addressed(client):
    digest = client.put_resource(b"model bytes" * 1000)
    assert len(digest) == 64
    out = client.run_table("identity", {}, pa.table({"x": [1.0]}), resources=[digest])
    assert out.num_rows == 1
    with pytest.raises(MissingResourceError, match="never uploaded"):
        client.run_table("identity", {}, pa.table({"x": [1.0]}), resources=["0" * 64])


def test_unknown_stage(client):
    with pytest.raises(UnknownStageError, match="No stage named 'nope'; registered stages: .*convolve") as e:
        client.run_table("nope", {}, pa.table({"x": [1.0]}))
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(UnknownStageError):
        client.describe("nope")


@pytest.mark.parametrize("params,match", [
    ({"factor": "two"}, "param 'factor' must be of type float"),
    ({"factor": 0}, "param 'factor': must not be 0"),
    ({}, "requires param 'factor'"),
    ({"factor": 1, "extra": 2}, "has no param.*'extra'"),
])
def test_bad_params(client, params, match):
    with pytest.raises(InvalidParamsError, match=match) as e:
        client.run_table("scale", params, pa.table({"x": [1.0]}))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidParamsError, match=match):
        client.describe("scale", params, pa.schema([("x", pa.float64())]))


@pytest.mark.parametrize("params,match", [
    ({"kernel_real": []}, "cannot be empty"),
    ({"kernel_real": [1, 2], "kernel_imag": [1]}, "kernel_imag has 1 taps but kernel_real has 2"),
    ({"kernel_real": [1], "mode": "middle"}, "must be one of 'full', 'same', 'valid'"),
    ({"kernel_real": [1]}, "needs param 'length'"),
])
def test_convolve_bad_params(client, params, match):
    with pytest.raises(InvalidParamsError, match=match):
        client.run_table("convolve", params, complex_table(np.ones(3, complex)))


def test_wrong_schema(client):
    with pytest.raises(SchemaError, match="needs an input column 'x' of type double; the input has columns"):
        client.run_table("scale", {"factor": 2.0}, pa.table({"z": [1.0]}))
    with pytest.raises(SchemaError, match="column 'x' must be of type double, found int64"):
        client.run_table("scale", {"factor": 2.0}, pa.table({"x": [1]}))


def test_bad_input_data(client):
    t = pa.table({"id": pa.array([0, 1, 2], pa.int64()), "real": pa.array([1.0, None, 2.0]),
                  "imag": pa.array([0.0, 0.0, 0.0])})
    with pytest.raises(InputError, match="Column 'real' has 1 null value"):
        client.run_table("convolve", {"kernel_real": [1.0], "length": 3}, t)
    x = np.ones(10, complex)
    with pytest.raises(InputError, match="need samples up to id"):
        client.run_table("convolve", {"kernel_real": [1.0, 1.0, 1.0], "length": 20}, complex_table(x))


def test_raising_stage_carries_type_message_and_traceback(client):
    with pytest.raises(StageFailedError) as e:
        client.run_table("raise_error", {"message": "kaboom"}, pa.table({"x": [1.0]}))
    err = e.value
    assert err.code == grpc.StatusCode.INTERNAL
    assert err.stage == "raise_error" and err.remote_type == "ValueError"
    assert "ValueError: kaboom" in str(err)
    assert "in deeper" in err.remote_traceback and "Traceback (most recent call last)" in str(err)


@pytest.mark.parametrize("token", [None, "wrong"])
def test_missing_or_wrong_token(worker, token):
    with WorkerClient(worker.address, token) as c:
        with pytest.raises(AuthenticationError, match="bearer token") as e:
            c.list_stages()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(AuthenticationError):
            c.run_table("identity", {}, pa.table({"x": [1.0]}))
        assert c.health() == "SERVING"  # the standard health service needs no token


def test_protocol_misuse(worker):
    channel = grpc.insecure_channel(worker.address)
    stub = pb_grpc.WorkerStub(channel)
    md = (("authorization", f"Bearer {worker.token}"),)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Run(iter([pb.RunRequest(batch=pb.Batch(arrow=b""))]), metadata=md))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "must start with Open" in e.value.details()
    channel.close()


def test_dead_worker_is_not_a_stage_error():
    w = start_worker(stages=["tests.stages_for_tests"], env={"PYTHONPATH": ROOT})
    c = w.client()
    assert c.health() == "SERVING"
    w.proc.kill()
    w.proc.wait()
    with pytest.raises(WorkerUnavailableError, match="unavailable"):
        c.list_stages()
    c.close()
    w.stop()


def test_an_output_over_the_message_limit_is_a_clear_stage_error():
    w = start_worker(stages=["tests.stages_for_tests"], env={"PYTHONPATH": ROOT}, max_message_bytes=1 << 20)
    c = w.client()
    try:
        x = pa.table({"x": np.arange(1000.0)})
        assert c.run_table("repeat", {"times": 10}, x).num_rows == 10_000  # 80 KB: fine
        with pytest.raises(StageFailedError, match=r"over the 1,048,576-byte message limit .* Raise the limit"):
            c.run_table("repeat", {"times": 1000}, x)  # 8 MB in one output batch
        assert c.health() == "SERVING"  # the worker lives on
    finally:
        c.close()
        w.stop()


def test_worker_refuses_to_start_without_token():
    proc = subprocess.run([sys.executable, "-m", "ferry", "worker"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "a bearer token is required" in proc.stderr


def test_worker_reports_a_bad_stage_module():
    with pytest.raises(WorkerUnavailableError, match="cannot import stage module 'no_such_module'"):
        start_worker(stages=["no_such_module"], timeout=60)


def test_port_file_is_written(worker):
    with open(os.path.join(worker._workdir.name, "port")) as f:
        assert int(f.read()) == worker.port


def test_worker_exits_when_its_parent_dies(tmp_path):
    """A worker started with --exit-with-parent does not outlive a parent killed outright."""
    import signal

    import psutil

    token = tmp_path / "token"
    token.write_text("t")
    # The parent: a shell that starts the worker in the background, prints its pid, then waits;
    # the worker's ready line comes through the same pipe.
    parent = subprocess.Popen(
        ["bash", "-c", f"{sys.executable} -m ferry worker --token-file {token} --exit-with-parent 2>/dev/null & "
                       "echo $!; wait"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    worker = psutil.Process(int(parent.stdout.readline()))
    port = int(parent.stdout.readline().strip().split("=")[1])
    with WorkerClient(f"127.0.0.1:{port}", "t") as c:
        assert c.health() == "SERVING"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    parent.stdout.close()
    worker.wait(timeout=30)
    assert not worker.is_running()


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 128, 300, 16_381, 16_384, 2_097_152 + 3])
def test_batch_responses_encoded_by_hand_equal_protobufs(size):
    # Run's output batches skip the protobuf message (two copies of every output byte); the
    # bytes must be exactly what protobuf would send, across the varint length boundaries.
    from ferry.v1 import worker_pb2 as pb
    from ferry.worker.server import encode_batch_response

    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    expected = pb.RunResponse(batch=pb.Batch(arrow=data)).SerializeToString()
    assert encode_batch_response(data) == expected
    assert encode_batch_response(pa.py_buffer(data)) == expected
    assert pb.RunResponse.FromString(encode_batch_response(data)).batch.arrow == data
