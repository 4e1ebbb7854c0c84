"""Peak memory of the outlier score's plan built from a search's kept lists at 10^7 rows.

    python benchmarks/outlier_plan_memory.py LABEL [CODE_DIR]   # CODE_DIR: the dedup checkout to time (default: this one)

10^7 rows, 20 000 lists, each row's 8 nearest lists (own first, random): ``knn._plan_from_lists``
(7 visits a row, 7·10^7 in all). Prints the peak resident memory above the start, what the plan
holds, and the CPU seconds (docs/scale.md, "The 10^7 run").
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, sys.argv[2] if len(sys.argv) > 2 else str(Path(__file__).resolve().parent.parent))
from dedup.compute.search import knn
from dedup.compute.search.ivf import IVFParams, NearestLists

n, nlist, keep, nprobe = 10_000_000, 20000, 8, 8
rng = np.random.default_rng(0)
nearest = rng.integers(0, nlist, (n, keep), dtype=np.int32)
assign = nearest[:, 0].copy()


class C:  # a stand-in quantizer: build_plan reads params.nlist and centroids
    params = IVFParams.auto(n, 512)
    centroids = np.zeros((nlist, 8), np.float32)


C.params = C.params.__class__(**{**vars(C.params), "nlist": nlist})


idx = np.arange(n, dtype=np.int64)


def hwm():
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1]) // 1024


def rss():
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmRSS")).split()[1]) // 1024


base = rss()
t = time.process_time()
plan = knn._plan_from_lists(NearestLists(C, assign, nearest), idx, n, nprobe)
print(sys.argv[1] if len(sys.argv) > 1 else "this checkout", "visits", len(plan.visitor_rows), "peak above start MB", hwm() - base, "held MB", rss() - base, "cpu s", round(time.process_time() - t, 1))
