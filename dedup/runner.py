"""Phase sequence for ``dedup run``: features (per shard, resumable) → candidates → manifest.

Exit codes: 0 complete; 2 usage/config error (raised as ConfigError before any work);
3 finished, but with failed shards or over the error budget (manifest still written, and
marked ``partial`` in stats.json and in the manifest's metadata).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import ExitStack, closing, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from dedup import __version__, interrupt
from dedup.config import Config
from dedup.errors import ConfigError
from dedup.extras import need
from dedup.faults import crash_point
from dedup.io.rundir import RunDir
from dedup.io.shards import list_shards
from dedup.memory import return_freed_memory
from dedup.progress import Progress
from dedup.records import ShardRef

log = logging.getLogger("dedup")

EXIT_OK, EXIT_USAGE, EXIT_PARTIAL = 0, 2, 3


@dataclass(frozen=True)
class Outcome:
    """What a run ended with: its exit code (``EXIT_OK`` / ``EXIT_PARTIAL``), the stats it wrote
    to stats.json, and the run directory's URL."""

    exit_code: int
    stats: dict
    run_dir: str


class RunLock:
    """Refuses a second concurrent writer of one run directory (local run directories).

    The lock file records the owner (pid, host, process start time) and, once they start, the
    owner's worker processes. A lock is stale, and taken over, only when the owner and every
    recorded worker are gone: a worker that outlived its owner may still be writing into the
    run directory. For the same reason the owner releases it only once its workers are gone.
    """

    def __init__(self, run: RunDir):
        self.run = run
        self.path = run.lock
        self.held = False
        self.info: dict = {}

    def __enter__(self) -> RunLock:
        if not self.run.local:
            return self
        os.makedirs(self.run.path, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()), "workers": []}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    with open(self.path) as f:
                        other = json.loads(f.read() or "{}")
                except (OSError, ValueError):
                    other = {}
                if other.get("host") == me["host"]:
                    owner_alive = _alive(other.get("pid"), other.get("started"))
                    workers = [w for w in other.get("workers") or [] if _alive(*_pid_start(w))]
                    if not owner_alive and not workers:
                        os.remove(self.path)  # stale: its owner and its workers are dead
                        continue
                    if not owner_alive:
                        raise ConfigError(
                            f"run directory {self.run.url}: the dedup process that locked it (pid {other.get('pid')}) is gone, "
                            f"but its worker process(es) {[_pid_start(w)[0] for w in workers]} still run; wait for them to "
                            f"exit (or kill them), then rerun"
                        ) from None
                raise ConfigError(
                    f"run directory {self.run.url} is locked by another dedup process "
                    f"(pid {other.get('pid')} on {other.get('host')}); if no such process runs, remove {self.path}"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self.info = me
            self.held = True
            return self
        raise ConfigError(f"could not take the lock {self.path}")

    def add_workers(self, pids: list[int]) -> None:
        """Record worker processes (with their start times) in the lock file."""
        if not self.held:
            return
        known = {_pid_start(w)[0] for w in self.info["workers"]}
        self.info["workers"] += [[p, _start_time(p)] for p in pids if p not in known]
        self.run.write_bytes(self.path, json.dumps(self.info).encode())  # temp + rename: never half a lock

    def __exit__(self, *exc) -> None:
        if not self.held:
            return
        deadline = time.monotonic() + _WORKER_EXIT_S
        while (left := [w for w in self.info.get("workers", []) if _alive(*_pid_start(w))]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left:  # pragma: no cover - the executors join their workers before we get here
            log.warning("worker process(es) %s still run: leaving the lock %s in place", [w[0] for w in left], self.path)
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        self.held = False


_WORKER_EXIT_S = 10.0


def _pid_start(w) -> tuple:
    """A recorded worker: ``[pid, start time]`` (or a bare pid)."""
    return (w[0], w[1]) if isinstance(w, list | tuple) else (w, None)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid, started: int | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie), and is the process that started at ``started``."""
    if not isinstance(pid, int):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if fields[0] in (b"Z", b"X"):  # exited, not yet reaped: writes nothing any more
            return False
        return started is None or int(fields[19]) == started
    except FileNotFoundError:
        return False
    except (OSError, IndexError, ValueError):
        pass  # no /proc: ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _model_tag(cfg: Config) -> str | None:
    if "embedding" not in cfg.methods:
        return None
    from dedup.compute.embedders import spec_tag

    return spec_tag(cfg.embedding.spec)


def _check_run_json(run: RunDir, cfg: Config, force: bool, shard_urls: dict[str, str]) -> None:
    path = run.run_json
    if not run.exists(path):
        return
    try:
        prev = run.read_json(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{run.url}/run.json cannot be read ({type(e).__name__}: {e}); use a new --out directory") from None
    _check_same_inputs(run, prev, shard_urls, force)
    if prev.get("config_hash") != cfg.config_hash() and not force:
        old, new = prev.get("config", {}), cfg.to_dict()
        diffs = [f"  {k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        raise ConfigError(
            f"{run.url} holds a run made with another configuration:\n" + "\n".join(diffs)
            + "\nuse a new --out directory, or --force to recompute what the change affects"
        )


def _check_same_inputs(run: RunDir, prev: dict, shard_urls: dict[str, str], force: bool) -> None:
    """A run directory holds one corpus: reusing it for other shards would replace its manifest
    and leave the old shards' features behind. Refused unless --force, which then removes the
    features and markers of the shards that are no longer inputs."""
    old_urls = prev.get("shard_urls")
    old = dict(old_urls) if isinstance(old_urls, dict) else {sid: None for sid in prev.get("shards", [])}
    gone = sorted(set(old) - set(shard_urls))
    new = sorted(set(shard_urls) - set(old))
    moved = sorted(s for s in set(old) & set(shard_urls) if old[s] is not None and old[s] != shard_urls[s])
    if not (gone or new or moved):
        return
    if not force:
        parts = [f"{len(x)} {what} (e.g. {x[0]})" for x, what in ((gone, "shard(s) no longer in the inputs"),
                 (new, "new shard(s)"), (moved, "shard(s) read from another location")) if x]
        raise ConfigError(
            f"{run.url} holds a run of other inputs: " + ", ".join(parts)
            + "; use a new --out directory, or --force to replace that run"
        )
    for sid in gone:
        run.remove(run.features(sid))
        run.remove(run.done(sid))
    if gone:
        log.info("--force: removed the features of %d shard(s) that are no longer inputs", len(gone))


def _guard_locations(inputs: list[str], out: str, refs: list[ShardRef], against: str | None) -> list[str]:
    """Refuse an --out that overlaps the inputs or --against, or is a directory of the user's
    files; before anything is written. Returns the normalised input locations (run.json)."""
    from dedup.io.safety import dir_is_empty, guard_dir_output, input_locations, is_run_dir

    reads = input_locations(inputs, [r.url for r in refs])
    loc = guard_dir_output(out, reads=reads, runs=[against] if against else [])
    if not dir_is_empty(loc) and not is_run_dir(loc):
        raise ConfigError(
            f"--out {out}: is an existing directory that is not a dedup run ({len(os.listdir(loc.path))} entries); "
            "choose a new or empty directory (nothing was written)"
        )
    if against:
        prev = RunDir(against)
        if not prev.exists(prev.run_json):
            raise ConfigError(f"--against {against}: not a dedup run directory (no run.json)")
    return [(f"{r.proto}://{r.path.lstrip('/')}" if r.proto else r.path) for r in reads]


def _canonical_urls(refs: list[ShardRef]) -> dict[str, str]:
    from dedup.io.safety import canonical

    return {r.shard_id: canonical(r.url) for r in refs}


def run_pipeline(
    inputs: list[str], out: str, cfg: Config, *, force: bool = False, progress: bool = True,
    against: str | None = None, merge: bool = False,
) -> Outcome:
    from dedup.phases.features import FeatureExtractor, marker_is_current

    t_start = time.perf_counter()
    if cfg.run.executor == "ray":
        need("--executor ray", "ray", hint="or --executor local")
    refs, missing = list_shards(inputs)
    if not refs:
        if missing:
            raise ConfigError("no such shard or directory: " + ", ".join(m.url for m in missing[:3])
                              + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        raise ConfigError(f"no shards found in {inputs}")
    locations = _guard_locations(inputs, out, refs, against)
    if "embedding" in cfg.methods:  # an unreachable model hub fails here, in seconds, before any work
        from dedup.compute.embedders import preflight

        preflight(cfg.embedding.spec)
    run = RunDir(out)
    shard_urls = _canonical_urls([*refs, *missing])
    with RunLock(run) as lock:
        _check_run_json(run, cfg, force, shard_urls)
        removed = run.clean_temp()
        if removed:
            log.info("removed %d temp file(s) left by an interrupted run", removed)
        model_tag = _model_tag(cfg)
        fhash = cfg.features_hash(model_tag)
        prev_info = None
        if against:
            from dedup.phases.incremental import check_previous

            prev_info = check_previous(RunDir(against), fhash, model_tag)  # fail fast, before any work
        run.write_json(
            run.run_json,
            {
                "config": cfg.to_dict(),
                "config_hash": cfg.config_hash(),
                "features_hash": fhash,
                "model_tag": model_tag,
                "dedup_version": __version__,
                "inputs": list(inputs),
                "input_locations": locations,
                "against": against,
                "shards": [r.shard_id for r in refs],
                "shard_urls": shard_urls,
            },
        )
        markers: dict[str, dict] = {}
        failures: dict[str, str] = {m.shard_id: f"missing: shard not found: {m.url}" for m in missing}
        todo: list[ShardRef] = []
        for ref in refs:
            m = marker_is_current(run, ref, fhash)
            if m is not None:
                markers[ref.shard_id] = m
            else:
                todo.append(ref)
        if markers:
            log.info("resuming: %d shard(s) already done, %d to do", len(markers), len(todo))

        interrupt.status(lambda: f"{len(markers)} of {len(refs)} shards done")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        with Progress(progress) as prog, ExitStack() as stack:
            task = prog.task("features", total=len(refs))
            task.update(len(markers))
            if todo:
                executor = _executor(cfg)
                if hasattr(executor, "on_workers"):
                    executor.on_workers = lock.add_workers
                factory = lambda: FeatureExtractor(cfg)  # noqa: E731
                # closed on any exit (an interrupt too): the executor stops its workers before the lock is released
                results = stack.enter_context(closing(executor.map_features(cfg.to_dict(), run.url, todo, factory)))
                for res in results:
                    sid, marker = res.ref.shard_id, res.marker
                    if marker is None:
                        failures[sid] = res.error or "unknown error"
                    elif marker["condition"] == "missing":
                        failures[sid] = f"missing: {marker['error']}"
                    else:
                        markers[sid] = marker
                    task.advance(note=sid)
                    crash_point("features:shard_done")
        timings["features"] = round(time.perf_counter() - t0, 3)
        for sid, m in markers.items():
            if m["condition"] != "ok":
                failures[sid] = f"{m['condition']}: {m['error']}"

        done_ids = [r.shard_id for r in refs if r.shard_id in markers]
        if against:
            from dedup.phases.incremental import incremental_finish

            assert prev_info is not None  # checked when `against` was given
            stats = incremental_finish(run, RunDir(against), cfg, done_ids, prev_info, merge=merge, failed_shards=bool(failures))
            stats["timings"].update(timings)
        else:
            stats = finish_run(run, cfg, done_ids, failed_shards=bool(failures), progress=progress, timings=timings)
        stats["shards"] = {
            "total": len(refs) + len(missing),
            "done": len(markers),
            "failed": {sid: failures[sid] for sid in sorted(failures)},
            "conditions": _count(m["condition"] for m in markers.values()),
            # tar members that are no sample (links, directories, names without a key): listed
            # with the reason in each shard's done marker
            "ignored_members": sum(len(m.get("ignored_members") or []) for m in markers.values()),
        }
        stats["timings"]["total"] = round(time.perf_counter() - t_start, 3)
        stats["model_tag"] = model_tag
        stats["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        run.write_json(run.stats, stats, sort_keys=False)  # histogram buckets in numeric order
        code = EXIT_PARTIAL if stats["partial"] else EXIT_OK
        return Outcome(code, stats, run.url)


def finish_run(
    run: RunDir, cfg: Config, shard_ids: list[str], *, failed_shards: bool = False, progress: bool = True,
    timings: dict | None = None,
) -> dict:
    """Candidates then manifest from the run's features files. Returns stats (not yet written)."""
    from dedup.phases.candidates import find_pairs, load_features
    from dedup.phases.manifest import cluster_manifest, write_manifest

    timings = dict(timings or {})
    return_freed_memory(setup=True)
    log.debug("global phase: %s", "load")  # (benchmarks/scale.py's per-phase memory listens for these)
    t0, c0 = time.perf_counter(), time.process_time()
    # sha256 as 8-byte prefixes in the table; whole digests read from the files where needed
    fs = load_features(run, sorted(shard_ids), with_embeddings="embedding" in cfg.methods, digests=False)
    # the table (~61 B a row) moves to a file mapping beside the staged embeddings: each phase
    # has only the pages it reads resident, and they are dropped between phases
    fs.map_table(_scratch_dir(run))
    return_freed_memory()
    timings["load"] = round(time.perf_counter() - t0, 3)
    timings["cpu_load"] = round(time.process_time() - c0, 3)  # cpu_*: this process's CPU seconds, all threads
    log.debug("global phase: %s", "candidates")
    t0, c0 = time.perf_counter(), time.process_time()
    want_outlier = fs.embeddings is not None and cfg.clusters.outlier_k > 0
    # the searches' tasks: on Ray, one executor (one connection) for the candidate search and
    # the outlier score; locally, worker threads here
    with (_executor(cfg) if cfg.run.executor == "ray" else nullcontext()) as executor:
        with Progress(progress) as prog:
            bars: dict = {}

            def cb(name: str, done: int, total: int) -> None:
                if name not in bars:
                    bars[name] = prog.updater(f"candidates/{name}")
                bars[name](done, total)

            # the embedding search keeps its rows' nearest lists for the outlier score's search
            found = find_pairs(cfg, fs, progress=cb, executor=executor, keep_lists=want_outlier)
        pairs, info, pair_rows, near_lists = found.table, found.info, found.rows, found.lists
        del found
        fs.drop_pages()
        return_freed_memory()
        crash_point("candidates:before_write")
        run.write_parquet(run.pairs, pairs)
        if pair_rows is not None:  # the clusters take the pairs' rows: their sample ids are not needed again
            pairs = pairs.select(["method", "score"])
        timings["candidates"] = round(time.perf_counter() - t0, 3)
        timings["cpu_candidates"] = round(time.process_time() - c0, 3)
        t0, c0 = time.perf_counter(), time.process_time()
        outlier = None
        outlier_search = None
        if want_outlier and fs.embeddings is not None:
            from dedup.phases.manifest import outlier_scores

            log.info("outlier scores: k-th nearest neighbour of %d embeddings", int(fs.ok().sum()))
            log.debug("global phase: %s", "outlier")
            ost: dict = {}
            with Progress(progress) as prog:
                outlier = outlier_scores(fs.embeddings, fs.ok(), cfg.clusters.outlier_k, stats=ost,
                                         progress=prog.updater("outlier scores"), lists=near_lists, executor=executor)
            del near_lists
            return_freed_memory()
            timings["outlier"] = round(ost.get("seconds", 0.0), 3)
            spread = executor is not None and "units" in ost  # IVF units ran as the executor's tasks
            outlier_search = {"method": ost.get("method"), "units": ost.get("units"),
                              "executor": "ray" if spread else "local", "seconds": timings["outlier"]}
    th_choice = info.get("embedding_threshold")
    th_value = th_choice["value"] if th_choice else None
    # the rows are formatted and written one row group at a time (no full manifest table here)
    log.debug("global phase: %s", "clusters")
    fs.drop_pages()
    manifest, mstats = cluster_manifest(cfg, fs.table, pairs, outlier=outlier, embeddings=fs.embeddings, threshold=th_value,
                                        rows=pair_rows, digests=fs.digests, release=fs.drop_pages)
    log.debug("global phase: %s", "manifest write")
    written = write_manifest(run, cfg, manifest, failed_shards=failed_shards)
    del manifest
    timings["manifest"] = round(time.perf_counter() - t0, 3)
    timings["cpu_manifest"] = round(time.process_time() - c0, 3)
    status_counts = _value_counts(fs.table["status"])
    return {
        **mstats,
        **written.stats(),
        "status_counts": status_counts,
        "pairs": info["pairs"],
        "uninformative_hashes": info.get("uninformative_hashes", {}),
        "candidate_timings": info["timings"],
        "ivf": info.get("ivf"),
        "ivf_search": info.get("ivf_search"),
        "outlier_search": outlier_search,
        "methods": list(cfg.methods),
        "thresholds": {
            "phash_radius": cfg.hashes.phash_radius,
            "dhash_radius": cfg.hashes.dhash_radius,
            "embedding_cosine": (th_value if th_value is not None else cfg.embedding.resolved_threshold())
            if "embedding" in cfg.methods else None,
        },
        "embedding_threshold": th_choice,
        "timings": timings,
    }


def _scratch_dir(run: RunDir) -> str | None:
    """Where the global phases put local scratch files: the run's ``index/`` when the run
    directory is local (and the folder can be made), else the temp dir (None)."""
    if not run.local:
        return None
    path = run.p("index")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    return path


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def _value_counts(col: pa.ChunkedArray) -> dict[str, int]:
    """``_count`` of a string column without a Python string a row."""
    vc = pc.value_counts(col).to_pylist()
    return dict(sorted((v["values"], v["counts"]) for v in vc))


def _executor(cfg: Config):
    if cfg.run.executor == "ray":
        from dedup.executors.ray import RayExecutor  # imports ray: only when asked for

        return RayExecutor(cfg)
    from dedup.executors.local import LocalExecutor

    workers = cfg.run.workers or (os.cpu_count() or 1)
    return LocalExecutor(workers, retries=cfg.run.retries)


def manifest_table(run_dir: str) -> pa.Table:
    from dedup.io.manifests import read_manifest

    return read_manifest(RunDir(run_dir))
