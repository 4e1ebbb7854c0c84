"""The coarse stage's upper level (dedup.compute.search.upper): the same pairs as the flat
assignment (at a forced small switch-over), deterministic whatever the split of the rows."""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest

from dedup.compute import candidates as C
from dedup.compute.candidates import IVFParams
from dedup.compute.search.coarse import assign_rows, plan_ivf, train_ivf
from dedup.compute.search.ivf import _auto_upper
from dedup.compute.search.threads import single_threaded_libs


def _unit(v):
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def emb():
    """12 000 clustered float16 rows (d = 128) with 1 500 planted copies at cosine 0.9-1."""
    rng = np.random.default_rng(3)
    n, d = 12_000, 128
    spec = (1.0 + np.arange(d)) ** -0.35
    centers = _unit(rng.standard_normal((60, d)))
    noise = _unit(rng.standard_normal((n, d)) * spec)
    x = _unit(0.8 * centers[rng.integers(0, 60, n)] + 0.7 * noise)
    k = 1500
    tgt = rng.choice(n, size=k, replace=False)
    src = rng.choice(np.setdiff1d(np.arange(n), tgt), size=k)
    u = rng.standard_normal((k, d)) * spec
    u -= (u * x[src]).sum(1, keepdims=True) * x[src]
    c = rng.uniform(0.9, 1.0, (k, 1))
    x[tgt] = c * x[src] + np.sqrt(1 - c * c) * _unit(u)
    return _unit(x).astype(np.float16)


def _params(n, d, **kw):
    # 400 lists of ~30 rows: enough that 20 super-lists (6 probed) leave most lists unseen
    kw = {"exact_below": 0, "use_gpu": False, "nlist": 400, "nprobe": 16, "pca_dim": 32, **kw}
    return IVFParams.auto(n, d, 0.9, **kw)


def test_upper_level_finds_the_flat_pairs(emb):
    flat = C.embedding_pairs(emb, 0.9, _params(*emb.shape))
    st: dict = {}
    upper = C.embedding_pairs(emb, 0.9, _params(*emb.shape, super_lists=20, super_probe=6), stats=st)
    truth = C.brute_force_pairs(emb, 0.9)
    f, u, t = (set(zip(p.i.tolist(), p.j.tolist())) for p in (flat, upper, truth))
    assert len(t) > 1000 and u <= t
    assert len(f & u) >= 0.99 * len(f)  # the tested floor: ≥ 0.99 of the flat quantizer's pairs
    assert len(u) >= 0.97 * len(t)
    assert C.embedding_pairs(emb, 0.9, _params(*emb.shape, super_lists=20, super_probe=6)) == upper  # deterministic
    # probing every super-list is the flat assignment: the same pairs exactly
    assert C.embedding_pairs(emb, 0.9, _params(*emb.shape, super_lists=20, super_probe=20)) == flat


def test_upper_level_is_deterministic_across_splits_and_processes(emb):
    params = _params(*emb.shape, super_lists=20, super_probe=6)
    coarse = train_ivf(emb, params, threshold=0.9)
    assert coarse.upper is not None and len(coarse.upper.centroids) == 20
    assert np.array_equal(np.sort(coarse.upper.order), np.arange(400))
    again = pickle.loads(pickle.dumps(coarse))  # as a task gets it: the faiss index rebuilt
    assert "_index" not in again.upper.__dict__
    n = len(emb)
    with single_threaded_libs():
        whole = assign_rows(emb, coarse, slice(0, n))
        for cuts in ([0, 1, 37, 4000, 4001, n], [0, 6000, n], [0, 19, 20, 8191, 8192, n]):
            parts = [assign_rows(emb, again, slice(a, b)) for a, b in zip(cuts[:-1], cuts[1:])]
            assert np.array_equal(np.concatenate([p[0] for p in parts]), whole[0])
            assert np.array_equal(np.concatenate([p[1] for p in parts]), whole[1])
            assert np.array_equal(np.concatenate([p[2] for p in parts]), whole[2])
        odd = np.random.default_rng(0).permutation(n)[:3000]
        got = assign_rows(emb, coarse, np.sort(odd))
        assert np.array_equal(got[0], whole[0][np.sort(odd)])
    # the serial plan (worker threads, bound rows) assigns every row the same way
    for threads in (1, 2):
        plan = plan_ivf(emb, replace(params, threads=threads), threshold=0.9)
        assert np.array_equal(plan.assign, whole[0])
        assert len(plan.visitor_rows) == len(whole[1])


def test_auto_keeps_the_flat_assignment_unless_switched_on(monkeypatch):
    from dedup.compute.search import ivf

    for n in (10**6, 10**7, 10**8):  # measured: no win up to 10⁷ rows at recall ≥ 0.99
        assert IVFParams.auto(n, 512, 0.9).super_lists == 0
    monkeypatch.setattr(ivf, "UPPER_FROM_LISTS", 10_000)
    assert IVFParams.auto(10**6, 512, 0.9).super_lists == 0  # 2 000 lists: below
    big = IVFParams.auto(10**7, 512, 0.9)
    assert (big.super_lists, big.super_probe) == _auto_upper(big.nlist) == (283, 32)


def test_saved_crossmatch_index_keeps_its_upper_level(emb, tmp_path, monkeypatch):
    """A VectorIndex built above the switch-over saves its upper level: the loaded index
    assigns queries with the same quantizer (the same answers)."""
    from dedup.compute import crossmatch
    from dedup.compute.search import ivf

    monkeypatch.setattr(ivf, "UPPER_FROM_LISTS", 50)
    monkeypatch.setattr(ivf, "UPPER_PROBE", 4)
    ref, q = emb[:10_000], emb[10_000:]
    vi = crossmatch.VectorIndex(ref, flat_max=1000, threshold=0.9)
    assert vi.plan is not None and vi.plan.coarse is not None and vi.plan.coarse.upper is not None
    vi.save(str(tmp_path / "ix"))
    back = crossmatch.VectorIndex.load(str(tmp_path / "ix"), ref)
    assert back is not None and back.plan is not None and back.plan.coarse.upper is not None
    a, b = vi.range(q, 0.9), back.range(q, 0.9)
    assert len(a.q) > 100
    assert np.array_equal(a.q, b.q) and np.array_equal(a.r, b.r) and np.array_equal(a.score, b.score)
