"""The executor contract of the distributed work (dedup.compute.search.driver.TaskMap): the local
executor and the in-process ThreadMap run the same tasks as Ray; the search has one driver."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from dedup.compute.search.driver import SearchTaskError, ThreadMap, search_embeddings
from dedup.compute.search.ivf import IVFParams
from dedup.executors.local import LocalExecutor

ROOT = Path(__file__).resolve().parent.parent


def _half_or_fail(shared, item):
    if item == 3:
        raise ValueError("three is bad")
    return shared[item] / 2


@pytest.mark.parametrize("executor", [ThreadMap(2), ThreadMap(1), LocalExecutor(1, threads=2)], ids=["threads", "serial", "local"])
def test_map_units_yields_every_item_once_with_its_error(executor):
    shared = executor.put(np.arange(10, dtype=np.float64))
    got = {item: (res, err) for item, res, err in executor.map_units(_half_or_fail, range(6), shared=shared)}
    assert sorted(got) == list(range(6))
    assert got[3] == (None, "ValueError: three is bad")
    assert all(got[k] == (k / 2, None) for k in (0, 1, 2, 4, 5))


def _data(n=6000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x[1::50] = x[0::50][: len(x[1::50])] + 0.05 * rng.normal(size=(len(x[1::50]), d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


class _Backwards(ThreadMap):
    """Runs the tasks in reverse order (as a remote executor may finish them)."""

    def map_units(self, fn, items, *, shared=None):
        yield from reversed(list(super().map_units(fn, items, shared=shared)))


def test_one_driver_same_pairs_whatever_the_executor_and_task_order():
    x = _data()
    ok = np.ones(len(x), bool)
    ok[7] = False
    params = IVFParams.auto(int(ok.sum()), x.shape[1], threshold=0.9)
    a = search_embeddings(x, 0.9, params, valid=ok, executor=ThreadMap(1), keep_nearest=True)
    b = search_embeddings(x, 0.9, params, valid=ok, executor=_Backwards(2), keep_nearest=True)
    c = search_embeddings(x, 0.9, params, valid=ok, executor=LocalExecutor(1, threads=2))
    assert a.stats.method == "ivf" and a.stats.valid == len(x) - 1 and len(a.pairs) > 50
    assert a.pairs == b.pairs == c.pairs
    assert a.lists is not None and b.lists is not None and c.lists is None
    assert np.array_equal(a.lists.nearest, b.lists.nearest) and (a.lists.nearest[7] == -1).all()


class _Failing(ThreadMap):
    def map_units(self, fn, items, *, shared=None):
        for item, _res, _err in super().map_units(fn, items, shared=shared):
            yield item, None, "OSError: worker lost"


def test_a_failed_task_is_one_clear_error():
    x = _data()
    with pytest.raises(SearchTaskError, match="coarse stage failed after retries: OSError: worker lost"):
        search_embeddings(x, 0.9, IVFParams.auto(len(x), x.shape[1], threshold=0.9), executor=_Failing(1))


def test_ray_is_imported_only_under_executors():
    pattern = re.compile(r"^\s*(import ray|from ray[ .])", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "dedup").rglob("*.py")
                 if "executors" not in p.parts and pattern.search(p.read_text())]
    assert offenders == []
