"""Ray executor: the features phase spread over a Ray cluster, and per-item tasks (``map_units``)
for the search and the outlier score.

Per shard, three stages (the same three methods the local executor runs in one process, see
:class:`dedup.phases.features.FeatureExtractor`, so the features files are identical):

1. ``_scan_shard`` — a CPU task (``ray.cpus_per_task``) and a *streaming generator*: it
   fingerprints the shard, reads the tar, decodes each image itself (never Ray's WebDataset
   decoder, which fails a whole job on one bad JPEG), hashes, and yields each chunk of up to
   ``FeatureExtractor.batch`` decoded images as soon as it is full, then the shard's rows last.
2. ``_EmbedActor`` — a pool of actors (``ray.embed_actors``, ``ray.gpus_per_actor``,
   ``ray.cpus_per_actor``) that load the model once each and embed one chunk per call.
3. ``_write_shard`` — a small task that assembles the table from the rows and the chunks'
   embeddings and writes ``features/<shard>.parquet`` then ``done/<shard>.json`` (last).

The driver (this process) only moves object references: it never fetches images. Memory is
bounded: at most ``ray.max_in_flight`` shards are open; a generator pauses after a few
unconsumed chunks (``_BACKPRESSURE``); chunks are handed to the actors only while fewer than
``_QUEUE_PER_ACTOR`` per actor are waiting. Nothing materialises the data set.

Failures: a worker that dies (OOM killer, preemption, SIGKILL) is handled by Ray — the scan
task is retried (``max_retries``; a streaming generator replays and the consumer skips what it
already has), an actor is restarted and its calls retried (``max_restarts``,
``max_task_retries``), the write task is retried on any exception. A shard whose stages still
fail is restarted from scratch by the driver up to ``run.retries`` times, then reported failed
(the run finishes partial, exit 3), exactly like the local executor.

Interrupts (SIGINT/SIGTERM, see :mod:`dedup.interrupt`): the driver cancels its running scan,
write and per-item tasks (forced), kills the embedding actors, and shuts Ray down if it started
it; finished shards keep their markers.

Resume state is the run directory's ``done/`` markers, wherever the run directory lives (a
local path or an fsspec URL: s3://, gs://): a retried Ray job on a fresh cluster skips the
shards already done.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from dedup import interrupt
from dedup.config import Config
from dedup.errors import ConfigError
from dedup.executors import ShardResult
from dedup.faults import crash_point
from dedup.records import ModelInfo, ShardRef

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

log = logging.getLogger(__name__)

_BACKPRESSURE = 4  # unconsumed chunks a scan generator may run ahead by
_QUEUE_PER_ACTOR = 4  # chunks queued at one embedding actor
_WRITE_CPUS = 0.25  # the write task mostly waits on storage
_WAIT_S = 1.0
_LIMIT_REFRESH_S = 10.0  # how often the default in-flight limit follows the cluster's size
_PG_LOG_S = 30.0  # how often to say that the embedding actors still wait for resources
_PG_TIMEOUT_S = 1800.0  # ... and when to give up (an autoscaler may take minutes to add GPU nodes)


# ------------------------------------------------------------------------------------------
# worker side


_CACHE: dict = {}


def _extractor(cfg_dict: dict, info: ModelInfo | None):
    """One FeatureExtractor per worker process and configuration; it loads no model (``info``
    says what the actors' model is: the CPU stages never embed)."""
    from dedup.phases.features import FeatureExtractor

    key = (repr(sorted(cfg_dict.items())), info)
    ex = _CACHE.get(key)
    if ex is None:
        _CACHE.clear()
        ex = _CACHE[key] = FeatureExtractor(Config.model_validate(cfg_dict), model=info)
    return ex


def _scan_shard(cfg_dict: dict, info: ModelInfo | None, ref: ShardRef):
    """Yields ``("chunk", keys, uint8 arrays)`` per chunk, then ``("scan", fingerprint, ShardScan, seconds)``."""
    import numpy as np

    from dedup.phases.features import EmbedChunk, shard_fingerprint_or_none

    t0 = time.perf_counter()
    ex = _extractor(cfg_dict, info)
    fingerprint = shard_fingerprint_or_none(ref)
    for item in ex.scan(ref):
        if isinstance(item, EmbedChunk):
            # Decoded images travel as uint8 arrays (zero-copy through the object store);
            # Image.fromarray on the other side gives back the very same pixels.
            yield ("chunk", item.keys, [np.asarray(im) for im in item.images])
        else:
            yield ("scan", fingerprint, item, time.perf_counter() - t0)


class _EmbedActor:
    """Loads the model once; embeds chunks (one per call, in the order the driver sends them)."""

    def __init__(self, cfg_dict: dict):
        from dedup.phases.features import FeatureExtractor

        self.ex = FeatureExtractor(Config.model_validate(cfg_dict))

    def info(self) -> ModelInfo:
        e = self.ex.embedder
        return ModelInfo(str(e.tag), int(e.dim), int(e.input_size))

    def embed(self, chunk) -> tuple[list[str], Any, str | None, float]:
        from PIL import Image

        _, keys, arrays = chunk
        t = time.perf_counter()
        vecs, err = self.ex.embed_images([Image.fromarray(a) for a in arrays])
        return keys, vecs, err, time.perf_counter() - t


def _write_shard(cfg_dict: dict, info: ModelInfo | None, run_url: str, ref: ShardRef, scanned, *embedded) -> dict:
    from dedup.io.rundir import RunDir
    from dedup.phases.features import write_shard

    ex = _extractor(cfg_dict, info)
    _, fingerprint, scan, t_scan = scanned
    t_embed = sum(e[3] for e in embedded)
    timings = {**scan.timings, "embed": t_embed, "total": t_scan + t_embed}
    table, result, meta = ex.assemble(ref, scan, [(k, v, err) for k, v, err, _ in embedded], timings)
    return write_shard(ex, RunDir(run_url), ref, fingerprint, table, result, meta)


# ------------------------------------------------------------------------------------------
# driver side


@dataclass
class _Job:
    ref: ShardRef
    attempt: int = 0
    gen: Any = None  # ObjectRefGenerator of the scan task, until exhausted
    held: Any = None  # the latest item taken from gen: a chunk, unless it turns out to be the last
    embeds: list = field(default_factory=list)  # embed result refs, in chunk order
    write: Any = None  # the write task's ref


class RayExecutor:
    """``map_features`` (the features phase) and ``map_units`` (any per-item work) on Ray.

    Connects to ``ray.address`` (or ``RAY_ADDRESS``), else starts a local Ray; an already
    initialised Ray is used as is. :meth:`close` shuts down only a Ray this object started.
    """

    in_process = False  # tasks run in Ray workers: hand large inputs over by name, not by put

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._started = False
        self._actors: list = []
        self._pg: PlacementGroup | None = None
        self._remote: dict[str, Any] = {}

    # -- connection -------------------------------------------------------------------------
    def connect(self) -> None:
        if ray.is_initialized():
            return
        address = self.cfg.ray.address
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "logging_level": logging.WARNING}
        if address is None and not os.environ.get("RAY_ADDRESS"):
            # A local Ray for this process: no dashboard; it stops when this process exits.
            kwargs.update(include_dashboard=False, num_cpus=self.cfg.run.workers or None)
            # "local": always a fresh Ray of our own. With None, ray.init joins whatever cluster
            # an earlier `ray start` on this machine left in /tmp/ray (and then fails on num_cpus).
            address = "local"
            self._started = True
        ray.init(address=address, **kwargs)
        interrupt.reinstall()  # ray.init's SIGTERM handler would exit without stopping anything
        log.info("ray: %s, resources %s", "started a local Ray" if self._started else f"connected to {address or os.environ.get('RAY_ADDRESS')}", ray.cluster_resources())

    def close(self) -> None:
        """Kill the embedding actors; shut Ray down if this executor started it."""
        if ray.is_initialized():
            self.close_actors()
        if self._started and ray.is_initialized():
            ray.shutdown()
            self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, typ, e, tb) -> None:
        self.close()
        if isinstance(e, KeyboardInterrupt) and interrupt.as_interrupted(e) is not e:
            raise interrupt.as_interrupted(e) from None  # see dedup.interrupt._handler

    # -- sizing -----------------------------------------------------------------------------
    def _cluster_cpus(self) -> float:
        return float(ray.cluster_resources().get("CPU", 1.0))

    def _max_in_flight(self) -> int:
        return self.cfg.ray.max_in_flight or max(2, int(2 * self._cluster_cpus()))

    def _retries(self) -> int:
        return self.cfg.run.retries

    def _fn(self, name: str, fn: Callable, **opts):
        if name not in self._remote:
            self._remote[name] = ray.remote(fn).options(**opts)
        return self._remote[name]

    def _embed_actors(self, cfg_dict: dict, cfg: Config) -> list:
        """The embedding actors, each in its own bundle of a placement group: the bundles stay
        reserved while the run lasts, so an actor that dies restarts into its bundle instead of
        waiting behind scan tasks that took every CPU (which would stall the run)."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.close_actors()
        rc = cfg.ray
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        device = cfg.embedding.device.lower()
        # GPU actors when the cluster has GPUs now (device auto), or always for device cuda: an
        # autoscaling cluster that starts without GPU nodes adds them for the pending actors.
        use_gpu = rc.gpus_per_actor > 0 and (device.startswith("cuda") or (device == "auto" and gpus > 0))
        n = rc.embed_actors or (max(1, int(gpus // rc.gpus_per_actor)) if use_gpu else 1)
        bundle = {"CPU": rc.cpus_per_actor, **({"GPU": rc.gpus_per_actor} if use_gpu else {})}
        log.info("ray: starting %d embedding actor(s), %s each", n, bundle)
        self._pg = placement_group([dict(bundle) for _ in range(n)], strategy="SPREAD")
        # A local Ray this process started cannot grow; a cluster may (autoscaler): wait longer.
        limit = 15.0 if self._started else _PG_TIMEOUT_S
        step = min(_PG_LOG_S, limit)
        waited = 0.0
        while True:
            ready, _ = ray.wait([self._pg.ready()], timeout=step)
            if ready:
                break
            waited += step
            if waited >= limit:
                self.close_actors()
                raise ConfigError(
                    f"the cluster cannot host {n} embedding actor(s) with {bundle} each "
                    f"(cluster resources: {ray.cluster_resources()}); lower ray.embed_actors, "
                    "ray.cpus_per_actor or ray.gpus_per_actor, or add nodes"
                )
            log.warning("ray: waiting for resources for %d embedding actor(s) with %s each (%.0fs so far)", n, bundle, waited)
        left = ray.available_resources().get("CPU", 0.0)
        if left < cfg.ray.cpus_per_task:
            log.warning(
                "ray: the embedding actors leave %.2f CPU for scan tasks that need %s each; the run waits "
                "for more nodes (lower ray.embed_actors / ray.cpus_per_actor if none will come)", left, cfg.ray.cpus_per_task,
            )
        actor_cls = ray.remote(_EmbedActor)
        opts = dict(
            num_cpus=rc.cpus_per_actor,
            num_gpus=rc.gpus_per_actor if use_gpu else 0,
            max_restarts=-1,  # a killed/preempted actor comes back (and loads the model again)
            max_task_retries=self._retries(),
            max_concurrency=1,
        )
        self._actors = [
            actor_cls.options(
                **opts, scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i)
            ).remote(cfg_dict)
            for i in range(n)
        ]
        return self._actors

    def close_actors(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for a in self._actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._actors = []
        if self._pg is not None:
            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001
                pass
            self._pg = None

    # -- features phase ---------------------------------------------------------------------
    def map_features(self, cfg_dict: dict, run_url: str, refs: list[ShardRef], extractor_factory: Callable | None = None) -> Iterator[ShardResult]:
        """Same contract as ``LocalExecutor.map_features``: yields a :class:`ShardResult` per
        shard as each finishes; workers write the files."""
        return _interruptible(self._map_features(cfg_dict, run_url, refs))

    def _map_features(self, cfg_dict: dict, run_url: str, refs: list[ShardRef]) -> Iterator[ShardResult]:
        if not refs:
            return
        self.connect()
        active: list[_Job] = []
        try:
            cfg = Config.model_validate(cfg_dict)
            want_emb = "embedding" in cfg.methods
            info: ModelInfo | None = None
            actors: list = []
            if want_emb:
                actors = self._embed_actors(cfg_dict, cfg)
                try:
                    infos = ray.get([a.info.remote() for a in actors])
                except ray.exceptions.RayError as e:
                    self.close_actors()
                    raise ConfigError(f"the embedding actors could not load the model {cfg.embedding.spec!r}: {_short(e)}") from None
                info = infos[0]
                if any(i != info for i in infos):  # e.g. nodes with different model files
                    self.close_actors()
                    raise ConfigError(f"embedding actors disagree on the model: {sorted(set(infos), key=str)}")
            retries = self._retries()
            scan = self._fn(
                "scan", _scan_shard, num_cpus=cfg.ray.cpus_per_task, max_retries=retries, retry_exceptions=False,
                _generator_backpressure_num_objects=_BACKPRESSURE,
            )
            write = self._fn("write", _write_shard, num_cpus=_WRITE_CPUS, max_retries=retries, retry_exceptions=True)
            # Large values go to the object store once, not once per task.
            cfg_ref, info_ref = ray.put(cfg_dict), ray.put(info)

            todo: deque[_Job] = deque(_Job(r) for r in refs)
            limit = self._max_in_flight()
            capacity = max(1, len(actors) * _QUEUE_PER_ACTOR)
            embedding: dict[Any, int] = {}  # embed ref -> actor index, while unfinished
            per_actor = [0] * len(actors)

            def start(job: _Job) -> None:
                job.gen = scan.remote(cfg_ref, info_ref, job.ref)
                job.held, job.embeds, job.write = None, [], None
                active.append(job)

            def dispatch(job: _Job, chunk_ref) -> None:
                k = min(range(len(actors)), key=per_actor.__getitem__)
                r = actors[k].embed.remote(chunk_ref)
                per_actor[k] += 1
                embedding[r] = k
                job.embeds.append(r)

            t_limit = time.monotonic()
            while todo or active:
                if not self.cfg.ray.max_in_flight and time.monotonic() - t_limit > _LIMIT_REFRESH_S:
                    limit, t_limit = self._max_in_flight(), time.monotonic()  # nodes join and leave
                while todo and len(active) < limit:
                    start(todo.popleft())
                if embedding:
                    done, _ = ray.wait(list(embedding), num_returns=len(embedding), timeout=0, fetch_local=False)
                    for r in done:
                        per_actor[embedding.pop(r)] -= 1
                waitables = [j.write for j in active if j.write is not None]
                if len(embedding) < capacity or not want_emb:
                    waitables += [j.gen for j in active if j.gen is not None]
                elif embedding:
                    waitables += list(embedding)  # full: wake when an embedding finishes
                if not waitables:
                    continue
                ready, _ = ray.wait(waitables, num_returns=1, timeout=_WAIT_S, fetch_local=False)
                ready_set = set(ready)
                for job in list(active):
                    if job.gen is not None and job.gen in ready_set:
                        self._pump(job, dispatch, lambda: len(embedding) < capacity or not want_emb, write, cfg_ref, info_ref, run_url)
                    if job.write is not None and job.write in ready_set:
                        active.remove(job)
                        try:
                            marker = ray.get(job.write)
                        except ray.exceptions.RayError as e:
                            job.attempt += 1
                            err = _short(e)
                            if job.attempt > retries:
                                yield ShardResult(job.ref, None, err)
                            else:
                                log.warning("shard %s failed (attempt %d), restarting it: %s", job.ref.shard_id, job.attempt, err)
                                todo.append(job)
                            continue
                        log.debug("shard %s done", job.ref.shard_id)
                        yield ShardResult(job.ref, marker)
        except BaseException as e:
            self._cancel(active)  # nothing of this call runs on after it
            if not isinstance(e, Exception):  # interrupted (dedup.interrupt), or the consumer stopped
                self.close()  # the actors, and Ray itself if this executor started it
            raise
        finally:
            # The actors and their reserved resources are this call's: release them even when
            # the consumer stops early or the driver is interrupted.
            self.close_actors()

    @staticmethod
    def _cancel(jobs: list[_Job]) -> None:
        """Cancel the scan and write tasks of ``jobs`` (forced: their workers are killed; a write
        killed mid-file leaves only a temp file, its marker is written last). The embedding
        calls are actor tasks: they end with the actors (:meth:`close_actors`)."""
        for job in jobs:
            for r in (job.gen, job.write):
                if r is not None:
                    _cancel_ref(r)

    @staticmethod
    def _pump(job: _Job, dispatch, has_room, write, cfg_ref, info_ref, run_url) -> None:
        """Take what the scan generator has ready: every item but the last is a chunk to embed."""
        while has_room():
            try:
                r = job.gen._next_sync(timeout_s=0)
            except StopIteration:
                # job.held is the ("scan", ...) item (or the task's error, which the write
                # task then raises, so the driver sees it and restarts the shard).
                last = job.held if job.held is not None else job.gen.completed()
                job.gen = None
                log.debug("shard %s scanned (%d chunks); writing", job.ref.shard_id, len(job.embeds))
                job.write = write.remote(cfg_ref, info_ref, run_url, job.ref, last, *job.embeds)
                job.held = None
                return
            if r.is_nil():
                return
            if job.held is not None:
                dispatch(job, job.held)
            job.held = r

    # -- generic per-item work (candidate search per IVF list / hash chunk) -------------------
    def map_units(
        self, fn: Callable, items: Iterable, *, num_cpus: float | None = None, num_gpus: float = 0, shared: Any = None,
    ) -> Iterator[tuple[Any, Any, str | None]]:
        """Run ``fn(item)`` as one Ray task per item, at most ``ray.max_in_flight`` at a time;
        yields ``(item, result, None)`` or ``(item, None, error)`` as tasks finish (any order).
        Failed tasks are retried (``run.retries``), including when a worker dies.

        With ``shared`` (e.g. the embedding matrix), it is put in the object store once and
        tasks call ``fn(shared, item)``; numpy arrays arrive zero-copy from shared memory.
        ``shared`` may already be a reference from :meth:`put` (several calls, one copy)."""
        return _interruptible(self._map_units(fn, items, num_cpus=num_cpus, num_gpus=num_gpus, shared=shared))

    def _map_units(self, fn: Callable, items: Iterable, *, num_cpus: float | None, num_gpus: float, shared: Any) -> Iterator:
        self.connect()
        task = ray.remote(_unit).options(
            num_cpus=self.cfg.ray.cpus_per_task if num_cpus is None else num_cpus, num_gpus=num_gpus,
            max_retries=self._retries(), retry_exceptions=True,
            name=getattr(fn, "__name__", "unit"),  # the dashboard shows fn's name, not the wrapper's
        )
        if shared is not None:
            shared_ref = shared if isinstance(shared, ray.ObjectRef) else self.put(shared)
            yield from self._drain(task, items, lambda item: task.remote(fn, item, shared_ref))
            return
        yield from self._drain(task, items, lambda item: task.remote(fn, item))

    def put(self, obj: Any) -> Any:
        """Put ``obj`` in the object store once (numpy arrays contiguous, read zero-copy)."""
        self.connect()
        return ray.put(np.ascontiguousarray(obj) if isinstance(obj, np.ndarray) else obj)

    def _drain(self, task, items: Iterable, submit: Callable) -> Iterator[tuple[Any, Any, str | None]]:
        pending: dict[Any, Any] = {}
        it = iter(items)
        limit = self._max_in_flight()
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < limit:
                try:
                    item = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending[submit(item)] = item
            if not pending:
                break
            try:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for r in ready:
                    item = pending.pop(r)
                    try:
                        yield item, ray.get(r), None
                    except ray.exceptions.RayError as e:
                        yield item, None, _short(e)
            except BaseException:  # interrupted, or the consumer stopped: cancel what still runs
                for r in pending:
                    _cancel_ref(r)
                raise


def _unit(fn: Callable, item: Any, *shared: Any) -> Any:
    """One ``map_units`` task on a worker: ``fn(item)``, or ``fn(shared, item)``."""
    crash_point("ray:unit")  # fault-injection tests hold or kill a unit here (dedup.faults)
    return fn(*shared, item)


def _interruptible(gen: Iterator) -> Iterator:
    """``gen``, with a KeyboardInterrupt that Ray raised on our SIGINT/SIGTERM turned back into
    :class:`dedup.interrupt.Interrupted` (see ``dedup.interrupt._handler``)."""
    try:
        yield from gen
    except KeyboardInterrupt as e:
        new = interrupt.as_interrupted(e)
        if new is e:
            raise
        raise new from None


def _cancel_ref(r) -> None:
    try:
        ray.cancel(r, force=True)
    except Exception:  # noqa: BLE001 - already finished, or gone with its worker
        pass


def _short(e: BaseException) -> str:
    """A one-line reason from a Ray error: the user exception's type and message, not Ray's
    traceback (for an actor that died in ``__init__`` the exception is only in the text)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and not isinstance(cause, ray.exceptions.RayError):
        return f"{type(cause).__name__}: {cause}"[:500]
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if _EXC_LINE.match(ln):
            return f"{type(e).__name__}: {ln}"[:500]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:500]


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)(:|$)")
