"""Benchmark the coarse stage's quantizer: flat assignment vs an upper level over the centroids.

    python benchmarks/quantizer.py --n 1000000 --n 10000000      # a table; writes docs/candidates.md
    python benchmarks/quantizer.py --n 1000000 --json            # one JSON line per n and quantizer
    ... --variant ivf:141:8 --variant hnsw:32:64                 # the upper levels to measure
    python benchmarks/quantizer.py --ranks                       # where the lists a row needs lie
    python benchmarks/quantizer.py --n 1000000 --list-rows 500 --list-rows 2000   # list sizes: the
        # flat quantizer with nlist = n / list rows; visits, pair-stage dot products, partition bytes
        # a row (section nlist of docs/candidates.md); --nprobe, --train-size override auto's

Data: the candidate benchmark's CLIP-like float16 embeddings (d = 512, planted near-duplicates
at cosines U[0.90, 0.995], 2% exact copies, 5% hard negatives; ``benchmarks/candidates.py``),
cached in ``$DEDUP_BENCH_CACHE`` (10⁷ rows: 10 GB). The quantizer is trained as the pipeline
trains it (``IVFParams.auto(n, 512, 0.90)``: nlist = n / 500, PCA to 128 dimensions and k-means
on ``train_size`` rows sampled with the search's seed, ``train_ivf``); it is cached as a pickle
next to the data. Each upper level is built on its centroids:

* ``flat``: every row compared with every centroid (the pipeline's assignment below the switch).
* ``ivf:S:m``: S super-lists (k-means over the centroids), a row compared with the centroids of
  its m nearest super-lists (``dedup.compute.search.upper``, what the pipeline adopts).
* ``hnsw:M:ef``: faiss ``IndexHNSWFlat`` over the centroids (M links, efSearch = ef).
* ``graph:S:m:E:K:R`` (a prototype): the E nearest lists found by ``ivf:S:m``, their K nearest
  centroids (a kNN graph over the centroids, built flat), R greedy hops to the nearest one's.

S may be written as a multiple of √nlist: ``ivf:2x:16`` = 2·√nlist super-lists.

Each then feeds the same visiting rule (own list + the lists within the bisector radius, at
most nprobe). Measured, one thread:

* ``us/row``: CPU µs a row of the assignment from the rows' PCA coordinates (``--time-rows``
  random rows; the PCA projection, the same for all, is shown once as ``project us/row``).
* ``visits/row``: lists a row visits besides its own.
* recall: an exact pair (cosine ≥ 0.90) counts as found when the search would compare its two
  rows: the same list, or one row visits the other's list. ``recall (sampled)``: over every
  exact pair touching ``--queries`` random rows (brute force against all n rows, planted and
  natural pairs alike); ``recall (planted)``: over ``--planted`` random planted copies whose
  exact cosine is ≥ 0.90. ``vs flat``: the fraction of the pairs the flat quantizer finds (both
  sets) that this one finds too.

With ``--list-rows``: also ``at_cap`` (share of the timed rows that visit nprobe - 1 lists: the
cap cuts them short), ``pair_dots_per_row`` (the pair stage's dot products a row, Σ over lists of
members × (members + visitors) / n: the mean over the timed rows of the members of each list
they are in, list sizes counted on the first ``--count-rows`` rows and scaled to n — the rows are
i.i.d.) and ``partition_bytes_per_row`` ((1 + visits) × 1 037 B: what the partitioned search
writes a row).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.candidates import CACHE, THRESHOLD, _data_path, _ensure_data, _flat  # noqa: E402

DOC = ROOT / "docs" / "candidates.md"
VARIANTS = ["flat", "ivf:1x:8", "ivf:1x:16", "ivf:1x:32", "ivf:2x:32", "ivf:2x:64", "hnsw:32:128"]


class _HNSW:
    """An HNSW graph over the centroids in the place of the upper level (benchmark only)."""

    def __init__(self, centroids: np.ndarray, m: int, ef: int):
        import faiss

        self.index = faiss.IndexHNSWFlat(centroids.shape[1], m)
        self.index.hnsw.efConstruction = max(40, ef)
        self.index.add(np.ascontiguousarray(centroids, np.float32))
        self.index.hnsw.efSearch = ef

    def nearest(self, lists: np.ndarray, q: np.ndarray, k: int):
        return self.index.search(np.ascontiguousarray(q, np.float32), k)


class _Graph:
    """Prototype: entry lists from an upper level, then their neighbours in a kNN graph of
    the centroids (benchmark only)."""

    def __init__(self, centroids: np.ndarray, upper, entries: int, k: int, rounds: int):
        import faiss

        self.upper, self.entries, self.rounds = upper, entries, rounds
        self.flat = faiss.IndexFlatL2(centroids.shape[1])
        self.flat.add(np.ascontiguousarray(centroids, np.float32))
        self.graph = self.flat.search(np.ascontiguousarray(centroids, np.float32), k + 1)[1].astype(np.int64)  # own first

    def _dist(self, q, ids):
        import faiss

        out = np.empty(ids.shape, np.float32)
        ids = np.ascontiguousarray(ids)
        self.flat.compute_distance_subset(len(q), faiss.swig_ptr(q), ids.shape[1], faiss.swig_ptr(out), faiss.swig_ptr(ids))
        return out

    def nearest(self, lists: np.ndarray, q: np.ndarray, k: int):
        q = np.ascontiguousarray(q, np.float32)
        _, ent = self.upper.nearest(lists, q, self.entries)  # entry lists, then `rounds` greedy hops
        ent = np.where(ent < 0, ent[:, :1], ent)
        cand = self.graph[ent].reshape(len(q), -1)
        for _ in range(self.rounds):
            cand = np.sort(cand, axis=1)
            d = self._dist(q, cand)
            d[:, 1:][cand[:, 1:] == cand[:, :-1]] = np.inf
            best = cand[np.arange(len(q)), d.argmin(axis=1)]
            cand = np.concatenate([cand, self.graph[best]], axis=1)
        cand = np.sort(cand, axis=1)
        d = self._dist(q, cand)
        d[:, 1:][cand[:, 1:] == cand[:, :-1]] = np.inf
        kk = min(k, cand.shape[1])
        part = np.argpartition(d, kk - 1, axis=1)[:, :kk]
        dp, ip = np.take_along_axis(d, part, 1), np.take_along_axis(cand, part, 1)
        o = np.argsort(dp, axis=1, kind="stable")
        return np.take_along_axis(dp, o, 1), np.take_along_axis(ip, o, 1)


def _params(n: int, list_rows: int | None = None, nprobe: int | None = None, train_size: int | None = None):
    from dedup.compute.search.ivf import IVFParams

    over = {"nprobe": nprobe} if nprobe else {}
    if train_size:
        over["train_size"] = min(n, train_size)
    return IVFParams.auto(n, 512, THRESHOLD, list_rows=list_rows, super_lists=0, **over)


def _train(n: int, seed: int, list_rows: int | None = None, nprobe: int | None = None,
           train_size: int | None = None):
    """The quantizer as the pipeline trains it (cached by nlist): params, quantizer, seconds.
    ``list_rows``: rows per list instead of auto's rule (nprobe, train_size follow the nlist);
    ``nprobe``: the cap instead of auto's (the same k-means: nprobe is not used to train);
    ``train_size``: k-means sample rows instead of auto's."""
    from dedup.compute.search.coarse import sample_rows, train_ivf
    from dedup.compute.search.kernels import take_rows

    params = _params(n, list_rows, nprobe, train_size)
    tag = f"-t{params.train_size}" if params.train_size != _params(n, list_rows).train_size else ""
    path = CACHE / f"quantizer-n{n}-l{params.nlist}{tag}-s{seed}.pkl"
    if path.exists():
        p0, coarse, secs = pickle.loads(path.read_bytes())
        if replace(p0, nprobe=params.nprobe) == params:
            return params, replace(coarse, params=params), secs
    x = np.load(_data_path(n, seed, THRESHOLD), mmap_mode="r")
    want = sample_rows(np.arange(n, dtype=np.int64), max(params.train_size, params.nlist), params.seed)
    sample = np.asarray(take_rows(x, want))
    c0 = time.process_time()
    coarse = train_ivf(sample, params, threshold=THRESHOLD)
    out = (params, coarse, time.process_time() - c0)
    path.write_bytes(pickle.dumps(out))
    return out


def _upper(coarse, variant: str):
    from dedup.compute.search.threads import single_threaded_libs
    from dedup.compute.search.coarse import train_upper

    kind, *args = variant.split(":")
    if args and args[0].endswith("x"):  # S as a multiple of √nlist
        args[0] = str(int(round(float(args[0][:-1]) * len(coarse.centroids) ** 0.5)))
    c0 = time.process_time()
    with single_threaded_libs():
        if kind == "flat":
            q = replace(coarse, upper=None)
        elif kind == "ivf":
            q = replace(coarse, upper=train_upper(coarse.centroids, int(args[0]), int(args[1]), coarse.params.niter,
                                                  coarse.params.seed),
                        params=replace(coarse.params, super_lists=int(args[0]), super_probe=int(args[1])))
        elif kind == "graph":  # graph:S:m:entries:K:rounds
            up = train_upper(coarse.centroids, int(args[0]), int(args[1]), coarse.params.niter, coarse.params.seed)
            q = replace(coarse, upper=_Graph(coarse.centroids, up, int(args[2]), int(args[3]), int(args[4])))
        elif kind == "hnsw":
            q = replace(coarse, upper=_HNSW(coarse.centroids, int(args[0]), int(args[1])))
        else:
            raise SystemExit(f"unknown variant {variant!r}")
        q.nearest(coarse.centroids[:1], 1)  # builds the search index
    return q, time.process_time() - c0


def _assign(q, pz: np.ndarray, rows: np.ndarray):
    from dedup.compute.search.coarse import assign_coordinates
    from dedup.compute.search.threads import single_threaded_libs

    with single_threaded_libs():
        c0 = time.process_time()
        prim, vr, vl = assign_coordinates(q, pz, rows)
        return prim, vr, vl, time.process_time() - c0


def _found(prim: dict, visits: np.ndarray, nlist: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether the search compares rows a and b: same list, or one visits the other's list."""
    pa = np.array([prim[r] for r in a.tolist()], np.int64)
    pb = np.array([prim[r] for r in b.tolist()], np.int64)
    return (pa == pb) | np.isin(a * nlist + pb, visits) | np.isin(b * nlist + pa, visits)


ROW_BYTES = 1037  # a partition row: id, list, float16 vector (docs/scale.md)


def _list_sizes(x: np.ndarray, coarse, rows: int, block: int = 1 << 16) -> tuple[np.ndarray, int]:
    """Members of every list, estimated from the first ``rows`` rows (all when ≥ n; the
    benchmark's rows are i.i.d., so a block is a random sample), scaled to n."""
    from dedup.compute.search.threads import single_threaded_libs

    n = len(x)
    rows = min(int(rows), n)
    counts = np.zeros(len(coarse.centroids), np.int64)
    with single_threaded_libs():
        for s in range(0, rows, block):
            pz, _ = coarse.coordinates(np.asarray(x[s : min(rows, s + block)], np.float32))
            counts += np.bincount(coarse.nearest(pz, 1)[1][:, 0], minlength=len(counts))
    return counts * (n / rows), rows


def _pair_cost(sizes: np.ndarray, rid: np.ndarray, prim: np.ndarray, vr: np.ndarray, vl: np.ndarray) -> float:
    """Dot products of the pair stage a row, Σ_L m_L (m_L + v_L) / n, as the mean over the
    sampled rows of the members of every list the row is in (own + visited)."""
    pos = np.searchsorted(rid, vr)
    per = sizes[prim].astype(np.float64)
    np.add.at(per, pos, sizes[vl])
    return float(per.mean())


def measure(n: int, seed: int, variants: list[str], queries: int, planted: int, time_rows: int,
            list_rows: int | None = None, nprobe: int | None = None, count_rows: int = 10**6,
            train_size: int | None = None) -> list[dict]:
    from dedup.compute.search.kernels import take_rows
    from dedup.compute.search.threads import single_threaded_libs

    path = _ensure_data(n, seed, THRESHOLD)
    x = np.load(path, mmap_mode="r")
    params, coarse, train_s = _train(n, seed, list_rows, nprobe, train_size)
    nlist = coarse.params.nlist
    # exact pairs: every pair touching `queries` random rows (brute force), and planted copies
    ref = CACHE / f"quantizer-flat-n{n}-q{queries}-s{seed}.npz"
    if not ref.exists():
        _flat(n, seed, THRESHOLD, queries, ref)
    f = np.load(ref)
    si, sj = f["i"].astype(np.int64), f["j"].astype(np.int64)
    pl = np.load(path.with_suffix(".planted.npz"))
    pick = np.sort(np.random.default_rng(seed + 7).choice(len(pl["targets"]), min(planted, len(pl["targets"])), replace=False))
    pa, pb = pl["targets"][pick].astype(np.int64), pl["bases"][pick].astype(np.int64)
    cos = (np.asarray(take_rows(x, pa), np.float64) * np.asarray(take_rows(x, pb), np.float64)).sum(1)
    ok = cos >= THRESHOLD
    pa, pb = pa[ok], pb[ok]
    ends = np.unique(np.concatenate([si, sj, pa, pb]))
    timed = np.sort(np.random.default_rng(seed + 11).choice(n, min(time_rows, n), replace=False))
    with single_threaded_libs():
        c0 = time.process_time()
        pz_t, _ = coarse.coordinates(np.asarray(take_rows(x, timed), np.float32))
        project_us = (time.process_time() - c0) / len(timed) * 1e6
        pz_e, _ = coarse.coordinates(np.asarray(take_rows(x, ends), np.float32))
    sizes, counted = _list_sizes(x, coarse, count_rows) if count_rows else (None, 0)
    out, base = [], None
    for v in variants:
        q, build_s = _upper(coarse, v)
        prim_t, vr_t, vl_t, secs = _assign(q, pz_t, timed)
        per_row = np.bincount(np.searchsorted(timed, vr_t), minlength=len(timed))
        prim, vr, vl, _ = _assign(q, pz_e, ends)
        pmap = dict(zip(ends.tolist(), prim.tolist()))
        visits = vr * nlist + vl
        fs, fp = _found(pmap, visits, nlist, si, sj), _found(pmap, visits, nlist, pa, pb)
        if base is None:
            base = (fs, fp)
        r = {"kind": "quantizer", "n": n, "nlist": nlist, "nprobe": coarse.params.nprobe, "variant": v,
             "list_rows": round(n / nlist), "train_size": coarse.params.train_size, "train_cpu_s": round(train_s, 1), "build_cpu_s": round(build_s, 2), "time_rows": len(timed),
             "us_per_row": round(secs / len(timed) * 1e6, 2), "project_us_per_row": round(project_us, 2),
             "visits_per_row": round(len(vr_t) / len(timed), 3), "queries": int(len(f["q"])),
             "sampled_pairs": int(len(si)), "recall_sampled": round(float(fs.mean()) if len(fs) else 1.0, 5),
             "planted_pairs": int(len(pa)), "recall_planted": round(float(fp.mean()) if len(fp) else 1.0, 5),
             "vs_flat": round(float(np.concatenate([fs, fp])[np.concatenate(base)].mean()), 5),
             "at_cap": round(float((per_row >= coarse.params.nprobe - 1).mean()), 5) if coarse.params.nprobe > 1 else 1.0,
             "partition_bytes_per_row": round((1 + len(vr_t) / len(timed)) * ROW_BYTES)}
        if sizes is not None:
            r.update(pair_dots_per_row=round(_pair_cost(sizes, timed, prim_t, vr_t, vl_t), 1),
                     list_size_max=int(sizes.max()), count_rows=counted)
        out.append(r)
        print(json.dumps(r), flush=True)
    return out


def ranks(n: int, seed: int, rows: int = 4096) -> dict:
    """Where the lists a row needs lie among its super-lists: the rank (by distance) of the
    super-list (S = √nlist) holding each list the flat assignment gives a row (own + visited)."""
    from dedup.compute.search.coarse import assign_coordinates, train_upper
    from dedup.compute.search.kernels import take_rows
    from dedup.compute.search.threads import single_threaded_libs

    x = np.load(_ensure_data(n, seed, THRESHOLD), mmap_mode="r")
    _, coarse, _ = _train(n, seed)
    pick = np.sort(np.random.default_rng(seed + 1).choice(n, min(rows, n), replace=False))
    nl = len(coarse.centroids)
    s = int(round(nl**0.5))
    with single_threaded_libs():
        pz, _ = coarse.coordinates(np.asarray(take_rows(x, pick), np.float32))
        prim, vr, vl = assign_coordinates(coarse, pz, np.arange(len(pick)))
        up = train_upper(coarse.centroids, s, s, coarse.params.niter, coarse.params.seed)
        import faiss

        flat = faiss.IndexFlatL2(up.centroids.shape[1])
        flat.add(up.centroids)
        order = flat.search(np.ascontiguousarray(pz, np.float32), s)[1]  # every super-centroid, nearest first
    own = np.empty(nl, np.int64)
    for k in range(s):
        own[up.order[up.offsets[k] : up.offsets[k + 1]]] = k
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(s), order.shape).copy(), 1)
    r = np.concatenate([np.arange(len(pick)), vr])
    rk = rank[r, own[np.concatenate([prim, vl])]]
    q = np.quantile(rk, [0.5, 0.9, 0.99])
    out = {"kind": "ranks", "n": n, "nlist": nl, "super_lists": s, "rows": len(pick),
           "lists_per_row": round(len(rk) / len(pick), 3), "rank_q50_q90_q99": [int(v) for v in q]}
    print(json.dumps(out), flush=True)
    return out


def _size(n: int) -> str:
    k = len(str(n)) - 1
    return "10" + "".join("⁰¹²³⁴⁵⁶⁷⁸⁹"[int(c)] for c in str(k)) if n == 10**k else str(n)


def report(rows: list[dict]) -> str:
    from benchmarks._table import machine_description, markdown_table

    head = ["n", "nlist", "quantizer", "us/row", "project us/row", "visits/row", "recall (sampled)",
            "recall (planted)", "vs flat", "upper level build CPU s"]
    body = [[_size(r["n"]), r["nlist"], r["variant"], r["us_per_row"], r["project_us_per_row"], r["visits_per_row"],
             f"{r['recall_sampled']:.4f} ({r['sampled_pairs']})", f"{r['recall_planted']:.4f} ({r['planted_pairs']})",
             f"{r['vs_flat']:.4f}", r["build_cpu_s"]] for r in rows]
    r0 = rows[0]
    return (f"Measured by `python benchmarks/quantizer.py` on {machine_description()}: "
            f"{r0['time_rows']} timed rows, sampled query rows as in `queries` of the JSON lines (4 000 at 10⁶, "
            "1 000 at 10⁷), nprobe as `IVFParams.auto`. "
            "us/row: CPU µs a row of the assignment from the PCA coordinates (one thread). Recall: the "
            "fraction of exact pairs (cosine ≥ 0.90) the search would compare (pairs in parentheses).\n\n"
            + markdown_table(head, body) + "\n")


def report_lists(rows: list[dict], pair_ns: float | None) -> str:
    """The list-size table (``--list-rows``): what each nlist costs a row."""
    from benchmarks._table import machine_description, markdown_table

    head = ["n", "rows a list", "nlist", "nprobe", "train rows", "train CPU s", "assign us/row", "visits/row",
            "rows at cap", "pair dots/row", "partition B/row", "recall (sampled)", "recall (planted)"]
    if pair_ns:
        head[-2:-2] = ["CPU us/row: train + assign + pairs"]
    body = []
    for r in rows:
        line = [_size(r["n"]), r["list_rows"], r["nlist"], r["nprobe"], r["train_size"], r["train_cpu_s"],
                r["us_per_row"], r["visits_per_row"], f"{r['at_cap']:.4f}", round(r["pair_dots_per_row"]),
                r["partition_bytes_per_row"], f"{r['recall_sampled']:.4f} ({r['sampled_pairs']})",
                f"{r['recall_planted']:.4f} ({r['planted_pairs']})"]
        if pair_ns:
            line[-2:-2] = [round(r["train_cpu_s"] * 1e6 / r["n"] + r["us_per_row"] + r["pair_dots_per_row"] * pair_ns / 1000, 1)]
        body.append(line)
    note = (f" CPU us/row: the k-means' CPU / n + the assignment's µs + pair dots × {pair_ns} ns (`--pair-ns`, "
            "the pair stage's CPU a dot product, measured apart); the PCA projection, the same for all, is left out."
            if pair_ns else "")
    return (f"Measured by `python benchmarks/quantizer.py --list-rows …` on {machine_description()}, the flat "
            "quantizer, one thread. rows at cap: share of the timed rows that visit nprobe - 1 lists. pair "
            "dots/row: Σ over lists of members × (members + visitors) / n, list sizes counted on "
            "`--count-rows` rows. partition B/row: (1 + visits) × 1 037 B." + note + "\n\n"
            + markdown_table(head, body) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, action="append", help="rows (repeatable; default 1e6 and 1e7)")
    ap.add_argument("--variant", action="append", help=f"quantizer (repeatable; default {' '.join(VARIANTS)})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--queries", type=int, help="random rows whose exact pairs are found by brute force "
                    "(default 4 000 up to 10⁶ rows, 1 000 above)")
    ap.add_argument("--planted", type=int, default=20000, help="random planted copies checked")
    ap.add_argument("--time-rows", type=int, default=32768, help="random rows whose assignment is timed")
    ap.add_argument("--list-rows", type=int, action="append", help="rows a list: nlist = n / this instead of "
                    "auto's rule (repeatable; 0 = auto's); writes the list-size table (section nlist)")
    ap.add_argument("--nprobe", type=int, help="nprobe cap instead of auto's")
    ap.add_argument("--train-size", type=int, help="k-means sample rows instead of auto's")
    ap.add_argument("--count-rows", type=int, default=10**6, help="rows assigned to count list sizes "
                    "(with --list-rows; default 1e6)")
    ap.add_argument("--pair-ns", type=float, help="CPU ns a pair-stage dot product (for the table's total)")
    ap.add_argument("--json", action="store_true", help="JSON lines only")
    ap.add_argument("--ranks", action="store_true", help="only the super-list ranks of the lists rows need (JSON)")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/candidates.md")
    ap.add_argument("--from-log", type=Path, help="re-render the table from the JSON lines of an earlier run")
    a = ap.parse_args(argv)
    if a.ranks:
        for n in a.n or [10**6, 10**7]:
            ranks(n, a.seed)
        return
    if a.from_log:
        rows = [json.loads(line) for line in a.from_log.read_text().splitlines() if line.startswith("{")]
    else:
        rows = []
        for n in a.n or [10**6, 10**7]:
            queries = a.queries or (4000 if n <= 10**6 else 1000)
            for lr in a.list_rows or [None]:
                rows += measure(n, a.seed, a.variant or (["flat"] if a.list_rows else VARIANTS), queries,
                                a.planted, a.time_rows, lr or None, a.nprobe,
                                a.count_rows if a.list_rows else 0, a.train_size)
    if a.json:
        return
    lists = bool(a.list_rows)
    body = report_lists(rows, a.pair_ns) if lists else report(rows)
    print(body)
    if not a.no_write:
        from benchmarks._table import write_section

        write_section("nlist" if lists else "quantizer", body, DOC)


if __name__ == "__main__":
    main()
