"""Do two revisions of dedup write the same manifests? Writes section "same-manifests" of
docs/benchmarks.md.

    python benchmarks/same_manifests.py --rev-a 50fe68d --rev-b WORKTREE
    python benchmarks/same_manifests.py --rev-a main --rev-b wt-api --embedder sscd-distilled --no-write

For a refactoring that must not change behaviour. Each revision's code is exported with
``git archive`` into a temporary directory (``WORKTREE``: this checkout as it is, uncommitted
changes included) and runs ``dedup run`` as a subprocess with ``PYTHONPATH`` pointing at it,
on the same input bytes, built once by this checkout's ``dedup.testing``:

1. ``synth``        real photos with planted copies (dedup.testing.synth.make_shards, 4 shards);
2. ``bad``          the bad-input corpus (dedup.testing.corpus.make_bad_corpus: truncated, empty
                    and missing shards, undecodable members; exit code 3);
3. ``incremental``  synth's shards 0-1 as a first run, then shards 2-3 ``--against`` it ``--merge``:
                    the delta and the merged manifest.

Methods exact, phash, dhash and embedding (``--embedder``, default the fast ``pixel``). Compared
row by row: the manifest (and ``merged_manifest.parquet``, ``pairs/pairs.parquet``), its schema
metadata, the exit code, and stats.json without its timings. The manifest has no timing
column; every column is compared. Exit status 0 when everything is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._table import machine_description, markdown_table, write_section  # noqa: E402

WORKTREE = "WORKTREE"
# stats.json keys (at any depth) that measure time, not behaviour
_VOLATILE = ("timing", "seconds", "finished_at", "cpu_")


def export(rev: str, dest: Path) -> tuple[Path, str]:
    """The code of ``rev`` under ``dest`` (``WORKTREE``: this checkout); returns (root, commit)."""
    if rev == WORKTREE:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True)
        return ROOT, head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=False)
    if commit.returncode != 0:
        raise SystemExit(f"error: unknown revision {rev!r}: {commit.stderr.strip()}")
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True, check=True)
    tar = dest.parent / (dest.name + ".tar")
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as tf:
        tf.extractall(dest, filter="data")
    tar.unlink()
    return dest, commit.stdout.strip()


def make_corpora(base: Path) -> dict[str, list[str]]:
    """The inputs of each case, as ``dedup run`` takes them."""
    from dedup.testing.corpus import make_bad_corpus
    from dedup.testing.synth import make_shards

    synth = base / "synth"
    make_shards(synth)
    bad, _expected = make_bad_corpus(base / "bad")  # paths, a missing shard among them
    day1, day2 = base / "day1", base / "day2"
    for d, names in ((day1, ("shard-00000.tar", "shard-00001.tar")), (day2, ("shard-00002.tar", "shard-00003.tar"))):
        d.mkdir()
        for name in names:
            shutil.copy(synth / name, d / name)
    return {"synth": [str(synth)], "bad": list(bad), "day1": [str(day1)], "day2": [str(day2)]}


def dedup_run(code: Path, cwd: Path, args: list[str], embedder: str) -> tuple[int, float]:
    env = {**os.environ, "PYTHONPATH": str(code)}
    cmd = [sys.executable, "-m", "dedup.cli", "run", *args, "--methods", "exact,phash,dhash,embedding",
           "--embedder", embedder, "--workers", "2", "--no-report", "--quiet"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if p.returncode not in (0, 3):
        raise SystemExit(f"error: {' '.join(cmd)} (in {cwd}, code {code}) exited {p.returncode}:\n{p.stderr[-2000:]}")
    return p.returncode, time.perf_counter() - t0


def run_cases(codes: dict[str, Path], base: Path, corpora: dict[str, list[str]], embedder: str) -> dict[str, dict[str, dict]]:
    """Every case with each revision's code, the revisions alternating case by case (so that
    a change in the machine's load falls on both); each revision in its own directory, with
    relative --out / --against paths: the same strings for both."""
    cases = {
        "synth": [[*corpora["synth"], "--out", "synth"]],
        "bad": [[*corpora["bad"], "--out", "bad"]],
        "incremental": [[*corpora["day1"], "--out", "day1"],
                        [*corpora["day2"], "--out", "day2", "--against", "day1", "--merge"]],
    }
    out: dict[str, dict[str, dict]] = {rev: {} for rev in codes}
    for case, steps in cases.items():
        for rev, code in codes.items():
            work = base / f"runs-{rev}"
            work.mkdir(exist_ok=True)
            exits, seconds = [], 0.0
            for args in steps:
                code_, t = dedup_run(code, work, args, embedder)
                exits.append(code_)
                seconds += t
            last = work / steps[-1][steps[-1].index("--out") + 1]
            res: dict = {"dir": last, "exit": exits[0] if len(exits) == 1 else tuple(exits), "seconds": seconds}
            if len(steps) > 1:
                res["first"] = work / steps[0][steps[0].index("--out") + 1]
            out[rev][case] = res
    return out


def _scrub(obj):
    if isinstance(obj, dict):
        return {k: _scrub(v) for k, v in obj.items() if not any(w in k for w in _VOLATILE)}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    return obj


def _diff_keys(a: object, b: object, at: str = "") -> list[str]:
    """Where two scrubbed stats differ: key paths added (+), removed (-) or changed (~)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"-{at}{k}" for k in a if k not in b] + [f"+{at}{k}" for k in b if k not in a]
        for k in a:
            if k in b:
                out += _diff_keys(a[k], b[k], f"{at}{k}.")
        return out
    return [] if a == b else [f"~{at.rstrip('.')}"]


def _same_table(a: Path, b: Path) -> tuple[bool, str]:
    if not a.exists() or not b.exists():
        return a.exists() == b.exists(), "missing" if a.exists() != b.exists() else "neither"
    ta, tb = pq.read_table(a), pq.read_table(b)
    if ta.schema.metadata != tb.schema.metadata:
        return False, "schema metadata differs"
    if ta.schema != tb.schema:
        return False, "schema differs"
    if ta.num_rows != tb.num_rows:
        return False, f"{ta.num_rows} vs {tb.num_rows} rows"
    if not ta.equals(tb):
        bad = [c for c in ta.column_names if not ta[c].equals(tb[c])]
        return False, f"columns differ: {bad}"
    return True, f"{ta.num_rows} rows"


def compare(a: dict, b: dict) -> tuple[list[object], bool]:
    da, db = a["dir"], b["dir"]
    files = ["manifest.parquet", "pairs/pairs.parquet"] + (["merged_manifest.parquet"] if (da / "merged_manifest.parquet").exists() else [])
    verdicts = {f: _same_table(da / f, db / f) for f in files}
    if "first" in a:  # the first run of the incremental case, too
        verdicts["day1 manifest"] = _same_table(a["first"] / "manifest.parquet", b["first"] / "manifest.parquet")
    sa, sb = (_scrub(json.loads((d / "stats.json").read_text())) for d in (da, db))
    diff = _diff_keys(sa, sb)
    added = [d for d in diff if d.startswith("+")]
    same_stats = len(diff) == len(added)  # keys only added (new diagnostics) change no decision
    same_exit = a["exit"] == b["exit"]
    ok = all(v[0] for v in verdicts.values()) and same_stats and same_exit
    rows = pq.read_metadata(da / "manifest.parquet").num_rows
    detail = "; ".join(f"{f}: {'same' if v[0] else 'DIFFERENT'} ({v[1]})" for f, v in verdicts.items())
    stats_note = ("same" if not diff else f"same values, {len(added)} keys added ({', '.join(added[:4])}…)") if same_stats \
        else "**different** (" + ", ".join(diff[:6]) + ")"
    return [rows, "yes" if ok else "**NO**", detail, stats_note,
            f"{a['exit']}" + ("" if same_exit else f" vs {b['exit']}"), round(a["seconds"], 1), round(b["seconds"], 1)], ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev-a", default="50fe68d", help="the reference revision (default 50fe68d)")
    ap.add_argument("--rev-b", default=WORKTREE, help=f"the revision to check (default {WORKTREE}: this checkout)")
    ap.add_argument("--embedder", default="pixel", help="embedder spec for the embedding method (default pixel)")
    ap.add_argument("--no-write", action="store_true", help="print the table only, leave docs/benchmarks.md alone")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="same-manifests-") as tmp:
        base = Path(tmp)
        code_a, commit_a = export(args.rev_a, base / "code-a")
        code_b, commit_b = export(args.rev_b, base / "code-b")
        corpora = make_corpora(base / "corpora")
        res = run_cases({"a": code_a, "b": code_b}, base, corpora, args.embedder)
        res_a, res_b = res["a"], res["b"]
        rows, all_ok = [], True
        for case in res_a:
            row, ok = compare(res_a[case], res_b[case])
            rows.append([case, *row])
            all_ok &= ok

    headers = ["corpus", "manifest rows", "identical", "tables compared", "stats.json (no timings)", "exit code",
               f"s ({commit_a})", f"s ({commit_b})"]
    table = markdown_table(headers, rows)
    head = (f"`python benchmarks/same_manifests.py --rev-a {args.rev_a} --rev-b {args.rev_b} --embedder {args.embedder}` "
            f"({machine_description()}): `dedup run` with methods exact, phash, dhash, embedding ({args.embedder}) on the "
            f"same inputs with the code of {commit_a} and of {commit_b}; tables compared row by row, every column, and "
            f"their schema metadata. Verdict: **{'identical' if all_ok else 'DIFFERENT'}**.")
    print(head + "\n\n" + table)
    if not args.no_write:
        write_section("same-manifests", "### Same manifests across revisions (`benchmarks/same_manifests.py`)\n\n" + head + "\n\n" + table)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
