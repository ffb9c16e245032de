"""The LOPQ stages: lopq_encode (map) and lopq_train (reduce), in-process and over a real worker."""
import dataclasses
import json
import pickle

import numpy as np
import pyarrow as pa
import pytest

from ferry import registry
from ferry.errors import InputError, InvalidParamsError, SchemaError
from ferry.lopq import LOPQModel, fit
from ferry.stages.lopq import train as T
import os

from tests.paths import LOPQ_DATA

DATA = LOPQ_DATA
FIXTURE = f"{DATA}/random_test_model.lopq"


def fixture_examples():
    with open(f"{DATA}/random_test_model_examples.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["id"] for r in rows], np.array([r["vector"] for r in rows]), [r["code"] for r in rows]


def vector_table(ids, X, kind="list", value_type=pa.float64()):
    flat = pa.array(np.asarray(X).ravel(), type=value_type)
    if kind == "fixed":
        vec = pa.FixedSizeListArray.from_arrays(flat, X.shape[1])
    else:
        vec = pa.ListArray.from_arrays(pa.array(np.arange(0, X.size + 1, X.shape[1], dtype=np.int32)), flat)
    return pa.table({"id": pa.array(ids, pa.int64()), "vector": vec})


def run_in_process(name, params, table, resources=None):
    st = registry.get(name)
    resolved = st.resolve_params(params)
    out_schema = st.output_schema(table.schema, resolved)
    proc = st.open(resolved, resources or {})
    outs = [proc.process(b) for b in table.to_batches(max_chunksize=7)]
    tail = proc.finish()
    batches = [b for b in outs + [tail] if b is not None and b.num_rows]
    return pa.Table.from_batches(batches, schema=out_schema) if batches else out_schema.empty_table()


def codes_of(table):
    return [[c, f] for c, f in zip(table.column("coarse").to_pylist(), table.column("fine").to_pylist())]


@pytest.fixture(scope="module")
def fixture_resource():
    import hashlib

    with open(FIXTURE, "rb") as f:
        data = f.read()
    return hashlib.sha256(data).hexdigest(), data


@pytest.mark.parametrize("kind,value_type", [("list", pa.float64()), ("fixed", pa.float64()), ("list", pa.float32())])
def test_encode_stage_gives_the_reference_codes(fixture_resource, kind, value_type):
    digest, data = fixture_resource
    ids, X, codes = fixture_examples()
    table = vector_table(ids, X, kind, value_type)
    out = run_in_process("lopq_encode", {"model": digest}, table, {digest: data})
    assert out.schema.names == ["id", "coarse", "fine"]
    assert out.column("id").to_pylist() == ids
    if value_type == pa.float64():
        assert codes_of(out) == codes
    else:
        want = LOPQModel.load(FIXTURE).encode(X.astype(np.float32))
        assert codes_of(out) == [[list(c), list(f)] for c, f in zip(*want)]


def test_encode_stage_schema_and_param_errors(fixture_resource):
    st = registry.get("lopq_encode")
    ok = pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32()))])
    out = st.output_schema(ok, st.resolve_params({"model": "abc"}))
    assert out.field("id").type == pa.string() and out.field("fine").type == pa.list_(pa.int32())
    with pytest.raises(SchemaError, match=r"column 'vector' must be a list of float or double .* found list<item: string>"):
        st.output_schema(pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.string()))]), st.resolve_params({"model": "a"}))
    with pytest.raises(SchemaError, match=r"needs an id column 'key'"):
        st.output_schema(ok, st.resolve_params({"model": "a", "id_col": "key"}))
    with pytest.raises(InvalidParamsError, match=r"needs param 'model'"):
        st.output_schema(ok, st.resolve_params({}))
    with pytest.raises(InvalidParamsError, match=r"did not attach"):
        st.open(st.resolve_params({"model": "0" * 64}), {})


def test_encode_stage_data_errors(fixture_resource):
    digest, data = fixture_resource
    res = {digest: data}
    ids, X, _ = fixture_examples()
    with pytest.raises(InputError, match=r"dimension 7, the model takes 8"):
        run_in_process("lopq_encode", {"model": digest}, vector_table(ids, X[:, :7]), res)
    ragged = pa.table({"id": pa.array([1, 2], pa.int64()), "vector": pa.array([[1.0] * 8, [1.0] * 7])})
    with pytest.raises(InputError, match=r"row 1 of column 'vector' has 7 values, row 0 has 8"):
        run_in_process("lopq_encode", {"model": digest}, ragged, res)
    nulls = pa.table({"id": pa.array([1, 2], pa.int64()), "vector": pa.array([[1.0] * 8, None])})
    with pytest.raises(InputError, match=r"1 null vector\(s\), the first at row 1"):
        run_in_process("lopq_encode", {"model": digest}, nulls, res)
    nan = X.copy()
    nan[4, 2] = np.nan
    with pytest.raises(InputError, match=r"must be finite; row 4"):
        run_in_process("lopq_encode", {"model": digest}, vector_table(ids, nan), res)


def test_encode_over_a_real_worker(client, fixture_resource):
    digest, data = fixture_resource
    assert client.put_resource(data) == digest
    ids, X, codes = fixture_examples()
    out = client.run_table("lopq_encode", {"model": digest}, vector_table(ids, X), resources=[digest])
    assert out.column("id").to_pylist() == ids
    assert codes_of(out) == codes
    spec = {s.name: s for s in client.list_stages()}
    assert "lopq_encode" in spec and "lopq_train" in spec
    # A non-nullable id column (as a JVM streaming source sends) comes back as Describe declares it.
    table = vector_table(ids, X)
    strict = table.cast(pa.schema([pa.field("id", table.schema.field("id").type, nullable=False),
                                   table.schema.field("vector")]))
    out = client.run_table("lopq_encode", {"model": digest}, strict, resources=[digest])
    assert codes_of(out) == codes and out.schema.field("id").nullable


def test_a_pickle_uploaded_as_the_model_fails_with_a_clear_error(client):
    blob = pickle.dumps({"Cs": np.zeros((2, 5, 4))}, protocol=4)
    digest = client.put_resource(blob)
    ids, X, _ = fixture_examples()
    with pytest.raises(InputError, match=r"is a Python pickle.*never loads pickles"):
        client.run_table("lopq_encode", {"model": digest}, vector_table(ids, X), resources=[digest])


# --- training through the reduce stage -----------------------------------------------------------------

def mixture(n, d, k, seed):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((k, d)) * 3
    rng = np.random.default_rng(seed)
    return centers[rng.integers(k, size=n)] + rng.standard_normal((n, d))


CONFIG = dict(dim=16, V=4, M=4, subquantizer_clusters=16, seed=5)


def drive_training(X, partitions, run_stage, put):
    """What a Spark driver does: chunk on each partition, combine as a tree, aggregate, next pass.

    run_stage(params, table, resources) -> table; put(bytes) -> resource digest.
    """
    parts = np.array_split(X, partitions)
    cfg = T.TrainConfig(D_in=16, V=4, M=4, subquantizer_clusters=16, seed=5, coarse_iters=4, sub_iters=4)
    state_digest, state_bytes = "", None
    steps = T.plan(cfg, T.TrainState(cfg))
    step = next(steps)
    inertia = None
    while True:
        params = {**CONFIG, "step": step, "state": state_digest}
        res = [state_digest] if state_digest else []
        partials = [run_stage({**params, "phase": "chunk"}, vector_table(np.arange(len(p)), p), res)
                    for p in parts]
        rows = pa.concat_tables(partials)
        # One level of tree combination, then the aggregate.
        left = run_stage({**params, "phase": "combine"}, rows.slice(0, 2), res)
        rows = pa.concat_tables([left, rows.slice(2)])
        out = run_stage({**params, "phase": "aggregate"}, rows, res)
        state_bytes = out.column("state")[0].as_py()
        state_digest = put(state_bytes)
        new = dataclasses.replace(T.state_from_bytes(state_bytes), config=cfg)
        value = out.column("inertia")[0].as_py()
        if step.endswith("_step"):
            assert new.inertia == value
        try:
            step = steps.send(new)
        except StopIteration:
            assert out.column("model")[0].as_py() == new.model().to_bytes()
            return new.model()
        assert out.column("model")[0].as_py() == b"" or step in ("sub_init", "sub_step", "sub_rotation_step")


def test_training_through_the_reduce_stage_equals_fit():
    import hashlib

    X = mixture(1500, 16, 8, seed=1)
    store = {}

    def put(data):
        d = hashlib.sha256(data).hexdigest()
        store[d] = data
        return d

    model = drive_training(X, 3, lambda params, table, res: run_in_process("lopq_train", params, table,
                                                                           {d: store[d] for d in res}), put)
    want = fit(X, V=4, M=4, subquantizer_clusters=16, seed=5, coarse_iters=4, sub_iters=4)
    # The states travel in float64: the stage-driven training is fit's, up to summation order.
    for name in ("Cs", "Rs", "mus", "subs"):
        np.testing.assert_allclose(getattr(model, name), getattr(want, name), rtol=0, atol=1e-9)
    for a, b in zip(model.encode(X), want.encode(X)):
        np.testing.assert_array_equal(a, b)


def test_a_training_pass_over_a_real_worker(client):
    X = mixture(900, 16, 8, seed=2)
    params = {**CONFIG, "step": "pca"}
    partials = [client.run_table("lopq_train", {**params, "phase": "chunk"}, vector_table(np.arange(300), part))
                for part in np.array_split(X, 3)]
    assert all(p.num_rows == 1 and p.schema.names == ["partial"] for p in partials)
    out = client.run_table("lopq_train", {**params, "phase": "aggregate"}, pa.concat_tables(partials))
    cfg = T.TrainConfig(D_in=16, V=4, M=4, subquantizer_clusters=16, seed=5)
    state = T.state_from_bytes(out.column("state")[0].as_py())
    assert out.column("model")[0].as_py() == b""  # not a model yet after the PCA pass
    want = T.run_pass(T.PASSES["pca"], [X], T.TrainState(cfg))
    np.testing.assert_allclose(state.pca.projection, want.pca.projection, atol=1e-6)
    with pytest.raises(InvalidParamsError, match=r"step 'coarse_step' needs param 'state'"):
        client.run_table("lopq_train", {**CONFIG, "step": "coarse_step", "phase": "chunk"}, vector_table([0], X[:1]))
    with pytest.raises(SchemaError, match=r"reads a binary column 'partial'"):
        client.run_table("lopq_train", {**params, "phase": "combine"}, vector_table([0], X[:1]))
