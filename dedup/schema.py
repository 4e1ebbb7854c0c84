"""Arrow schemas of the files phases hand to each other. Columns are documented in docs/manifest.md.

Bump a version on any change to its schema; readers refuse versions they do not know.
"""

from __future__ import annotations

import pyarrow as pa

FEATURES_VERSION = "FEATURES_V2"
PAIRS_VERSION = "PAIRS_V1"
MANIFEST_VERSION = "MANIFEST_V1"

_FEATURE_FIELDS = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("shard_id", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("image_member", pa.string()),  # extension of the member the image came from
    pa.field("file_size", pa.int64()),
    pa.field("caption_len", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("orig_mode", pa.string()),
    pa.field("format", pa.string()),
    pa.field("sha256", pa.binary(32)),
    pa.field("phash", pa.uint64()),
    pa.field("dhash", pa.uint64()),
    # V2: share of the image's area inside its uniform borders (1.0 = none); hashes are of that box
    pa.field("content_fraction", pa.float32()),
]


def features_schema(dim: int | None, metadata: dict[str, str] | None = None) -> pa.Schema:
    fields = list(_FEATURE_FIELDS)
    if dim:
        fields.append(pa.field("embedding", pa.list_(pa.float16(), dim)))
    md = {"schema_version": FEATURES_VERSION, **(metadata or {})}
    return pa.schema(fields, metadata={k: str(v) for k, v in md.items()})


PAIRS_SCHEMA = pa.schema(
    [
        pa.field("a", pa.string(), nullable=False),  # sample_id, a < b
        pa.field("b", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),  # exact | phash | dhash | embedding
        pa.field("score", pa.float32(), nullable=False),  # 1.0 exact; Hamming bits; cosine
    ],
    metadata={"schema_version": PAIRS_VERSION},
)

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("cluster_id", pa.string()),
        pa.field("cluster_size", pa.int32()),
        pa.field("is_keeper", pa.bool_(), nullable=False),
        pa.field("dup_method", pa.string()),
        pa.field("score_to_keeper", pa.float32()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("file_size", pa.int64()),
        pa.field("phash", pa.uint64()),
        pa.field("dhash", pa.uint64()),
        pa.field("outlier_score", pa.float32()),
    ],
    metadata={"schema_version": MANIFEST_VERSION},
)


def check_version(schema: pa.Schema, expected: str, what: str) -> None:
    from dedup.errors import SchemaMismatchError

    md = schema.metadata or {}
    got = md.get(b"schema_version", b"").decode()
    if got != expected:
        raise SchemaMismatchError(f"{what} has schema version {got or 'none'!r}, this dedup reads {expected!r}")
