"""benchmarks/hash_scale.py: the rows it reports are the exact search's (same pairs as brute force)."""

import numpy as np

from benchmarks import hash_scale
from benchmarks.candidates import synth_hashes
from dedup.compute.search.hamming import hash_pairs


def test_hash_scale_reports_the_exhaustive_pair_counts(capsys):
    rows = hash_scale.measure(3000)
    assert [r[1] for r in rows] == ["phash", "dhash"]
    for (name, radius, seed), row in zip(hash_scale.RADII, rows, strict=True):
        assert row[1] == name
        brute = hash_pairs(synth_hashes(3000, seed), radius, method="brute")
        assert row[2] == radius and int(row[-1].replace(",", "")) == len(brute.i) > 0
        assert float(row[5]) >= 0 and np.isfinite(float(row[6]))
        assert row[7] == "–" or float(row[7]) >= 0  # peak heap above the start (MB)


def test_the_faiss_peer_finds_the_same_pairs():
    rows = hash_scale.measure_faiss(3000)
    for (name, radius, seed), row in zip(hash_scale.RADII, rows, strict=True):
        brute = hash_pairs(synth_hashes(3000, seed), radius, method="brute")
        assert row[1] == name and int(row[-1].replace(",", "")) == len(brute.i) > 0
