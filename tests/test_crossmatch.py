"""VectorIndex: queries against references (dedup check, --against) vs exact brute force."""

import numpy as np
import pytest

from dedup.compute.crossmatch import VectorIndex


def _unit(v):
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def refs_queries():
    """6000 clustered float16 references (d = 256); 1500 queries: 1000 near-copies of
    references at cosine 0.9-1 (some exact), 500 fresh rows of the same clusters."""
    rng = np.random.default_rng(0)
    d = 256
    spec = (1 + np.arange(d)) ** -0.35
    centers = _unit(rng.normal(size=(40, d)) * spec)
    ref = _unit(0.8 * centers[rng.integers(0, 40, 6000)] + 0.6 * _unit(rng.normal(size=(6000, d)) * spec))
    ref = ref.astype(np.float16)
    base = ref[rng.integers(0, 6000, 1000)].astype(np.float64)
    c = rng.uniform(0.9, 1.0, (1000, 1))
    c[:50] = 1.0
    u = rng.normal(size=(1000, d)) * spec
    u = _unit(u - (u * base).sum(1, keepdims=True) * base)
    fresh = _unit(0.8 * centers[rng.integers(0, 40, 500)] + 0.6 * _unit(rng.normal(size=(500, d)) * spec))
    q = np.vstack([_unit(c * base + np.sqrt(1 - c * c) * u), fresh]).astype(np.float16)
    exact = q.astype(np.float64) @ ref.astype(np.float64).T
    return ref, q, exact


def _pairs(m):
    return set(zip(m.q.tolist(), m.r.tolist()))


def test_flat_index_is_exact(refs_queries):
    ref, q, exact = refs_queries
    vi = VectorIndex(ref, flat_max=10**6, threshold=0.9)
    assert vi.plan is None
    m = vi.range(q, 0.9)
    assert _pairs(m) == set(zip(*np.nonzero(exact >= 0.9))) and len(m.q) >= 1000
    assert np.array_equal(m.score, exact[m.q, m.r].astype(np.float32))  # exact scores
    assert (np.diff(m.q) >= 0).all()  # ordered by query
    idx, sims = vi.topk(q, 3)
    assert np.array_equal(idx[:, 0], exact.argmax(axis=1))
    assert np.allclose(sims, np.take_along_axis(exact, idx, axis=1)) and (np.diff(sims, axis=1) <= 0).all()
    # fewer references than k: the rest is -1 / NaN
    idx, sims = VectorIndex(ref[:2], threshold=0.9).topk(q[:5], 3)
    assert (idx[:, 2] == -1).all() and np.isnan(sims[:, 2]).all() and (idx[:, :2] >= 0).all()


def test_ivf_index_recall_and_exact_scores(refs_queries):
    ref, q, exact = refs_queries
    vi = VectorIndex(ref, flat_max=1000, threshold=0.9)
    assert vi.plan is not None and vi.plan.bound_rows is not None  # the IVF, with the prefilter
    truth = set(zip(*np.nonzero(exact >= 0.9)))
    m = vi.range(q, 0.9)
    got = _pairs(m)
    assert got <= truth and len(got) >= 0.99 * len(truth)  # nothing false, little lost
    assert len(got) == len(m.q)  # each pair once, though it can be met from both sides
    assert np.array_equal(m.score, exact[m.q, m.r].astype(np.float32))
    exact_copies = {(k, int(exact[k].argmax())) for k in range(50)}
    assert exact_copies <= got
    idx, sims = vi.topk(q, 1)
    assert (idx[:, 0] == exact.argmax(axis=1)).mean() >= 0.99
    assert np.allclose(sims[:, 0], exact[np.arange(len(q)), idx[:, 0]])
    # a second call, another thread count: the same answer
    again = VectorIndex(ref, flat_max=1000, threshold=0.9, threads=1).range(q, 0.9)
    assert np.array_equal(again.q, m.q) and np.array_equal(again.r, m.r) and np.array_equal(again.score, m.score)


def test_saved_index_loads_and_answers_the_same(refs_queries, tmp_path):
    ref, q, _ = refs_queries
    vi = VectorIndex(ref, flat_max=1000, threshold=0.9)
    vi.save(str(tmp_path / "ix"))
    assert not list((tmp_path / "ix").glob("*.pkl"))
    back = VectorIndex.load(str(tmp_path / "ix"), ref)
    assert back is not None and back.threshold == 0.9
    a, b = vi.range(q, 0.9), back.range(q, 0.9)
    assert np.array_equal(a.q, b.q) and np.array_equal(a.r, b.r) and np.array_equal(a.score, b.score)
    assert np.array_equal(vi.topk(q, 2)[0], back.topk(q, 2)[0])
    # another reference set (count) or no index at all: None, so the caller rebuilds
    assert VectorIndex.load(str(tmp_path / "ix"), ref[:100]) is None
    assert VectorIndex.load(str(tmp_path / "nothing"), ref) is None
    flat = VectorIndex(ref[:500], threshold=0.9)
    flat.save(str(tmp_path / "flat"))
    assert VectorIndex.load(str(tmp_path / "flat"), ref[:500]).plan is None


def test_empty_inputs(refs_queries):
    ref, q, _ = refs_queries
    vi = VectorIndex(ref[:0], threshold=0.9)
    assert len(vi.range(q, 0.9).q) == 0
    idx, sims = vi.topk(q[:3], 1)
    assert (idx == -1).all() and np.isnan(sims).all()
    assert len(VectorIndex(ref, threshold=0.9).range(q[:0], 0.9).q) == 0
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        VectorIndex(ref[0], threshold=0.9)
