"""Write notebooks/*.ipynb (kept as code here so they stay reviewable): `python scripts/make_notebooks.py`."""

from pathlib import Path

import nbformat as nbf

NB = Path(__file__).resolve().parent.parent / "notebooks"

SETUP = '''import os, json
from pathlib import Path
import numpy as np
import pyarrow.parquet as pq
import pyarrow.compute as pc
# The run directory to explore: set DEDUP_RUN_DIR, or run `dedup demo` first (writes dedup-demo/run).
RUN = Path(os.environ.get("DEDUP_RUN_DIR", "dedup-demo/run"))
assert (RUN / "manifest.parquet").exists(), f"{RUN} is not a finished dedup run"
manifest = pq.read_table(RUN / "manifest.parquet")
stats = json.loads((RUN / "stats.json").read_text())
print(RUN, manifest.num_rows, "samples")'''


def explore() -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb.cells = [
        nbf.v4.new_markdown_cell("# Explore a dedup run\n\nReads a run directory written by `dedup run`: counts, cluster sizes (copy counts), the largest clusters with thumbnails, and why each sample was dropped."),
        nbf.v4.new_code_cell(SETUP),
        nbf.v4.new_markdown_cell("## Counts by status and by method"),
        nbf.v4.new_code_cell('''df = manifest.to_pandas()
print(df["status"].value_counts().to_string())
print()
print(df.loc[~df["is_keeper"] & (df["status"] == "ok"), "dup_method"].value_counts().to_string())
summary = {"samples": len(df), "kept": int(df["is_keeper"].sum()), "duplicates": int((~df["is_keeper"] & (df["status"] == "ok")).sum())}
summary'''),
        nbf.v4.new_markdown_cell("## Cluster sizes\n\nThe cluster size is the copy count: the memorization-risk signal."),
        nbf.v4.new_code_cell('''sizes = df.loc[df["cluster_id"] == df["sample_id"], "cluster_size"]
sizes.value_counts().sort_index()'''),
        nbf.v4.new_markdown_cell("## The largest clusters"),
        nbf.v4.new_code_cell('''largest = (df[df["cluster_size"] > 1].groupby("cluster_id").size().sort_values(ascending=False).head(5))
for keeper, n in largest.items():
    members = df[df["cluster_id"] == keeper][["sample_id", "is_keeper", "dup_method", "score_to_keeper", "width", "height"]]
    print(f"cluster of {n}, keeper {keeper}")
    print(members.to_string(index=False))
    print()'''),
        nbf.v4.new_markdown_cell("## Thumbnails of one cluster\n\nImages are read back from the input shards (their URLs are in `done/<shard>.json`)."),
        nbf.v4.new_code_cell('''import io
from PIL import Image
from dedup.io.shards import ShardReadResult, image_member, iter_samples
from dedup.records import ShardRef

def load_images(sample_ids, exts=("jpg", "jpeg", "png", "webp")):
    out = {}
    for sid in sample_ids:
        shard, key = sid.rsplit("/", 1)
        url = json.loads((RUN / "done" / f"{shard}.json").read_text())["url"]
        for s in iter_samples(ShardRef(url, shard), ShardReadResult(), exts):
            if s.key == key:
                out[sid] = Image.open(io.BytesIO(image_member(s, exts)[1])).convert("RGB")
                break
    return out

if len(largest):
    ids = df[df["cluster_id"] == largest.index[0]]["sample_id"].tolist()
    imgs = load_images(ids)
    strip = Image.new("RGB", (128 * len(imgs), 128), "white")
    for k, im in enumerate(imgs.values()):
        im.thumbnail((128, 128)); strip.paste(im, (128 * k, 0))
    display(strip)'''),
    ]
    return nb


def calibrate() -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb.cells = [
        nbf.v4.new_markdown_cell("# Calibrate thresholds\n\nHow far apart are the pairs each method found, and where would a stricter or looser threshold cut? With a labelled ground truth (the demo writes `ground_truth.json` next to its shards, or set `DEDUP_TRUTH`), precision and recall per threshold."),
        nbf.v4.new_code_cell(SETUP),
        nbf.v4.new_code_cell('''pairs = pq.read_table(RUN / "pairs" / "pairs.parquet").to_pandas()
print(pairs.groupby("method")["score"].describe().to_string())
stats["thresholds"]'''),
        nbf.v4.new_markdown_cell("## Hash distances of all pairs within a wider radius\n\nRecompute pHash pairs up to 16 bits from the manifest's hashes (cheap), to see what lies just outside the configured radius."),
        nbf.v4.new_code_cell('''from dedup.compute.candidates import hash_pairs
ok = manifest.filter(pc.equal(manifest["status"], "ok"))
ids = np.array(ok["sample_id"].to_pylist())
wide = hash_pairs(ok["phash"].to_numpy().astype(np.uint64), 16)
hist = np.bincount(wide.score.astype(int), minlength=17)
dict(enumerate(hist.tolist()))'''),
        nbf.v4.new_markdown_cell("## Precision and recall per pHash radius (needs a ground truth)"),
        nbf.v4.new_code_cell('''truth_path = Path(os.environ.get("DEDUP_TRUTH", RUN.parent / "ground_truth.json"))
rows = []
if truth_path.exists():
    from dedup.testing.synth import GroundTruth
    truth = GroundTruth.from_json(truth_path).duplicate_pairs()
    a, b, s = ids[wide.i], ids[wide.j], wide.score
    is_dup = np.array([tuple(sorted(p)) in truth for p in zip(a, b)])
    for r in range(0, 17):
        sel = s <= r
        tp = int((is_dup & sel).sum())
        rows.append({"radius": r, "pairs": int(sel.sum()), "precision": tp / max(int(sel.sum()), 1), "recall": tp / max(len(truth), 1)})
    best = max((x for x in rows if x["precision"] >= 0.99), key=lambda x: x["recall"], default=None)
    print("largest-recall radius at precision >= 0.99:", best)
else:
    print(f"no ground truth at {truth_path}: showing distances only")
rows[:17]'''),
    ]
    return nb


if __name__ == "__main__":
    NB.mkdir(exist_ok=True)
    for name, nb in (("explore_clusters.ipynb", explore()), ("calibrate_thresholds.ipynb", calibrate())):
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbf.write(nb, NB / name)
        print("wrote", NB / name)
