"""Local executor: shards through the features phase in this process or a process pool.

Each worker process builds one :class:`FeatureExtractor` (so the model loads once per
process) and writes its shards' files itself; the parent only collects the markers. A shard
whose task raises is retried; a worker that dies (OOM killer, segfault) breaks the pool,
which is rebuilt and the unfinished shards resubmitted.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from dedup.records import ShardRef

log = logging.getLogger(__name__)

_WORKER: dict = {}


def _init_worker(cfg_dict: dict, run_url: str, threads: int) -> None:
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


Result = tuple[ShardRef, dict | None, str | None]  # (shard, marker, error)


class LocalExecutor:
    def __init__(self, workers: int, retries: int = 2):
        self.workers = max(1, workers)
        self.retries = retries

    def map_features(self, cfg_dict: dict, run_url: str, refs: list[ShardRef], extractor_factory: Callable) -> Iterator[Result]:
        if not refs:
            return
        if self.workers == 1 or len(refs) == 1:
            yield from self._serial(run_url, refs, extractor_factory)
        else:
            yield from self._pool(cfg_dict, run_url, refs)

    def _serial(self, run_url: str, refs: list[ShardRef], extractor_factory: Callable) -> Iterator[Result]:
        from dedup.io.rundir import RunDir
        from dedup.phases.features import run_shard

        extractor = extractor_factory()
        run = RunDir(run_url)
        for ref in refs:
            err = None
            for attempt in range(self.retries + 1):
                try:
                    yield ref, run_shard(extractor, run, ref), None
                    break
                except Exception as e:  # noqa: BLE001 - recorded as a shard failure
                    err = f"{type(e).__name__}: {e}"
                    log.warning("shard %s failed (attempt %d): %s", ref.shard_id, attempt + 1, err)
            else:
                yield ref, None, err

    def _pool(self, cfg_dict: dict, run_url: str, refs: list[ShardRef]) -> Iterator[Result]:
        cores = os.cpu_count() or 1
        threads = max(1, cores // self.workers)
        attempts = {r: 0 for r in refs}
        todo = list(refs)
        while todo:
            ctx = mp.get_context("spawn")
            broken = False
            with ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker, initargs=(cfg_dict, run_url, threads)) as pool:
                futures = {pool.submit(_task, r): r for r in todo}
                todo = []
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        ref = futures[fut]
                        try:
                            yield ref, fut.result(), None
                        except BrokenProcessPool as e:
                            broken = True
                            attempts[ref] += 1
                            if attempts[ref] > self.retries:
                                yield ref, None, f"worker process died: {e}"
                            else:
                                todo.append(ref)
                        except Exception as e:  # noqa: BLE001
                            attempts[ref] += 1
                            if attempts[ref] > self.retries:
                                yield ref, None, f"{type(e).__name__}: {e}"
                            else:
                                todo.append(ref)
                    if broken:
                        for fut in pending:
                            fut.cancel()
                            ref = futures[fut]
                            if ref not in todo:
                                todo.append(ref)
                        break
            if broken:
                log.warning("a worker process died; restarting the pool for %d shard(s)", len(todo))
