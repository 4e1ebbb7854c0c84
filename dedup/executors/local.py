"""Local executor: shards through the features phase in this process or a process pool.

Each worker process builds one :class:`FeatureExtractor` (so the model loads once per
process) and writes its shards' files itself; the parent only collects the markers. A shard
whose task raises is retried; a worker that dies (OOM killer, segfault) breaks the pool,
which is rebuilt and the unfinished shards resubmitted.

Stopping (see :mod:`dedup.interrupt`): only a window of ``2 × workers`` shards is queued at a
time, so an interrupt (or a consumer that stops early) has no backlog to wait for; the workers
are then SIGKILLed and joined before the exception leaves :meth:`LocalExecutor.map_features`
(their outputs are renamed into place and their markers written last, so killing one mid-shard
loses only that shard's work). Workers ignore SIGINT and die with the parent process.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from dedup import interrupt
from dedup.executors import ShardResult
from dedup.records import ShardRef

log = logging.getLogger(__name__)

_WORKER: dict = {}


_JOIN_S = 10.0  # how long to wait for a SIGKILLed worker to be gone


def _init_worker(cfg_dict: dict, run_url: str, threads: int, parent_pid: int) -> None:
    interrupt.worker_setup(parent_pid)
    # Keep each process to its share of the cores (set before torch/onnxruntime load).
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    _WORKER.update(cfg=cfg_dict, run_url=run_url, threads=threads)


def _worker_extractor():
    if "extractor" not in _WORKER:
        from dedup.config import Config
        from dedup.io.rundir import RunDir
        from dedup.phases.features import FeatureExtractor

        try:
            import torch

            torch.set_num_threads(_WORKER["threads"])
        except ImportError:  # pragma: no cover
            pass
        _WORKER["extractor"] = FeatureExtractor(Config.model_validate(_WORKER["cfg"]))
        _WORKER["run"] = RunDir(_WORKER["run_url"])
    return _WORKER["extractor"], _WORKER["run"]


def _task(ref: ShardRef) -> dict:
    from dedup.phases.features import run_shard

    extractor, run = _worker_extractor()
    return run_shard(extractor, run, ref)


class LocalExecutor:
    in_process = True  # map_units runs on threads here (features: worker processes)

    def __init__(self, workers: int, retries: int = 2, on_workers: Callable[[list[int]], None] | None = None,
                 threads: int = 0):
        self.workers = max(1, workers)
        self.threads = threads  # worker threads of map_units (0: one per core)
        self.retries = retries
        self.on_workers = on_workers  # told the pids of each pool's workers (the run lock records them)

    def map_features(self, cfg_dict: dict, run_url: str, refs: list[ShardRef], extractor_factory: Callable) -> Iterator[ShardResult]:
        if not refs:
            return
        if self.workers == 1 or len(refs) == 1:
            yield from self._serial(run_url, refs, extractor_factory)
        else:
            yield from self._pool(cfg_dict, run_url, refs)

    # -- generic per-item work (the candidate search's tasks, the outlier score's units) ----------
    def map_units(self, fn: Callable, items: Iterable, *, shared: Any = None) -> Iterator[tuple[Any, Any, str | None]]:
        """The executor contract of :class:`dedup.compute.search.driver.TaskMap`: ``fn(item)``
        (``fn(shared, item)`` with ``shared``) on worker threads of this process (the search
        kernels release the GIL in BLAS and faiss), yielding ``(item, result, error)`` as each
        finishes; ``run.workers`` threads (0: one per core)."""
        from dedup.compute.search.driver import ThreadMap

        return ThreadMap(self.threads).map_units(fn, items, shared=shared)

    def put(self, obj: Any) -> Any:
        """Nothing to hand over: the threads read the caller's objects."""
        return obj

    def _serial(self, run_url: str, refs: list[ShardRef], extractor_factory: Callable) -> Iterator[ShardResult]:
        from dedup.io.rundir import RunDir
        from dedup.phases.features import run_shard

        extractor = extractor_factory()
        run = RunDir(run_url)
        for ref in refs:
            err = None
            for attempt in range(self.retries + 1):
                try:
                    yield ShardResult(ref, run_shard(extractor, run, ref))
                    break
                except Exception as e:  # noqa: BLE001 - recorded as a shard failure
                    err = f"{type(e).__name__}: {e}"
                    log.warning("shard %s failed (attempt %d): %s", ref.shard_id, attempt + 1, err)
            else:
                yield ShardResult(ref, None, err)

    def _pool(self, cfg_dict: dict, run_url: str, refs: list[ShardRef]) -> Iterator[ShardResult]:
        cores = os.cpu_count() or 1
        threads = max(1, cores // self.workers)
        attempts = {r: 0 for r in refs}
        todo = deque(refs)
        window = 2 * self.workers  # queued at most: an interrupt has no backlog to wait for
        while todo:
            ctx = mp.get_context("spawn")
            broken = False
            pool = ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=_init_worker, initargs=(cfg_dict, run_url, threads, os.getpid())
            )
            futures: dict = {}
            try:
                while todo or futures:
                    if todo and len(futures) < window:
                        self._submit(pool, futures, todo, window)
                    done, _ = wait(set(futures), return_when=FIRST_COMPLETED)
                    for fut in done:
                        ref = futures.pop(fut)
                        try:
                            yield ShardResult(ref, fut.result())
                        except BrokenProcessPool as e:
                            broken = True
                            attempts[ref] += 1
                            if attempts[ref] > self.retries:
                                yield ShardResult(ref, None, f"worker process died: {e}")
                            else:
                                todo.append(ref)
                        except Exception as e:  # noqa: BLE001
                            attempts[ref] += 1
                            if attempts[ref] > self.retries:
                                yield ShardResult(ref, None, f"{type(e).__name__}: {e}")
                            else:
                                todo.append(ref)
                    if broken:
                        for fut, ref in futures.items():
                            fut.cancel()
                            if ref not in todo:
                                todo.append(ref)
                        break
            except BaseException:  # interrupted, or the consumer stopped: no worker may go on
                _terminate(pool)
                raise
            pids = _pids(pool)  # (shutdown forgets them)
            pool.shutdown(wait=True)
            interrupt.unregister_workers(pids)
            if broken:
                log.warning("a worker process died; restarting the pool for %d shard(s)", len(todo))

    def _submit(self, pool: ProcessPoolExecutor, futures: dict, todo: deque, window: int) -> None:
        """Top the queue up to ``window`` shards; tell who needs to know the workers' pids."""
        before = set(_pids(pool))
        with interrupt.deferred():  # a worker starts with SIGINT/SIGTERM blocked (see worker_setup)
            while todo and len(futures) < window:
                ref = todo.popleft()
                futures[pool.submit(_task, ref)] = ref
        pids = _pids(pool)
        if set(pids) - before:
            interrupt.register_workers(pids)
            if self.on_workers is not None:
                self.on_workers(pids)


def _pids(pool: ProcessPoolExecutor) -> list[int]:
    procs = getattr(pool, "_processes", None) or {}
    return sorted(p.pid for p in list(procs.values()) if p.pid)


def _terminate(pool: ProcessPoolExecutor) -> None:
    """SIGKILL the pool's workers (a running shard is abandoned: its temp file is removed by the
    next run, its marker was never written), cancel what is queued, and wait until every worker
    is gone, so that nothing writes into the run directory any more."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        try:
            p.kill()
        except (OSError, ValueError):  # already gone / closed
            pass
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        try:
            p.join(_JOIN_S)
        except (OSError, ValueError, AssertionError):
            pass
    # and the pool's manager thread, which closes its wake-up pipe as it ends: left running, the
    # interpreter's exit hook (concurrent.futures' _python_exit, which wakes it without a lock
    # in 3.11; cf. CPython gh-125451) can write to that pipe while it is being closed and print
    # "OSError: Bad file descriptor" under the one-line interrupt message
    manager = getattr(pool, "_executor_manager_thread", None)
    if manager is not None:
        manager.join(_JOIN_S)
    still = [p.pid for p in procs if p.is_alive()] if procs else []
    if still:  # pragma: no cover - SIGKILL does not fail short of an uninterruptible sleep
        log.warning("worker process(es) %s did not exit after SIGKILL", still)
    else:
        interrupt.unregister_workers(p.pid for p in procs)
