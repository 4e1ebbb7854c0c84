"""Throughput side by side with peer tools, with quality beside speed; writes the ``throughput``
section of docs/benchmarks.md.

    python benchmarks/throughput.py                      # both sets, every row (~25 min on 2 idle cores)
    python benchmarks/throughput.py --quick --no-write   # small sets, for development
    python benchmarks/throughput.py --sets web --rows default,sscd,baseline

Two sets, each with planted edited copies as ground truth, written once as shuffled WebDataset
shards (for dedup) and as an image folder with the same bytes (for the peers):

small  CIFAR-10 photos of ../shared/data/cifar10_dev (32 px) + planted light edits (one copy each
       of 10 % of them: JPEG q40, 1-px shift, brightness ±10 %, PNG re-save), as in
       benchmarks/quality_groups.py's cifar set;
web    web-sized images (long side 300–1,000 px): the real photos of dedup.testing.synth
       (scikit-image, UKBench/Holidays) and CIFAR-10 photos upscaled (bicubic) to a random size in
       that range, JPEG q90, + one edited copy of 25 % of them (light and strong edits of
       dedup.testing.variants).

Rows, one tool process each, run one after the other on the same files:

default    ``dedup run`` with the default settings (the default embedder, see dedup/config.py);
hashes     ``dedup run --methods exact,phash,dhash``;
sscd       ``dedup run --embedder sscd`` (where no baseline row runs); ``sscd-distilled`` likewise
           (skipped when it is the default);
baseline   ``dedup run --embedder sscd`` from a git ref (``--baseline-ref``, default ``main``), exported
           with ``git archive`` into the work folder and run from there: the same command as it
           stands on that ref (web set only unless ``--baseline-sets``);
clip       ``dedup run --embedder open_clip:ViT-B-32:none`` (random weights: compute cost only, no
           quality) on the first shards holding ``--clip-images`` images;
fastdup    fastdup 2.54 at its defaults on the folder (its bundled model, connected components),
           in its own interpreter (``--fastdup-python``; see benchmarks/quality_groups.py);
imagededup imagededup 0.3.3 ``PHash().find_duplicates`` (Hamming ≤ 10, its default) on the folder,
           in its own interpreter (``--imagededup-python``, default /tmp/imagededup-venv/bin/python;
           set up with ``python -m venv --system-site-packages /tmp/imagededup-venv`` then
           ``/tmp/imagededup-venv/bin/pip install --no-deps imagededup==0.3.3.post2 scikit-learn
           joblib narwhals`` — it only needs numpy/Pillow/scipy/PyWavelets for hashing).

Measured per row: wall seconds, CPU seconds of the tool's process tree (``getrusage(RUSAGE_CHILDREN)``
around it: every worker process is reaped), peak RSS of the process tree (sum over its processes,
polled every 0.1 s), and for dedup the CPU per phase from its own counters (done markers'
``cpu_decode``/``cpu_hash``/``cpu_embed``/``cpu_total`` per shard, stats.json's ``cpu_load``/
``cpu_candidates``/``cpu_manifest``). Quality: pair precision/recall/F1 of each tool's clusters
against the planted groups (``dedup.testing.variants.score_clusters``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._table import kill_group, machine_description, markdown_table, stop_on_sigterm, write_section  # noqa: E402
from benchmarks.quality_groups import CIFAR_EDITS, cifar_images, fastdup_python  # noqa: E402
from dedup.config import Config  # noqa: E402
from dedup.testing.synth import real_photos  # noqa: E402
from dedup.testing.variants import (  # noqa: E402
    LIGHT_EDITS, Member, decode, jpeg_bytes, largest_keepers, make_variant, score_clusters, union_find_components,
    write_members,
)

WEB_EDITS = LIGHT_EDITS + ("hflip", "grayscale", "text_overlay", "letterbox", "crop_30pct")
ALL_ROWS = ("default", "baseline", "sscd", "sscd-distilled", "hashes", "fastdup", "imagededup", "clip")
CLIP_SPEC = "open_clip:ViT-B-32:none"
PHASES = ("read+other", "decode", "hash", "embed", "search", "manifest", "start-up+rest")
IMAGEDEDUP_PY = "/tmp/imagededup-venv/bin/python"


@dataclass
class Row:
    name: str
    images: int
    wall: float = 0.0
    cpu: float = 0.0
    rss_mib: float = 0.0
    load: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    quality: dict | None = None
    note: str = ""


# ---------------------------------------------------------------- data sets


def build_small(out: Path, n: int, seed: int) -> tuple[list[Member], str]:
    imgs = cifar_images(n, seed=seed)
    if not imgs:
        raise SystemExit("error: ../shared/data/cifar10_dev not found (set DEDUP_SHARED_DATA)")
    rng = np.random.default_rng(seed)
    planted = set(rng.choice(len(imgs), max(1, len(imgs) // 10), replace=False).tolist())
    items: list[tuple[Member, bytes, str]] = []
    for k, (fname, label, data) in enumerate(imgs):
        items.append((Member("", fname, "original" if k in planted else "negative", label=label), data, "jpg"))
        if k in planted:
            e = CIFAR_EDITS[k % len(CIFAR_EDITS)]
            vdata, ext = make_variant(decode(data), e, rng, original_bytes=data)
            items.append((Member("", fname, e, label=label), vdata, ext))
    members = write_members(items, out / "shards", n_shards=4, seed=seed, folder=out / "images")
    return members, f"{len(imgs)} CIFAR-10 photos (32 px) + {len(planted)} planted light edits ({', '.join(CIFAR_EDITS)})"


def build_web(out: Path, n: int, seed: int) -> tuple[list[Member], str]:
    rng = np.random.default_rng(seed)
    photos = [(name, im) for name, im in real_photos(1000)]
    cifar = cifar_images(max(0, n - len(photos)), seed=seed + 7)
    originals: list[tuple[str, Image.Image]] = list(photos)
    for fname, _label, data in cifar:
        im = decode(data)
        side = int(rng.integers(300, 1001))
        w, h = im.size
        scale = side / max(w, h)
        originals.append((f"up_{fname}", im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)))
    planted = set(rng.choice(len(originals), len(originals) // 4, replace=False).tolist())
    items: list[tuple[Member, bytes, str]] = []
    for k, (name, im) in enumerate(originals):
        ob = jpeg_bytes(im, 90)
        items.append((Member("", name, "original" if k in planted else "negative"), ob, "jpg"))
        if k in planted:
            e = WEB_EDITS[k % len(WEB_EDITS)]
            data, ext = make_variant(im, e, rng, original_bytes=ob)
            items.append((Member("", name, e), data, ext))
    members = write_members(items, out / "shards", n_shards=8, seed=seed, folder=out / "images")
    return members, (f"{len(photos)} real photos + {len(cifar)} CIFAR-10 photos upscaled to 300–1,000 px (JPEG q90) "
                     f"+ {len(planted)} planted edited copies ({', '.join(WEB_EDITS)})")


# ---------------------------------------------------------------- measuring a process tree


def measure(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> tuple[float, float, float, int]:
    """Run ``cmd``; return (wall s, CPU s of the process tree, peak summed RSS MiB, exit code)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    peak = 0
    with open(log, "w") as fh:
        # its own process group: killed whole (tool and workers) if this benchmark stops early
        proc = psutil.Popen(cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                total = 0
                try:
                    for p in [proc, *proc.children(recursive=True)]:
                        try:
                            total += p.memory_info().rss
                        except psutil.Error:
                            pass
                except psutil.Error:
                    pass
                peak = max(peak, total)
                time.sleep(0.1)
        except BaseException:
            kill_group(proc)
            raise
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, peak / 2**20, int(proc.returncode)


def _env(pythonpath: Path | None) -> dict[str, str]:
    env = dict(os.environ, SENTRY_OPT_OUT="1", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


# ---------------------------------------------------------------- rows


def dedup_phases(run_dir: Path, cpu_total: float) -> dict[str, float]:
    """CPU seconds per phase from the run's own counters (empty if the code did not record them)."""
    ph = dict.fromkeys(PHASES, 0.0)
    for f in (run_dir / "done").glob("*.json"):
        t = json.loads(f.read_text()).get("timings", {})
        if "cpu_total" not in t:
            return {}
        for k in ("decode", "hash", "embed"):
            ph[k] += t[f"cpu_{k}"]
        ph["read+other"] += t["cpu_total"] - t["cpu_decode"] - t["cpu_hash"] - t["cpu_embed"]
    st = json.loads((run_dir / "stats.json").read_text()).get("timings", {})
    if "cpu_candidates" not in st:
        return {}
    ph["search"] = st.get("cpu_load", 0.0) + st["cpu_candidates"]
    ph["manifest"] = st["cpu_manifest"]
    ph["start-up+rest"] = max(0.0, cpu_total - sum(ph.values()))
    return ph


def run_dedup(name: str, inputs: list[Path], work: Path, args: list[str], members: list[Member] | None,
              code: Path = ROOT) -> Row:
    slug = "".join(c if c.isalnum() or c in "-." else "_" for c in name)[:60]
    run_dir = work / f"run-{slug}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-c", "from dedup.cli import main; main()", "run", *map(str, inputs), "--out", str(run_dir), *args]
    row = Row(name, 0, load=os.getloadavg()[0])
    row.wall, row.cpu, row.rss_mib, rc = measure(cmd, _env(code), work, work / f"{slug}.log")
    if rc not in (0, 3):
        row.note = f"exit {rc}: " + ((work / f"{slug}.log").read_text().strip().splitlines() or [""])[-1][:200]
        return row
    m = pq.read_table(run_dir / "manifest.parquet", columns=["sample_id", "cluster_id", "is_keeper"])
    row.images = m.num_rows
    row.phases = dedup_phases(run_dir, row.cpu)
    if members is not None:
        row.quality = score_clusters(members, m["sample_id"].to_pylist(), m["cluster_id"].to_pylist(), m["is_keeper"].to_pylist())
    stats = json.loads((run_dir / "stats.json").read_text())
    cos = (stats.get("thresholds") or {}).get("embedding_cosine")
    if cos is not None:
        row.note = f"cosine ≥ {cos:.3g}"
    return row


def _clusters_from_links(members: list[Member], folder: Path, links: list[tuple[str, str]]) -> tuple[list, list, list]:
    by_file = {m.filename: m for m in members}
    names = sorted(by_file)
    index = {n: k for k, n in enumerate(names)}
    pairs = [(index[a], index[b]) for a, b in links if a in index and b in index]
    i = np.array([p[0] for p in pairs], np.int64)
    j = np.array([p[1] for p in pairs], np.int64)
    labels = union_find_components(len(names), i, j)
    pixels, sizes = [], []
    for n in names:
        with Image.open(folder / n) as im:
            pixels.append(im.width * im.height)
        sizes.append((folder / n).stat().st_size)
    keep = largest_keepers(labels, np.array(pixels, np.int64), np.array(sizes, np.int64))
    return [by_file[n].sample_id for n in names], labels.tolist(), keep.tolist()


_FASTDUP = r"""
import csv, json, os, sys
os.environ.setdefault("SENTRY_OPT_OUT", "1")
import fastdup
img, work = sys.argv[1], sys.argv[2]
fastdup.run(img, work_dir=work, num_threads=int(sys.argv[3]))   # defaults: threshold 0.9, k 2, ccthreshold 0.96
files, _ = fastdup.load_binary_feature(os.path.join(work, "atrain_features.dat"), d=576)
cc = {int(r["__id"]): int(r["component_id"]) for r in csv.DictReader(open(os.path.join(work, "connected_components.csv")))}
json.dump({"files": [os.path.basename(f) for f in files], "cc": cc}, open(os.path.join(work, "result.json"), "w"))
"""

_IMAGEDEDUP = r"""
import json, sys
from imagededup.methods import PHash
d = PHash(verbose=False).find_duplicates(image_dir=sys.argv[1], num_enc_workers=int(sys.argv[3]), num_dist_workers=int(sys.argv[3]))
json.dump(d, open(sys.argv[2], "w"))
"""


def run_fastdup(py: str, folder: Path, work: Path, members: list[Member]) -> Row:
    fw = work / "fastdup"
    shutil.rmtree(fw, ignore_errors=True)
    fw.mkdir(parents=True)
    row = Row("fastdup", len(members), load=os.getloadavg()[0])
    row.wall, row.cpu, row.rss_mib, rc = measure([py, "-c", _FASTDUP, str(folder), str(fw), "2"], _env(None), fw, work / "fastdup.log")
    if rc != 0:
        row.note = f"exit {rc}: " + (work / "fastdup.log").read_text().strip()[-200:]
        return row
    res = json.loads((fw / "result.json").read_text())
    files, cc = res["files"], {int(k): v for k, v in res["cc"].items()}
    comp: dict[int, list[str]] = {}
    for k, f in enumerate(files):
        if k in cc:
            comp.setdefault(cc[k], []).append(f)
    links = [(ms[0], m) for ms in comp.values() for m in ms[1:]]
    row.quality = score_clusters(members, *_clusters_from_links(members, folder, links))
    row.note = "its defaults (cc ≥ 0.96)"
    return row


def run_imagededup(py: str, folder: Path, work: Path, members: list[Member]) -> Row:
    out = work / "imagededup.json"
    row = Row("imagededup PHash", len(members), load=os.getloadavg()[0])
    row.wall, row.cpu, row.rss_mib, rc = measure([py, "-c", _IMAGEDEDUP, str(folder), str(out), "2"], _env(None), work, work / "imagededup.log")
    if rc != 0:
        row.note = f"exit {rc}: " + (work / "imagededup.log").read_text().strip()[-200:]
        return row
    dups = json.loads(out.read_text())
    links = [(a, b) for a, bs in dups.items() for b in bs]
    row.quality = score_clusters(members, *_clusters_from_links(members, folder, links))
    row.note = "Hamming ≤ 10 (its default)"
    return row


def export_ref(ref: str, dest: Path) -> str | None:
    """``git archive REF`` into ``dest``; returns 'REF@sha' or None when git cannot."""
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref], capture_output=True, text=True, check=True).stdout.strip()
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        arch = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=arch, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{ref}@{sha}"


# ---------------------------------------------------------------- report


def _fmt(v: float | None, nd: int = 3) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def render(sets: list[tuple[str, str, int, list[Row]]], cmd: str, total: float, loads: tuple[float, float]) -> str:
    out = [
        (f"Generated by `{cmd}` on {machine_description()} in {total:.0f} s; 1-minute load average "
         f"{loads[0]:.1f} at the start, {loads[1]:.1f} at the end (the machine is shared with other jobs: CPU-s are "
         "the steady figures, wall times are pessimistic when the load column exceeds the core count)."),
        "",
        ("Columns: **img/s** = images / wall s; **CPU-ms/img** = CPU time of the tool's whole process tree "
        "(workers included) / images; per-phase CPU-ms/img for dedup from its own counters (*read+other*: tar "
        "reading, sha256, features file; *embed* includes the resize to the model's input; *search*: loading "
        "the features and the candidate search; *manifest*: outlier scores, clusters, manifest; *start-up+rest*: "
        "imports, model load, process pool); **RSS** = peak resident memory summed over the process tree; "
        "**P / R / F1** = pair precision/recall/F1 of the tool's clusters against the planted groups (unplanted "
        "near-duplicates inside CIFAR-10 count as false pairs for every tool alike); **load** = 1-minute load "
        "average when the row started."),
        "",
    ]
    for name, desc, n, rows in sets:
        out += [f"### {name}: {desc} ({n} images)", ""]
        hdr = ["tool", "img/s", "CPU-ms/img", *PHASES, "RSS MiB", "P", "R", "F1", "load", "notes"]
        body = []
        for r in rows:
            k = r.images or n
            ph = [f"{1000 * r.phases[p] / k:.1f}" if r.phases else "–" for p in PHASES]
            q = r.quality
            body.append([r.name, f"{k / r.wall:.1f}" if r.wall else "–", f"{1000 * r.cpu / k:.1f}" if r.cpu else "–", *ph,
                         f"{r.rss_mib:.0f}", _fmt(q and q["precision"]), _fmt(q and q["recall"]), _fmt(q and q["f1"]),
                         f"{r.load:.1f}", r.note + (f" ({k} images)" if r.images and r.images != n else "")])
        out += [markdown_table(hdr, body), ""]
        by = {r.name.split(" ")[0]: r for r in rows}
        d, b = by.get("default"), next((r for r in rows if r.name.startswith("baseline")), None)
        if d and b and d.cpu and b.cpu:
            ratio = (b.cpu / (b.images or n)) / (d.cpu / (d.images or n))
            fd = d.quality["f1"] if d.quality else None
            fb = b.quality["f1"] if b.quality else None
            out += [(f"Default pipeline vs `{b.name}`: **{ratio:.2f}× less CPU per image** "
                     f"(F1 {_fmt(fd)} vs {_fmt(fb)})."), ""]
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="web,small", help="comma-separated subset of small,web")
    ap.add_argument("--rows", default=",".join(ALL_ROWS), help=f"comma-separated subset of {','.join(ALL_ROWS)}")
    ap.add_argument("--small-n", type=int, default=1500, help="CIFAR-10 photos in the small set (default 1500; + 10 %% copies)")
    ap.add_argument("--web-n", type=int, default=1250, help="originals in the web set (default 1250; + 25 %% copies)")
    ap.add_argument("--clip-images", type=int, default=200, help="open_clip runs on the first shards holding at least this many images")
    ap.add_argument("--baseline-ref", default="main", help="git ref whose `dedup run --embedder sscd` is the baseline row")
    ap.add_argument("--baseline-sets", default="web", help="sets that get the baseline row")
    ap.add_argument("--fastdup-python", default=None, help="interpreter with fastdup 2.54 (see benchmarks/quality_groups.py)")
    ap.add_argument("--imagededup-python", default=IMAGEDEDUP_PY, help="interpreter with imagededup (see module doc)")
    ap.add_argument("--quick", action="store_true", help="small sets (development): 600 CIFAR photos, 300 web originals")
    ap.add_argument("--workdir", default=None, help="keep data and runs here (default: a temp dir, removed)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    stop_on_sigterm()
    if args.quick:
        args.small_n, args.web_n, args.clip_images = 600, 300, 100
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = sorted(set(rows_wanted) - set(ALL_ROWS))
    if bad:
        raise SystemExit(f"error: unknown rows {bad}; choose from {','.join(ALL_ROWS)}")
    default_spec = Config().embedding.spec
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="throughput-"))
    tmp.mkdir(parents=True, exist_ok=True)
    fd_py = fastdup_python(args.fastdup_python) if "fastdup" in rows_wanted else None
    baseline_label = export_ref(args.baseline_ref, tmp / "baseline-code") if "baseline" in rows_wanted else None
    t_all, load0 = time.time(), os.getloadavg()[0]
    sets: list[tuple[str, str, int, list[Row]]] = []
    for set_name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        d = tmp / set_name
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.time()
        members, desc = (build_small(d, args.small_n, args.seed) if set_name == "small" else build_web(d, args.web_n, args.seed))
        print(f"[{set_name}] built {len(members)} images in {time.time() - t0:.0f} s", file=sys.stderr)
        shards = sorted((d / "shards").glob("*.tar"))
        rows: list[Row] = []

        sets.append((set_name, desc, len(members), rows))

        def done(r: Row, set_name: str = set_name, rows: list[Row] = rows) -> None:
            rows.append(r)
            publish(sets, args, time.time() - t_all, load0, final=False)
            print(f"[{set_name}] {r.name}: wall {r.wall:.1f} s, CPU {r.cpu:.1f} s, RSS {r.rss_mib:.0f} MiB, "
                  f"F1 {_fmt(r.quality and r.quality['f1'])} {r.note}", file=sys.stderr)

        for what in rows_wanted:
            if what == "hashes":
                done(run_dedup("hashes only", [d / "shards"], d, ["--methods", "exact,phash,dhash"], members))
            elif what == "default":
                done(run_dedup(f"default ({default_spec})", [d / "shards"], d, [], members))
            elif what in ("sscd", "sscd-distilled") and what != default_spec and not (
                    what == "sscd" and "baseline" in rows_wanted and set_name in args.baseline_sets.split(",")):
                # (where the baseline row runs, it is `--embedder sscd` already)
                done(run_dedup(f"--embedder {what}", [d / "shards"], d, ["--embedder", what], members))
            elif what == "baseline" and set_name in args.baseline_sets.split(","):
                if baseline_label is None:
                    rows.append(Row(f"baseline {args.baseline_ref}", len(members), note="git archive failed: skipped"))
                else:
                    done(run_dedup(f"baseline {baseline_label} --embedder sscd", [d / "shards"], d, ["--embedder", "sscd"],
                                   members, code=tmp / "baseline-code"))
            elif what == "clip":
                sub, k = [], 0
                per = {m.sample_id.split("/")[0] for m in members}
                counts = {s: sum(1 for m in members if m.sample_id.startswith(s + "/")) for s in per}
                for s in shards:
                    if k >= args.clip_images:
                        break
                    sub.append(s)
                    k += counts[s.stem]
                done(run_dedup("open_clip ViT-B-32 (random weights, cost only)", sub, d, ["--embedder", CLIP_SPEC], None))
            elif what == "fastdup":
                if fd_py is None:
                    rows.append(Row("fastdup", len(members), note="skipped: no fastdup interpreter"))
                else:
                    done(run_fastdup(fd_py, d / "images", d, members))
            elif what == "imagededup":
                if not Path(args.imagededup_python).exists():
                    rows.append(Row("imagededup PHash", len(members), note=f"skipped: {args.imagededup_python} not found"))
                else:
                    done(run_imagededup(args.imagededup_python, d / "images", d, members))
    if not args.workdir:
        shutil.rmtree(tmp, ignore_errors=True)
    publish(sets, args, time.time() - t_all, load0, final=True)


def publish(sets: list[tuple[str, str, int, list[Row]]], args: argparse.Namespace, total: float, load0: float, *, final: bool) -> None:
    """Render the table; write it into docs/benchmarks.md after every row (so a stopped run leaves
    what it measured, marked unfinished); print it at the end."""
    cmd = "python benchmarks/throughput.py" + ("" if args.sets == "web,small" else f" --sets {args.sets}") \
        + (" --quick" if args.quick else "") + ("" if args.rows == ",".join(ALL_ROWS) else f" --rows {args.rows}")
    text = render(sets, cmd, total, (load0, os.getloadavg()[0]))
    if final:
        print(text)
    else:
        text = "**Unfinished run: the rows measured so far.**\n\n" + text
    if not args.no_write:
        write_section("throughput", "## Throughput side by side (dedup, fastdup, imagededup)\n\n" + text)
        if final:
            print("wrote docs/benchmarks.md (section throughput)", file=sys.stderr)

if __name__ == "__main__":
    main()
