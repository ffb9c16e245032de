"""ferry's LOPQ under the reference implementation's own published recall test on the Oxford5k features.

The reference (Yahoo's lopq) tests itself this way (its test_oxford5k): split the Oxford features
80/20 into a database, which is also the training set, and queries, with a seeded shuffle; find
each query's exact nearest neighbour in the database; fit V=16, M=8 with one k-means run; index
the database and search each query with quota 1000; and require the recall of that neighbour at
[1, 10, 100, 1000] results to be above [0.51, 0.92, 0.97, 0.97]. Here the same with ferry's public
API, for three seeds of the split, each of which must clear every threshold.

Measured here, seeds 0, 1, 2 (4,050 database vectors, 1,013 queries): recall@1 0.574, 0.597,
0.587; recall@10 0.972, 0.975, 0.972; recall@100 and @1000 0.995, 0.996, 0.989 (ferry's
training before its rotation refinement: recall@1 0.533, 0.576, 0.564, recall@10 0.958, 0.968,
0.958). The test can fail: M=2 (recall@10 0.77, seed 0) and V=2 (recall@100 0.93) fall below
the thresholds.
"""
import os

import numpy as np
import pytest

from ferry.lopq import LOPQSearcher, fit, read_fvecs
from tests.paths import LOPQ_DATA

OXFORD = os.path.join(LOPQ_DATA, "oxford_features.fvecs")
#: The reference's recall thresholds (result counts) and the recall it requires above each.
THRESHOLDS = (1, 10, 100, 1000)
REQUIRED = (0.51, 0.92, 0.97, 0.97)
QUOTA = 1000


@pytest.fixture(scope="module")
def oxford():
    if not os.path.exists(OXFORD):
        pytest.skip(f"{OXFORD} is missing: set FERRY_SHARED_DATA to the shared data folder")
    X = read_fvecs(OXFORD).astype(np.float64)
    assert X.shape == (5063, 128)
    return X


def split(X, seed):
    """80/20 by a seeded shuffle: (database, queries); the queries are the 20% rounded up, as the reference's."""
    perm = np.random.default_rng(seed).permutation(len(X))
    n_queries = int(np.ceil(0.2 * len(X)))
    return X[perm[n_queries:]], X[perm[:n_queries]]


def exact_nn(Q, B):
    return ((B ** 2).sum(1)[None, :] - 2 * Q @ B.T).argmin(1)


@pytest.mark.slow
# Like the reference's run of this test, a cluster or two of 16 gets fewer points than the 64 dimensions
# of a half and keeps the identity rotation: ferry warns about it; the recall is what is judged here.
@pytest.mark.filterwarnings("ignore::ferry.lopq.LOPQTrainingWarning")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_beats_the_reference_test_thresholds_on_oxford(oxford, seed):
    B, Q = split(oxford, seed)
    assert (len(B), len(Q)) == (4050, 1013)
    nn = exact_nn(Q, B)
    model = fit(B, V=16, M=8, seed=seed)
    searcher = LOPQSearcher(model)
    searcher.add(B)
    ranked = [searcher.search(q, quota=QUOTA).ids for q in Q]
    recall = [float(np.mean([nn[i] in r[:t] for i, r in enumerate(ranked)])) for t in THRESHOLDS]
    assert all(r > need for r, need in zip(recall, REQUIRED)), \
        f"seed {seed}: recall at {THRESHOLDS} = {np.round(recall, 3).tolist()}, the reference requires above {REQUIRED}"
