"""The run directory: layout, atomic writes (local or fsspec URL), and small JSON helpers.

Local files are written to a temporary name in the same directory and renamed into place;
on object stores a PUT is already atomic per key, so the final key is written directly and the
``done`` marker is always written last.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from dedup import extras
from dedup.errors import ConfigError
from dedup.faults import crash_point

TMP_MARK = ".tmp-"
CHECK_PARQUET = "check.parquet"  # written by `dedup check`
WITHIN_PARQUET = "within.parquet"  # written by `dedup check --within`


class RunDir:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.path = extras.url_to_fs(self.url)  # a missing s3fs: one line naming [s3]
        self.local = self.fs.protocol in ("file", ("file", "local")) or "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )

    # -- layout -----------------------------------------------------------------------------
    def p(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def features(self, shard_id: str) -> str:
        return self.p("features", shard_id + ".parquet")

    def done(self, shard_id: str) -> str:
        return self.p("done", shard_id + ".json")

    # Every file of the layout (docs/manifest.md, "Manifest and run-directory files"), named
    # here once: callers use these, never the names spelled out.
    @property
    def done_dir(self) -> str:
        """``done/``: one marker per finished shard."""
        return self.p("done")

    @property
    def run_json(self) -> str:
        """``run.json``: resolved config, hashes, model tag, inputs (written before any work)."""
        return self.p("run.json")

    @property
    def stats(self) -> str:
        """``stats.json``: counts, histograms, failed shards, timings (written last)."""
        return self.p("stats.json")

    @property
    def manifest(self) -> str:
        """``manifest.parquet``: one row per input sample (a delta for an incremental run); a
        directory of part files when large (:mod:`dedup.io.manifests` reads and writes both)."""
        return self.p("manifest.parquet")

    @property
    def merged_manifest(self) -> str:
        """``merged_manifest.parquet``: previous manifest + delta (``--against ... --merge``)."""
        return self.p("merged_manifest.parquet")

    @property
    def pairs(self) -> str:
        """``pairs/pairs.parquet``: candidate pairs found by each method."""
        return self.p("pairs", "pairs.parquet")

    @property
    def index_dir(self) -> str:
        """``index/``: the staged embeddings and the cached index of the keepers."""
        return self.p("index")

    @property
    def embeddings(self) -> str:
        """``index/embeddings.f16``: every sample's embedding, float16, sample_id order."""
        return self.p("index", "embeddings.f16")

    @property
    def lists_dir(self) -> str:
        """``index/lists``: the embedding search's list-bucket partitions and markers (while it runs)."""
        return self.p("index", "lists")

    @property
    def embedding_pairs_dir(self) -> str:
        """``pairs/embedding``: the embedding search's pairs per list bucket, and markers."""
        return self.p("pairs", "embedding")

    @property
    def report(self) -> str:
        """``report.html``: the default ``dedup report`` output."""
        return self.p("report.html")

    @property
    def checks(self) -> str:
        """``checks.json``: the ``dedup check`` runs made against this run."""
        return self.p("checks.json")

    @property
    def eval_prefix(self) -> str:
        """``eval``: default prefix of ``dedup eval``'s .json/.parquet/.png."""
        return self.p("eval")

    @property
    def lock(self) -> str:
        """``.lock``: the running writer (local run directories)."""
        return self.p(".lock")

    # A `dedup check --out` directory holds these.
    @property
    def check_parquet(self) -> str:
        return self.p(CHECK_PARQUET)

    @property
    def check_html(self) -> str:
        return self.p("check.html")

    @property
    def within_parquet(self) -> str:
        return self.p(WITHIN_PARQUET)

    # -- io ---------------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def write_bytes(self, path: str, data: bytes) -> None:
        if self.local:
            with self.open_atomic(path) as f:
                f.write(data)
        else:  # one PUT: already atomic per key, no local spool needed
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with self.fs.open(path, "wb") as f:
                f.write(data)

    @contextmanager
    def open_atomic(self, path: str) -> Iterator[IO[bytes]]:
        """A binary file to stream a large output into; it appears at ``path`` only if the block
        completes. Local: a temp name in the same directory, fsynced and renamed. Remote: a
        local temp file, uploaded on success (never a partial object). Nothing is held in
        memory."""
        parent = posixpath.dirname(path)
        if self.local:
            os.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f"{TMP_MARK}{uuid.uuid4().hex}-{posixpath.basename(path)}")
            try:
                with open(tmp, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                crash_point("write:" + posixpath.basename(path))
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            with tempfile.NamedTemporaryFile(prefix=TMP_MARK, suffix="-" + posixpath.basename(path)) as f:
                yield f
                f.flush()
                self.fs.makedirs(parent, exist_ok=True)
                self.fs.put_file(f.name, path)

    def write_json(self, path: str, obj: Any, sort_keys: bool = True) -> None:
        """``sort_keys=False`` keeps the dicts' own order (e.g. numeric histogram buckets)."""
        self.write_bytes(path, (json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n").encode())

    def read_json(self, path: str) -> Any:
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read())

    def write_parquet(self, path: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(path, buf.getvalue())

    def write_parquet_chunks(self, path: str, schema: pa.Schema, chunks: Iterable[pa.Table]) -> None:
        """One Parquet file written a row group at a time (each chunk cast to ``schema``,
        whose metadata the file keeps), streamed to a temp file: only one chunk is in memory.
        It appears at ``path`` only once complete (:meth:`open_atomic`)."""
        with self.open_atomic(path) as f:
            with pq.ParquetWriter(f, schema, compression="zstd") as w:
                for t in chunks:
                    w.write_table(t if t.schema.equals(schema, check_metadata=False) else t.cast(schema))

    def read_parquet(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """Read one Parquet file (local: pyarrow's own file; remote: the fsspec file).

        Through ``ParquetFile``, never ``pq.read_table`` on a Python file object: that makes a
        dataset whose last reference to the Python file can be dropped by one of arrow's
        threads after the call returns; if the interpreter is exiting by then, that thread
        cannot take the GIL and the process aborts (exit 134, "terminate called without an
        active exception") after all the work is done. Measured: 21 of 40 one-read scripts
        aborted that way, 0 of 40 with this (tests/test_rundir_exit.py)."""
        if self.local:
            return pq.ParquetFile(path).read(columns=columns)
        with self.fs.open(path, "rb") as f:
            # on this calling thread only: none of arrow's pool threads ever touches the Python
            # file, so none can be left holding it when the interpreter exits. (The abort was
            # still seen in 1 of 10 runs of tests/test_rundir_exit.py in one CI run, and 0 of 240
            # here; which of its two reads aborted is not known. Local reads use no Python file.)
            return pq.ParquetFile(f).read(columns=columns, use_threads=False)

    def remove(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def clean_temp(self) -> int:
        """Remove temp files and directories (a manifest's parts being written) left by a
        killed writer. Returns how many were removed."""
        if not self.local or not os.path.isdir(self.path):
            return 0
        n = 0
        for root, dirs, files in os.walk(self.path):
            for name in files:
                if name.startswith(TMP_MARK):
                    os.remove(os.path.join(root, name))
                    n += 1
            for name in [d for d in dirs if d.startswith(TMP_MARK)]:
                shutil.rmtree(os.path.join(root, name))
                dirs.remove(name)
                n += 1
        return n


def finished_run(run_dir: str) -> RunDir:
    """The finished run at ``run_dir``, or a one-line error saying what it is instead."""
    try:
        run = RunDir(run_dir)
        exists = run.exists(run.path)
    except (ValueError, ImportError, OSError) as e:
        raise ConfigError(f"cannot open run directory {run_dir}: {type(e).__name__}: {e}") from None
    if not exists:
        raise ConfigError(f"run directory {run_dir} does not exist")
    if not run.exists(run.run_json):
        raise ConfigError(f"run directory {run_dir} is not a finished dedup run (no run.json)")
    if not run.exists(run.manifest):
        raise ConfigError(f"run directory {run_dir} is not a finished dedup run (no manifest.parquet yet: "
                          "finish it with `dedup run` first)")
    from dedup.io.manifests import manifest_files

    manifest_files(run)  # a directory manifest whose write was interrupted: a one-line ConfigError
    return run
