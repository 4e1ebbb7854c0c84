"""How the exact pHash / dHash pair search grows with n (multi-index hashing, docs/scale.md).

    python benchmarks/hash_scale.py                       # n = 1e5, 1e6, 3e6; writes docs/benchmarks.md
    python benchmarks/hash_scale.py --n 1000000 --no-write

For each n: the benchmark's synthetic 64-bit hashes (``benchmarks.candidates.synth_hashes``: half
uniform, half near topic prototypes, 10 % planted copies within 14 bits), the planner's choice
(``plan_mih``: chunks, per-chunk radius, estimated cost) and the measured CPU seconds of
``hash_pairs`` at the pipeline's radii (pHash 8, dHash 6), and its peak heap above the start
(RssAnon sampled every 5 ms by a thread; Linux, "–" elsewhere). A probe of a 21–22-bit chunk finds
~n / 2²² rows, so past a few million rows the candidates a row verifies grow with n and the
search with n²: the table shows the per-row cost rising.

``--faiss`` adds, for each hash, the peer a user would reach for: faiss's own multi-index hashing
(``IndexBinaryMultiHash``, 3 tables of 21 bits, up to 2 bits flipped a table, ``range_search``
below radius + 1; exact at these radii: 63 of the 64 bits are hashed in 3 tables, and ≤ 8
differing bits leave some table with ≤ 2 of them) on the same hashes, with its pair count (the
same) and CPU seconds (all threads).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.candidates import synth_hashes  # noqa: E402

RADII = (("phash", 8, 0), ("dhash", 6, 1))  # name, radius, seed of its synthetic hashes


def _anon_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("RssAnon")) / 1024
    except (OSError, StopIteration):
        return None


class _Peak:
    """The largest RssAnon seen while the block runs, less the one at its start (MB)."""

    def __enter__(self):
        self.start = self.peak = _anon_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.005):
            now = _anon_mb()
            if now is not None and self.peak is not None:
                self.peak = max(self.peak, now)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def above(self) -> str:
        return "–" if self.start is None or self.peak is None else f"{self.peak - self.start:.0f}"


def _timed(n: int, name: str, radius: int, layout: str, est: str, search) -> list[object]:
    """One table row: ``search()`` (returns its pair count) timed in CPU seconds, its peak heap."""
    c0 = time.process_time()
    with _Peak() as peak:
        pairs = search()
    cpu = time.process_time() - c0
    row: list[object] = [f"{n:,}", name, radius, layout, est, f"{cpu:.1f}", f"{cpu / n * 1e6:.1f}", peak.above(), f"{pairs:,}"]
    print(" | ".join(str(v) for v in row), flush=True)
    return row


def measure(n: int) -> list[list[object]]:
    from dedup.compute.search.hamming import hash_pairs, plan_mih

    rows: list[list[object]] = []
    for name, radius, seed in RADII:
        h = synth_hashes(n, seed)
        plan = plan_mih(h, radius, np.random.default_rng(0))
        layout = f"{plan.m} chunks, ≤ {plan.rp} bits each" if plan else "exhaustive"
        est = f"{plan.est_cost / 1e9:.1f}" if plan else "–"
        rows.append(_timed(n, name, radius, layout, est, lambda h=h, r=radius: len(hash_pairs(h, r).i)))
    return rows


def faiss_multihash_pairs(h: np.ndarray, radius: int) -> int:
    """Pairs i < j within ``radius`` bits, by faiss's IndexBinaryMultiHash (exact here: 3 × 21
    of the 64 bits hashed, ≤ 2 flips a table; ≤ ``radius`` ≤ 8 differing bits leave some table
    with ≤ 2 of them)."""
    import faiss

    assert radius <= 8
    codes = np.ascontiguousarray(np.asarray(h).view(np.uint8).reshape(len(h), 8))
    index = faiss.IndexBinaryMultiHash(64, 3, 21)
    index.nflip = 2
    index.add(codes)
    lims, _, ids = index.range_search(codes, radius + 1)  # distances < radius + 1
    q = np.repeat(np.arange(len(h)), np.diff(lims).astype(np.int64))
    return int((q < ids).sum())


def measure_faiss(n: int) -> list[list[object]]:
    rows: list[list[object]] = []
    for name, radius, seed in RADII:
        h = synth_hashes(n, seed)
        rows.append(_timed(n, name, radius, "faiss IndexBinaryMultiHash 3 × 21 bits, ≤ 2 flips", "–",
                           lambda h=h, r=radius: faiss_multihash_pairs(h, r)))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, action="append", help="rows (repeatable); default 1e5, 1e6, 3e6")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    ap.add_argument("--faiss", action="store_true", help="also faiss's IndexBinaryMultiHash on the same hashes")
    args = ap.parse_args(argv)
    from benchmarks._table import machine_description, markdown_table, write_section

    rows = [r for n in (args.n or [100_000, 1_000_000, 3_000_000])
            for r in measure(n) + (measure_faiss(n) if args.faiss else [])]
    table = markdown_table(["n", "hash", "radius", "plan", "estimated s", "CPU s", "CPU µs a row", "peak heap MB", "pairs"], rows)
    cmd = "python benchmarks/hash_scale.py" + "".join(f" --n {n}" for n in (args.n or [])) + (" --faiss" if args.faiss else "")
    body = f"### hash_scale\n\n`{cmd}` on {machine_description()}:\n\n{table}\n"
    print(body)
    if not args.no_write:
        write_section("hash_scale", body)


if __name__ == "__main__":
    main()
