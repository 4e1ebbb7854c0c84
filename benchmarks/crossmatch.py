"""Queries against a reference set (``dedup check``, ``--against``); writes section
"crossmatch" of docs/benchmarks.md.

    python benchmarks/crossmatch.py                       # 980 000 refs, 20 000 queries (~8 min)
    python benchmarks/crossmatch.py --refs 200000 --queries 5000 --no-write

References and queries are disjoint rows of the candidate benchmark's synthetic embeddings
(d = 512, cosine threshold 0.9, planted near-duplicates; benchmarks/candidates.py, cached in
/tmp/dedup-bench). Side by side in one run:

* **faiss IndexIVFFlat**: what a user would reach for, and what dedup used before (nlist =
  4·√n, trained on 64·nlist rows, nprobe 16): ``range_search`` per query.
* **dedup VectorIndex**: the candidate search's IVF lists over the references, the queries
  compared list by list in matrix products with the bound prefilter, exact rescoring.

Recall is against exact brute force for the first ``--truth`` queries (all pairs at cosine ≥
the threshold with those queries), plus false positives (pairs reported below it).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._table import machine_description, markdown_table, write_section  # noqa: E402
from benchmarks.candidates import D, THRESHOLD, _ensure_data  # noqa: E402

SOURCE_N = 1_000_000


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _truth(ref: np.ndarray, q: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """Exact (query, ref) pairs ≥ threshold: float32 products, float64 rescoring near it."""
    from dedup.compute.search.kernels import rows_f32
    from dedup.compute.search.threads import n_threads, pmap, single_threaded_libs

    xq = rows_f32(q, slice(0, len(q)))
    blocks = [(s, min(len(ref), s + (1 << 16))) for s in range(0, len(ref), 1 << 16)]

    def one(b):
        s, e = b
        r = rows_f32(ref, slice(s, e))
        qi, ri = np.nonzero(xq @ r.T >= threshold - 1e-3)
        ex = np.einsum("ij,ij->i", q[qi].astype(np.float64), ref[s + ri].astype(np.float64))
        ok = ex >= threshold
        return list(zip(qi[ok].tolist(), (s + ri[ok]).tolist()))

    out: set = set()
    with single_threaded_libs():
        for _, got in pmap(one, blocks, n_threads(0)):
            out.update(got)
    return out


def ivfflat_index(ref: np.ndarray, seed: int = 1234):
    """The faiss index dedup used before for queries against references (and the outlier
    score): IndexIVFFlat, inner product, nlist = 4·√n, trained on 64·nlist rows, nprobe 16."""
    import faiss

    n, d = ref.shape
    nlist = int(min(4 * math.sqrt(n), n // 50))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, nlist * 64), replace=False))
    index.train(np.ascontiguousarray(ref[sample], np.float32))
    index.nprobe = min(nlist, 16)
    for a in range(0, n, 65536):
        index.add(np.ascontiguousarray(ref[a : a + 65536], np.float32))
    return index


def _faiss_ivfflat(ref: np.ndarray, q: np.ndarray, threshold: float, seed: int = 1234) -> dict:
    t0 = time.perf_counter()
    index = ivfflat_index(ref, seed)
    nlist = index.nlist
    t1 = time.perf_counter()
    qi, ri = [], []
    for a in range(0, len(q), 4096):
        lims, dist, ids = index.range_search(np.ascontiguousarray(q[a : a + 4096], np.float32), threshold - 1e-6)
        rows = np.repeat(np.arange(len(lims) - 1), np.diff(lims.astype(np.int64)))
        keep = dist >= threshold
        qi.append(a + rows[keep])
        ri.append(ids[keep])
    t2 = time.perf_counter()
    return dict(build=t1 - t0, query=t2 - t1, qi=np.concatenate(qi), ri=np.concatenate(ri).astype(np.int64),
                params=f"nlist {nlist}, nprobe {index.nprobe}")


def _dedup(ref: np.ndarray, q: np.ndarray, threshold: float) -> dict:
    from dedup.compute.crossmatch import VectorIndex

    t0 = time.perf_counter()
    vi = VectorIndex(ref, threshold=threshold)
    t1 = time.perf_counter()
    m = vi.range(q, threshold)
    t2 = time.perf_counter()
    vi.topk(q, 1)
    t3 = time.perf_counter()
    p = vi.plan
    return dict(build=t1 - t0, query=t2 - t1, topk=t3 - t2, qi=m.q, ri=m.r,
                params=f"nlist {p.nlist}, nprobe ≤ {p.params.nprobe}, bound {0 if p.bound_rows is None else p.bound_rows.shape[1]}")


def run(refs: int, queries: int, truth_q: int, seed: int, threshold: float) -> list[dict]:
    if refs + queries > SOURCE_N:
        raise SystemExit(f"--refs + --queries must be ≤ {SOURCE_N}")
    x = np.load(_ensure_data(SOURCE_N, seed, threshold), mmap_mode="r")
    ref, q = x[:refs], np.asarray(x[SOURCE_N - queries :])
    t0 = time.perf_counter()
    truth = _truth(ref, q[:truth_q], threshold)
    t_truth = time.perf_counter() - t0
    out = []
    for name, fn in (("faiss IndexIVFFlat (range_search)", _faiss_ivfflat), ("dedup VectorIndex", _dedup)):
        r = fn(ref, q, threshold)
        sel = r["qi"] < truth_q
        got = set(zip(r["qi"][sel].tolist(), r["ri"][sel].tolist()))
        out.append(dict(method=name, refs=refs, queries=queries, params=r["params"], build_s=round(r["build"], 1),
                        query_s=round(r["query"], 2), ms_per_query=round(1000 * r["query"] / queries, 3),
                        topk_s=round(r.get("topk", float("nan")), 2), pairs=int(len(r["qi"])),
                        recall=round(len(got & truth) / max(1, len(truth)), 4), truth_pairs=len(truth),
                        false_pos=len(got - truth), peak_rss_mb=round(_rss_mb())))
    out.append(dict(method=f"exact brute force ({truth_q} queries)", refs=refs, queries=truth_q, params="float32 tiles + float64",
                    build_s=0.0, query_s=round(t_truth, 1), ms_per_query=round(1000 * t_truth / truth_q, 3),
                    topk_s=float("nan"), pairs=len(truth), recall=1.0, truth_pairs=len(truth), false_pos=0,
                    peak_rss_mb=round(_rss_mb())))
    return out


def report(rows: list[dict], threshold: float, truth_q: int) -> str:
    head = ["method", "parameters", "build s", "range s (all queries)", "ms / query", "top-1 s", "pairs",
            f"recall ({truth_q} queries)", "false positives"]
    body = [[r["method"], r["params"], r["build_s"], r["query_s"], r["ms_per_query"],
             "—" if math.isnan(r["topk_s"]) else r["topk_s"], r["pairs"], f"{r['recall']:.4f} of {r['truth_pairs']}",
             r["false_pos"]] for r in rows]
    r0 = rows[0]
    return (f"## Queries against references (`benchmarks/crossmatch.py`)\n\n{machine_description()}. "
            f"{r0['refs']:,} reference and {r0['queries']:,} query rows (disjoint) of the candidate benchmark's "
            f"synthetic embeddings (d = {D}, cosine ≥ {threshold}); recall against exact brute force for the first "
            f"{truth_q:,} queries. Peak RSS of the whole run: {max(r['peak_rss_mb'] for r in rows):,} MB.\n\n"
            + markdown_table(head, body) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refs", type=int, default=980_000)
    ap.add_argument("--queries", type=int, default=20_000)
    ap.add_argument("--truth", type=int, default=5_000, help="queries with exact brute-force truth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=THRESHOLD)
    ap.add_argument("--json", action="store_true", help="print JSON lines only")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    a = ap.parse_args(argv)
    rows = run(a.refs, a.queries, min(a.truth, a.queries), a.seed, a.threshold)
    for r in rows:
        print(json.dumps(r), flush=True)
    if a.json:
        return
    body = report(rows, a.threshold, min(a.truth, a.queries))
    print(body)
    if not a.no_write:
        write_section("crossmatch", body)


if __name__ == "__main__":
    main()
