"""Core install vs the full one; writes section "install" of docs/benchmarks.md.

    python benchmarks/install_size.py [--venv /tmp/dedup-core-venv] [--no-write]

1. ``python -m venv VENV && VENV/bin/pip install .`` — the core install, from the package
   index — timed; then ``du`` of VENV's site-packages, and a check that none of the extras'
   packages (torch, open_clip, onnxruntime, ray, ...) came with it.
2. ``VENV/bin/dedup run SHARDS --methods exact,phash,dhash`` on the demo's corpus (real photos
   with planted copies, :func:`dedup.testing.synth.make_shards`, built by this Python), scored
   against the planted ground truth: the core runs end to end.
3. The full install: what ``pip install '.[all]'`` resolves to (``pip install --dry-run
   --ignore-installed --report``: nothing is installed), sized as those same distributions
   installed in this Python (the sum of the files each one's RECORD lists).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._table import machine_description, markdown_table, write_section  # noqa: E402

EXTRA_ONLY = ("torch", "torchvision", "open_clip_torch", "onnxruntime", "ray", "matplotlib", "scikit_image",
              "pandas", "webdataset", "s3fs")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _site_packages(venv: Path) -> Path:
    return next(venv.glob("lib/python*/site-packages"))


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def core_install(venv: Path) -> tuple[float, list[str]]:
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    src = Path(tempfile.mkdtemp(prefix="dedup-src-"))  # a clean copy: no build/ or egg-info in the checkout
    try:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split()
        for f in files:
            if (ROOT / f).is_file():
                (src / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, src / f)
        t0 = time.perf_counter()
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(src)], check=True)
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(src, ignore_errors=True)
    listed = subprocess.run([str(venv / "bin" / "pip"), "list", "--format=json"], check=True, capture_output=True,
                            text=True).stdout
    return seconds, sorted(d["name"] for d in json.loads(listed))


def core_run(venv: Path, work: Path) -> dict:
    from dedup.testing.evaluate import score_manifest
    from dedup.testing.synth import make_shards

    truth = make_shards(work / "shards")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    t0 = time.perf_counter()
    r = subprocess.run([str(venv / "bin" / "dedup"), "run", str(work / "shards"), "--out", str(work / "run"),
                        "--methods", "exact,phash,dhash", "--json", "-q"], cwd=work, env=env, capture_output=True,
                       text=True, check=False)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"core run failed (exit {r.returncode}): {r.stderr.strip()}")
    import pyarrow.parquet as pq

    stats = json.loads(r.stdout)
    score = score_manifest(pq.read_table(work / "run" / "manifest.parquet"), truth)
    return {"seconds": seconds, "samples": stats["samples"], "duplicates": stats["duplicates"], "score": score}


def full_set(tmp: Path) -> list[tuple[str, str]]:
    report = tmp / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report",
                    str(report), f"{ROOT}[all]"], check=True)
    items = json.loads(report.read_text())["install"]
    return [(it["metadata"]["name"], it["metadata"]["version"]) for it in items]


def installed_size(name: str) -> tuple[int, str] | None:
    """Bytes of the files ``name``'s RECORD lists in this Python, and the installed version."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    total = 0
    for f in dist.files or []:
        p = Path(str(dist.locate_file(f)))
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total, dist.version


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "dedup-core-venv")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()

    seconds, core = core_install(args.venv)
    leaked = [n for n in core if _norm(n) in {_norm(e) for e in EXTRA_ONLY}]
    if leaked:
        raise SystemExit(f"the core install pulled extras' packages: {leaked}")
    site = _site_packages(args.venv)
    core_bytes = _du(site)
    tooling = sum(_du(p) for p in site.iterdir() if p.is_dir() and _norm(p.name).split("_")[0] in ("pip", "setuptools"))
    with tempfile.TemporaryDirectory() as tmp:
        run = core_run(args.venv, Path(tmp))
        full = full_set(Path(tmp))
    sizes = {n: installed_size(n) for n, _ in full}
    found = {n: s for n, s in sizes.items() if s is not None}
    missing = sorted(n for n in sizes if n not in found)
    other_version = [n for n, v in full if n in found and found[n][1].split("+")[0] != v.split("+")[0]]
    other_bytes = sum(found[n][0] for n in other_version)
    full_bytes = sum(b for b, _ in found.values())
    biggest = sorted(((b, n) for n, (b, _) in found.items()), reverse=True)[:6]

    score = run["score"]
    recall = ", ".join(f"{e} {r['found']}/{r['planted']}" for e, r in score["per_edit"].items())
    rows = [
        ["core: `pip install .`", len(core) - 2, _mb(core_bytes - tooling), f"{seconds:.0f} s from the package index"],
        ["full: `pip install '.[all]'`", len(full), _mb(full_bytes), f"{len(missing)} not installed here"],
    ]
    body = "\n".join([
        "## Install size: core vs all extras",
        "",
        "`python benchmarks/install_size.py` — " + machine_description() + ".",
        "",
        markdown_table(["install", "distributions", "site-packages", "note"], rows),
        "",
        f"Core: a fresh venv's site-packages after `pip install .`, less pip and setuptools ({_mb(tooling)}). "
        "Full: the distributions `pip install --dry-run --ignore-installed --report '.[all]'` resolves to, sized as installed "
        "in the benchmark's own environment (the files each one's RECORD lists)"
        + (f"; {len(other_version)} of them ({_mb(other_bytes)} in all) at another release there"
           if other_version else "")
        + (f"; not installed there (not counted): {', '.join(missing)}" if missing else "") + ".",
        "Largest in the full set: " + ", ".join(f"{n} {_mb(b)}" for b, n in biggest) + ".",
        "",
        (f"End to end on the core install: `dedup run --methods exact,phash,dhash` over the demo corpus "
         f"({run['samples']} samples) exited 0 in {run['seconds']:.1f} s: {run['duplicates']} duplicates, "
         f"pair precision {score['precision']:.3f}, recall {score['recall']:.3f} (hashes only; found/planted per "
         f"edit: {recall})."),
    ])
    print(body)
    if not args.no_write:
        write_section("install", body)


if __name__ == "__main__":
    main()
