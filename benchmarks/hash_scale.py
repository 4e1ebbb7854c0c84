"""How the exact pHash / dHash pair search grows with n (multi-index hashing, docs/scale.md).

    python benchmarks/hash_scale.py                       # n = 1e5, 1e6, 3e6; writes docs/benchmarks.md
    python benchmarks/hash_scale.py --n 1000000 --no-write

For each n: the benchmark's synthetic 64-bit hashes (``benchmarks.candidates.synth_hashes``: half
uniform, half near topic prototypes, 10 % planted copies within 14 bits), the planner's choice
(``plan_mih``: chunks, per-chunk radius, estimated cost) and the measured CPU seconds of
``hash_pairs`` at the pipeline's radii (pHash 8, dHash 6). A probe of a 21–22-bit chunk finds
~n / 2²² rows, so past a few million rows the candidates a row verifies grow with n and the
search with n²: the table shows the per-row cost rising.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.candidates import synth_hashes  # noqa: E402

RADII = (("phash", 8, 0), ("dhash", 6, 1))  # name, radius, seed of its synthetic hashes


def measure(n: int) -> list[list[object]]:
    from dedup.compute.search.hamming import hash_pairs, plan_mih

    rows: list[list[object]] = []
    for name, radius, seed in RADII:
        h = synth_hashes(n, seed)
        plan = plan_mih(h, radius, np.random.default_rng(0))
        c0 = time.process_time()
        got = hash_pairs(h, radius)
        cpu = time.process_time() - c0
        layout = f"{plan.m} chunks, ≤ {plan.rp} bits each" if plan else "exhaustive"
        est = f"{plan.est_cost / 1e9:.1f}" if plan else "–"
        rows.append([f"{n:,}", name, radius, layout, est, f"{cpu:.1f}", f"{cpu / n * 1e6:.1f}", f"{len(got.i):,}"])
        print(" | ".join(str(v) for v in rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, action="append", help="rows (repeatable); default 1e5, 1e6, 3e6")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = ap.parse_args(argv)
    from benchmarks._table import machine_description, markdown_table, write_section

    rows = [r for n in (args.n or [100_000, 1_000_000, 3_000_000]) for r in measure(n)]
    table = markdown_table(["n", "hash", "radius", "plan", "estimated s", "CPU s", "CPU µs a row", "pairs"], rows)
    cmd = "python benchmarks/hash_scale.py" + "".join(f" --n {n}" for n in (args.n or []))
    body = f"### hash_scale\n\n`{cmd}` on {machine_description()}:\n\n{table}\n"
    print(body)
    if not args.no_write:
        write_section("hash_scale", body)


if __name__ == "__main__":
    main()
