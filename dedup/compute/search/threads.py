"""Worker threads and library thread pinning: the searches parallelise over independent pieces
(units, row blocks) with Python threads, BLAS/OpenMP/torch held to one thread each inside them."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager

__all__ = [
    "n_threads",
    "pmap",
    "single_threaded_libs",
]


def n_threads(threads: int) -> int:
    return int(threads) if threads and threads > 0 else max(1, os.cpu_count() or 1)


@contextmanager
def single_threaded_libs() -> Iterator[None]:
    """BLAS and faiss (OpenMP) to one thread each, restored afterwards.

    We parallelise over independent pieces (units, blocks) with Python threads instead:
    BLAS/OpenMP thread pools on many small products are slow, and several times slower still
    when the cores are shared with other processes (measured in docs/candidates.md).
    """
    import faiss
    from threadpoolctl import threadpool_limits

    prev = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    # flat search (the coarse stage): 1 024 query rows per BLAS block instead of 4 096 keeps the
    # distance block in cache: 27% faster at 3 906 centroids, 10% at 2 000 (measured)
    prev_bs = faiss.cvar.distance_compute_blas_query_bs
    faiss.cvar.distance_compute_blas_query_bs = 1024
    torch = sys.modules.get("torch")  # only its fp16 conversion runs here (see rows_f32)
    prev_torch = torch.get_num_threads() if torch is not None else 0
    if torch is not None:
        torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        faiss.omp_set_num_threads(prev)
        faiss.cvar.distance_compute_blas_query_bs = prev_bs
        if torch is not None:
            torch.set_num_threads(prev_torch)


def pmap(fn: Callable, items: list, workers: int) -> Iterator:
    """Map in a thread pool, yielding results in completion order as (index, result)."""
    if workers <= 1 or len(items) <= 1:
        for k, it in enumerate(items):
            yield k, fn(it)
        return
    with ThreadPoolExecutor(max_workers=workers) as ex:
        futs = {ex.submit(fn, it): k for k, it in enumerate(items)}
        try:
            for f in as_completed(list(futs)):
                k = futs.pop(f)  # a finished future keeps its result: not past its turn
                res = f.result()
                del f
                yield k, res
        except BaseException:  # interrupted (dedup.interrupt) or abandoned: do not run the queue first
            ex.shutdown(wait=False, cancel_futures=True)
            raise
