"""LOPQ training: each pass's chunk/combine/aggregate triad against the whole data, fit end to end."""
import dataclasses

import numpy as np
import pytest

from ferry.errors import InputError, InvalidParamsError
from ferry.lopq import LOPQModel, LOPQTrainingWarning, fit
from ferry.stages.lopq import train as T
from ferry.stages.lopq.model import Centroids
from tests.synthetic import mixture


def random_chunks(X, parts, seed):
    """X cut at random places into `parts` chunks (some may be empty)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, X.shape[0] + 1, size=parts - 1))
    return np.split(X, cuts)


def reduce_random_tree(partials, combine, seed):
    """Combines partials in a random order and tree shape: combine must not care."""
    rng = np.random.default_rng(seed)
    items = list(partials)
    while len(items) > 1:
        i = int(rng.integers(len(items) - 1))
        items[i:i + 2] = [combine(items[i], items[i + 1])]
    return items[0]


def run(p, chunks, state, seed=0):
    return p.aggregate(reduce_random_tree([p.chunk(X, state) for X in chunks], p.combine, seed), state)


CHUNKINGS = [1, 3, 7]


@pytest.fixture(scope="module")
def data():
    # An offset mean makes naive sum-of-squares covariance lose digits; Chan's update must not.
    return mixture(3000, 16, 12, seed=1) + 1e3


def trained_state(X, steps, **cfg):
    cfg = T.TrainConfig(D_in=X.shape[1], **{"V": 4, "M": 4, "subquantizer_clusters": 16, **cfg})
    state = T.TrainState(cfg)
    for name in steps:
        state = T.run_pass(T.PASSES[name], [X], state)
    return state


@pytest.mark.parametrize("parts", CHUNKINGS)
def test_pca_moments_any_chunking_equals_numpy(data, parts):
    m = reduce_random_tree([T.moments_chunk(c) for c in random_chunks(data, parts, parts)], T.moments_combine, parts)
    assert m.n == data.shape[0]
    np.testing.assert_allclose(m.mean, data.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(T.covariance(m), np.cov(data, rowvar=False), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("parts", CHUNKINGS)
def test_pca_pass_any_chunking_equals_single_chunk(data, parts):
    state = T.TrainState(T.TrainConfig(D_in=16, V=4, M=4))
    one = run(T.PASSES["pca"], [data], state)
    many = run(T.PASSES["pca"], random_chunks(data, parts, 10 + parts), state, seed=parts)
    np.testing.assert_allclose(many.pca.projection, one.pca.projection, atol=1e-9)
    np.testing.assert_allclose(many.pca.mean, one.pca.mean, rtol=1e-12)


def test_pca_is_orthonormal_and_balances_the_halves(data):
    state = run(T.PASSES["pca"], [data], T.TrainState(T.TrainConfig(D_in=16, V=4, M=4, pca_dim=12)))
    P = state.pca.projection
    assert P.shape == (16, 12)
    np.testing.assert_allclose(P.T @ P, np.eye(12), atol=1e-6)
    Y = state.pca.apply(data)
    var = Y.var(axis=0, ddof=1)
    # Decorrelated, and both halves carry about the same log-volume of variance.
    cov = np.cov(Y, rowvar=False)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 1e-3 * var.max()
    logs = np.log(var)
    assert abs(logs[:6].sum() - logs[6:].sum()) < 0.25 * abs(logs).sum()
    # The kept axes are the 12 of largest variance.
    all_var = np.sort(np.linalg.eigvalsh(np.cov(data, rowvar=False)))[::-1]
    np.testing.assert_allclose(np.sort(var)[::-1], all_var[:12], rtol=1e-4)


def test_eigenvalue_allocation_balances_log_products():
    ev = np.array([100.0, 50, 20, 10, 5, 2, 1, 0.5])
    perm = T.eigenvalue_allocation(2, ev)
    assert sorted(perm) == list(range(8))
    a, b = np.log(ev[perm[:4]]).sum(), np.log(ev[perm[4:]]).sum()
    assert abs(a - b) <= np.log(ev).max() - np.log(ev).min()
    # Eigenvalues below 1 and zeros still spread out: the three largest open three buckets,
    # then each bucket takes a small one, the largest bucket last.
    small = np.array([1e-3, 1e-4, 1e-5, 1e-6, 0.0, 0.0])
    buckets = T.eigenvalue_allocation(3, small).reshape(3, 2)
    assert [tuple(sorted(b)) for b in buckets] == [(0, 4), (1, 5), (2, 3)]
    with pytest.raises(InvalidParamsError, match="do not split into 4 equal buckets"):
        T.eigenvalue_allocation(4, np.ones(6))


@pytest.mark.parametrize("parts", CHUNKINGS)
def test_a_kmeans_step_any_chunking_equals_single_chunk(data, parts):
    rng = np.random.default_rng(5)
    C = data[rng.choice(data.shape[0], 9, replace=False)] + 0.1
    whole = T.kmeans_chunk(data, C)
    p = reduce_random_tree([T.kmeans_chunk(c, C) for c in random_chunks(data, parts, parts)], T.kmeans_combine, parts)
    np.testing.assert_array_equal(p.counts, whole.counts)
    np.testing.assert_allclose(p.sums, whole.sums, rtol=1e-12)
    assert p.inertia == pytest.approx(whole.inertia, rel=1e-12)
    np.testing.assert_allclose(T.kmeans_aggregate(p, C), T.kmeans_aggregate(whole, C), rtol=1e-12, atol=1e-9)
    # And the step is Lloyd's: means of the points nearest each centroid.
    labels = ((data[:, None, :] - C[None]) ** 2).sum(-1).argmin(1)
    want = np.stack([data[labels == k].mean(0) for k in range(9)])
    np.testing.assert_allclose(T.kmeans_aggregate(whole, C), want, rtol=1e-12)


def test_kmeans_plus_plus_seeds_each_set_of_a_stack_as_it_would_alone():
    rng = np.random.default_rng(5)
    sets = rng.standard_normal((3, 396, 6))
    # The third set: 12 integer points, 33 copies each, two of which differ by 2^-40 in one
    # coordinate: distinct in float64, one point to the float32 distances that weigh the
    # sampling. Its 12th centre comes from the exact fallback, not from rounding noise (which
    # picked a copy of a centre already chosen before the noise floor).
    pts = rng.integers(-2, 3, size=(12, 6)).astype(float)
    pts[11] = pts[10]
    pts[11, 0] += 2.0 ** -40
    sets[2] = np.repeat(pts, 33, axis=0)
    stacked = T.kmeans_plus_plus(sets, 12, [np.random.default_rng(b) for b in range(3)])
    for b in range(3):
        alone = T.kmeans_plus_plus(sets[b:b + 1], 12, [np.random.default_rng(b)])[0]
        np.testing.assert_array_equal(stacked[b], alone)
        assert all((sets[b] == c).all(1).any() for c in alone)      # centres are rows of the set
        assert np.unique(alone, axis=0).shape[0] == 12               # all different
    np.testing.assert_array_equal(np.unique(stacked[2], axis=0), np.unique(pts, axis=0))


def test_k_means_plus_plus_draws_points_with_probability_proportional_to_their_weight():
    # The two-level draw (a block by the blocks' running sums, then a point within it) picks
    # what np.searchsorted on the running sum over all the points picks, blocks of zeros and a
    # zero-padded last block included.
    rng = np.random.default_rng(8)
    w = rng.random((3, 7 * T._KPP_BLOCK)).astype(np.float32) ** 4
    w[0, T._KPP_BLOCK:3 * T._KPP_BLOCK] = 0          # two empty blocks
    w[1, ::2] = 0                                    # points that may never be drawn
    w[2, 6 * T._KPP_BLOCK + 5:] = 0                  # the padding of a last, ragged block
    u = rng.random((3, 500))
    got, total = T._draw(w.reshape(3, 7, T._KPP_BLOCK), u)
    for b in range(3):
        cum = np.cumsum(w[b], dtype=np.float64)
        np.testing.assert_array_equal(got[b], np.searchsorted(cum, u[b] * cum[-1], side="right"))
        assert total[b] == pytest.approx(cum[-1], rel=1e-6)
        assert (w[b, got[b]] > 0).all()
    # And the frequencies follow the weights.
    many, _ = T._draw(w[1:2].reshape(1, 7, T._KPP_BLOCK), rng.random((1, 200_000)))
    freq = np.bincount(many[0], minlength=w.shape[1]) / many.size
    np.testing.assert_allclose(freq, w[1] / w[1].sum(), atol=0.004)


@pytest.mark.parametrize("rows_per_cluster", [3, 40, 2000])
def test_cross_moments_by_code_sums_or_directly_equal_the_definition(rows_per_cluster):
    # A rotation step's cross moments, sum over each cluster's rows of y r^T (y: the codes'
    # reconstruction), come by code sums when clusters hold many rows and directly when few;
    # either way they are the definition's. Cluster 2 is empty.
    rng = np.random.default_rng(rows_per_cluster)
    mh, K, d, V = 2, 16, 4, 5
    counts = np.array([rows_per_cluster, 2 * rows_per_cluster, 0, 1, rows_per_cluster])
    bounds = np.concatenate(([0], np.cumsum(counts)))
    n = int(bounds[-1])
    r = rng.standard_normal((n, mh * d))
    subs = rng.standard_normal((mh, K, d))
    labels = rng.integers(0, K, size=(mh, n))
    got = np.full((V, mh * d, mh * d), np.nan)
    got[2] = 0.0
    T._cross_moments(r, labels, subs, counts, bounds, out=got)
    y = np.concatenate([subs[j][labels[j]] for j in range(mh)], axis=1)
    want = np.stack([y[a:b].T @ r[a:b] for a, b in zip(bounds, bounds[1:])])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


def test_fit_equals_its_passes_run_without_the_drivers_cache(data):
    # fit() keeps prepared chunks between passes (the PCA'd halves, the subquantizers' frames,
    # these started from those halves): the model is the one the passes give run one by one,
    # each preparing its own chunk, bit for bit.
    kw = dict(V=4, M=4, subquantizer_clusters=16, seed=2)
    got = fit(data, **kw)
    state = T.initial_state(data.shape[1], **kw)
    want = T.drive(state, (0, 1, 2), lambda name, st: T.run_pass(T.PASSES[name], [data], st),
                   progress=lambda *a: None).model()
    for name in ("Cs", "Rs", "mus", "subs"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    np.testing.assert_array_equal(got.pca.projection, want.pca.projection)


def test_an_empty_cluster_moves_to_a_far_point(data):
    C = np.vstack([data[:3], np.full((1, 16), 1e6)])    # the last centroid attracts nothing
    p = T.kmeans_chunk(data, C)
    assert p.counts[3] == 0
    new = T.kmeans_aggregate(p, C)
    assert any(np.array_equal(new[3], row) for row in data)


@pytest.mark.parametrize("parts", CHUNKINGS)
def test_coarse_and_subquantizer_steps_any_chunking_equal_single_chunk(data, parts):
    sub_ready = ["coarse_init", "rotations", "sub_init"]
    for step, ready in (("coarse_step", ["coarse_init"]), ("sub_step", sub_ready), ("sub_rotation_step", sub_ready)):
        state = trained_state(data, ready, pca=False)
        one = run(T.PASSES[step], [data], state)
        many = run(T.PASSES[step], random_chunks(data, parts, 20 + parts), state, seed=parts)
        fields = {"coarse_step": ["Cs"], "sub_step": ["subs"], "sub_rotation_step": ["subs", "Rs"]}[step]
        for field in fields:
            np.testing.assert_allclose(getattr(many, field), getattr(one, field), rtol=1e-9, atol=1e-9)
        assert many.inertia == pytest.approx(one.inertia, rel=1e-9)


def test_a_rotation_step_is_lloyd_for_the_subquantizers_and_procrustes_for_the_rotations(data):
    state = trained_state(data, ["coarse_init", "coarse_step", "rotations", "sub_init", "sub_step"], pca=False)
    new = run(T.PASSES["sub_rotation_step"], [data], state)
    # The subquantizers take the Lloyd step a sub_step takes from the same state.
    np.testing.assert_allclose(new.subs, run(T.PASSES["sub_step"], [data], state).subs, rtol=1e-12, atol=1e-12)
    model = state.model()
    coarse, Z = model.project(data)
    fine = np.stack([((Z[:, None, 4 * m:4 * m + 4] - state.subs[m][None]) ** 2).sum(-1).argmin(1) for m in range(4)], 1)
    Y = np.concatenate([state.subs[m][fine[:, m]] for m in range(4)], axis=1)   # reconstructions, local frames
    for h in (0, 1):
        for v in range(4):
            rows = coarse[:, h] == v
            r = data[rows, 8 * h:8 * h + 8] - model.Cs[h][v] - model.mus[h][v]
            y = Y[rows, 8 * h:8 * h + 8]
            R_old, R_new = state.Rs[h, v], new.Rs[h, v]
            np.testing.assert_allclose(R_new @ R_new.T, np.eye(8), atol=1e-9)
            # Orthogonal Procrustes: no orthogonal matrix fits the codes better, so none of
            # the old rotation and random ones do.
            err = lambda R: ((r @ R.T - y) ** 2).sum()
            assert err(R_new) <= err(R_old) * (1 + 1e-12)
            for k in range(5):
                Qr, _ = np.linalg.qr(np.random.default_rng(k).standard_normal((8, 8)))
                assert err(R_new) <= err(R_old @ Qr if k % 2 else Qr) * (1 + 1e-12)


def test_rotation_iters_zero_trains_the_reference_rotations(data):
    seen = []
    kw = dict(V=4, M=4, subquantizer_clusters=16, seed=1, sub_iters=5)
    plain = fit(data, **kw, rotation_iters=0, progress=lambda name, state, s: seen.append((name, state.Rs)))
    names = [n for n, _ in seen]
    assert "sub_rotation_step" not in names and 1 <= names.count("sub_step") <= 5
    # Its rotations are the rotations pass's (eigenvectors of each cluster's residual covariance).
    np.testing.assert_array_equal(plain.Rs, LOPQModel(plain.Cs, dict(seen)["rotations"], plain.mus, M=4).Rs)
    refined = fit(data, **kw)
    assert not np.allclose(refined.Rs, plain.Rs, atol=1e-3)
    # Step 2 alone keeps the rotations it is given.
    again = fit(data, **{**kw, "V": None}, steps=[2], existing=refined)
    np.testing.assert_array_equal(again.Rs, refined.Rs)


@pytest.mark.parametrize("parts", CHUNKINGS)
def test_rotation_accumulators_any_chunking_equal_single_chunk(data, parts):
    state = trained_state(data, ["coarse_init", "coarse_step"], pca=False)
    p = T.PASSES["rotations"]
    whole = p.chunk(data, state)
    many = reduce_random_tree([p.chunk(c, state) for c in random_chunks(data, parts, 30 + parts)], p.combine, parts)
    np.testing.assert_array_equal(many.counts, whole.counts)
    np.testing.assert_allclose(many.means, whole.means, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(many.scatter, whole.scatter, rtol=1e-9, atol=1e-7)
    # Against numpy: residual mean and covariance of each cluster of the first half.
    Y = data[:, :8]
    labels = ((Y[:, None, :] - state.Cs[0][None]) ** 2).sum(-1).argmin(1)
    for v in range(4):
        r = Y[labels == v] - state.Cs[0][v]
        np.testing.assert_allclose(whole.means[0, v], r.mean(0), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(whole.scatter[0, v] / (len(r) - 1), np.cov(r, rowvar=False), rtol=1e-9, atol=1e-9)
    # The aggregate's rotations are orthonormal and decorrelate each cluster's residuals.
    new = p.aggregate(whole, state)
    for h in (0, 1):
        for v in range(4):
            R = new.Rs[h, v]
            np.testing.assert_allclose(R @ R.T, np.eye(8), atol=1e-9)
    r = Y[labels == 0] - state.Cs[0][0] - new.mus[0, 0]
    cov = np.cov(r @ new.Rs[0, 0].T, rowvar=False)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 1e-9 * np.abs(cov).max() + 1e-9


@pytest.mark.parametrize("parts", CHUNKINGS)
def test_init_samples_do_not_depend_on_chunking(data, parts):
    state = T.TrainState(T.TrainConfig(D_in=16, V=4, M=4, pca=False, init_sample=500))
    p = T.PASSES["coarse_init"]
    whole = p.chunk(data, state)
    many = reduce_random_tree([p.chunk(c, state) for c in random_chunks(data, parts, 40 + parts)], p.combine, parts)
    np.testing.assert_array_equal(many.keys, whole.keys)
    np.testing.assert_array_equal(many.rows, whole.rows)
    assert len(whole.keys) == 500


def test_partials_survive_their_wire_format(data):
    state = trained_state(data, ["coarse_init", "coarse_step"], pca=False)
    full = trained_state(data, ["coarse_init", "rotations", "sub_init"], pca=False)
    for name in ("pca", "coarse_init", "coarse_step", "rotations", "sub_rotation_step"):
        part = T.PASSES[name].chunk(data[:500], full if name.startswith("sub_") else state)
        back = T.partial_from_bytes(T.partial_to_bytes(part))
        assert type(back) is type(part)
        for a, b in zip(part if isinstance(part, tuple) else (part,), back if isinstance(back, tuple) else (back,)):
            for f in a.__dataclass_fields__:
                np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))
    with pytest.raises(InputError, match="does not decode"):
        T.partial_from_bytes(b"not an npz")


def test_fit_is_the_same_for_any_chunking(data):
    a = fit(data, V=4, M=4, subquantizer_clusters=16, seed=3, chunk_rows=3000, coarse_iters=4, sub_iters=4)
    b = fit(data, V=4, M=4, subquantizer_clusters=16, seed=3, chunk_rows=701, coarse_iters=4, sub_iters=4)
    for name in ("Cs", "Rs", "mus", "subs"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1e-6)
    for x, y in zip(a.encode(data), b.encode(data)):
        assert (x == y).mean() > 0.999


def test_the_default_schedule(data):
    seen = []
    fit(data, V=4, M=4, subquantizer_clusters=16, seed=0, progress=lambda name, state, s: seen.append(name))
    assert seen[:2] == ["pca", "coarse_init"] and 1 <= seen.count("coarse_step") <= 10
    # sub_init (with its 8 steps on the k-means++ sample, the last 4 refining the rotations), then
    # at most 4 passes over the data, every one refining the rotations too (their early stop
    # compares from the second on).
    tail = seen[seen.index("rotations") + 1:]
    assert tail[0] == "sub_init" and 2 <= len(tail) - 1 <= 4 and set(tail[1:]) == {"sub_rotation_step"}
    cfg = T.TrainConfig(D_in=16, V=4, M=4)
    assert (cfg.sub_iters, cfg.rotation_iters, cfg.sample_iters, cfg.coarse_iters) == (4, 4, 8, 10)


def test_fit_reduces_distortion_step_by_step(data):
    seen = []
    fit(data, V=4, M=4, subquantizer_clusters=16, seed=0, sample_iters=0, sub_iters=12, rotation_iters=8,
        progress=lambda name, state, s: seen.append((name, state.inertia)))
    names = [n for n, _ in seen]
    assert names[:2] == ["pca", "coarse_init"] and "rotations" in names
    # 12 subquantizer steps over the data, 4 Lloyd steps, then 8 that also refine the rotations.
    assert names[-13:] == ["sub_init"] + ["sub_step"] * 4 + ["sub_rotation_step"] * 8
    coarse = [i for n, i in seen if n == "coarse_step"]
    sub = [i for n, i in seen if n == "sub_step"]
    refined = [i for n, i in seen if n == "sub_rotation_step"]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(coarse, coarse[1:]))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(sub, sub[1:]))
    # Lloyd and Procrustes updates from one assignment are not a guaranteed descent together,
    # but the refinement must end well below where the plain Lloyd steps left the distortion.
    assert refined[-1] < 0.97 * sub[-1]


def test_sub_init_runs_sample_iters_lloyd_steps_on_its_sample(data):
    state = trained_state(data, ["pca", "coarse_init", "coarse_step", "rotations"])
    chunks = random_chunks(data, 3, 3)
    seeded = run(T.PASSES["sub_init"], chunks, dataclasses.replace(state, config=dataclasses.replace(
        state.config, sample_iters=0)))
    stepped = run(T.PASSES["sub_init"], chunks, dataclasses.replace(state, config=dataclasses.replace(
        state.config, sample_iters=3, rotation_iters=0)))
    # By hand: the same sample (the rows with the smallest keys), three Lloyd steps from k-means++.
    sample = T.tree_combine([T.sub_init_chunk(c, state) for c in chunks], T.sample_combine)
    subs = seeded.subs
    for _ in range(3):
        subs = np.stack([T.kmeans_aggregate(T.kmeans_chunk(z, c), c)
                         for z, c in zip(T._split(T.local_residuals(sample.rows, state), 4), subs)])
    np.testing.assert_allclose(stepped.subs, subs, rtol=1e-12, atol=1e-12)
    assert not np.allclose(stepped.subs, seeded.subs)
    seen = []
    fit(data, V=4, M=4, subquantizer_clusters=16, seed=0, sample_iters=8, sub_iters=8, rotation_iters=8,
        progress=lambda name, state, s: seen.append(name))
    # The sample steps inside sub_init, then 8 steps over the data, all refining rotations
    # (fewer if they converge: their early stop compares from the second on).
    tail = seen[seen.index("sub_init") + 1:]
    assert 2 <= len(tail) <= 8 and set(tail) == {"sub_rotation_step"}
    with pytest.raises(InvalidParamsError, match=r"sample_iters=-1"):
        fit(data, V=4, M=4, subquantizer_clusters=16, sample_iters=-1)


def test_sub_init_refines_the_rotations_on_its_sample_in_its_last_rotation_iters_steps(data):
    state = trained_state(data, ["pca", "coarse_init", "coarse_step", "rotations"])
    chunks = random_chunks(data, 3, 4)
    with_config = lambda **kw: dataclasses.replace(state, config=dataclasses.replace(state.config, **kw))
    seeded = run(T.PASSES["sub_init"], chunks, with_config(sample_iters=0))
    got = run(T.PASSES["sub_init"], chunks, with_config(sample_iters=5, rotation_iters=2))
    # By hand: 3 Lloyd steps on the sample (the rows with the smallest keys), then 2
    # sub_rotation_step passes with the sample as their one chunk.
    sample = T.tree_combine([T.sub_init_chunk(c, state) for c in chunks], T.sample_combine)
    subs = seeded.subs
    for _ in range(3):
        subs = np.stack([T.kmeans_aggregate(T.kmeans_chunk(z, c), c)
                         for z, c in zip(T._split(T.local_residuals(sample.rows, state), 4), subs)])
    want = dataclasses.replace(state, subs=subs)
    for _ in range(2):
        want = run(T.PASSES["sub_rotation_step"], [sample.rows], want)
    for name in ("subs", "Rs"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-12)
    assert not np.allclose(got.Rs, state.Rs, atol=1e-3)
    assert got.inertia is None          # the data's steps start their convergence test afresh
    # rotation_iters=0 (or rotations given, not trained: fit with steps without 1) keeps them.
    kept = run(T.PASSES["sub_init"], chunks, with_config(sample_iters=5, rotation_iters=0))
    np.testing.assert_array_equal(kept.Rs, state.Rs)
    given = fit(data, V=4, M=4, subquantizer_clusters=16, seed=1)
    again = fit(data, M=4, subquantizer_clusters=16, seed=1, steps=[2], existing=given, sample_iters=8)
    np.testing.assert_array_equal(again.Rs, given.Rs)


def test_too_few_points_per_cluster_warns_and_falls_back_to_identity():
    # 40 points in 8 coarse clusters of 16-dimensional halves: every cluster has fewer points
    # than dimensions, so no covariance can be estimated; the reference uses identity rotations.
    X = mixture(40, 32, 8, seed=2)
    with pytest.warns(LOPQTrainingWarning, match=r"fewer points than the 16 dimensions.*fall back to the identity"):
        m = fit(X, V=8, M=4, subquantizer_clusters=8, seed=0, pca=False)
    np.testing.assert_array_equal(m.Rs, np.broadcast_to(np.eye(16), m.Rs.shape))
    coarse, fine = m.encode(X)   # and the model still encodes
    assert fine.shape == (40, 4)


def test_fit_bad_input():
    X = mixture(300, 16, 4, seed=0)
    with pytest.raises(InvalidParamsError, match=r"M \(subquantizers in total\) must be even.*got 3"):
        fit(X, V=4, M=3)
    with pytest.raises(InvalidParamsError, match=r"D=16 must be divisible by M=6"):
        fit(X, V=4, M=6)
    with pytest.raises(InvalidParamsError, match=r"D=12 must be divisible by M=8"):
        fit(X, V=4, M=8, pca_dim=12)
    with pytest.raises(InputError, match=r"at least as many points as coarse clusters per half \(V\): found 300 .* 400"):
        fit(X, V=400, M=4)
    with pytest.raises(InputError, match=r"at least as many points as subquantizer clusters: found 300 .* 512"):
        fit(X, V=4, M=4, subquantizer_clusters=512)
    bad = X.copy()
    bad[17, 3] = np.nan
    with pytest.raises(InputError, match=r"must be finite; row 17"):
        fit(bad, V=4, M=4)
    with pytest.raises(InputError, match=r"one dimension, found \[8, 16\]"):
        fit([X[:100], X[100:, :8]], V=4, M=4)
    with pytest.raises(InputError, match=r"needs at least 16 distinct points for 16 clusters, found 10"):
        fit(np.repeat(X[:10], 30, axis=0), V=4, M=4, subquantizer_clusters=16)


def test_fit_with_pca_reduction_saves_loads_and_encodes_raw_vectors(data, tmp_path):
    import ferry.lopq

    m = ferry.lopq.fit(data, V=4, M=4, subquantizer_clusters=16, pca_dim=8, coarse_iters=3, sub_iters=3)
    assert (m.input_dim, m.D) == (16, 8)
    m.save(tmp_path / "m.lopq")
    back = ferry.lopq.LOPQModel.load(tmp_path / "m.lopq")
    for a, b in zip(back.encode(data), m.encode(data)):
        np.testing.assert_array_equal(a, b)
    # Decoding maps back to the input space, closer than the data's own spread.
    err = ((m.decode(*m.encode(data)) - data) ** 2).sum(1).mean()
    assert err < 0.5 * ((data - data.mean(0)) ** 2).sum(1).mean()


def test_states_travel_exactly_as_npz(data):
    state = trained_state(data, ["pca", "coarse_init", "coarse_step", "rotations", "sub_init", "sub_step"])
    back = T.state_from_bytes(T.state_to_bytes(state))
    assert back.config == state.config and back.inertia == state.inertia
    for name in ("Cs", "Rs", "mus", "subs"):
        np.testing.assert_array_equal(getattr(back, name), getattr(state, name))
    np.testing.assert_array_equal(back.pca.projection, state.pca.projection)
    with pytest.raises(InputError, match="training state does not decode"):
        T.state_from_bytes(b"PK\x03\x04 not really")


def test_training_resumes_from_a_partial_model_step_by_step(data):
    kw = dict(V=4, M=4, subquantizer_clusters=16, seed=2, coarse_iters=3, sub_iters=3)
    whole = fit(data, **kw)
    coarse_only = fit(data, **kw, steps=[0])
    assert coarse_only.Rs is None and coarse_only.subs is None
    np.testing.assert_array_equal(coarse_only.Cs, whole.Cs)
    resumed = fit(data, **{**kw, "V": None}, steps=[1, 2], existing=coarse_only)
    for a, b in zip(resumed.encode(data), whole.encode(data)):
        assert (a == b).mean() > 0.99
    # Another M keeps the PCA and the coarse centroids and trains rotations for it.
    finer = fit(data, **{**kw, "V": None, "M": 8}, steps=[1, 2], existing=whole)
    assert finer.M == 8 and finer.subs.shape == (8, 16, 2)
    np.testing.assert_array_equal(finer.Cs, whole.Cs)
    np.testing.assert_array_equal(finer.pca.projection, whole.pca.projection)
    with pytest.raises(InvalidParamsError, match=r"skip step 0 \(coarse clustering\)"):
        fit(data, **kw, steps=[1, 2])
    with pytest.raises(InvalidParamsError, match=r"step 2 alone needs the rotations"):
        fit(data, **{**kw, "V": None}, steps=[2], existing=coarse_only)


def test_row_keys_are_stable_spread_and_seeded():
    # Structured rows (a counter in one column, zeros elsewhere) must still give spread keys:
    # the sampling takes the smallest keys, so clumps would bias which rows train.
    X = np.zeros((20000, 16))
    X[:, 3] = np.arange(20000)
    keys = T.row_keys(X, 7)
    assert np.unique(keys).size == 20000
    top = (keys >> np.uint64(60)).astype(int)       # 16 buckets of the top 4 bits
    counts = np.bincount(top, minlength=16)
    chi2 = ((counts - 1250.0) ** 2 / 1250.0).sum()
    assert chi2 < 40, counts                         # 15 degrees of freedom: p < 0.001 above ~37.7
    np.testing.assert_array_equal(T.row_keys(X[5:9], 7), keys[5:9])          # a row's key is its own
    assert not np.array_equal(T.row_keys(X, 8), keys)
    Y = X.copy()
    Y[:, 15] = -0.0                                  # only the sign bit of one column differs
    assert (T.row_keys(Y, 7) != keys).all()


@pytest.mark.parametrize("ratio", [0.3, 1.0])
def test_sampling_keeps_the_same_rows_for_any_chunking(data, ratio):
    whole = T.sample_mask(data, ratio, 9)
    parts = np.concatenate([T.sample_mask(c, ratio, 9) for c in random_chunks(data, 5, 1)])
    np.testing.assert_array_equal(whole, parts)
    assert abs(whole.mean() - ratio) < 0.05
    with pytest.raises(InvalidParamsError, match=r"sampling ratio must lie in \(0, 1\]"):
        T.sample_mask(data, 0.0, 9)


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e6])
@pytest.mark.parametrize("scale", [1.0, 1e17])
def test_lloyd_assignment_equals_the_exact_nearest_centroid_far_from_the_origin_and_at_huge_scales(offset, scale):
    # Float32 distances from data shifted by the centroids' mean: a common offset loses no
    # digits; values whose squares overflow float32 take the exact float64 path.
    rng = np.random.default_rng(11)
    X = (mixture(4000, 16, 20, seed=3) + offset) * scale
    C = X[rng.choice(X.shape[0], 40, replace=False)] + 0.01 * scale
    labels, dists = T.assign(X, Centroids(C))
    exact = ((X[:, None, :] - C[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, exact.argmin(1))
    np.testing.assert_allclose(dists, exact.min(1), rtol=1e-9, atol=1e-9 * scale ** 2)
