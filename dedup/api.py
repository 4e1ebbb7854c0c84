"""The Python API: what the CLI does, callable from a notebook or a pipeline.

    import dedup
    run = dedup.run(["shards/"], "runs/r1", methods="exact,phash,dhash")
    print(run.stats["duplicates"], "duplicates")
    keep = run.manifest(filters=[("is_keeper", "=", True)])   # a pyarrow Table
    dedup.apply(run, "clean/")                                   # clean shards, original bytes

Every function takes and returns plain values (paths, pyarrow tables, dicts); errors are
:class:`dedup.errors.DedupError` (``ConfigError`` for what the CLI answers with exit 2). The
same checks as the CLI run first: outputs never overlap inputs, an unreachable model hub fails
before any work.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from dedup.config import Config, load_config
from dedup.errors import ConfigError
from dedup.io.rundir import RunDir, finished_run
from dedup.records import Status


@dataclass(frozen=True)
class Run:
    """A finished run directory: its manifest, stats and pairs."""

    path: str
    exit_code: int = 0  # as `dedup run` would exit: 0 complete, 3 partial

    @property
    def stats(self) -> dict:
        rd = RunDir(self.path)
        return rd.read_json(rd.stats)

    @property
    def config(self) -> Config:
        rd = RunDir(self.path)
        return Config.model_validate(rd.read_json(rd.run_json)["config"])

    def manifest(self, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
        """The manifest (one row per input sample), optionally some columns / filtered rows
        (pyarrow filter syntax, as in ``pq.read_table(..., filters=...)``), read a batch at a
        time: one file or a directory of parts alike (:mod:`dedup.io.manifests`)."""
        from dedup.io.manifests import read_manifest

        rd = RunDir(self.path)
        return read_manifest(rd, columns, filters)

    def pairs(self) -> pa.Table:
        rd = RunDir(self.path)
        return rd.read_parquet(rd.pairs)

    def images(self, sample_ids: list[str]) -> dict:
        """The decoded images (PIL, RGB) of these samples, read back from the input shards."""
        from dedup.compute.decode import decode_image
        from dedup.io.shards import ShardReadResult, image_member, iter_samples
        from dedup.records import ShardRef

        rd = RunDir(self.path)
        exts = tuple(self.config.input.image_exts)
        wanted: dict[str, set[str]] = {}
        for sid in sample_ids:
            shard, key = sid.rsplit("/", 1)
            wanted.setdefault(shard, set()).add(key)
        out = {}
        for shard, keys in wanted.items():
            url = rd.read_json(rd.done(shard))["url"]
            for sample in iter_samples(ShardRef(url, shard), ShardReadResult(), exts):
                if sample.key in keys:
                    data = image_member(sample, exts)[1]
                    dec = decode_image(data) if data else None
                    if dec is not None and dec.image is not None:
                        out[f"{shard}/{sample.key}"] = dec.image.convert("RGB")
        return out

    def hash_pairs(self, method: str = "phash", radius: int = 16) -> pa.Table:
        """Every pair of ok samples whose ``method`` hash (phash or dhash) is within ``radius``
        bits: ``a``, ``b`` (sample ids), ``bits`` — to see what lies just outside the run's radius."""
        import numpy as np
        import pyarrow.compute as pc

        from dedup.compute.search.hamming import hash_pairs

        m = self.manifest(["sample_id", "status", method])
        m = m.filter(pc.and_(pc.equal(m["status"], Status.OK.value), pc.is_valid(m[method])))
        ids = np.array(m["sample_id"].to_pylist(), dtype=object)
        found = hash_pairs(m[method].to_numpy().astype(np.uint64), int(radius))
        return pa.table({"a": pa.array(ids[found.i], pa.string()), "b": pa.array(ids[found.j], pa.string()),
                         "bits": pa.array(np.asarray(found.score, np.int32))})

    def kept_ids(self) -> list[str]:
        """``sample_id`` of every kept sample (what ``dedup apply --keep-list`` writes)."""
        return sorted(self.manifest(["sample_id", "is_keeper"], filters=[("is_keeper", "=", True)])["sample_id"].to_pylist())


def run(
    inputs: str | list[str], out: str, *, config: str | Path | Config | None = None, methods: str | list[str] | None = None,
    embedder: str | None = None, force: bool = False, progress: bool = False, against: Run | str | None = None,
    merge: bool = False, **settings: Any,
) -> Run:
    """Deduplicate ``inputs`` (shard directories, .tar files, globs, brace patterns, URLs) into
    the run directory ``out``; as ``dedup run``. ``config``: a YAML/JSON file, or a
    :class:`~dedup.config.Config` that already holds every setting. ``settings`` are dotted
    config keys with ``__`` for the dot: ``run(..., hashes__phash_radius=6,
    embedding__threshold=0.7)``. ``against``: an incremental run against that previous run
    (``merge``: also write ``merged_manifest.parquet``)."""
    from dedup.runner import run_pipeline

    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if isinstance(config, Config):
        if methods is not None or embedder is not None or settings:
            raise ConfigError("run(config=Config(...)) takes no methods, embedder or settings: the Config holds them all")
        cfg = config
    else:
        direct = {k.replace("__", "."): v for k, v in settings.items()}
        cfg = load_config(config, None, **{"methods": methods, "embedding.spec": embedder, **direct})
    if merge and against is None:
        raise ConfigError("merge needs against=PREVIOUS_RUN (it merges this run's delta into that run)")
    if "embedding" in cfg.methods:
        from dedup.compute.embedders import parse_spec

        parse_spec(cfg.embedding.spec)  # (the model hub is probed by run_pipeline, after the paths are checked)
    previous = against.path if isinstance(against, Run) else against
    outcome = run_pipeline(inputs, out, cfg, force=force, progress=progress, against=previous, merge=merge)
    return Run(outcome.run_dir, outcome.exit_code)


def open_run(path: str) -> Run:
    """A finished run directory (a one-line ConfigError if it is not one)."""
    finished_run(path)
    return Run(path)


def apply(run: Run | str, out: str | None = None, *, keep_list: str | None = None, include_failed: bool = False,
          overwrite: bool = False, progress: Callable[[str], None] | None = None,
          total: Callable[[int], None] | None = None) -> dict:
    """Clean shards (original member bytes) and/or a keep-list; as ``dedup apply``. Every
    output is checked before any is written. Returns the clean shards' counts (``shards``,
    ``skipped``, ``samples_written``, ``members_written``, ``expected``) and ``keep_list``
    (ids written). ``total(shards)`` then ``progress(shard_id)`` per shard follow the work."""
    from dedup.phases.apply import apply_run, guard_apply_outputs, write_keep_list

    path = run.path if isinstance(run, Run) else run
    guard_apply_outputs(path, out, keep_list, overwrite)
    result: dict = {}
    if out:
        result.update(apply_run(path, out, include_failed, progress=progress, total=total, overwrite=overwrite))
    if keep_list:
        result["keep_list"] = write_keep_list(path, keep_list, include_failed, overwrite=overwrite)
    return result


@dataclass(frozen=True)
class CheckResult:
    """What ``dedup check`` wrote (``out``) and the summary it prints."""

    out: str
    within: bool
    summary: dict  # flagged / queries / regions_per_query ...; with ``within``: groups

    def table(self) -> pa.Table:
        """``check.parquet`` (``within.parquet`` with ``within``) as a table."""
        rd = RunDir(self.out)
        return rd.read_parquet(rd.within_parquet if self.within else rd.check_parquet)


def check_result(queries: str | list[str], against: Run | str, out: str = "dedup-check", **options: Any) -> CheckResult:
    """As ``dedup check``: ``out`` is checked first (a new or empty directory, or an earlier
    check's, never overlapping the queries or the run); ``options`` as its flags: within,
    group_by, min_copies, regions, max_regions."""
    from dedup.phases.check import check as check_queries

    path = against.path if isinstance(against, Run) else against
    query_list = [queries] if isinstance(queries, str) else list(queries)
    _guard_check_out(query_list, path, out)
    max_regions = options.get("max_regions")
    if max_regions is not None and max_regions < 1:
        raise ConfigError(f"--max-regions {max_regions}: must be at least 1 (or --no-regions)")
    summary = check_queries(query_list, path, out, **options)
    return CheckResult(out, bool(options.get("within")), summary)


def check(queries: str | list[str], against: Run | str, out: str = "dedup-check", **options: Any) -> pa.Table:
    """Flag queries that are near-copies of the run's training samples; returns check.parquet
    (within.parquet with ``within``) as a table (as ``dedup check``; ``options``: within,
    group_by, min_copies, regions, max_regions). :func:`check_result` also gives the summary."""
    return check_result(queries, against, out, **options).table()


def _guard_check_out(queries: list[str], against: str, out_dir: str) -> None:
    """A check's ``out`` directory: outside the queries and the run, and new, empty or an
    earlier check's."""
    from dedup.io.rundir import CHECK_PARQUET, WITHIN_PARQUET
    from dedup.io.safety import dir_is_empty, guard_dir_output, input_locations

    loc = guard_dir_output(out_dir, reads=input_locations(queries), runs=[against])
    if not dir_is_empty(loc) and not ({CHECK_PARQUET, WITHIN_PARQUET} & set(os.listdir(loc.path))):
        raise ConfigError(f"--out {out_dir}: is a non-empty directory that no `dedup check` wrote; choose a new or empty directory")
