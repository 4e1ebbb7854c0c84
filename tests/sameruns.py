"""Whole-manifest equality for tests that run one corpus two ways (executors, clusters, storage):
every column but timings, rows sorted by sample_id and compared one by one, so a failure names
the first sample and the columns that differ."""

from __future__ import annotations

import math

import pyarrow as pa

TIMING_WORDS = ("seconds", "timing", "elapsed")


def manifest_rows(table: pa.Table) -> list[dict]:
    """The manifest's rows sorted by sample_id, without timing columns."""
    keep = [c for c in table.column_names if not any(w in c for w in TIMING_WORDS)]
    rows = [{k: _comparable(v) for k, v in r.items()} for r in table.select(keep).to_pylist()]
    return sorted(rows, key=lambda r: r["sample_id"])


def _comparable(v: object) -> object:
    return "NaN" if isinstance(v, float) and math.isnan(v) else v  # NaN != NaN in a row compare


def assert_same_manifest(got: pa.Table, want: pa.Table) -> None:
    assert got.schema.remove_metadata().equals(want.schema.remove_metadata()), (got.schema, want.schema)
    rows_got, rows_want = manifest_rows(got), manifest_rows(want)
    assert len(rows_got) == len(rows_want)
    for a, b in zip(rows_got, rows_want):
        assert a == b, (a["sample_id"], {k: (a[k], b[k]) for k in a if a[k] != b[k]})
