"""Identity and status vocabulary shared by every phase.

``sample_id = f"{shard_id}/{key}"`` is the ONLY identity of a sample. It never depends on
the position of a sample in a shard or of a shard in the input list.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# The signals a run can use (``methods`` / ``--methods``), in their canonical order, which is
# also their priority: when several methods find one pair, the manifest reports the first.
METHODS = ("exact", "phash", "dhash", "embedding")


class Status(str, enum.Enum):
    """Per-sample status. Documented for users in docs/manifest.md."""

    OK = "ok"  # decoded; every requested feature computed
    EMPTY = "empty"  # the image member has zero bytes
    DECODE_ERROR = "decode_error"  # bytes are not a readable image (garbage, truncated data)
    UNSUPPORTED_FORMAT = "unsupported_format"  # a real image in a format not allowed by config
    TOO_LARGE = "too_large"  # pixel count above decode.max_pixels (decompression-bomb guard)
    NO_IMAGE = "no_image"  # the sample has members but none with an image extension
    READ_ERROR = "read_error"  # the tar member could not be read (shard truncated inside it)
    EMBED_ERROR = "embed_error"  # decoded, but the embedder failed on this sample

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


@dataclass(frozen=True, order=True)
class ShardRef:
    """One input shard: its URL (anything fsspec opens) and its stable id."""

    url: str
    shard_id: str  # path relative to the input root, without the .tar extension


@dataclass(frozen=True)
class ModelInfo:
    """What the features phase needs to know of the embedding model without loading it: its
    identity (``tag``, part of the features hash), vector size and input size (decoding)."""

    tag: str
    dim: int
    input_size: int


def sample_id(shard_id: str, key: str) -> str:
    return f"{shard_id}/{key}"


def sample_keys(sample_ids, shard_ids):
    """The ``key`` of each sample: its ``sample_id`` without the ``f"{shard_id}/"`` prefix, as an
    Arrow string array, computed from the two columns' buffers (no Python string a row).
    ``sample_ids``: a string (Chunked)Array; ``shard_ids``: row-aligned, string or
    dictionary-encoded. Raises ValueError where a sample_id is shorter than its shard_id or has
    no "/" right after it (the prefix's own bytes are not compared)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = sample_ids.combine_chunks() if isinstance(sample_ids, pa.ChunkedArray) else sample_ids
    ids = ids.cast(pa.large_string()) if pa.types.is_large_string(ids.type) else ids.cast(pa.string())
    sh = shard_ids.combine_chunks() if isinstance(shard_ids, pa.ChunkedArray) else shard_ids
    n = len(ids)
    if len(sh) != n:
        raise ValueError(f"{n} sample ids but {len(sh)} shard ids")
    if pa.types.is_dictionary(sh.type):  # the prefix of each row: its shard id's bytes and the "/"
        plen = pc.binary_length(sh.dictionary).to_numpy(zero_copy_only=False).astype(np.int64)[
            sh.indices.to_numpy(zero_copy_only=False)] + 1
    else:
        sh = sh if pa.types.is_large_string(sh.type) else sh.cast(pa.string())
        plen = pc.binary_length(sh).to_numpy(zero_copy_only=False).astype(np.int64) + 1
    off_type = np.int64 if pa.types.is_large_string(ids.type) else np.int32
    offs = np.frombuffer(ids.buffers()[1], off_type)[ids.offset : ids.offset + n + 1].astype(np.int64)
    data = np.frombuffer(ids.buffers()[2], np.uint8) if n and ids.buffers()[2] is not None else np.zeros(0, np.uint8)
    start, end = offs[:-1], offs[1:]
    klen = end - start - plen
    if n and ((klen < 0).any() or (data[start + plen - 1] != ord("/")).any()):
        bad = int(np.flatnonzero((klen < 0) | (data[np.minimum(start + plen - 1, max(len(data) - 1, 0))] != ord("/")))[0])
        raise ValueError(f"sample_id {ids[bad].as_py()!r} does not start with its shard_id {sh[bad].as_py()!r} and '/'")
    # the rows' bytes are contiguous: alternately a prefix (dropped) and a key (kept)
    keep = np.repeat(np.tile(np.array([False, True]), n), np.column_stack([plen, klen]).ravel())
    keys = data[offs[0] : offs[-1]][keep] if n else data[:0]
    koffs = np.zeros(n + 1, np.int64)
    np.cumsum(klen, out=koffs[1:])
    typ = pa.large_string() if koffs[-1] >= 2**31 - 1 else pa.string()
    koffs = koffs.astype(np.int64 if typ == pa.large_string() else np.int32)
    return pa.Array.from_buffers(typ, n, [None, pa.py_buffer(koffs), pa.py_buffer(keys)])


def status_mask(col, status: Status | str):
    """``col == status`` (a string or dictionary-encoded status column, Array or ChunkedArray) as
    a numpy bool array, null: False; a dictionary column is compared through its dictionary
    (no string a row is decoded)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    value = status.value if isinstance(status, Status) else status
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    if not chunks:
        return np.zeros(0, bool)
    out = []
    for c in chunks:
        if pa.types.is_dictionary(c.type):
            hit = pc.equal(c.dictionary, value).fill_null(False).to_numpy(zero_copy_only=False)
            idx = c.indices.fill_null(0).to_numpy(zero_copy_only=False) if len(hit) else np.zeros(len(c), np.int64)
            m = hit[idx] if len(hit) else np.zeros(len(c), bool)
            out.append(m & c.is_valid().to_numpy(zero_copy_only=False) if c.null_count else m)
        else:
            out.append(pc.equal(c, value).fill_null(False).to_numpy(zero_copy_only=False))
    return np.concatenate(out).astype(bool, copy=False)
