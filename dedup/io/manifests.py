"""The manifest on disk: one Parquet file, or, when large, a directory of part files.

``manifest.parquet`` (and ``merged_manifest.parquet``) is one file up to
:data:`MANIFEST_PART_ROWS` rows (written exactly as before there was a directory form). Above
it, the same path is a directory::

    manifest.parquet/
      part-00000.parquet    MANIFEST_PART_ROWS rows each (the last fewer), sample_id order,
      part-00001.parquet    each with the manifest schema and its metadata
      ...
      _parts.json           written last: {"format": 1, "rows": N, "parts": [{"file", "rows"}, ...]}

A directory is finished only when it holds ``_parts.json``; dedup's readers read exactly the
parts it lists and refuse a directory without it (a write that was killed). Locally the
directory is also written under a temp name (``.tmp-…``, removed by the next run) and renamed
into place once complete, so a half-written one never sits at the final path; on an object
store (no rename) the old manifest is removed first and ``_parts.json`` is the only proof of
completion. pyarrow's own readers skip ``_``-prefixed files, so
``pq.read_table("run/manifest.parquet", filters=...)`` reads either form.

Readers (:func:`iter_manifest`, :func:`read_manifest`) stream row batches of the columns they
need, filtered as they go, never the whole manifest.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dedup.errors import ConfigError
from dedup.faults import crash_point
from dedup.io.rundir import TMP_MARK, RunDir

if TYPE_CHECKING:
    import pyarrow.dataset as ds

# Above this many rows the manifest is a directory of parts of this many rows (32 row groups of
# dedup.phases.manifest.CHUNK_ROWS); at or below it, one file. A part is what one reader or
# one task handles comfortably: ~2·10⁶ rows are ~100–200 MB of Parquet, ~1 GB as Python rows.
MANIFEST_PART_ROWS = 1 << 21
PARTS_MARKER = "_parts.json"
_FORMAT = 1
BATCH_ROWS = 1 << 16  # rows a reader holds at a time


def part_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def _slices(data: pa.Table | Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    if isinstance(data, pa.Table):
        if data.num_rows == 0:
            yield data
        for s in range(0, data.num_rows, rows):
            yield data.slice(s, rows)
    else:
        yield from data


def _parts(chunks: Iterable[pa.Table], part_rows: int) -> Iterator[Iterator[pa.Table]]:
    """The chunks regrouped into parts of ``part_rows`` rows (a chunk is cut at a part's end)."""
    it = iter(chunks)
    pending: list[pa.Table] = []

    def one() -> Iterator[pa.Table]:
        left = part_rows
        while left > 0:
            t = pending.pop() if pending else next(it, None)
            if t is None:
                return
            if t.num_rows > left:
                pending.append(t.slice(left))
                t = t.slice(0, left)
            left -= t.num_rows
            if t.num_rows:
                yield t

    while True:
        first = pending.pop() if pending else next(it, None)
        if first is None:
            return
        pending.append(first)
        yield one()


def write_manifest_data(run: RunDir, path: str, schema: pa.Schema, data: pa.Table | Iterable[pa.Table], rows: int,
                        part_rows: int | None = None) -> int:
    """Write a manifest of ``rows`` rows at ``path``: one file (as ``RunDir.write_parquet`` /
    ``write_parquet_chunks`` always did) when ``rows <= part_rows``, else a directory of parts
    (module docstring). ``data``: a table, or chunks of one (only one chunk in memory). An old
    manifest at ``path``, file or directory, is replaced. Returns the number of parts (0: a file)."""
    part_rows = int(part_rows or MANIFEST_PART_ROWS)
    if rows <= part_rows:
        if run.exists(path) and run.fs.isdir(path):
            _remove_dir(run, path)  # an earlier, larger manifest: a file cannot replace a directory
        if isinstance(data, pa.Table):
            run.write_parquet(path, data.cast(schema) if not data.schema.equals(schema) else data)
        else:
            run.write_parquet_chunks(path, schema, data)
        return 0
    chunk = min(part_rows, BATCH_ROWS)
    parent, name = posixpath.dirname(path), posixpath.basename(path)
    if run.local:
        target = posixpath.join(parent, f"{TMP_MARK}{uuid.uuid4().hex}-{name}")
    else:  # no rename on an object store: the old manifest goes first, the marker comes last
        if run.exists(path) and run.fs.isdir(path):
            _remove_dir(run, path)
        elif run.exists(path):
            run.fs.rm(path)
        target = path
    try:
        listed = _write_parts(run, target, name, schema, _parts(_slices(data, chunk), part_rows))
        if sum(n for _, n in listed) != rows:
            raise AssertionError(f"manifest parts hold {sum(n for _, n in listed)} rows, expected {rows}")
        run.write_bytes(posixpath.join(target, PARTS_MARKER), json.dumps(
            {"format": _FORMAT, "rows": rows, "parts": [{"file": f, "rows": n} for f, n in listed]}, indent=1).encode())
        crash_point("write:" + name)
        if run.local:
            _publish_dir(target, path)
    finally:
        if run.local and os.path.exists(target):
            shutil.rmtree(target)
    return len(listed)


def _write_parts(run: RunDir, target: str, name: str, schema: pa.Schema, parts: Iterator[Iterator[pa.Table]]) -> list[tuple[str, int]]:
    listed: list[tuple[str, int]] = []
    for k, chunks in enumerate(parts):
        f, n = part_name(k), 0
        with run.open_atomic(posixpath.join(target, f)) as out:
            with pq.ParquetWriter(out, schema, compression="zstd") as w:
                for t in chunks:
                    w.write_table(t if t.schema.equals(schema, check_metadata=False) else t.cast(schema))
                    n += t.num_rows
        listed.append((f, n))
        crash_point(f"write:{name}/{f}")
    return listed


def _publish_dir(tmp: str, path: str) -> None:
    """Put the finished directory ``tmp`` at ``path`` (local). An old manifest there (file or
    directory) is first renamed aside, then removed: at no moment is an unfinished manifest at
    ``path``; killed in between, there is none (the next run writes it) and a temp name that
    the next run removes (:meth:`RunDir.clean_temp`)."""
    old = None
    if os.path.lexists(path):
        old = posixpath.join(posixpath.dirname(path), f"{TMP_MARK}{uuid.uuid4().hex}-old-{posixpath.basename(path)}")
        os.rename(path, old)
    os.rename(tmp, path)
    if old is not None and os.path.isdir(old):
        shutil.rmtree(old)
    elif old is not None:
        os.remove(old)


def _remove_dir(run: RunDir, path: str) -> None:
    """Remove a directory manifest, its marker first (so that it never looks finished while it goes)."""
    marker = posixpath.join(path, PARTS_MARKER)
    if run.exists(marker):
        run.fs.rm(marker)
    run.fs.rm(path, recursive=True)


# -- reading ------------------------------------------------------------------------------------
def manifest_files(run: RunDir, path: str | None = None) -> list[str]:
    """The Parquet files of the manifest at ``path`` (default: the run's): itself when a file,
    the parts ``_parts.json`` lists when a directory. A directory without it is refused
    (ConfigError): its write was interrupted. A missing manifest: FileNotFoundError."""
    path = path or run.manifest
    if not run.exists(path):
        raise FileNotFoundError(path)
    if not run.fs.isdir(path):
        return [path]
    marker = posixpath.join(path, PARTS_MARKER)
    if not run.exists(marker):
        raise ConfigError(f"{path}: an unfinished manifest directory (no {PARTS_MARKER}: its write was interrupted); "
                          "run `dedup run` again to write it")
    info = run.read_json(marker)
    if info.get("format") != _FORMAT:
        raise ConfigError(f"{marker}: format {info.get('format')!r}, this dedup reads format {_FORMAT}")
    return [posixpath.join(path, p["file"]) for p in info["parts"]]


def manifest_complete(run: RunDir, path: str | None = None) -> bool:
    """Whether a finished manifest is at ``path`` (a file, or a directory with its marker)."""
    try:
        manifest_files(run, path)
    except (FileNotFoundError, ConfigError):
        return False
    return True


def _parquet(run: RunDir, f: str, fn) -> Any:
    """``fn(ParquetFile)`` for the file ``f`` (remote: on this calling thread, as
    :meth:`RunDir.read_parquet` explains)."""
    if run.local:
        return fn(pq.ParquetFile(f))
    with run.fs.open(f, "rb") as fh:
        return fn(pq.ParquetFile(fh))


def manifest_schema(run: RunDir, path: str | None = None) -> pa.Schema:
    """The manifest's schema with its metadata (``config_hash``, ``partial``, …)."""
    return _parquet(run, manifest_files(run, path)[0], lambda p: p.schema_arrow)


def manifest_rows(run: RunDir, path: str | None = None) -> int:
    """Rows of the manifest, from the files' footers (no row is read)."""
    return sum(_parquet(run, f, lambda p: p.metadata.num_rows) for f in manifest_files(run, path))


def manifest_dataset(run: RunDir, path: str | None = None) -> ds.Dataset:
    """The manifest as a ``pyarrow.dataset`` (either form; local or fsspec), for column
    projection and filter pushdown: ``manifest_dataset(run).to_table(columns=[...], filter=...)``."""
    import pyarrow.dataset as ds

    files = manifest_files(run, path)
    if run.local:
        return ds.dataset(files, format="parquet")
    return ds.dataset(files, format="parquet", filesystem=run.fs)


def _filter_columns(filters: Any) -> list[str]:
    if filters is None or not isinstance(filters, list):
        return []
    terms = [t for group in filters for t in group] if filters and isinstance(filters[0], list) else filters
    return [t[0] for t in terms]


def iter_manifest(run: RunDir, columns: list[str] | None = None, filters: Any = None, path: str | None = None,
                  batch_rows: int | None = None) -> Iterator[pa.Table]:
    """The manifest's rows in order (sample_id), ``batch_rows`` at a time, as tables of
    ``columns`` (default all) and only the rows that pass ``filters`` (pyarrow's filter syntax
    as in ``pq.read_table(..., filters=...)``: a list of (column, op, value) tuples, or a list
    of such lists; or a ``pyarrow.compute.Expression`` over ``columns``). One batch in memory."""
    from pyarrow.parquet import filters_to_expression

    expr = None if filters is None else (filters if isinstance(filters, pc.Expression) else filters_to_expression(filters))
    want = None if columns is None else list(columns)
    read = None if want is None else want + [c for c in dict.fromkeys(_filter_columns(filters)) if c not in want]
    batch_rows = int(batch_rows or BATCH_ROWS)
    for f in manifest_files(run, path):
        if run.local:
            yield from _batches(pq.ParquetFile(f), read, want, expr, batch_rows, True)
        else:
            with run.fs.open(f, "rb") as fh:
                yield from _batches(pq.ParquetFile(fh), read, want, expr, batch_rows, False)


def _batches(pf: pq.ParquetFile, read, want, expr, batch_rows: int, threads: bool) -> Iterator[pa.Table]:
    for b in pf.iter_batches(batch_size=batch_rows, columns=read, use_threads=threads):
        t = pa.Table.from_batches([b])
        if expr is not None:
            t = t.filter(expr)
        yield t if want is None or read == want else t.select(want)


def read_manifest(run: RunDir, columns: list[str] | None = None, filters: Any = None, path: str | None = None) -> pa.Table:
    """:func:`iter_manifest` collected into one table (with the manifest's schema metadata):
    for a filtered subset or a few columns; the whole manifest only when asked for."""
    schema = manifest_schema(run, path)
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)
    parts = list(iter_manifest(run, columns, filters, path))
    if not parts:
        return schema.empty_table()
    return pa.concat_tables(parts).replace_schema_metadata(schema.metadata)
