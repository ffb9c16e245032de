"""The LOPQ stages of the stage contract: encoding (map) and the training passes (reduce).

``lopq_encode`` reads the model as a resource (uploaded once, by sha256) and turns rows of
(id, vector) into (id, coarse, fine).

``lopq_train`` is one training pass in one of three phases, the reduce-stage shape of the
chunk / combine / aggregate triad in train.py:

    phase=chunk      rows of vectors           -> one row: the partial of every batch seen
    phase=combine    rows of partials          -> one row: their combination
    phase=aggregate  rows of partials          -> one row: the next training state
                                                  (a partial model, LOPQModelParams bytes)

A driver runs chunk on every partition, combines as a tree (treeAggregate), aggregates once,
uploads the new state as a resource, and starts the next pass. Partials travel as npz bytes.
"""
from __future__ import annotations

import dataclasses

import collections
import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ferry.arrow import empty_batch
from ferry.errors import InputError, InvalidParamsError, SchemaError
from ferry.registry import Param, stage
from ferry.stages.lopq import train as T
from ferry.stages.lopq.model import LOPQModel

_VECTOR_VALUE_TYPES = (pa.float32(), pa.float64())


def vectors_from_column(stage_name: str, col, name: str) -> np.ndarray:
    """A list / large_list / fixed_size_list column of floats as float64 (N, D), without row loops."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        first = int(np.flatnonzero(~np.asarray(col.is_valid()))[0])
        raise InputError(f"Stage {stage_name!r}: column {name!r} has {col.null_count} null vector(s), the first "
                         f"at row {first} of the batch; drop them first")
    n = len(col)
    if pa.types.is_fixed_size_list(col.type):
        D = col.type.list_size
        values = col.flatten()
    else:
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        D = int(lengths[0]) if n else 0
        if n and (lengths != D).any():
            bad = int(np.flatnonzero(lengths != D)[0])
            raise InputError(f"Stage {stage_name!r}: vector at row {bad} of column {name!r} has {int(lengths[bad])} "
                             f"values, row 0 has {D}; every vector must have the model's dimension")
        values = col.flatten()
    if values.null_count:
        raise InputError(f"Stage {stage_name!r}: column {name!r} holds null values inside vectors; drop or fill them")
    flat = values.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    return flat.reshape(n, D) if n else np.empty((0, D))


def _check_vector_field(stage_name: str, schema: pa.Schema, name: str) -> None:
    idx = schema.get_field_index(name)
    if idx < 0:
        raise SchemaError(f"Stage {stage_name!r} needs a vector column {name!r} (array<float> or array<double>); "
                          f"the input has columns {schema.names}")
    t = schema.field(idx).type
    if not ((pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
            and t.value_type in _VECTOR_VALUE_TYPES):
        raise SchemaError(f"Stage {stage_name!r}: column {name!r} must be a list of float or double "
                          f"(array<float>/array<double>), found {t}; cast it first")


# --- encoding -------------------------------------------------------------------------------------

_MODELS: "collections.OrderedDict[str, LOPQModel]" = collections.OrderedDict()
_MODELS_LOCK = threading.Lock()
#: Parsed models kept per process, by resource digest: a worker serves many Runs of one model.
MODEL_CACHE_SIZE = 4


def model_from_resource(stage_name: str, digest: str, resources: dict) -> LOPQModel:
    # The same answer whether or not this process has parsed the model before: a Run must
    # attach the model it names even when the cache could serve it.
    if digest not in resources:
        raise InvalidParamsError(
            f"Stage {stage_name!r} param 'model' names resource {digest!r}, which this Run did not attach "
            f"(attached: {sorted(resources) or 'none'}); upload the model file with PutResource and list its "
            "digest in the Run's resources"
        )
    with _MODELS_LOCK:
        if digest in _MODELS:
            _MODELS.move_to_end(digest)
            return _MODELS[digest]
    model = LOPQModel.from_bytes(resources[digest], source=f"the model resource {digest[:12]}")
    with _MODELS_LOCK:
        _MODELS[digest] = model
        while len(_MODELS) > MODEL_CACHE_SIZE:
            _MODELS.popitem(last=False)
    return model


def _encode_schema(input_schema: pa.Schema, params: dict) -> pa.Schema:
    id_col, vector_col = params["id_col"], params["vector_col"]
    idx = input_schema.get_field_index(id_col)
    if idx < 0:
        raise SchemaError(f"Stage 'lopq_encode' needs an id column {id_col!r}; the input has columns {input_schema.names}")
    _check_vector_field("lopq_encode", input_schema, vector_col)
    if params["model"] == "":
        raise InvalidParamsError("Stage 'lopq_encode' needs param 'model': the sha256 digest of the uploaded model file")
    return pa.schema([pa.field(id_col, input_schema.field(idx).type),
                      pa.field("coarse", pa.list_(pa.int32())), pa.field("fine", pa.list_(pa.int32()))])


def _list_column(codes: np.ndarray) -> pa.Array:
    n, k = codes.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(codes.ravel(), type=pa.int32()))


@stage(
    "lopq_encode",
    params=[
        Param("model", "string", "sha256 digest of the LOPQ model file (LOPQModelParams protobuf) uploaded as a "
                                 "resource.", default=""),
        Param("id_col", "string", "Id column, copied to the output.", default="id"),
        Param("vector_col", "string", "Vector column: array<float> or array<double> of the model's input dimension.",
              default="vector"),
    ],
    output_schema=_encode_schema,
    input_doc="an id column of any type and a vector column (list or fixed-size list of float32/float64)",
    uses_resources=True,
)
class LopqEncodeStage:
    """LOPQ codes of vectors: (id, coarse [c0, c1], fine [f0, ..., fM-1]) per input row."""

    def __init__(self, model, id_col, vector_col, resources):
        self._model = model_from_resource("lopq_encode", model, resources)
        self._id, self._vec = id_col, vector_col

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        X = vectors_from_column("lopq_encode", batch.column(self._vec), self._vec)
        if X.shape[0] and X.shape[1] != self._model.input_dim:
            raise InputError(f"Stage 'lopq_encode': vectors in column {self._vec!r} have dimension {X.shape[1]}, "
                             f"the model takes {self._model.input_dim}")
        coarse, fine = self._model.encode(X)
        ids = batch.column(self._id)
        # The declared id field, not the input's: its nullability must match what Describe promised.
        schema = pa.schema([pa.field(self._id, ids.type), pa.field("coarse", pa.list_(pa.int32())),
                            pa.field("fine", pa.list_(pa.int32()))])
        return pa.RecordBatch.from_arrays([ids, _list_column(coarse), _list_column(fine)], schema=schema)

    def finish(self):
        return None


# --- training ---------------------------------------------------------------------------------------

PHASES = ("chunk", "combine", "aggregate")
_PARTIAL_SCHEMA = pa.schema([("partial", pa.binary())])
# state: the whole training state in float64 (npz), for the next pass; model: the LOPQModelParams
# protobuf of that state once it is a complete model (empty before), what a driver keeps at the end.
_STATE_SCHEMA = pa.schema([("state", pa.binary()), ("inertia", pa.float64()), ("model", pa.binary())])


def _train_schema(input_schema: pa.Schema, params: dict) -> pa.Schema:
    if params["phase"] == "chunk":
        _check_vector_field("lopq_train", input_schema, params["vector_col"])
    else:
        idx = input_schema.get_field_index("partial")
        if idx < 0 or input_schema.field(idx).type not in (pa.binary(), pa.large_binary()):
            raise SchemaError(f"Stage 'lopq_train' phase {params['phase']!r} reads a binary column 'partial' "
                              f"(the output of phase 'chunk' or 'combine'); the input has {input_schema}")
    _config(params).check()
    if params["step"] != "pca" and not params["state"]:
        raise InvalidParamsError(f"Stage 'lopq_train' step {params['step']!r} needs param 'state': the digest of "
                                 "the training state the previous pass's aggregate produced")
    return _STATE_SCHEMA if params["phase"] == "aggregate" else _PARTIAL_SCHEMA


def _config(params: dict) -> T.TrainConfig:
    return T.TrainConfig(D_in=params["dim"], V=params["V"], M=params["M"],
                         subquantizer_clusters=params["subquantizer_clusters"], pca=params["pca"],
                         pca_dim=params["pca_dim"] or None, seed=params["seed"],
                         init_sample=params["init_sample"] or None, sample_iters=params["sample_iters"],
                         rotation_iters=params["rotation_iters"])


def _positive(v):
    return None if v >= 1 else "must be >= 1"


@stage(
    "lopq_train",
    kind="reduce",
    params=[
        Param("step", "string", "Training pass.", choices=tuple(T.PASSES)),
        Param("phase", "string", "chunk (vectors -> partial), combine (partials -> partial) or aggregate "
                                 "(partials -> next state).", choices=PHASES),
        Param("dim", "int", "Input vector dimension.", check=_positive),
        Param("V", "int", "Coarse clusters per half.", check=_positive),
        Param("M", "int", "Subquantizers in total (even, dividing the LOPQ dimension).", check=_positive),
        Param("subquantizer_clusters", "int", "Clusters per subquantizer.", default=256, check=_positive),
        Param("pca", "bool", "Rotate onto principal axes and balance the halves first.", default=True),
        Param("pca_dim", "int", "Principal axes kept; 0 keeps all.", default=0),
        Param("seed", "int", "Seed of sampling and k-means++.", default=0),
        Param("init_sample", "int", f"Points sampled for k-means++; 0: {T.INIT_SAMPLE_PER_CLUSTER} per cluster, at "
                                    "least 1024.", default=0),
        Param("sample_iters", "int", "Subquantizer Lloyd steps on the k-means++ sample (step sub_init).",
              default=T.TrainConfig.sample_iters),
        Param("rotation_iters", "int", "Of those, the last ones that also refine the rotations (step sub_init; 0 "
                                       "when the rotations are given, not trained).",
              default=T.TrainConfig.rotation_iters),
        Param("state", "string", "Digest of the training state resource (empty for the pca pass).", default=""),
        Param("vector_col", "string", "Vector column (phase chunk).", default="vector"),
    ],
    output_schema=_train_schema,
    input_doc="phase chunk: a vector column; phases combine and aggregate: a binary column 'partial'",
    uses_resources=True,
)
class LopqTrainStage:
    """One LOPQ training pass as a reduction: emits one row when the stream ends."""

    def __init__(self, step, phase, dim, V, M, subquantizer_clusters, pca, pca_dim, seed, init_sample, sample_iters,
                 rotation_iters, state, vector_col, resources):
        self._pass = T.PASSES[step]
        self._phase = phase
        cfg = _config(dict(dim=dim, V=V, M=M, subquantizer_clusters=subquantizer_clusters, pca=pca,
                           pca_dim=pca_dim, seed=seed, init_sample=init_sample, sample_iters=sample_iters,
                           rotation_iters=rotation_iters))
        if state:
            if state not in resources:
                raise InvalidParamsError(f"Stage 'lopq_train' param 'state' names resource {state!r}, which this Run "
                                         "did not attach; upload it and list its digest in the Run's resources")
            self._state = dataclasses.replace(T.state_from_bytes(resources[state]), config=cfg)
        else:
            self._state = T.TrainState(cfg)
        self._vec = vector_col
        self._acc = None

    def _add(self, partial) -> None:
        self._acc = partial if self._acc is None else self._pass.combine(self._acc, partial)

    def process(self, batch: pa.RecordBatch):
        if self._phase == "chunk":
            X = vectors_from_column("lopq_train", batch.column(self._vec), self._vec)
            if X.shape[0]:
                from ferry.stages.lopq.model import as_vectors
                X = as_vectors(X, self._state.config.D_in, what=f"column {self._vec!r}")
                self._add(self._pass.chunk(X, self._state))
        else:
            for blob in batch.column("partial").to_pylist():
                if blob is None:
                    raise InputError("Stage 'lopq_train': a null partial; every row must come from a chunk or combine")
                self._add(T.partial_from_bytes(blob))
        return None

    def finish(self):
        if self._phase != "aggregate":
            if self._acc is None:
                return empty_batch(_PARTIAL_SCHEMA)
            return pa.RecordBatch.from_pydict({"partial": [T.partial_to_bytes(self._acc)]}, schema=_PARTIAL_SCHEMA)
        if self._acc is None:
            raise InputError("Stage 'lopq_train' phase 'aggregate' received no partials: the data was empty")
        new = self._pass.aggregate(self._acc, self._state)
        inertia = float("nan") if new.inertia is None else new.inertia
        model = new.model() if new.Cs is not None else None
        return pa.RecordBatch.from_pydict({"state": [T.state_to_bytes(new)], "inertia": [inertia],
                                           "model": [model.to_bytes() if model is not None and model.complete
                                                     else b""]}, schema=_STATE_SCHEMA)
