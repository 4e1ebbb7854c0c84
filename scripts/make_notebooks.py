"""Write notebooks/*.ipynb (kept as code here so they stay reviewable): `python scripts/make_notebooks.py`."""

from pathlib import Path

import nbformat as nbf

NB = Path(__file__).resolve().parent.parent / "notebooks"

SETUP = '''import os, json
from pathlib import Path
import numpy as np
import dedup
# The run directory to explore: set DEDUP_RUN_DIR, or run `dedup demo` first (writes dedup-demo/run).
RUN = Path(os.environ.get("DEDUP_RUN_DIR", "dedup-demo/run"))
run = dedup.open_run(str(RUN))  # the public API (docs/api.md)
manifest = run.manifest()
stats = run.stats
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
        nbf.v4.new_markdown_cell("## Thumbnails of one cluster\n\nImages are read back from the input shards (`Run.images`)."),
        nbf.v4.new_code_cell('''from PIL import Image

if len(largest):
    ids = df[df["cluster_id"] == largest.index[0]]["sample_id"].tolist()
    imgs = run.images(ids)  # read back from the input shards
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
        nbf.v4.new_code_cell('''pairs = run.pairs().to_pandas()
print(pairs.groupby("method")["score"].describe().to_string())
stats["thresholds"]'''),
        nbf.v4.new_markdown_cell("## Hash distances of all pairs within a wider radius\n\nRecompute pHash pairs up to 16 bits from the manifest's hashes (cheap), to see what lies just outside the configured radius."),
        nbf.v4.new_code_cell('''wide = run.hash_pairs("phash", radius=16)  # a, b, bits
hist = np.bincount(wide["bits"].to_numpy(), minlength=17)
dict(enumerate(hist.tolist()))'''),
        nbf.v4.new_markdown_cell("## Precision and recall per pHash radius (needs a ground truth)"),
        nbf.v4.new_code_cell('''truth_path = Path(os.environ.get("DEDUP_TRUTH", RUN.parent / "ground_truth.json"))
rows = []
if truth_path.exists():
    # the demo's ground truth: samples of one group are duplicates of each other
    groups = {}
    for smp in json.loads(truth_path.read_text())["samples"]:
        if smp.get("group") is not None:
            groups.setdefault(smp["group"], []).append(smp["sample_id"])
    truth = {tuple(sorted((x, y))) for ids in groups.values() for k, x in enumerate(ids) for y in ids[k + 1:]}
    a, b, s = wide["a"].to_pylist(), wide["b"].to_pylist(), wide["bits"].to_numpy()
    is_dup = np.array([tuple(sorted(p)) in truth for p in zip(a, b)], bool)
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
