"""A process that reads a run's Parquet files and then exits must exit cleanly.

``pq.read_table`` on a Python file object (what fsspec hands out) builds a dataset whose last
reference to that file can be dropped by one of arrow's threads after the call returns. When
the interpreter is already exiting, that thread cannot take the GIL, and the process aborts
(exit 134, "terminate called without an active exception") after all its work is done: a
scheduler sees a failed job. About half of such one-read processes aborted here.
``RunDir.read_parquet`` reads through ``ParquetFile`` instead. Each run below reads a local and
an in-memory (fsspec, non-local) file and exits right after; with the old code nearly every
batch of runs had aborts.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest

from dedup.io.rundir import RunDir

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np, pyarrow as pa
    from dedup.io.rundir import RunDir

    local = RunDir(sys.argv[1])
    assert local.local
    t = local.read_parquet(local.p("m.parquet"), columns=["a"])
    assert t.num_rows == 100_000 and t.column_names == ["a"]
    remote = RunDir("memory://exit-test")
    remote.write_parquet(remote.p("m.parquet"), pa.table({"a": np.arange(100_000), "b": np.ones(100_000)}))
    assert not remote.local
    assert remote.read_parquet(remote.p("m.parquet")).num_rows == 100_000
    """
)


@pytest.mark.slow
def test_reading_parquet_then_exiting_does_not_abort(tmp_path):
    run = RunDir(str(tmp_path))
    run.write_parquet(run.p("m.parquet"), pa.table({"a": np.arange(100_000), "b": np.random.default_rng(0).random(100_000)}))
    codes = []
    for _ in range(10):
        p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120)
        codes.append((p.returncode, p.stderr[-300:]))
    assert all(rc == 0 for rc, _ in codes), [c for c in codes if c[0] != 0]
