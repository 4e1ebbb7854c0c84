import numpy as np
import pytest

from dedup.compute.clusters import Edges, keeper_clusters, rank_order


def edges(pairs, method=0):
    i = np.array([p[0] for p in pairs], np.int64)
    j = np.array([p[1] for p in pairs], np.int64)
    return Edges(i, j, np.full(len(i), method, np.int8), np.ones(len(i), np.float32))


def test_chain_is_not_merged_through_a_non_keeper():
    # 0 ~ 1 ~ 2 (a chain); 0 and 2 are not duplicates of each other.
    cl = keeper_clusters(3, edges([(0, 1), (1, 2)]), rank=np.array([0, 1, 2]))
    assert cl.keeper.tolist() == [0, 0, 2]
    assert cl.is_keeper.tolist() == [True, False, True]
    assert cl.size.tolist() == [2, 2, 1]


def test_every_member_is_a_direct_duplicate_of_its_keeper_random_graphs():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = 40
        m = rng.integers(0, 80)
        e = rng.integers(0, n, size=(m, 2))
        e = e[e[:, 0] != e[:, 1]]
        rank = rng.permutation(n)
        cl = keeper_clusters(n, edges([tuple(x) for x in e]), rank)
        adj = {(min(a, b), max(a, b)) for a, b in e}
        for s in range(n):
            k = cl.keeper[s]
            if k != s:
                assert (min(s, k), max(s, k)) in adj, "member not directly linked to its keeper"
                assert rank[k] < rank[s] and cl.keeper[k] == k
        # No two keepers are duplicates of each other when one ranks above the other and is a keeper
        # only if ... keepers may be linked only through dropped samples:
        keepers = np.flatnonzero(cl.keeper == np.arange(n))
        for a, b in adj:
            if a in keepers and b in keepers:
                pytest.fail(f"two linked samples {a},{b} are both keepers")


def test_best_ranked_keeper_wins_and_invalid_rows_are_excluded():
    # 3 is a duplicate of both keepers 0 and 1 (0 and 1 not linked); rank prefers 1.
    cl = keeper_clusters(5, edges([(0, 3), (1, 3), (3, 4)]), rank=np.array([1, 0, 2, 3, 4]), valid=np.array([1, 1, 1, 1, 0], bool))
    assert cl.keeper[3] == 1
    assert cl.keeper[4] == -1 and not cl.is_keeper[4] and cl.size[4] == 0
    assert cl.keeper[2] == 2 and cl.size[2] == 1


def test_keep_per_cluster_keeps_best_ranked_k():
    star = edges([(0, k) for k in range(1, 6)])
    cl = keeper_clusters(6, star, rank=np.arange(6), keep_per_cluster=3)
    assert cl.is_keeper.tolist() == [True, True, True, False, False, False]
    assert (cl.keeper == 0).all() and (cl.size == 6).all()


def test_method_priority_exact_reported_over_embedding():
    e = Edges(np.array([0, 0]), np.array([1, 1]), np.array([3, 0], np.int8), np.array([0.9, 1.0], np.float32))
    cl = keeper_clusters(2, e, rank=np.array([0, 1]))
    assert cl.method[1] == 0 and cl.score[1] == 1.0


def test_rank_order_descending_then_tiebreak():
    pixels = np.array([100, 400, 400, np.nan])
    tiebreak = np.arange(4)
    r = rank_order([(pixels, True), (tiebreak, False)])
    assert r.tolist() == [2, 0, 1, 3]


def test_rank_order_is_the_lexicographic_order_of_its_keys():
    # one stable sort a key gives np.lexsort's order: ties, NaN last either way, strings, row order last
    rng = np.random.default_rng(5)
    n = 3000
    a = rng.integers(0, 4, n).astype(np.float64)
    a[rng.random(n) < 0.1] = np.nan
    b = rng.integers(0, 3, n)
    c = np.array(["x", "yy", "a"])[rng.integers(0, 3, n)]
    cols = [(a, True), (b, False), (c, True)]
    keys = [np.arange(n)]
    for v, desc in reversed(cols):
        v = np.unique(v, return_inverse=True)[1] if v.dtype.kind == "U" else v
        v = np.where(np.isnan(v.astype(float)), -np.inf if desc else np.inf, v.astype(float))
        keys.append(-v if desc else v)
    want = np.empty(n, np.int64)
    want[np.lexsort(keys)] = np.arange(n)
    assert rank_order(cols).tolist() == want.tolist()


def test_large_clusters_keep_only_members_confirmed_by_two_signals():
    import pyarrow as pa

    from dedup.config import load_config
    from dedup.phases.manifest import build_manifest

    ids = [f"s/{k}" for k in range(5)]
    table = pa.table({
        "sample_id": ids, "shard_id": ["s"] * 5, "key": [str(k) for k in range(5)], "status": ["ok"] * 5,
        "width": [100, 90, 90, 90, 90], "height": [100] * 5, "file_size": [5, 4, 3, 2, 1], "phash": pa.array([0] * 5, pa.uint64()),
    })
    # 1 and 2: phash + embedding; 3: exact; 4: embedding only (weak).
    rows = [("s/0", "s/1", "phash", 2), ("s/0", "s/1", "embedding", 0.9), ("s/0", "s/2", "phash", 3), ("s/0", "s/2", "embedding", 0.8),
            ("s/0", "s/3", "exact", 1.0), ("s/0", "s/4", "embedding", 0.7)]
    pairs = pa.table({"a": [r[0] for r in rows], "b": [r[1] for r in rows], "method": [r[2] for r in rows], "score": pa.array([r[3] for r in rows], pa.float32())})
    off, _ = build_manifest(load_config(None, None), table, pairs)
    assert off["cluster_size"].to_pylist() == [5] * 5
    on, _ = build_manifest(load_config(None, None, **{"clusters.verify_min_size": 4}), table, pairs)
    m = {r["sample_id"]: r for r in on.to_pylist()}
    assert [m[f"s/{k}"]["cluster_id"] for k in range(4)] == ["s/0"] * 4
    assert m["s/4"]["cluster_id"] == "s/4" and m["s/4"]["is_keeper"]


def test_hash_cross_check_drops_one_hash_collisions():
    """A pair found by one hash is a duplicate only if the other hash agrees within twice its
    radius (hashes.cross_check): a real copy has both hashes close, an unrelated image that
    collides on one 64-bit hash has the other far apart."""
    import pyarrow as pa

    from dedup.config import load_config
    from dedup.phases.manifest import build_manifest

    def bits(k: int) -> int:  # k low bits set
        return (1 << k) - 1

    base_p, base_d = 0xF0F0F0F0F0F0F0F0, 0x0F0F0F0F0F0F0F0F
    ph = [base_p, base_p ^ bits(8), base_p ^ bits(8), base_p ^ bits(30)]
    dh = [base_d, base_d ^ bits(1), base_d ^ bits(20), base_d ^ bits(5)]
    ids = [f"s/{k}" for k in range(4)]
    table = pa.table({
        "sample_id": ids, "shard_id": ["s"] * 4, "key": [str(k) for k in range(4)], "status": ["ok"] * 4,
        "width": [100, 90, 90, 90], "height": [100] * 4, "file_size": [4, 3, 2, 1],
        "phash": pa.array(ph, pa.uint64()), "dhash": pa.array(dh, pa.uint64()),
    })
    # what the hash indexes would find at radius 8 (pHash) and 6 (dHash)
    rows = [("s/0", "s/1", "phash", 8), ("s/0", "s/1", "dhash", 1), ("s/0", "s/2", "phash", 8), ("s/0", "s/3", "dhash", 5)]
    pairs = pa.table({"a": [r[0] for r in rows], "b": [r[1] for r in rows], "method": [r[2] for r in rows],
                      "score": pa.array([r[3] for r in rows], pa.float32())})
    on, _ = build_manifest(load_config(None, None, methods=["phash", "dhash"]), table, pairs)
    m = {r["sample_id"]: r for r in on.to_pylist()}
    assert m["s/1"]["cluster_id"] == "s/0" and not m["s/1"]["is_keeper"]  # both hashes agree
    assert m["s/2"]["is_keeper"] and m["s/2"]["cluster_size"] == 1  # pHash 8, dHash 20 > 12
    assert m["s/3"]["is_keeper"] and m["s/3"]["cluster_size"] == 1  # dHash 5, pHash 30 > 16
    off, _ = build_manifest(load_config(None, None, methods=["phash", "dhash"], **{"hashes.cross_check": False}), table, pairs)
    assert off["cluster_size"].to_pylist() == [4] * 4
    # with one hash only there is nothing to cross-check against
    one, _ = build_manifest(load_config(None, None, methods=["phash"]), table, pairs.filter(pa.compute.equal(pairs["method"], "phash")))
    assert {r["sample_id"]: r["cluster_id"] for r in one.to_pylist()}["s/2"] == "s/0"


def test_hash_rule_table():
    import numpy as np

    from dedup.config import load_config
    from dedup.phases.manifest import hash_rule

    cfg = load_config(None, None)  # radii 8 / 6, cross-check on
    dp = np.array([0, 8, 8, 9, 16, 17, -1, 3])
    dd = np.array([0, 12, 13, 0, 6, 6, 2, -1])
    p_ok, d_ok = hash_rule(cfg, dp, dd)
    assert p_ok.tolist() == [True, True, False, False, False, False, False, True]
    assert d_ok.tolist() == [True, False, False, True, True, False, True, False]
    p_off, d_off = hash_rule(load_config(None, None, **{"hashes.cross_check": False}), dp, dd)
    assert p_off.tolist() == [True, True, True, False, False, False, False, True]
    assert d_off.tolist() == [True, False, False, True, True, True, True, False]


def _group_clusters_reference(n, e, rank, valid, joins):
    """group_clusters' rules written plainly (a dict of links, one component at a time)."""
    from dedup.compute.clusters import components

    lab = components(n, e, valid)
    keeper = np.where(valid, np.arange(n), -1)
    method, score = np.full(n, -1, np.int8), np.full(n, np.nan, np.float32)
    link = {}
    for a, b, m, s in zip(e.i.tolist(), e.j.tolist(), e.method.tolist(), e.score.tolist()):
        if a != b and valid[a] and valid[b]:
            key = (min(a, b), max(a, b))
            if key not in link or m < link[key][0]:
                link[key] = (m, s)
    degree = np.zeros(n, int)
    for a, b in link:
        degree[a] += 1
        degree[b] += 1
    rest = []
    for c in np.unique(lab[lab >= 0]):
        members = np.flatnonzero(lab == c)
        if len(members) < 2:
            continue
        cand = members[degree[members] >= 0.8 * degree[members].max()]
        k = int(cand[np.argmin(rank[cand])])
        ok, jm, js = joins(members, k) if joins else (np.zeros(len(members), bool), None, None)
        for p, mbr in enumerate(members.tolist()):
            d = link.get((min(mbr, k), max(mbr, k)))
            if mbr == k:
                continue
            if d is not None:
                keeper[mbr], (method[mbr], score[mbr]) = k, d
            elif ok[p]:
                keeper[mbr], method[mbr], score[mbr] = k, jm[p], js[p]
            else:
                rest.append(mbr)
    return keeper, method, score, rest


def test_group_clusters_matches_its_rules_on_random_graphs():
    from dedup.compute.clusters import group_clusters

    rng = np.random.default_rng(1)

    def joins(members, k):
        r = np.random.default_rng(int(k) * 1000 + len(members))
        return r.random(len(members)) > 0.5, r.integers(0, 4, len(members)), r.random(len(members))

    for trial in range(200):
        n = int(rng.integers(2, 50))
        m = int(rng.integers(0, 90))
        i, j = rng.integers(0, n, m), rng.integers(0, n, m)
        e = Edges(i.astype(np.int64), j.astype(np.int64), rng.integers(0, 4, m).astype(np.int8),
                  rng.random(m).astype(np.float32))
        valid = rng.random(n) > 0.1
        rank = rng.permutation(n)
        jn = joins if trial % 2 else None
        cl = group_clusters(n, e, rank, valid=valid, joins=jn)
        keeper, method, score, rest = _group_clusters_reference(n, e, rank, valid, jn)
        decided = np.setdiff1d(np.arange(n), rest)  # members left to keeper_clusters: checked elsewhere
        assert np.array_equal(cl.keeper[decided], keeper[decided]), trial
        assert np.array_equal(cl.method[decided], method[decided]), trial
        assert np.allclose(cl.score[decided], score[decided], equal_nan=True), trial
