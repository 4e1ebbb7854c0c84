"""Candidate search: exact groups, hash multi-index hashing, IVF embeddings vs brute force."""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest

from dedup.compute import candidates as C
from dedup.compute.search import bound as search_bound
from dedup.compute.search import cosine as search_cosine
from dedup.compute.search import knn as search_knn
from dedup.compute.candidates import IVFParams, Pairs


def _check_canonical(p: Pairs) -> None:
    assert p.i.dtype == np.int64 and p.j.dtype == np.int64 and p.score.dtype == np.float32
    assert len(p.i) == len(p.j) == len(p.score)
    assert np.all(p.i < p.j)
    if len(p) > 1:
        key = p.i * (int(p.j.max()) + 1) + p.j
        assert np.all(np.diff(key) > 0)  # sorted by (i, j), no duplicates


def _set(p: Pairs) -> set[tuple[int, int]]:
    return set(zip(p.i.tolist(), p.j.tolist()))


def _unit(rng, n, d=64):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _near(rng, base, cos):
    """Unit vectors at exactly cosine `cos` from each (unit) base row."""
    u = rng.standard_normal(base.shape).astype(np.float32)
    u -= (u * base).sum(1, keepdims=True) * base
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    c = np.asarray(cos, np.float32).reshape(-1, 1)
    return c * base + np.sqrt(1 - c * c) * u


@pytest.fixture(scope="module")
def emb():
    """8000 clustered float16 embeddings (d=128) with planted near-duplicates at cos 0.9-1."""
    rng = np.random.default_rng(7)
    n, d = 8000, 128
    spec = (1.0 + np.arange(d)) ** -0.35
    centers = _unit(rng, 40, d) * 1.0
    t = rng.integers(0, 40, n)
    noise = rng.standard_normal((n, d)) * spec
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    x = centers[t] * 0.8 + noise * 0.7
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    k = 1200
    tgt = rng.choice(n, size=k, replace=False)
    src = rng.choice(np.setdiff1d(np.arange(n), tgt), size=k)
    x[tgt] = _near(rng, x[src].astype(np.float32), rng.uniform(0.86, 1.0, k))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _reference(x, threshold):
    """Naive all-pairs reference in float64."""
    a = np.asarray(x, np.float64)
    s = a @ a.T
    i, j = np.nonzero(np.triu(s >= threshold, 1))
    return set(zip(i.tolist(), j.tolist()))


# ---------------------------------------------------------------------------------------------
# exact
# ---------------------------------------------------------------------------------------------


def test_exact_pairs_star():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (4, 32), dtype=np.uint8)
    groups = np.array([2, 0, 1, 0, 2, 3, 0, 2])
    p = C.exact_pairs(base[groups])
    _check_canonical(p)
    # group 0: rows 1,3,6 -> star at 1; group 2: rows 0,4,7 -> star at 0; 1 and 3 singletons
    assert _set(p) == {(1, 3), (1, 6), (0, 4), (0, 7)}
    assert np.all(p.score == 1.0)


def test_exact_pairs_compare_whole_digests_where_prefixes_repeat():
    """The grouping sorts 8-byte prefixes and reads whole digests only where they repeat:
    digests that share a prefix but differ later must stay apart, and groups hidden among
    such near-collisions must still form, against a dictionary of whole digests."""
    from dedup.compute.search.exact import digest_groups, digest_prefixes

    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (40, 32), dtype=np.uint8)
    base[20:, :8] = base[0, :8]  # 20 digests with the same first 8 bytes, different after
    rows = rng.integers(0, 40, 400)
    d = base[rows]
    want: dict = {}
    for r, k in enumerate(rows.tolist()):
        want.setdefault(k, []).append(r)
    want_pairs = {(g[0], x) for g in want.values() for x in g[1:]}
    assert _set(C.exact_pairs(d)) == want_pairs
    read = []
    got_rows, gid = digest_groups(digest_prefixes(d), lambda r: read.append(len(r)) or d[r])
    assert sorted(tuple(got_rows[gid == g].tolist()) for g in np.unique(gid)) == sorted(
        tuple(g) for g in want.values() if len(g) > 1)
    # all rows repeat a prefix here (400 rows of 40 digests): read whole once
    assert read == [400]
    # unique prefixes: no whole digest read at all
    u = rng.integers(0, 256, (100, 32), dtype=np.uint8)
    read.clear()
    assert len(digest_groups(digest_prefixes(u), lambda r: read.append(len(r)) or u[r])[0]) == 0 and read == []


def test_exact_pairs_edge_cases():
    assert len(C.exact_pairs(np.zeros((0, 32), np.uint8))) == 0
    assert len(C.exact_pairs(np.zeros((1, 32), np.uint8))) == 0
    p = C.exact_pairs(np.zeros((1000, 32), np.uint8))
    assert len(p) == 999 and np.all(p.i == 0) and np.array_equal(p.j, np.arange(1, 1000))


# ---------------------------------------------------------------------------------------------
# hashes
# ---------------------------------------------------------------------------------------------


def _hash_reference(h, radius):
    d = np.bitwise_count(h[:, None] ^ h[None, :])
    i, j = np.nonzero(np.triu(d <= radius, 1))
    return set(zip(i.tolist(), j.tolist())), d


def _hashes(rng, n, dup=300, maxd=16):
    h = rng.integers(0, 2**63, size=n, dtype=np.int64).view(np.uint64) << np.uint64(1)
    h ^= rng.integers(0, 2, size=n).astype(np.uint64)
    tgt = rng.choice(n, dup, replace=False)
    src = rng.choice(n, dup)
    for t, s in zip(tgt, src):
        m = 0
        for b in rng.choice(64, rng.integers(0, maxd + 1), replace=False):
            m |= 1 << int(b)
        h[t] = h[s] ^ np.uint64(m)
    return h


@pytest.mark.parametrize("radius", [0, 1, 4, 8, 12, 20])
def test_hash_pairs_match_brute_force(radius):
    rng = np.random.default_rng(radius)
    h = _hashes(rng, 1500)
    ref, d = _hash_reference(h, radius)
    for method in ("auto", "mih", "brute"):
        p = C.hash_pairs(h, radius, method=method)
        _check_canonical(p)
        assert _set(p) == ref, method
        assert np.array_equal(p.score, d[p.i, p.j].astype(np.float32))


def test_hash_pairs_valid_mask_and_signed_input():
    rng = np.random.default_rng(3)
    h = _hashes(rng, 800)
    valid = rng.random(800) < 0.7
    p = C.hash_pairs(h.view(np.int64), 8, valid=valid)
    idx = np.flatnonzero(valid)
    ref, _ = _hash_reference(h[idx], 8)
    assert _set(p) == {(int(idx[a]), int(idx[b])) for a, b in ref}
    assert valid[p.i].all() and valid[p.j].all()


def test_hash_pairs_edge_cases():
    assert len(C.hash_pairs(np.zeros(0, np.uint64), 4)) == 0
    assert len(C.hash_pairs(np.zeros(1, np.uint64), 4)) == 0
    p = C.hash_pairs(np.zeros(300, np.uint64), 4)  # one giant bucket
    assert len(p) == 300 * 299 // 2 and np.all(p.score == 0)
    p = C.hash_pairs(np.array([0, 2**64 - 1], np.uint64), 64)
    assert _set(p) == {(0, 1)} and p.score[0] == 64


@pytest.mark.parametrize("cap", [1, 5, 64])
def test_hash_mih_verifies_in_pieces(monkeypatch, cap):
    """Candidates are verified ~_VERIFY_CAP at a time, a bucket longer than that cut into
    pieces: with a tiny cap (every range split, spans of one range) the pairs are still the
    brute-force pairs, once each, with their distances; big buckets (copies of a few hashes)
    included."""
    from dedup.compute.search import hamming

    monkeypatch.setattr(hamming, "_VERIFY_CAP", cap)
    rng = np.random.default_rng(cap)
    h = np.concatenate([_hashes(rng, 600), np.repeat(rng.integers(0, 2**63, 3, dtype=np.int64).view(np.uint64), 40)])
    rng.shuffle(h)
    for radius in (0, 6, 8):
        ref, d = _hash_reference(h, radius)
        p = C.hash_pairs(h, radius, method="mih")
        _check_canonical(p)
        assert _set(p) == ref and len(p) == len(ref)
        assert np.array_equal(p.score, d[p.i, p.j].astype(np.float32))


# ---------------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------------


def test_brute_force_matches_reference_and_blocks(emb):
    x = emb[:3000]
    ref = _reference(x, 0.9)
    base = C.brute_force_pairs(x, 0.9)
    _check_canonical(base)
    assert _set(base) == ref and len(ref) > 50
    exact = (np.asarray(x, np.float64)[base.i] * np.asarray(x, np.float64)[base.j]).sum(1)
    assert np.array_equal(base.score, exact.astype(np.float32))
    for block in (50, 333, 5000):
        assert C.brute_force_pairs(x, 0.9, block=block) == base, block


def test_fp16_rows_convert_bit_exactly_through_torch(tmp_path):
    """The fast (torch, F16C) float16 -> float32 conversion equals numpy's bit for bit,
    special values included, for memmap slices (read-only) and gathered rows alike."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 64)).astype(np.float16)
    x[0, :6] = [np.inf, -np.inf, np.nan, -0.0, np.float16(6e-8), np.float16(65504)]
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert "torch" in __import__("sys").modules and torch is not None
    for rows in (slice(0, 300), slice(5, 200), np.array([0, 3, 3, 299]), np.arange(0, 300, 2)):
        for src in (x, mm):
            got = C.rows_f32(src, rows)
            ref = np.asarray(src[rows]).astype(np.float32)
            assert got.dtype == np.float32 and got.flags.c_contiguous
            assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


def _ivf(n, d, **kw):
    kw.setdefault("exact_below", 0)
    return IVFParams.auto(n, d, 0.9, **kw)


def test_ivf_recall_against_brute_force(emb):
    truth = C.brute_force_pairs(emb, 0.9)
    p = C.embedding_pairs(emb, 0.9, _ivf(*emb.shape, use_gpu=False))
    _check_canonical(p)
    assert p.i.size and _set(p) <= _set(truth)  # no false positives: every pair verified
    recall = len(_set(p) & _set(truth)) / len(truth)
    assert recall >= 0.99, recall
    # scores of found pairs are the exact ones
    t = dict(zip(zip(truth.i.tolist(), truth.j.tolist()), truth.score.tolist()))
    assert all(t[k] == s for k, s in zip(zip(p.i.tolist(), p.j.tolist()), p.score.tolist()))


def test_ivf_identical_across_block_sizes_and_runs(emb):
    params = _ivf(*emb.shape, use_gpu=False)
    base = C.embedding_pairs(emb, 0.9, params)
    for bs in (64, 300, 4096):
        assert C.embedding_pairs(emb, 0.9, replace(params, block_size=bs)) == base, bs
    assert C.embedding_pairs(emb, 0.9, params) == base  # deterministic
    # float32 input holding the same (fp16-representable) values: same pairs and scores
    assert C.embedding_pairs(emb.astype(np.float32), 0.9, params) == base


def test_units_are_independent_and_picklable(emb):
    params = _ivf(*emb.shape, use_gpu=False)
    plan = C.plan_ivf(emb, params)
    units = C.make_units(plan, unit_rows=500)
    assert len(units) > 3
    assert sum(len(u.lists) for u in units) <= plan.nlist
    units = [pickle.loads(pickle.dumps(u)) for u in units[::-1]]  # any order, any process
    # the coarse stage splits the same way: a pickled quantizer assigns rows identically
    coarse = C.train_ivf(emb, params)
    again = pickle.loads(pickle.dumps(coarse))
    for a, b in zip(C.assign_rows(emb, coarse, slice(100, 900)), C.assign_rows(emb, again, np.arange(100, 900))):
        assert np.array_equal(a, b)
    assert np.array_equal(C.assign_rows(emb, coarse, slice(0, 500))[0], plan.assign[:500])
    parts = [C.unit_pairs(emb, u, 0.9, plan.params) for u in units]
    assert C.merge_pairs(parts) == C.embedding_pairs(emb, 0.9, params)


def _bounded(n, d, **kw):
    """IVF with the pair-stage prefilter on at d = 128 (auto turns it on from d = 128 with
    pca_dim 64, which leaves too few dimensions here): 16 PCA axes, a 32-axis bound."""
    return _ivf(n, d, use_gpu=False, pca_dim=16, bound_dim=32, **kw)


def test_bound_rows_bound_every_cosine(emb):
    """The prefilter's premise: the product of two bound rows is ≥ the rows' cosine (less the
    slack), for every pair, and rules out almost all pairs below the threshold."""
    plan = C.plan_ivf(emb, _bounded(*emb.shape), threshold=0.9)
    z = plan.bound_rows
    assert z is not None and z.shape == (len(emb), 32 + 2)  # 32 axes, the mean, the rest's norm
    rows = np.random.default_rng(0).choice(len(emb), 1500, replace=False)
    x = emb.astype(np.float64)
    exact = x[rows] @ x.T
    bound = z[rows].astype(np.float64) @ z.T.astype(np.float64)
    assert (bound >= exact - C.BOUND_SLACK).all()
    assert (bound >= exact).all()  # in fact without the slack here (it covers worst cases)
    passed = (bound >= 0.9 - C.BOUND_SLACK).mean()
    assert passed < 10 * (exact >= 0.9).mean() and passed < 0.01
    # a row that is not unit-norm cannot be bounded this way: every pair with it is a candidate
    odd = C.Bound(C.train_ivf(emb, _bounded(*emb.shape), threshold=0.9).bound.axes)(
        np.vstack([emb[:2].astype(np.float32) * 2.0, np.zeros((1, emb.shape[1]), np.float32)]))
    assert (odd[:, -1] >= 1e6).all()


def test_bounded_tiles_give_the_same_pairs(emb):
    """unit_pairs with the plan's bound rows finds exactly the pairs (and scores) of the full
    products, for any tile size; also on lists of identical rows (all candidates: dense path)."""
    params = _bounded(*emb.shape)
    plan = C.plan_ivf(emb, params, threshold=0.9)
    units = C.make_units(plan)
    for bs in (64, 300, 4096):
        plain = C.merge_pairs(C.unit_pairs(emb, u, 0.9, plan.params, block_size=bs) for u in units)
        bounded = C.merge_pairs(C.unit_pairs(emb, u, 0.9, plan.params, block_size=bs, bound=plan.bound_rows)
                                for u in units)
        assert bounded == plain and len(plain) > 500, bs
    same = np.vstack([np.repeat(emb[:1], 600, axis=0), emb[1:3000]])
    plan = C.plan_ivf(same, replace(params, nlist=20), threshold=0.9)
    assert plan.bound_rows is not None
    units = C.make_units(plan)
    plain = C.merge_pairs(C.unit_pairs(same, u, 0.9, plan.params, block_size=256) for u in units)
    bounded = C.merge_pairs(C.unit_pairs(same, u, 0.9, plan.params, block_size=256, bound=plan.bound_rows)
                            for u in units)
    assert bounded == plain and len(plain) >= 600 * 599 // 2


def test_unit_pairs_project_the_bound_on_the_fly(emb, monkeypatch):
    """A unit given the quantizer's Bound (as a Ray unit is) projects the rows of its large
    lists itself: the same pairs as the full products and as the precomputed bound rows, for
    any tile size; lists below _PROJECT_MIN_MEMBERS members take the full products."""
    params = replace(_bounded(*emb.shape), nlist=12)
    plan = C.plan_ivf(emb, params, threshold=0.9)
    coarse = C.train_ivf(emb, params, threshold=0.9)
    units = C.make_units(plan, unit_rows=2000)
    sizes = np.diff(plan.member_offsets)
    assert (sizes >= C.PROJECT_MIN_MEMBERS).sum() >= 6 and (sizes > 0).all()
    for bs in (64, 300, 4096):
        plain = C.merge_pairs(C.unit_pairs(emb, u, 0.9, plan.params, block_size=bs) for u in units)
        rows = C.merge_pairs(C.unit_pairs(emb, u, 0.9, plan.params, block_size=bs, bound=plan.bound_rows)
                             for u in units)
        projected = C.merge_pairs(C.unit_pairs(emb, u, 0.9, plan.params, block_size=bs, bound=coarse.bound)
                                  for u in units)
        assert projected == plain == rows and len(plain) > 500, bs
    # which lists took the prefilter: with a "slack" that rules out every pair, those find
    # nothing, the others (full products) still find theirs
    monkeypatch.setattr(search_bound, "BOUND_SLACK", -1.0)
    monkeypatch.setattr(search_cosine, "PROJECT_MIN_MEMBERS", int(np.median(sizes[sizes > 0])) + 1)
    small = C.merge_pairs(C.unit_pairs(emb, u, 0.9, plan.params, bound=coarse.bound) for u in units)
    big = sizes[plan.assign] >= search_cosine.PROJECT_MIN_MEMBERS
    assert len(small) > 0 and not (big[small.i] & big[small.j]).any()  # each found in a small list
    assert len(small) < len(plain)


def test_ivf_with_bound_recall_against_brute_force(emb):
    truth = C.brute_force_pairs(emb, 0.9)
    st: dict = {}
    p = C.embedding_pairs(emb, 0.9, _bounded(*emb.shape), stats=st)
    assert st["bound_width"] == 34
    _check_canonical(p)
    got = _set(p)
    assert got <= _set(truth) and len(got) >= 0.97 * len(truth)
    assert C.embedding_pairs(emb, 0.9, _bounded(*emb.shape)) == p  # deterministic
    # the serial plan reads the rows' coordinates off their bound rows (projected while the
    # k-means trains); assign_rows (the Ray tasks) computes them from x: the same partition
    plan = C.plan_ivf(emb, _bounded(*emb.shape), threshold=0.9)
    coarse = C.train_ivf(emb, _bounded(*emb.shape), threshold=0.9)
    with C.single_threaded_libs():  # as the Ray tasks run it (multi-threaded BLAS rounds otherwise)
        assert np.array_equal(C.assign_rows(emb, coarse, slice(0, len(emb)))[0], plan.assign)


def test_auto_bound_dim():
    assert IVFParams.auto(10**6, 512).bound_dim == 128
    assert IVFParams.auto(10**6, 256).bound_dim == 64
    assert IVFParams.auto(10**6, 64).bound_dim == 0
    assert IVFParams.auto(10**8, 512).bound_dim == 0  # 52 GB of bound rows: off
    # d = 128: 64 PCA axes leave too few dimensions for a bound; the plan has none
    plan = C.plan_ivf(np.eye(128, dtype=np.float32)[np.arange(6000) % 128], _ivf(6000, 128), threshold=0.9)
    assert plan.bound_rows is None


def test_ivf_valid_mask(emb):
    rng = np.random.default_rng(1)
    valid = rng.random(len(emb)) < 0.8
    params = _ivf(int(valid.sum()), emb.shape[1], use_gpu=False)
    p = C.embedding_pairs(emb, 0.9, params, valid=valid)
    assert valid[p.i].all() and valid[p.j].all()
    idx = np.flatnonzero(valid)
    sub = C.embedding_pairs(np.ascontiguousarray(emb[idx]), 0.9, params)
    assert _set(p) == {(int(idx[a]), int(idx[b])) for a, b in _set(sub)}
    # brute-force path honours the mask too
    q = C.embedding_pairs(emb[:2000], 0.9, valid=valid[:2000])
    assert valid[q.i].all() and valid[q.j].all()


def test_memmap_input(emb, tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, emb)
    mm = np.load(path, mmap_mode="r")
    params = _ivf(*emb.shape, use_gpu=False)
    assert C.embedding_pairs(mm, 0.9, params) == C.embedding_pairs(emb, 0.9, params)


def test_embedding_edge_cases():
    d = 32
    assert len(C.embedding_pairs(np.zeros((0, d), np.float16), 0.9)) == 0
    assert len(C.embedding_pairs(_unit(np.random.default_rng(0), 1, d).astype(np.float16), 0.9)) == 0
    x = _unit(np.random.default_rng(0), 50, d).astype(np.float16)
    assert len(C.embedding_pairs(x, 0.9, valid=np.zeros(50, bool))) == 0
    two = np.repeat(x[:1], 2, axis=0)
    p = C.embedding_pairs(two, 0.9)
    assert _set(p) == {(0, 1)}


@pytest.mark.parametrize("n", [2500, pytest.param(10_000, marks=pytest.mark.slow)])
def test_all_identical_vectors_one_big_list(n):
    x = np.repeat(_unit(np.random.default_rng(0), 1, 32).astype(np.float16), n, axis=0)
    params = IVFParams.auto(n, 32, 0.9, exact_below=0, block_size=1024, use_gpu=False)
    plan = C.plan_ivf(x, params)
    # Identical vectors pile into (at most a few, tie-broken) lists far bigger than a tile.
    assert plan.list_sizes().max() >= n // 2 > params.block_size
    ticks = []
    p = C.embedding_pairs(x, 0.9, params, progress=lambda a, b: ticks.append((a, b)))
    assert len(p) == n * (n - 1) // 2
    assert ticks[-1][0] == ticks[-1][1]
    assert np.allclose(p.score, 1.0, atol=1e-3)


def test_auto_params():
    p0 = IVFParams.auto(0, 512)
    assert p0.nlist >= 1 and p0.nprobe >= 1
    prev = 0
    for n in (10**4, 10**5, 10**6, 10**7):
        p = IVFParams.auto(n, 512)
        assert 1 <= p.nprobe <= p.nlist <= max(1, n // 50)
        assert p.nlist >= prev
        prev = p.nlist
        assert p.train_size <= n
    p = IVFParams.auto(10**6, 512, nlist=123, block_size=77)
    assert (p.nlist, p.block_size) == (123, 77)
    assert replace(p, nprobe=3).nprobe == 3
    # the visiting radius grows as the threshold drops; no margin = plain top-nprobe
    p = IVFParams.auto(10**6, 512)
    assert C.probe_radius(p, 0.6) > C.probe_radius(p, 0.9) > C.probe_radius(p, 0.99) > 0
    assert C.probe_radius(replace(p, probe_margin=None), 0.9) == float("inf")


def test_auto_nlist_rule():
    """nlist = n / 500, at least √n, at most n / 50 — kept after measuring lists of 1 000 to
    8 000 rows at 10⁶ and 10⁷ (docs/candidates.md, "List size"): larger lists did not cut the
    visits a row makes, so they cost more dot products and lost recall."""
    want = {2: 1, 100: 2, 10**4: 100, 10**5: 316, 250_000: 500, 10**6: 2000, 10**7: 20_000, 2 * 10**9: 4 * 10**6}
    assert {n: IVFParams.auto(n, 512, 0.9).nlist for n in want} == want
    assert [IVFParams.auto(n, 512, 0.9).nprobe for n in (10**6, 10**7)] == [16, 32]
    # list_rows: the list size asked (no √n floor); nprobe and train_size follow the nlist
    for n in (10**6, 10**7):
        assert IVFParams.auto(n, 512, 0.9, list_rows=500) == IVFParams.auto(n, 512, 0.9)
    p = IVFParams.auto(10**7, 512, 0.9, list_rows=2000)
    assert (p.nlist, p.nprobe, p.train_size) == (5000, 22, 160_000)
    # the k-means sample: 32 a list, capped at 524 288 rows (26 a list at 10⁷)
    assert [IVFParams.auto(n, 512, 0.9).train_size for n in (10**6, 10**7, 10**8)] == [64_000, 524_288, 524_288]
    p = IVFParams.auto(10**6, 512, 0.9, list_rows=8000)
    assert (p.nlist, p.nprobe, p.train_size) == (125, 16, 20_000)
    assert IVFParams.auto(10**5, 512, 0.9, list_rows=10).nlist == 2000  # at most n / 50
    assert IVFParams.auto(10**6, 512, 0.9, list_rows=2000, nlist=7).nlist == 7


def test_adaptive_probing_visits_fewer_lists_and_stays_exact(emb):
    fixed = _ivf(*emb.shape, use_gpu=False, probe_margin=None)
    adaptive = _ivf(*emb.shape, use_gpu=False)
    pf = C.plan_ivf(emb, fixed, threshold=0.9)
    pa = C.plan_ivf(emb, adaptive, threshold=0.9)
    assert np.array_equal(pf.assign, pa.assign)  # same partition
    assert len(pf.visitor_rows) == len(emb) * (fixed.nprobe - 1)
    assert len(pa.visitor_rows) < len(pf.visitor_rows) / 2
    truth = _set(C.brute_force_pairs(emb, 0.9))
    a = _set(C.embedding_pairs(emb, 0.9, adaptive))
    f = _set(C.embedding_pairs(emb, 0.9, fixed))
    assert a <= f <= truth


@pytest.mark.gpu
@pytest.mark.skipif(not C.gpu_available(), reason="no GPU visible to faiss")
def test_gpu_matches_cpu(emb):
    params = _ivf(*emb.shape)
    cpu = C.embedding_pairs(emb, 0.9, replace(params, use_gpu=False))
    gpu = C.embedding_pairs(emb, 0.9, replace(params, use_gpu=True))
    assert gpu == cpu
    assert C.brute_force_pairs(emb[:3000], 0.9, use_gpu=True) == C.brute_force_pairs(emb[:3000], 0.9)


def _kth_exact(x: np.ndarray, k: int, rows: np.ndarray) -> np.ndarray:
    xs = x[rows].astype(np.float64)
    s = xs @ xs.T
    np.fill_diagonal(s, -np.inf)
    return np.sort(s, axis=1)[:, -k]


def test_kth_neighbour_similarity_exact_path_matches_brute_force():
    rng = np.random.default_rng(5)
    x = _unit(rng, 1500, 24).astype(np.float16)
    valid = rng.random(1500) > 0.1
    rows = np.flatnonzero(valid)
    ref = _kth_exact(x, 4, rows)
    for block in (97, 4096):
        got = C.kth_neighbour_similarity(x, 4, valid=valid, block=block)
        assert np.isnan(got[~valid]).all()
        np.testing.assert_allclose(got[rows], ref, atol=1e-5)
    assert np.isnan(C.kth_neighbour_similarity(x[:3], 5)).all()  # fewer others than k


def _topics(seed: int, n: int = 12_000, d: int = 32):
    """(rng, x): n unit rows around 40 topic centres, float32 (the outlier search tests' data)."""
    rng = np.random.default_rng(seed)
    centers = _unit(rng, 40, d)
    x = centers[rng.integers(0, 40, n)] + 0.35 * _unit(rng, n, d)
    return rng, (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_kth_neighbour_similarity_ivf_path_is_a_close_lower_bound():
    """Above exact_below the search only looks into a few lists: never above the exact value
    (a subset's k-th best), and close to it on clustered data."""
    rng, x = _topics(6)
    st = {}
    got = C.kth_neighbour_similarity(x, 5, exact_below=1000, stats=st)
    assert st["method"] == "ivf"
    q = np.sort(rng.choice(len(x), 800, replace=False))
    xs = x.astype(np.float64)
    s = xs[q] @ xs.T
    s[np.arange(len(q)), q] = -np.inf
    ref = np.sort(s, axis=1)[:, -5]
    assert (got[q] <= ref + 1e-5).all()
    assert np.mean(ref - got[q]) < 0.02
    assert np.mean(np.abs(ref - got[q]) < 1e-5) > 0.5
    # lists run on worker threads, merged in any order: the same values with one thread
    assert np.array_equal(C.kth_neighbour_similarity(x, 5, exact_below=1000, threads=1), got, equal_nan=True)


def test_outlier_units_any_cut_same_scores(monkeypatch):
    """The outlier search's lists run as work units; each unit merges its rows' k best, the
    driver merges the units. Small units (a visitor row in many of them) give the same values
    as one unit per ~65k rows, and a map_units that runs them in reverse order too."""
    _, x = _topics(6)
    valid = np.ones(len(x), bool)
    valid[::31] = False
    st: dict = {}
    ref = C.kth_neighbour_similarity(x, 5, valid=valid, exact_below=1000, stats=st)
    assert st["method"] == "ivf" and st["units"] == 1
    make = C.make_units
    monkeypatch.setattr(search_knn, "make_units", lambda plan, unit_rows=None: make(plan, 700))
    seen: list = []

    def backwards(units, k, block):
        seen.append(len(units))
        with C.single_threaded_libs():  # as the worker threads and Ray tasks run BLAS
            for pos in reversed(range(len(units))):
                yield pos, C.outlier_unit(x, units[pos], k, block)

    ticks: list = []
    st = {}
    got = C.kth_neighbour_similarity(x, 5, valid=valid, exact_below=1000, stats=st, map_units=backwards,
                                     progress=lambda a, b: ticks.append((a, b)))
    assert seen[0] == st["units"] >= 10
    assert np.array_equal(got, ref, equal_nan=True) and np.isnan(got[~valid]).all()
    assert ticks[-1][0] == ticks[-1][1] and [a for a, _ in ticks] == sorted(a for a, _ in ticks)
    assert np.array_equal(C.kth_neighbour_similarity(x, 5, valid=valid, exact_below=1000), ref, equal_nan=True)


def test_outlier_search_reuses_the_duplicate_search_lists():
    """embedding_pairs can leave its rows' nearest lists for kth_neighbour_similarity, which then
    skips its own coarse stage: still a close lower bound of the exact k-th similarity."""
    rng, x = _topics(6)
    valid = np.ones(len(x), bool)
    valid[::97] = False
    lists: dict = {}
    C.embedding_pairs(x, 0.9, IVFParams.auto(int(valid.sum()), 32, 0.9), valid=valid, lists_out=lists)
    assert lists["nearest"].shape == (len(x), 5) and (lists["nearest"][~valid] == -1).all()
    assert (lists["nearest"][valid, 0] == lists["assign"][valid]).all()  # own list first
    st: dict = {}
    got = C.kth_neighbour_similarity(x, 5, valid=valid, exact_below=1000, stats=st, lists=lists)
    assert st["method"] == "ivf (the duplicate search's lists)"
    assert np.isnan(got[~valid]).all()
    q = np.sort(rng.choice(np.flatnonzero(valid), 800, replace=False))
    xs = x.astype(np.float64)
    s = xs[q] @ xs[valid].T
    s[s > 1 - 1e-9] = -np.inf  # the row itself
    ref = np.sort(s, axis=1)[:, -5]
    assert (got[q] <= ref + 1e-5).all() and np.mean(ref - got[q]) < 0.02
    # as close as with the search's own coarse stage (another k-means on the same rows)
    own = C.kth_neighbour_similarity(x, 5, valid=valid, exact_below=1000)
    assert np.mean(np.abs(ref - got[q]) < 1e-5) >= np.mean(np.abs(ref - own[q]) < 1e-5) - 0.05 > 0.4
    assert np.mean(ref - got[q]) <= np.mean(ref - own[q]) + 0.005
    # lists that cannot serve (fewer probes kept than asked): the search trains its own
    st = {}
    C.kth_neighbour_similarity(x, 5, valid=valid, exact_below=1000, stats=st, nprobe=8, lists=lists)
    assert st["method"] == "ivf"


def test_progress_covers_the_coarse_stage_and_the_outlier_score(emb):
    """Long stages report progress: the coarse stage from before k-means to the last assigned
    block, the pair stage up to every list, the k-th-neighbour score up to its end."""
    params = _ivf(*emb.shape, use_gpu=False)
    plan_ticks, list_ticks = [], []
    C.embedding_pairs(emb, 0.9, params, progress=lambda a, b: list_ticks.append((a, b)),
                      plan_progress=lambda a, b: plan_ticks.append((a, b)))
    blocks = -(-len(emb) // (1 << 13))
    assert plan_ticks[0] == (0, blocks) and plan_ticks[-1] == (blocks, blocks)
    assert [a for a, _ in plan_ticks] == sorted(a for a, _ in plan_ticks)
    assert list_ticks[-1][0] == list_ticks[-1][1] == C.plan_ivf(emb, params).nlist
    for kw in ({"exact_below": 10**9, "block": 1000}, {"exact_below": 0}):
        ticks = []
        C.kth_neighbour_similarity(emb, 3, progress=lambda a, b, ticks=ticks: ticks.append((a, b)), **kw)
        assert len(ticks) >= 2 and ticks[-1][0] == ticks[-1][1], (kw, ticks[-3:])


@pytest.mark.parametrize("method", ["mih", "brute"])
def test_hash_pairs_progress_reaches_its_total(method):
    rng = np.random.default_rng(2)
    h = rng.integers(0, 2**63, size=20_000, dtype=np.int64).view(np.uint64)
    ticks = []
    C.hash_pairs(h, 6, method=method, progress=lambda a, b: ticks.append((a, b)))
    assert len(ticks) >= 2 and ticks[-1][0] == ticks[-1][1]
    assert all(a <= b for a, b in ticks) and [a for a, _ in ticks] == sorted(a for a, _ in ticks)


def test_more_lists_than_training_rows_uses_the_rows_as_centroids(emb):
    """train_size below nlist (the automatic sizes from ~2.6e8 rows on): the sample is raised to
    nlist rows, which become the centroids as they are (no k-means); the search still works."""
    params = _ivf(*emb.shape, use_gpu=False, nlist=500, train_size=300)
    plan = C.plan_ivf(emb, params, threshold=0.9)
    assert plan.nlist == len(plan.centroids) == 500
    sample = C.sample_rows(np.arange(len(emb)), 500, params.seed)
    proj, _ = C.fit_pca(C.rows_f32(emb, sample), params.pca_dim)
    assert np.allclose(plan.centroids, proj(C.rows_f32(emb, sample)), atol=1e-5)
    p = C.embedding_pairs(emb, 0.9, params)
    truth = _set(C.brute_force_pairs(emb, 0.9))
    assert _set(p) <= truth and len(_set(p) & truth) >= 0.95 * len(truth)


def test_quantizer_does_not_depend_on_the_thread_setting():
    """The coarse quantizer trains on one thread whatever ``threads`` says: even on tied data
    (identical rows, where multi-threaded BLAS rounding broke ties another way) the centroids
    are the same."""
    x = np.repeat(_unit(np.random.default_rng(0), 1, 32).astype(np.float16), 10_000, axis=0)
    params = IVFParams.auto(len(x), 32, 0.9, exact_below=0, use_gpu=False)
    ref = C.train_ivf(x, replace(params, threads=1)).centroids
    for t in (2, 3):
        assert np.array_equal(C.train_ivf(x, replace(params, threads=t)).centroids, ref), t


@pytest.mark.parametrize("subset", [False, True])
def test_outlier_plan_from_kept_lists_holds_each_lists_visitors_rows_increasing(subset):
    """The outlier score's plan from a search's nearest lists (plan_from_visits: counted per
    list, then each visit put in its list's place, a block of rows at a time): each list's
    members and visitors are exactly the rows that name it, rows increasing within a list;
    invalid rows (-1) and lists beyond nprobe left out."""
    from dataclasses import replace as dc_replace

    from dedup.compute.search.ivf import NearestLists
    from dedup.compute.search.knn import _plan_from_lists

    rng = np.random.default_rng(7)
    n, nlist, keep = 5000, 37, 6
    nearest = np.stack([rng.permutation(nlist)[:keep] for _ in range(n)]).astype(np.int32)
    nearest[rng.random((n, keep)) < 0.1] = -1  # some rows saw fewer lists
    nearest[:, 0] = rng.integers(0, nlist, n)
    idx = np.sort(rng.choice(n, 3000, replace=False)) if subset else np.arange(n)
    assign = np.full(n, -1, np.int32)
    assign[idx] = nearest[idx, 0]
    x = rng.standard_normal((200, 8)).astype(np.float32)
    params = IVFParams.auto(200, 8)
    from dedup.compute.search.coarse import train_ivf

    coarse = train_ivf(x, dc_replace(params, nlist=nlist, nprobe=keep, train_size=200, pca_dim=8, bound_dim=0))
    nprobe = 5
    got = _plan_from_lists(NearestLists(coarse, assign, nearest), idx, n, nprobe)
    others = nearest[idx, 1:nprobe]
    ok = others >= 0
    vr = np.repeat(idx, nprobe - 1).reshape(others.shape)[ok]
    vl = others[ok]
    order = np.lexsort((vr, vl))  # the reference: by list, rows increasing
    offsets = np.concatenate([[0], np.cumsum(np.bincount(vl, minlength=nlist))])
    member_order = np.lexsort((idx, assign[idx]))
    want = {"visitor_rows": vr[order], "visitor_offsets": offsets, "member_rows": idx[member_order],
            "member_offsets": np.concatenate([[0], np.cumsum(np.bincount(assign[idx], minlength=nlist))]),
            "assign": assign}
    assert got is not None and len(vr) > 1000
    for name, b in want.items():
        a = getattr(got, name)
        assert a.dtype.kind == "i" and np.array_equal(a, b), name
    assert got.visitor_rows.dtype == np.int32  # 4 bytes a visit (n < 2³¹)


def test_plan_from_visits_equals_build_plan_whatever_the_batches_order():
    """Batches whose rows do not increase (a remote executor's task files in any order, rows
    of several tasks interleaved) give the same plan as build_plan's sort: each list's rows are
    sorted where they were placed."""
    from dedup.compute.search.coarse import train_ivf
    from dedup.compute.search.ivf import build_plan, plan_from_visits

    rng = np.random.default_rng(3)
    n, nlist = 4000, 23
    x = rng.standard_normal((200, 8)).astype(np.float32)
    coarse = train_ivf(x, replace(IVFParams.auto(200, 8), nlist=nlist, nprobe=4, train_size=200, pca_dim=8, bound_dim=0))
    idx = np.sort(rng.choice(n, 3000, replace=False))
    prim = rng.integers(0, nlist, len(idx)).astype(np.int32)
    vr = np.repeat(idx, 3)
    vl = rng.integers(0, nlist, len(vr)).astype(np.int32)
    keep = np.ones(len(vr), bool)
    keep[1:] = (vr[1:] != vr[:-1]) | (vl[1:] != vl[:-1])  # a row visits a list once
    vr, vl = vr[keep], vl[keep]
    ref = build_plan(n, coarse, idx, prim, [(vr, vl)])
    cuts = np.array_split(rng.permutation(len(vr)), 7)  # batches of rows in no order
    for batches in ([(vr, vl)], [(vr[c], vl[c]) for c in cuts]):
        got = plan_from_visits(n, coarse, idx, prim, lambda b=batches: iter(b))
        for name in ("assign", "member_rows", "member_offsets", "visitor_rows", "visitor_offsets"):
            assert np.array_equal(getattr(got, name), getattr(ref, name)), name
        assert got.visitor_rows.dtype == np.int32
