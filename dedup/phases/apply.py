"""``dedup apply``: write clean shards holding only the kept samples, or a keep-list.

One output shard per input shard, same relative name (``CLEAN_DIR/<shard_id>.tar``), members
copied with their original bytes and tar headers (name, mode, mtime, owner), in input order,
with every sidecar of a kept key. Each output shard is streamed (never held in memory) to a
temp name and renamed (:meth:`RunDir.open_atomic`);
``CLEAN_DIR/_done/<shard_id>.json`` is written last, so a rerun skips finished shards. The
number of samples written per shard is checked against the manifest.

Before anything is written, every output is checked (:mod:`dedup.io.safety`): the clean
directory and the keep-list may not be, contain or lie inside an input of the run or the run
directory, and no file the user has is replaced without ``--overwrite``.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections import defaultdict
from itertools import groupby
from collections.abc import Callable, Iterator
from typing import IO

import numpy as np
import pyarrow.compute as pc

from dedup.errors import ConfigError, DedupError
from dedup.io.manifests import iter_manifest
from dedup.io.rundir import RunDir, finished_run
from dedup.io.shards import split_key
from dedup.records import Status


def _kept_mask(m, include_failed: bool):
    mask = m["is_keeper"]
    if include_failed:
        mask = pc.or_(mask, pc.not_equal(m["status"], Status.OK.value))
    return mask


def shard_rows(run: RunDir) -> tuple[dict[str, int], bool]:
    """(shard_id -> rows in the manifest, in the order the shards first appear; whether each
    shard's rows are consecutive), from one column read a batch at a time. They are whenever no
    shard id is another's directory ("a" beside "a/b": "a/b/x" sorts between "a/a" and "a/c")."""
    rows: dict[str, int] = {}
    last: str | None = None
    consecutive = True
    for m in iter_manifest(run, ["shard_id"]):
        col = m["shard_id"]
        if len(col) == 0:
            continue
        # runs of one shard id in this batch: where the value changes
        vals = col.to_numpy(zero_copy_only=False)
        starts = [0] + (1 + np.flatnonzero(vals[1:] != vals[:-1])).tolist()
        ends = starts[1:] + [len(vals)]
        for a, b in zip(starts, ends):
            sid = str(vals[a])
            if sid != last and sid in rows:
                consecutive = False
            rows[sid] = rows.get(sid, 0) + (b - a)
            last = sid
    return rows, consecutive


def _kept(run: RunDir, include_failed: bool) -> Iterator[tuple[str, str]]:
    """(shard_id, key) of every kept row, in manifest order, read a batch at a time."""
    for m in iter_manifest(run, ["shard_id", "key", "status", "is_keeper"]):
        kept = m.filter(_kept_mask(m, include_failed))
        yield from zip(kept["shard_id"].to_pylist(), kept["key"].to_pylist())


def kept_by_shard(run: RunDir, include_failed: bool = False) -> Iterator[tuple[str, set[str]]]:
    """(shard_id, its kept keys) one shard at a time, in manifest order, for a manifest whose
    shards' rows are consecutive (:func:`shard_rows`); shards with nothing kept are not
    yielded. Only one shard's keys are held at a time (all of them were: 794 MB at 4·10⁶ rows)."""
    done: set[str] = set()
    for sid, rows in groupby(_kept(run, include_failed), key=lambda r: r[0]):
        if sid in done:
            raise DedupError(f"the manifest of {run.url} is not in sample_id order (shard {sid!r} "
                             "comes back after other shards); rerun `dedup run`")
        done.add(sid)
        yield sid, {key for _, key in rows}


def kept_keys(run: RunDir, include_failed: bool = False) -> dict[str, set[str]]:
    """shard_id -> kept keys, every kept key at once (whatever the order of the rows)."""
    keys: dict[str, set[str]] = defaultdict(set)
    for sid, key in _kept(run, include_failed):
        keys[sid].add(key)
    return dict(keys)


def keep_set(run: RunDir, include_failed: bool = False) -> tuple[dict[str, set[str]], dict[str, int]]:
    """(shard_id -> kept keys, shard_id -> rows in manifest)."""
    return kept_keys(run, include_failed), shard_rows(run)[0]


def guard_apply_outputs(run_dir: str, clean_dir: str | None, keep_list: str | None, overwrite: bool = False) -> RunDir:
    """Check every output of ``dedup apply`` before anything is written: neither may overlap
    the run's inputs or the run directory; the clean directory must be new, empty or an
    earlier apply output (its ``_done/``) unless ``overwrite``; an existing keep-list is
    replaced only with ``overwrite``."""
    from dedup.io.safety import dir_is_empty, guard_dir_output, guard_file_output, locate, run_reads

    run = finished_run(run_dir)
    reads = run_reads(run)
    if clean_dir:
        loc = guard_dir_output(clean_dir, reads=reads, runs=[run_dir])
        if not dir_is_empty(loc) and not overwrite and not RunDir(clean_dir).exists(RunDir(clean_dir).p("_done")):
            raise ConfigError(
                f"--out {clean_dir}: is a non-empty directory that no `dedup apply` wrote; choose a new or empty "
                "directory, or pass --overwrite to write clean shards among its files (same-named files are replaced)"
            )
    if keep_list:
        guard_file_output(keep_list, reads=reads, runs=[run_dir], overwrite=overwrite, option="--keep-list")
        if clean_dir and locate(keep_list).path == locate(clean_dir).path:
            raise ConfigError(f"--keep-list {keep_list}: is the --out directory; give a file name")
    return run


def write_keep_list(run_dir: str, path: str, include_failed: bool = False, overwrite: bool = False) -> int:
    """One ``sample_id`` per line, sorted (the manifest's order): for loaders that filter on
    the fly. Written as the manifest is read, one batch of ids at a time."""
    run = guard_apply_outputs(run_dir, None, path, overwrite)
    out = RunDir(posixpath.dirname(path) or ".")
    n = 0
    with out.open_atomic(path if "://" in path else out.p(posixpath.basename(path))) as f:
        for m in iter_manifest(run, ["sample_id", "status", "is_keeper"]):
            ids = m.filter(_kept_mask(m, include_failed))["sample_id"].to_pylist()
            if ids:
                f.write(("\n".join(ids) + "\n").encode())
                n += len(ids)
        if n == 0:
            f.write(b"\n")
    return n


def apply_run(
    run_dir: str, clean_dir: str, include_failed: bool = False,
    progress: Callable[[str], None] | None = None, total: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> dict:
    run = guard_apply_outputs(run_dir, clean_dir, None, overwrite)
    rows, consecutive = shard_rows(run)
    if total is not None:
        total(len(rows))
    out = RunDir(clean_dir)
    summary = {"shards": 0, "skipped": 0, "samples_written": 0, "members_written": 0}
    expected = 0
    # one shard's kept keys at a time when the shards' rows are consecutive (always, unless a
    # shard id is another's directory); else every kept key at once
    kept = kept_by_shard(run, include_failed) if consecutive else iter(sorted(kept_keys(run, include_failed).items()))
    nxt = next(kept, None)
    # every shard of the manifest (those with nothing kept get an empty shard), in the order of
    # ``kept``: the manifest's, or sorted
    for sid in (rows if consecutive else sorted(rows)):
        want: set[str] = set()
        if nxt is not None and nxt[0] == sid:
            want = nxt[1]
            nxt = next(kept, None)
        expected += len(want)
        marker_path = out.p("_done", sid + ".json")
        if out.exists(marker_path):
            prev = out.read_json(marker_path)
            if prev.get("samples") == len(want):
                summary["skipped"] += 1
                summary["samples_written"] += prev["samples"]
                summary["members_written"] += prev["members"]
                if progress:
                    progress(sid)
                continue
        done = run.read_json(run.done(sid))
        with out.open_atomic(out.p(sid + ".tar")) as f:
            n_samples, n_members = _filter_shard(done["url"], want, f)
            if n_samples != len(want):  # raising here leaves no output shard behind
                raise DedupError(
                    f"shard {sid}: wrote {n_samples} samples but the manifest keeps {len(want)}; "
                    "the input shard changed since the run (rerun `dedup run`)"
                )
        out.write_json(marker_path, {"shard_id": sid, "source": done["url"], "samples": n_samples, "members": n_members})
        summary["shards"] += 1
        summary["samples_written"] += n_samples
        summary["members_written"] += n_members
        if progress:
            progress(sid)
    if nxt is not None:  # pragma: no cover - every kept shard is a manifest shard
        raise DedupError(f"shard {nxt[0]}: kept rows but no place among the manifest's shards")
    if summary["samples_written"] != expected:  # pragma: no cover - guarded per shard above
        raise DedupError(f"wrote {summary['samples_written']} samples, manifest keeps {expected}")
    summary["expected"] = expected
    return summary


def _filter_shard(url: str, keep: set[str], out: IO[bytes]) -> tuple[int, int]:
    """Stream the members of kept keys from the shard at ``url`` (a tar, or a gzipped tar)
    into the tar ``out``; returns (samples, members) written.

    Each kept member is copied as its original bytes: its header blocks, with any GNU
    long-name or PAX extended header before them, verbatim from the input stream (so GNU,
    ustar and PAX headers come out unchanged), then its data. A member's data is read before
    its header is written, so a member cut short by a truncated shard never appears. Only
    regular members with a WebDataset key are copied: the members that make up manifest rows
    (links, directories and key-less names are listed in the done markers, never in rows).
    Global PAX headers are copied where they stand, whether the member after them is kept or
    not (they apply to all later members). A sparse member (never written by WebDataset tools)
    is written expanded, with a rebuilt header.
    """
    from fsspec.core import url_to_fs

    from dedup.io.shards import STREAM_ERRORS, CountingReader, tar_stream

    fs, path = url_to_fs(url)
    seen: set[str] = set()
    members = written = end = 0  # end: where the previous member's data ended in the input

    def put(b: bytes) -> None:
        nonlocal written
        out.write(b)
        written += len(b)

    with fs.open(path, "rb") as f:
        reader = CountingReader(tar_stream(f)[0])  # tar bytes (decompressed), where offsets live
        try:
            src = tarfile.open(fileobj=reader, mode="r|")  # type: ignore[call-overload]  # "r|" only reads
            while (m := src.next()) is not None:
                # Between two members tarfile consumes only global PAX headers: copy them.
                if m.offset > end:
                    put(reader.bytes_at(end, m.offset - end) or b"")
                end = src.offset
                header = reader.bytes_at(m.offset, m.offset_data - m.offset)
                key, _ = split_key(m.name)
                if not (m.isfile() and key is not None and key in keep):
                    continue
                data = src.extractfile(m).read()
                if m.issparse() or header is None or len(header) != m.offset_data - m.offset:
                    header = _rebuilt_header(m)
                put(header)
                put(data + tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE))
                seen.add(key)
                members += 1
        except STREAM_ERRORS:
            pass  # a truncated shard ends here; its cut sample is never kept (status read_error)
    put(tarfile.NUL * (2 * tarfile.BLOCKSIZE))  # end-of-archive, padded to a record like tarfile
    put(tarfile.NUL * (-written % tarfile.RECORDSIZE))
    return len(seen), members


def _rebuilt_header(m: tarfile.TarInfo) -> bytes:
    """A PAX header for ``m`` as a plain regular file (fallback when the original header
    blocks are not available verbatim, or describe a sparse layout that is not copied)."""
    t = tarfile.TarInfo(m.name)
    for a in ("mode", "uid", "gid", "uname", "gname", "mtime", "size"):
        setattr(t, a, getattr(m, a))
    t.pax_headers = {k: v for k, v in m.pax_headers.items() if not k.startswith("GNU.sparse.")}
    return t.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
