"""Tile kernels of the cosine searches: rows gathered and converted from float16, the float32
tile product (:class:`Matmul`: BLAS on CPU; faiss on GPU only with ``use_gpu``), candidates
kept with a rounding margin and rescored exactly in float64 (see :mod:`dedup.compute.search`)."""

from __future__ import annotations

import mmap
import os
import sys
import threading

import numpy as np

__all__ = [
    "Matmul",
    "exact_scores",
    "f32_margin",
    "gpu_available",
    "drop_pages",
    "release_pages",
    "rows_f32",
    "take_rows",
    "tile_candidates",
    "tile_pairs",
    "want_fast_f16",
]

_F32 = np.float32


def gpu_available() -> bool:
    """True when faiss sees a CUDA GPU (faiss-gpu installed and a device visible)."""
    try:
        import faiss

        return faiss.get_num_gpus() > 0
    except Exception:  # noqa: BLE001  # pragma: no cover - faiss missing or broken CUDA
        return False



# numpy converts float16 one value at a time (≈2.5 ns per value on the benchmark machine: a
# quarter of the pair stage); torch uses the CPU's F16C instructions (≈0.15 ns). torch comes
# with the [embed] extra (without it numpy converts), and importing it costs ~2 s and ~480 MB
# resident (264 MB of heap and 214 MB of its libraries, measured here: a quarter of issue #18's
# 2 GB driver budget at 10⁷ rows, half of 1 GB at 10⁶), so a search imports it only when its
# conversions would cost far more than that: from 2³⁴ values (~40 s of numpy conversion; the
# outlier score at 10⁶ rows converts 3·10⁹, ~8 s); once loaded it is always used.
_FAST_F16_MIN_VALUES = 1 << 34


def want_fast_f16(x: np.ndarray, values: float) -> None:
    """Load torch for fp16 conversion when converting ``values`` float16 values pays for it."""
    if x.dtype != np.float16 or "torch" in sys.modules or values < _FAST_F16_MIN_VALUES:
        return
    try:
        import torch  # noqa: F401
    except Exception:  # noqa: BLE001  # pragma: no cover - torch missing or broken: numpy conversion
        pass


def rows_f32(x: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
    """Gather rows (sorted indices read a memmap front to back) and convert to float32
    (bit-exact either way: every float16 value is a float32 value)."""
    a = take_rows(x, rows)
    torch = sys.modules.get("torch") if a.dtype == np.float16 and a.size >= 4096 else None
    if torch is None:
        out = np.ascontiguousarray(a, dtype=_F32)
    else:
        if not (a.flags.writeable and a.flags.c_contiguous):
            a = np.array(a, order="C")  # torch wants a writable buffer (memmap slices are not)
        out = np.empty(a.shape, _F32)
        torch.from_numpy(out).copy_(torch.from_numpy(a))
    return out


def take_rows(x: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
    """``x[rows]`` (a copy for an index array, a view for a slice). The rows of a file mapping
    (np.memmap) picked by an index array are read from the file (``pread``) instead of through
    the mapping: a page fault maps whole folios of cached pages around the row (up to ~2 MB a
    row here: 100 scattered rows of ``index/embeddings.f16`` made 170 MB resident), which would
    count in the resident set until released. Slices are read through the mapping, whose pages
    are released every :data:`RELEASE_BYTES` (:func:`release_pages`). Mappings of up to
    :data:`MAPPED_MAX` bytes are read through the mapping alone (they may stay resident: fewer
    system calls, rows read again cost nothing)."""
    m = _mapping(x)
    if m is None or len(m) <= MAPPED_MAX:
        return x[rows]
    if not isinstance(rows, slice):
        got = _pread_rows(x, np.asarray(rows))
        if got is not None:
            return got
    a = x[rows]
    release_pages(x, rows)  # a slice's pages are touched after this (accounted ahead)
    return a


def _pread_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
    """The rows (int indices) of a read-only, row-contiguous 2-d array on a memmap read from
    its file; None where that is not possible (e.g. a file removed once mapped: then the
    mapping)."""
    m = _mapping(x)
    mm = _memmap_of(x)
    name = getattr(mm, "filename", None)
    if (m is None or mm is None or name is None or x.ndim != 2 or mm.mode != "r" or rows.dtype.kind not in "iu"
            or rows.ndim != 1 or x.strides != (x.shape[1] * x.itemsize, x.itemsize)):
        return None
    try:
        fd = os.open(name, os.O_RDONLY)
    except OSError:
        return None
    try:
        base = np.frombuffer(m, np.uint8).ctypes.data  # the mapping starts at this file offset:
        start = mm.offset - mm.offset % mmap.ALLOCATIONGRANULARITY
        pos0 = x.ctypes.data - base + start
        row = x.strides[0]
        n = x.shape[0]
        r = rows.astype(np.int64)
        if len(r) and (r.min() < -n or r.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        r = np.where(r < 0, r + n, r)
        out = np.empty((len(r), x.shape[1]), x.dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8).data)
        # runs of consecutive rows (in the order given) in one read each
        cut = np.flatnonzero(np.diff(r) != 1) + 1
        starts = np.concatenate([[0], cut]).tolist()
        ends = np.concatenate([cut, [len(r)]]).tolist()
        for a, b, first in zip(starts, ends, r[starts].tolist() if len(r) else []):
            want = (b - a) * row
            got = os.preadv(fd, [buf[a * row : b * row]], pos0 + first * row)
            if got != want:  # pragma: no cover - a file shorter than its mapping
                return None
        return out
    finally:
        os.close(fd)


# Pages of a file mapping (the staged float16 embeddings, ``index/embeddings.f16``) count in the
# process's resident set once touched, until the kernel reclaims them: reading every row once
# (the outlier score, the in-memory search) made 1 KB a row resident (1 GB at 10⁶ rows). After
# about this many bytes touched in a mapping, its pages are dropped from this process's page
# tables (madvise MADV_DONTNEED: they stay in the page cache, a later read maps them again, the
# data is the file's either way: the mapping is read-only).
RELEASE_BYTES = 64 << 20
# Mappings up to this size are read through the mapping and left resident (take_rows).
MAPPED_MAX = 256 << 20
# A read fault on a file mapping maps the cached pages around it too (Linux "fault-around",
# 64 KiB by default): a row read alone can make that much resident. Reads are accounted in
# windows of this size.
FAULT_AROUND = max(mmap.PAGESIZE, 1 << 16)
_read_since: dict[int, int] = {}
_read_lock = threading.Lock()


def _memmap_of(x: np.ndarray) -> np.memmap | None:
    """The np.memmap ``x`` is, or is a view of (e.g. ``np.asarray`` of a memmap)."""
    b: object = x
    for _ in range(8):
        if isinstance(b, np.memmap):
            return b
        b = getattr(b, "base", None)
        if b is None:
            return None
    return None


def _mapping(x: np.ndarray) -> mmap.mmap | None:
    b: object = x
    for _ in range(8):
        b = getattr(b, "base", None)
        if b is None or isinstance(b, mmap.mmap):
            return b
    return None


def release_pages(x: np.ndarray, rows: np.ndarray | slice) -> None:
    """Account the ``rows`` read from ``x`` (a read-only np.memmap; else nothing happens) and,
    every :data:`RELEASE_BYTES` touched, drop the mapping's resident pages (see above)."""
    m = _mapping(x)
    mm = _memmap_of(x)
    if m is None or mm is None or mm.mode != "r":
        return
    row = x.itemsize * (int(np.prod(x.shape[1:])) if x.ndim > 1 else 1)
    if isinstance(rows, slice):
        start, stop, step = rows.indices(x.shape[0])
        touched = max(0, stop - start) * row if step == 1 else len(range(start, stop, step)) * max(row, FAULT_AROUND)
    else:
        r = np.asarray(rows)
        if r.dtype == bool:
            r = np.flatnonzero(r)
        w = r.reshape(-1).astype(np.int64) * row // FAULT_AROUND  # the windows the rows fall in
        if len(w) > 1 and not (w[1:] >= w[:-1]).all():
            w = np.sort(w)
        touched = (int((w[1:] != w[:-1]).sum()) + 1 if len(w) else 0) * FAULT_AROUND
    with _read_lock:
        got = _read_since.get(id(m), 0) + touched
        _read_since[id(m)] = 0 if got >= RELEASE_BYTES else got
    if got >= RELEASE_BYTES:
        drop_pages(x)


def drop_pages(x: np.ndarray) -> None:
    """Drop the resident pages of the file mapping behind ``x`` (an np.memmap not opened
    copy-on-write; else nothing happens) from this process: a shared mapping's pages stay in
    the page cache (dirty ones are written back as usual) and are mapped again when read."""
    m = _mapping(x)
    mm = _memmap_of(x)
    if m is None or mm is None or mm.mode == "c":
        return
    from dedup.memory import unmap_resident

    unmap_resident(m)


def f32_margin(d: int) -> float:
    # above the worst-case float32 rounding of a d-term dot product of vectors of norm ≤ ~1
    return d * 2.0**-22 + 1e-6


_GPU_RES = None
_GPU_LOCK = threading.Lock()


class Matmul:
    """S = A @ B.T in float32: BLAS on CPU, faiss ``pairwise_distance_gpu`` on GPU."""

    def __init__(self, use_gpu: bool):
        self.gpu = bool(use_gpu)
        if self.gpu:
            import faiss

            global _GPU_RES
            with _GPU_LOCK:
                if _GPU_RES is None:
                    _GPU_RES = faiss.StandardGpuResources()
            self._faiss = faiss

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if self.gpu:
            f = self._faiss
            with _GPU_LOCK:
                return f.pairwise_distance_gpu(_GPU_RES, a, b, metric=f.METRIC_INNER_PRODUCT)
        return a @ b.T


def exact_scores(a: np.ndarray, b: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float64 dot products of a[r[k]] and b[c[k]] (exact for fp16-valued inputs, so the value
    does not depend on how it is computed)."""
    rs, inv_r = np.unique(r, return_inverse=True)
    cs, inv_c = np.unique(c, return_inverse=True)
    if len(rs) * len(cs) <= 4 * len(r):  # dense: one float64 product of the sub-block
        sub = a[rs].astype(np.float64) @ b[cs].astype(np.float64).T
        return sub[inv_r, inv_c]
    out = np.empty(len(r), np.float64)
    step = max(1, (1 << 21) // max(1, a.shape[1]))
    for s in range(0, len(r), step):
        e = min(len(r), s + step)
        out[s:e] = np.einsum("ij,ij->i", a[r[s:e]].astype(np.float64), b[c[s:e]].astype(np.float64))
    return out


def tile_candidates(s: np.ndarray, lo: float | np.float32, diag: tuple[int, int] | None):
    """Positions (r, c) of tile ``s`` holding a value ≥ lo, each symmetric pair once (see
    :func:`tile_pairs` for ``diag``); None when there are none. ``s`` is overwritten."""
    lo = np.float32(lo)
    sym = diag is not None and diag[0] > 0
    if sym:
        assert diag is not None
        n_sym, offset = diag
        r = np.arange(max(0, -offset), min(n_sym, s.shape[1] - offset))
        s[r, r + offset] = -np.inf  # a row and itself (else every such row would be a hit)
    # Candidates are rare: one reduction finds the rows holding any, and only those are
    # compared in full (a compare + nonzero over the whole tile cost ~15% of the pair stage).
    hit = np.flatnonzero(s.max(axis=1) >= lo)
    if len(hit) == 0:
        return None
    if 2 * len(hit) > len(s):  # dense (e.g. a list of near-identical rows): no copy of the rows
        r, c = np.nonzero(s >= lo)
    else:
        rr, c = np.nonzero(s[hit] >= lo)
        r = hit[rr]
    del s
    if sym:
        keep = (r >= n_sym) | (c > r + offset)  # each symmetric pair once (not its mirror)
        r, c = r[keep], c[keep]
        if len(r) == 0:
            return None
    return r, c


def tile_pairs(mm: Matmul, xr, xc, rows_r, rows_c, threshold: float, diag: tuple[int, int] | None):
    """Pairs (rows_r[r], rows_c[c]) with exact cosine ≥ threshold in one tile.

    ``diag = (n_sym, offset)``: rows r < n_sym belong to the symmetric (member × member) part
    and keep only columns c > r + offset (each pair once); other rows keep every column."""
    got = tile_candidates(mm(xr, xc), threshold - f32_margin(xr.shape[1]), diag)
    if got is None:
        return None
    r, c = got
    sc = exact_scores(xr, xc, r, c)
    ok = sc >= threshold
    if not ok.any():
        return None
    return rows_r[r[ok]], rows_c[c[ok]], sc[ok].astype(_F32)
