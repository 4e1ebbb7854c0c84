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
