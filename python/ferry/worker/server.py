"""The ferry worker: a gRPC server that runs registered stages over Arrow record batches."""
from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
import traceback
from concurrent import futures

import grpc
import pyarrow as pa
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ferry import arrow, registry
from ferry.errors import AuthenticationError, FerryError, MissingResourceError, ProtocolError, SchemaError, StageFailedError
from ferry.worker.shared_memory import SharedMemoryTable, SharedPair
from ferry.v1 import worker_pb2 as pb
from ferry.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger("ferry.worker")

SERVICE_NAME = "ferry.v1.Worker"
ERROR_TRAILER = "ferry-stage-error-bin"
#: Largest gRPC message either way. One row travels in one message, and a tile partial or a model
#: can be a few hundred MB: the default leaves room; `ferry worker --max-message-bytes` changes it.
MAX_MESSAGE_BYTES = 512 << 20

_CODES = {
    "unknown_stage": grpc.StatusCode.NOT_FOUND,
    "invalid_params": grpc.StatusCode.INVALID_ARGUMENT,
    "invalid_schema": grpc.StatusCode.INVALID_ARGUMENT,
    "invalid_input": grpc.StatusCode.INVALID_ARGUMENT,
    "protocol": grpc.StatusCode.INVALID_ARGUMENT,
    "missing_resource": grpc.StatusCode.FAILED_PRECONDITION,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "stage_failed": grpc.StatusCode.INTERNAL,
}
_KINDS = {"map": pb.STAGE_KIND_MAP, "group": pb.STAGE_KIND_GROUP, "reduce": pb.STAGE_KIND_REDUCE}


def _abort(context, stage: str, exc: BaseException):
    """Ends the call with a typed status and the StageError trailer; never returns."""
    category = exc.category if isinstance(exc, FerryError) else "stage_failed"
    err = pb.StageError(
        stage=stage, category=category, exception_type=type(exc).__qualname__, message=str(exc),
        traceback="" if isinstance(exc, FerryError) and category != "stage_failed"
        else "".join(traceback.format_exception(exc)),
    )
    if category == "stage_failed":
        log.warning("stage %r failed: %s", stage, err.traceback)
    context.set_trailing_metadata(((ERROR_TRAILER, err.SerializeToString()),))
    prefix = f"[{stage}] " if stage else ""
    context.abort(_CODES.get(category, grpc.StatusCode.INTERNAL), f"{prefix}{type(exc).__qualname__}: {exc}")


def _spec(st: registry.Stage) -> pb.StageSpec:
    return pb.StageSpec(
        name=st.name, version=st.version, kind=_KINDS[st.kind], doc=st.doc, input_doc=st.input_doc,
        params=[pb.ParamSpec(name=p.name, type=p.type, doc=p.doc, required=p.required,
                             default_json="" if p.required else registry.to_json(p.default),
                             choices=list(p.choices)) for p in st.params],
    )


def _as_batch(result, schema: pa.Schema, stage: str) -> pa.RecordBatch:
    """Coerces what a stage returned into one batch of its declared output schema."""
    if result is None:
        return arrow.empty_batch(schema)
    if isinstance(result, dict):
        result = pa.RecordBatch.from_pydict(result, schema=schema)
    elif isinstance(result, pa.Table):
        result = result.combine_chunks().to_batches()[0] if result.num_rows else arrow.empty_batch(schema)
    if not isinstance(result, pa.RecordBatch):
        raise StageFailedError(f"Stage {stage!r} returned {type(result).__name__}; it must return a "
                               "pyarrow.RecordBatch, a pyarrow.Table or a dict of columns")
    if not result.schema.equals(schema):
        raise StageFailedError(f"Stage {stage!r} returned columns {result.schema} but declared {schema}; "
                               "return the declared columns and types")
    return result


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(self, token: str | None, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self._token = token
        self._max_message = max_message_bytes
        self._resources: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._shared = SharedMemoryTable()

    def _message(self, out: pa.RecordBatch, stage: str, pair: SharedPair | None = None, owner: object = None,
                 index: int = 0) -> bytes:
        """An output batch as an encoded RunResponse, or a clear error when it is over the message
        limit (gRPC would drop the stream with a bare RESOURCE_EXHAUSTED that reads like a dead
        worker). With a shared-memory ``pair``, the batch goes into its output file where it fits,
        as output ``index`` of the stream ``owner``."""
        data = out.serialize()
        if data.size > self._max_message - 1024:
            biggest = max((c.nbytes for c in out.columns), default=0) // max(out.num_rows, 1)
            raise StageFailedError(
                f"Stage {stage!r} returned a batch of {out.num_rows} row(s) and {data.size:,} bytes, over the "
                f"{self._max_message:,}-byte message limit (about {biggest:,} bytes per row). Raise the limit "
                "(spark.ferry.grpc.maxMessageBytes from Spark, ferry worker --max-message-bytes), or send "
                "smaller rows (e.g. smaller tiles)")
        if pair is not None:
            offset = pair.write_output(data, owner, index)
            if offset is not None:
                return pb.RunResponse(batch=pb.Batch(shared_offset=offset, shared_length=data.size)).SerializeToString()
        return encode_batch_response(data)

    def _authorize(self, context) -> None:
        if self._token is None:
            return
        given = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
            why = "no bearer token" if not given else "a wrong bearer token"
            _abort(context, "", AuthenticationError(
                f"The call carried {why}; send metadata 'authorization: Bearer <token>' with the token "
                "the worker was started with (--token-file)"))

    def ListStages(self, request, context):
        self._authorize(context)
        return pb.ListStagesResponse(stages=[_spec(s) for s in registry.stages()])

    def Describe(self, request, context):
        self._authorize(context)
        try:
            st = registry.get(request.stage)
            out = pb.DescribeResponse(spec=_spec(st))
            if request.params_json or request.input_schema:
                params = st.resolve_params(registry.params_from_json(request.params_json))
                out.params_json = registry.params_to_json(params)
                if request.input_schema:
                    out.output_schema = arrow.schema_to_bytes(
                        st.output_schema(arrow.schema_from_bytes(request.input_schema), params))
            return out
        except Exception as e:  # noqa: BLE001 - every failure becomes a typed status
            _abort(context, request.stage, e)

    def PutResource(self, request_iterator, context):
        self._authorize(context)
        digest, expected, size = hashlib.sha256(), "", 0
        chunks = []
        for chunk in request_iterator:
            expected = expected or chunk.sha256
            digest.update(chunk.data)
            chunks.append(chunk.data)
            size += len(chunk.data)
        actual = digest.hexdigest()
        if expected and expected != actual:
            _abort(context, "", ProtocolError(f"Resource digest mismatch: announced {expected}, received {actual} "
                                              f"({size} bytes); resend it"))
        with self._lock:
            self._resources[actual] = b"".join(chunks)
        log.info("stored resource %s (%d bytes)", actual, size)
        return pb.ResourceRef(sha256=actual, size=size)

    def Run(self, request_iterator, context):
        self._authorize(context)
        stage_name = ""
        pair, owner = None, object()  # owner: this stream's regions of a shared output file
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("msg") != "open":
                raise ProtocolError("A Run stream must start with Open{stage, params_json, input_schema}")
            op = first.open
            stage_name = op.stage
            st = registry.get(op.stage)
            params = st.resolve_params(registry.params_from_json(op.params_json))
            if not op.input_schema:
                raise SchemaError(f"Open for stage {op.stage!r} carries no input_schema")
            in_schema = arrow.schema_from_bytes(op.input_schema)
            out_schema = st.output_schema(in_schema, params)
            with self._lock:
                missing = [d for d in op.resources if d not in self._resources]
                resources = {d: self._resources[d] for d in op.resources if d in self._resources}
            if missing:
                raise MissingResourceError(f"Resources {missing} were never uploaded to this worker; "
                                           "call PutResource first")
            processor = st.open(params, resources)
            if first.open.HasField("shared_memory"):
                pair = self._shared.attach(first.open.shared_memory)
            yield pb.RunResponse(opened=pb.Opened(output_schema=arrow.schema_to_bytes(out_schema),
                                                  shared_memory=pair is not None))
            m = pb.Metrics()
            ended = False
            for req in request_iterator:
                kind = req.WhichOneof("msg")
                if ended or kind not in ("batch", "end"):
                    raise ProtocolError(f"Unexpected {kind or 'empty message'} in a Run stream "
                                        f"{'after End' if ended else 'after Open'}")
                if kind == "end":
                    ended = True
                    break
                if pair is not None:
                    pair.acknowledge(owner, req.batch.outputs_read)
                if req.batch.shared_length:
                    if pair is None:
                        raise ProtocolError("A batch in shared memory on a Run stream whose Opened did not accept "
                                            "shared memory")
                    data = pair.read_input(req.batch.shared_offset, req.batch.shared_length)
                else:
                    data = req.batch.arrow
                batch = arrow.batch_from_bytes(data, in_schema)
                t0 = time.perf_counter()
                out = _as_batch(processor.process(batch), out_schema, stage_name)
                m.compute_seconds += time.perf_counter() - t0
                m.batches_in += 1
                m.rows_in += batch.num_rows
                m.batches_out += 1
                m.rows_out += out.num_rows
                yield self._message(out, stage_name, pair, owner, m.batches_out - 1)
            if not ended:
                raise ProtocolError("The Run stream closed without End; the client may have died")
            for tail in registry.finish_results(processor):
                out = _as_batch(tail, out_schema, stage_name)
                if out.num_rows:
                    m.batches_out += 1
                    m.rows_out += out.num_rows
                    yield self._message(out, stage_name, pair, owner, m.batches_out - 1)
            yield pb.RunResponse(metrics=m)
            yield pb.RunResponse(end=pb.End())
        except Exception as e:  # noqa: BLE001 - every failure becomes a typed status
            if context.is_active():
                _abort(context, stage_name, e)
            log.info("Run of %r ended after the client left: %s", stage_name, e)
        finally:
            if pair is not None:
                pair.end_stream(owner)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_batch_response(arrow_message) -> bytes:
    """``RunResponse(batch=Batch(arrow=arrow_message)).SerializeToString()``, in one copy.

    Building the protobuf message copies the Arrow bytes into it and serializing copies them
    again; output batches are most of what a worker sends, so Run encodes them by hand:
    RunResponse.batch is field 2 and Batch.arrow field 1, both length-delimited (wire type 2).
    """
    n = len(memoryview(arrow_message))
    if n == 0:
        return b"\x12\x00"  # proto3 leaves an empty bytes field out
    inner = b"\x0a" + _varint(n)
    return b"".join((b"\x12", _varint(len(inner) + n), inner, arrow_message))


def _serialize_run_response(response) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def _add_worker(servicer: WorkerServicer, server) -> None:
    """The generated ``add_WorkerServicer_to_server``, except that Run may yield responses
    already encoded (see :func:`encode_batch_response`)."""
    handlers = {
        "ListStages": grpc.unary_unary_rpc_method_handler(
            servicer.ListStages, request_deserializer=pb.ListStagesRequest.FromString,
            response_serializer=pb.ListStagesResponse.SerializeToString),
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe, request_deserializer=pb.DescribeRequest.FromString,
            response_serializer=pb.DescribeResponse.SerializeToString),
        "Run": grpc.stream_stream_rpc_method_handler(
            servicer.Run, request_deserializer=pb.RunRequest.FromString,
            response_serializer=_serialize_run_response),
        "PutResource": grpc.stream_unary_rpc_method_handler(
            servicer.PutResource, request_deserializer=pb.ResourceChunk.FromString,
            response_serializer=pb.ResourceRef.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def create_server(address: str = "127.0.0.1:0", token: str | None = None, max_workers: int = 8,
                  max_message_bytes: int = MAX_MESSAGE_BYTES):
    """Builds (but does not start) a worker server; returns (server, bound port)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ferry-run"),
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max_message_bytes),
                 ("grpc.so_reuseport", 0)],
    )
    _add_worker(WorkerServicer(token, max_message_bytes), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"Could not bind the worker to {address}; is the port in use?")
    return server, port
