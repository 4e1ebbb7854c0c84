"""sha256 digests on the driver without a 32-byte value for every row: the run's features
table holds their first 8 bytes (``sha256_prefix``; a table read whole, e.g. by ``--against``,
may hold the digests), whole digests are read for the few rows that need them (rows whose
prefixes repeat, the linked rows of the grouping checks, a threshold's sample)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa

from dedup.records import Status, status_mask

# The whole sha256 digests of some rows: (rows × 32 uint8, zero rows where unknown; known)
Digests = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def table_digests(table: pa.Table) -> Digests:
    """:data:`Digests` from the table's own ``sha256`` column."""

    def of(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        col = table["sha256"].take(pa.array(np.asarray(rows, np.int64)))
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        return digest_bytes(arr), arr.is_valid().to_numpy(zero_copy_only=False)

    return of


def has_digests(table: pa.Table) -> bool:
    """The table holds sha256 digests or their prefixes (the run's driver table:
    ``sha256_prefix``, the whole digests read from the features files)."""
    return "sha256" in table.column_names or "sha256_prefix" in table.column_names


def copy_counts(table: pa.Table, digests: Digests | None = None, rows: np.ndarray | None = None) -> np.ndarray:
    """How many ok samples hold exactly the same bytes as each sample (1 = unique).
    ``digests``: where the whole digests come from (default: the table's ``sha256``).
    ``rows`` (increasing): the counts of these rows only (the same values), found without an
    n-sized array: the table is scanned :data:`COPY_SCAN_ROWS` rows at a time, and only the
    rows sharing a prefix with one of ``rows`` and with some other row are grouped."""
    from dedup.compute.search.exact import digest_groups

    m = table.num_rows if rows is None else len(rows)
    if not has_digests(table):
        return np.ones(m, np.float64)
    whole = digests or table_digests(table)
    if rows is None:
        every, known = sha_prefixes(table)
        at = np.flatnonzero(known)
        prefix, ok = every[at], status_mask(table["status"], Status.OK)[at]
        del every, known
    else:
        rows = np.asarray(rows, np.int64)
        at, prefix, ok = _sharing_prefixes(table, rows)
    # count per row of ``at`` (the rows with a known digest that matter)
    grouped, gid = digest_groups(prefix, lambda r: whole(at[r])[0])
    count = np.ones(len(at), np.float64)
    if len(grouped):
        c = np.bincount(gid, weights=ok[grouped].astype(np.float64))  # ok rows with these bytes
        count[grouped] = np.where(c[gid] > 0, c[gid], 1.0)
    out = np.ones(m, np.float64)
    if rows is None:
        out[at] = count
        return out
    pos = np.minimum(np.searchsorted(at, rows), max(len(at) - 1, 0))
    found = (at[pos] == rows) if len(at) else np.zeros(m, bool)
    out[found] = count[pos[found]]
    return out


COPY_SCAN_ROWS = 1 << 20  # table rows read at a time by copy_counts(rows=…)


def _sharing_prefixes(table: pa.Table, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(every row with a known digest whose prefix is that of one of ``rows`` and of some
    other row, increasing; their prefixes; whether each is ok): all that counting ``rows``'
    copies needs, as a row's copies share its prefix (a row whose prefix no other row has is
    the only one with its bytes). The table's prefixes are read a slice at a time, three times:
    those of ``rows``, how often each occurs, then the rows of those that repeat (time traded
    for memory: nothing n-sized is held between the passes). Holds 12 B a row of ``rows``."""
    empty = np.empty(0, np.int64), np.empty(0, np.uint64), np.empty(0, bool)
    if not len(rows):
        return empty
    starts = range(0, table.num_rows, COPY_SCAN_ROWS)
    # the rows' known prefixes, read slice by slice (no take over the whole column)
    mine = []
    for s in starts:
        a, b = np.searchsorted(rows, [s, s + COPY_SCAN_ROWS])
        if a < b:
            p, k = sha_prefixes(table.slice(s, COPY_SCAN_ROWS))
            r = rows[a:b] - s
            mine.append(p[r[k[r]]])
    want = np.unique(np.concatenate(mine)) if mine else np.empty(0, np.uint64)
    del mine
    if not len(want):
        return empty

    def slices() -> Iterator[tuple[int, pa.Table, np.ndarray, np.ndarray]]:
        for s in starts:
            part = table.slice(s, COPY_SCAN_ROWS)
            p, k = sha_prefixes(part)
            i = np.minimum(np.searchsorted(want, p), len(want) - 1)
            hit = np.flatnonzero(k & (want[i] == p))
            yield s, part, hit, i[hit]

    seen = np.zeros(len(want), np.int32)
    for _, _, _, at in slices():
        seen += np.bincount(at, minlength=len(want)).astype(np.int32)
    repeats = seen >= 2
    del seen
    found_rows, found_prefix, found_ok = [], [], []
    for s, part, hit, at in slices():
        keep = repeats[at]
        hit = hit[keep]
        found_rows.append(hit + s)
        found_prefix.append(want[at[keep]])
        found_ok.append(status_mask(part["status"], Status.OK)[hit])
    return np.concatenate(found_rows), np.concatenate(found_prefix), np.concatenate(found_ok)


def sha_prefixes(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The ``sha256`` column's first 8 bytes as uint64 (0 where null; 8 bytes a row instead of
    the digests' 32) and where it is known (not null): keys for
    :func:`dedup.compute.search.exact.digest_groups`, which compares whole digests
    (:func:`sha_rows`) where prefixes repeat."""
    from dedup.compute.search.exact import digest_prefixes

    if "sha256" not in table.column_names:  # the driver table holds the prefixes themselves
        pcol = table["sha256_prefix"]
        return (pcol.fill_null(0).to_numpy(zero_copy_only=False).astype(np.uint64),
                pcol.is_valid().to_numpy(zero_copy_only=False))
    col = table["sha256"]
    known = col.is_valid().to_numpy(zero_copy_only=False)
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    out = np.zeros(len(col), np.uint64)
    at = 0
    for c in chunks:
        if len(c):
            out[at : at + len(c)] = digest_prefixes(digest_bytes(c))
        at += len(c)
    out[~known] = 0
    return out, known


def sha_rows(table: pa.Table, rows: np.ndarray) -> np.ndarray:
    """The whole ``sha256`` digests of ``rows`` as (len(rows), w) uint8 (zero rows where null)."""
    return table_digests(table)(rows)[0]


def digest_bytes(arr: pa.Array) -> np.ndarray:
    """A binary array as (len, w) uint8, nulls as zero rows: straight from the buffer for
    fixed-size binary, else value by value (older or hand-made tables) padded to the widest."""
    if pa.types.is_fixed_size_binary(arr.type):
        w = arr.type.byte_width
        raw = np.frombuffer(arr.buffers()[1], np.uint8, count=len(arr) * w, offset=arr.offset * w).reshape(-1, w)
        return np.where(arr.is_valid().to_numpy(zero_copy_only=False)[:, None], raw, 0).astype(np.uint8) \
            if arr.null_count else raw.copy()
    vals = arr.to_pylist()
    w = max(1, max((len(v) for v in vals if v is not None), default=0))
    return np.frombuffer(b"".join((v or b"").ljust(w, b"\0") for v in vals), np.uint8).reshape(-1, w) \
        if vals else np.zeros((0, w), np.uint8)
