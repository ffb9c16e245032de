"""A Python client of the ferry worker: what tests, the CLI and any Python caller use."""
from __future__ import annotations

import hashlib
import itertools
from typing import Any, Iterable, Iterator, Mapping

import grpc
import pyarrow as pa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ferry import arrow, registry
from ferry.errors import BY_CATEGORY, FerryError, ProtocolError, StageFailedError, WorkerUnavailableError
from ferry.v1 import worker_pb2 as pb
from ferry.v1 import worker_pb2_grpc as pb_grpc
from ferry.worker.server import ERROR_TRAILER, MAX_MESSAGE_BYTES


def error_from_rpc(e: grpc.RpcError) -> FerryError:
    """The typed ferry exception for a failed call, with the remote stage, type and traceback."""
    details = None
    for key, value in (e.trailing_metadata() or ()):
        if key == ERROR_TRAILER:
            details = pb.StageError.FromString(value)
    if details is None:
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
            return WorkerUnavailableError(f"The worker is unavailable ({e.code().name}): {e.details()}; "
                                          "it may have died or never started")
        return StageFailedError(f"Worker call failed with {e.code().name}: {e.details()}")
    cls = BY_CATEGORY.get(details.category, StageFailedError)
    text = details.message
    if details.category == "stage_failed" and details.exception_type:
        text = f"{details.exception_type}: {text}"
    if details.traceback:
        text += f"\n--- Python traceback (worker) ---\n{details.traceback}"
    err = cls(text)
    err.stage, err.remote_type, err.remote_traceback = details.stage, details.exception_type, details.traceback
    err.code = e.code()
    return err


class WorkerClient:
    """Calls one worker: ``WorkerClient("127.0.0.1:50051", token)``; use as a context manager."""

    def __init__(self, address: str, token: str | None, *, max_rows: int = arrow.DEFAULT_MAX_ROWS,
                 max_bytes: int = arrow.DEFAULT_MAX_BYTES):
        self.address = address
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        self._stub = pb_grpc.WorkerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        self.last_metrics: pb.Metrics | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._channel.close()

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        try:
            resp = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def list_stages(self) -> list[pb.StageSpec]:
        try:
            return list(self._stub.ListStages(pb.ListStagesRequest(), metadata=self._metadata).stages)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def describe(self, stage: str, params: Mapping[str, Any] | None = None,
                 input_schema: pa.Schema | None = None) -> pb.DescribeResponse:
        req = pb.DescribeRequest(stage=stage, params_json=registry.params_to_json(params) if params is not None else "",
                                 input_schema=arrow.schema_to_bytes(input_schema) if input_schema is not None else b"")
        try:
            return self._stub.Describe(req, metadata=self._metadata)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def output_schema(self, stage: str, params: Mapping[str, Any], input_schema: pa.Schema) -> pa.Schema:
        return arrow.schema_from_bytes(self.describe(stage, params, input_schema).output_schema)

    def put_resource(self, data: bytes, chunk_bytes: int = 4 << 20) -> str:
        digest = hashlib.sha256(data).hexdigest()

        def chunks():
            for i in range(0, max(len(data), 1), chunk_bytes):
                yield pb.ResourceChunk(sha256=digest if i == 0 else "", data=data[i:i + chunk_bytes])
        try:
            return self._stub.PutResource(chunks(), metadata=self._metadata).sha256
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def run(self, stage: str, params: Mapping[str, Any], batches: Iterable[pa.RecordBatch],
            schema: pa.Schema | None = None, resources: Iterable[str] = ()) -> Iterator[pa.RecordBatch]:
        """Streams batches through a stage; yields the output batches in input order.

        Input batches larger than the client's row and byte caps are split before sending.
        """
        batches = iter(batches)
        if schema is None:
            first = next(batches, None)
            if first is None:
                raise ValueError("run() needs a schema when there are no batches")
            schema = first.schema
            batches = itertools.chain([first], batches)

        def requests():
            yield pb.RunRequest(open=pb.Open(stage=stage, params_json=registry.params_to_json(params),
                                             input_schema=arrow.schema_to_bytes(schema), resources=list(resources)))
            for b in batches:
                if not b.schema.equals(schema):
                    raise ValueError(f"Every batch must have the stream's schema {schema}; got {b.schema}")
                for piece in arrow.split_batch(b, self.max_rows, self.max_bytes):
                    yield pb.RunRequest(batch=pb.Batch(arrow=arrow.batch_to_bytes(piece)))
            yield pb.RunRequest(end=pb.End())

        call = self._stub.Run(requests(), metadata=self._metadata)
        try:
            out_schema = None
            for resp in call:
                kind = resp.WhichOneof("msg")
                if kind == "opened":
                    out_schema = arrow.schema_from_bytes(resp.opened.output_schema)
                elif kind == "batch":
                    if out_schema is None:
                        raise ProtocolError("The worker sent a batch before Opened")
                    yield arrow.batch_from_bytes(resp.batch.arrow, out_schema)
                elif kind == "metrics":
                    self.last_metrics = resp.metrics
                elif kind == "end":
                    return
            raise WorkerUnavailableError("The worker closed the Run stream without End")
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        finally:
            call.cancel()

    def run_table(self, stage: str, params: Mapping[str, Any], table: pa.Table | pa.RecordBatch,
                  resources: Iterable[str] = ()) -> pa.Table:
        """Runs a whole table through a stage and returns the output as one table."""
        batches = table.to_batches() if isinstance(table, pa.Table) else [table]
        out = list(self.run(stage, params, batches, schema=table.schema, resources=resources))
        if not out:
            schema = self.output_schema(stage, params, table.schema)
            return schema.empty_table()
        return pa.Table.from_batches(out)
