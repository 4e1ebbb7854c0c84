"""Score a manifest (or a pairs table) against planted ground truth.

A *predicted pair* is two samples in the same cluster (same ``cluster_id``): what the manifest
tells a user. Precision = predicted pairs that were planted / predicted pairs; recall = planted
pairs predicted / planted pairs, also broken down per edit type.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations

import pyarrow as pa


def cluster_pairs(manifest: pa.Table) -> set[tuple[str, str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for sid, cid in zip(manifest["sample_id"].to_pylist(), manifest["cluster_id"].to_pylist()):
        if cid is not None:
            groups[cid].append(sid)
    pairs: set[tuple[str, str]] = set()
    for members in groups.values():
        for a, b in combinations(sorted(members), 2):
            pairs.add((a, b))
    return pairs


def score_pairs(predicted: set[tuple[str, str]], truth) -> dict:
    planted = truth.duplicate_pairs()
    tp = len(predicted & planted)
    per_edit = {}
    for edit, ps in sorted(truth.pairs_by_edit().items()):
        found = len(ps & predicted)
        per_edit[edit] = {"planted": len(ps), "found": found, "recall": found / len(ps) if ps else 1.0}
    return {
        "predicted": len(predicted),
        "planted": len(planted),
        "true_positives": tp,
        "precision": tp / len(predicted) if predicted else 1.0,
        "recall": tp / len(planted) if planted else 1.0,
        "false_positives": sorted(predicted - planted)[:20],
        "missed": sorted(planted - predicted)[:20],
        "per_edit": per_edit,
    }


def score_manifest(manifest: pa.Table, truth) -> dict:
    return score_pairs(cluster_pairs(manifest), truth)
