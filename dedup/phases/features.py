"""Phase 1: per-shard features. One shard in, one Parquet file + one done marker out.

Every sample read becomes exactly one row, whatever happened to it. The done marker is
written last, after the features file, so a killed run resumes at shard granularity.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pyarrow as pa

from dedup.compute.signals import SignalPlan, decode_plan, hash_batch  # noqa: F401 - decode_plan re-exported (its old home)
from dedup.config import Config
from dedup.faults import crash_point
from dedup.io.rundir import RunDir
from dedup.io.shards import ShardReadResult, caption_length, iter_samples, pick_image, shard_fingerprint
from dedup.records import ModelInfo, ShardRef, Status, sample_id
from dedup.schema import FEATURES_VERSION, features_schema

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

BATCH = 64


@dataclass
class _Row:
    key: str
    status: Status = Status.OK
    error: str | None = None
    image_member: str | None = None
    file_size: int | None = None
    caption_len: int | None = None
    width: int | None = None
    height: int | None = None
    orig_mode: str | None = None
    format: str | None = None
    sha256: bytes | None = None
    phash: int | None = None
    dhash: int | None = None
    content_fraction: float | None = None  # share of the area inside uniform borders (hashes only)
    emb_index: int = -1
    notes: list[str] = field(default_factory=list)
    image_name: str | None = None  # the image member's name in the tar (for notes)


@dataclass
class EmbedChunk:
    """Decoded images of up to ``BATCH`` samples of one shard, to embed together."""

    keys: list[str]
    images: list  # RGB PIL images (or, between Ray stages, uint8 HxWx3 arrays)


@dataclass
class ShardScan:
    """A shard read, decoded and hashed: its rows (in output order) and reader result."""

    rows: dict[str, _Row]
    result: ShardReadResult
    timings: dict


PREFETCH = 2  # chunks decoded ahead of the embedder: bounded memory (≤ 2 × batch images)
# Cores a CPU-embedding process needs before the prefetch thread pays: on 2 cores it competes
# with the model's own threads (benchmarks/pipeline.py, idle machine: 12.4 vs 11.4 wall ms and
# 23.9 vs 19.8 CPU ms an image with it). A GPU embedder leaves the cores to decoding: always on.
# Not measured on more cores or a GPU here (docs/benchmarks.md "pipeline").
OVERLAP_MIN_CORES = 4

_T = TypeVar("_T")


def prefetch(items: Iterator[_T], depth: int) -> Iterator[_T]:
    """``items``, produced by a worker thread at most ``depth`` items ahead of the consumer.

    In :meth:`FeatureExtractor.extract` this overlaps reading, decoding and hashing the next
    chunks with the embedding of the current one: libjpeg-turbo/Pillow decoding, numpy and
    onnxruntime/torch inference all release the GIL. An exception in the producer is raised in
    the consumer; a consumer that stops (an error, an interrupt) stops the producer at its next
    item."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(msg: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(msg, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            put(("error", e))

    worker = threading.Thread(target=produce, name="dedup-decode", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join(timeout=10)


class FeatureExtractor:
    """Holds what is expensive to set up (the embedder) for many shards in one process."""

    def __init__(self, cfg: Config, embedder=None, model: ModelInfo | None = None):
        """``model`` instead of an embedder: what the model is, for stages that never embed
        (the Ray executor's CPU tasks); :meth:`embed_images` then has no model to run."""
        self.cfg = cfg
        self.want_hash = bool({"phash", "dhash"} & set(cfg.methods))
        self.want_emb = "embedding" in cfg.methods
        self.embedder = embedder
        if self.want_emb and self.embedder is None and model is None:
            from dedup.compute.embedders import make_embedder

            self.embedder = make_embedder(cfg.embedding.spec, device=cfg.embedding.device, batch_size=cfg.embedding.batch_size)
        known = model if model is not None else self.embedder  # the model's tag, dim and input size
        self.model_tag = known.tag if self.want_emb else None
        self.dim = known.dim if self.want_emb else None
        self.features_hash = cfg.features_hash(self.model_tag)
        self.plan = SignalPlan.build(
            cfg.decode.draft, cfg.decode.max_pixels, cfg.decode.formats, want_hash=self.want_hash,
            embed_size=int(known.input_size) if self.want_emb else None)
        # Images per group handed to hashing/embedding (one model batch, or several).
        self.batch = max(BATCH, cfg.embedding.batch_size) if self.want_emb else BATCH
        # Decode + hash the next chunks in a thread while this one is embedded (extract only):
        # with a GPU model, or enough cores (OVERLAP_MIN_CORES).
        self.overlap = False
        if self.want_emb and self.embedder is not None:
            from dedup.compute.threads import cpu_threads

            self.overlap = getattr(self.embedder, "device", "cpu") != "cpu" or cpu_threads() >= OVERLAP_MIN_CORES

    # ---------------------------------------------------------------------------------------
    # The features of a shard come from three stages, which the local executor runs in one
    # process (:meth:`extract`) and the Ray executor spreads over CPU tasks and embedding
    # actors: :meth:`scan` (read + decode + hash), :meth:`embed_images` (per chunk of decoded
    # images, in shard order) and :meth:`assemble` (the table). Both executors go through the
    # same three methods, so their features files are identical.

    def extract(self, ref: ShardRef) -> tuple[pa.Table, ShardReadResult, dict]:
        t0, c0 = time.perf_counter(), time.process_time()
        scan: ShardScan | None = None
        embedded: list[tuple[list[str], np.ndarray | None, str | None]] = []
        t_embed = 0.0
        items = self.scan(ref)
        for item in (prefetch(items, PREFETCH) if self.want_emb and self.overlap else items):
            if isinstance(item, EmbedChunk):
                t = time.perf_counter()
                vecs, err = self.embed_images(item.images)
                t_embed += time.perf_counter() - t
                embedded.append((item.keys, vecs, err))
            else:
                scan = item
        assert scan is not None
        # CPU seconds: the whole process (all threads), and what the scan's own thread did;
        # the rest is the embedding (the model on all its threads) and the hand-over between them
        cpu_total = time.process_time() - c0
        timings = {**scan.timings, "embed": t_embed, "total": time.perf_counter() - t0,
                   "cpu_total": cpu_total, "cpu_embed": max(0.0, cpu_total - scan.timings["cpu_scan"])}
        return self.assemble(ref, scan, embedded, timings)

    def scan(self, ref: ShardRef) -> Iterator[EmbedChunk | ShardScan]:
        """Read, decode and hash one shard; no embedding.

        Yields one :class:`EmbedChunk` per group of up to ``self.batch`` decoded images (only when
        embeddings are wanted), in shard order, then the :class:`ShardScan` as the last item.
        Chunks hold the decoded images; consume them as they come to keep memory bounded.
        """
        result = ShardReadResult()
        rows: dict[str, _Row] = {}
        pending: list[tuple[_Row, Image.Image]] = []
        # wall seconds; cpu_*: CPU seconds of the thread running this generator (read, decode,
        # hash are single-threaded), counted only while it runs, not while it waits at a yield
        timings = {"decode": 0.0, "hash": 0.0, "cpu_decode": 0.0, "cpu_hash": 0.0, "cpu_scan": 0.0}
        seg = time.thread_time()

        def flush() -> EmbedChunk | None:
            if not pending:
                return None
            images = [im for _, im in pending]
            if self.want_hash:
                t, c = time.perf_counter(), time.thread_time()
                ph, dh, kept = hash_batch(images)
                timings["hash"] += time.perf_counter() - t
                timings["cpu_hash"] += time.thread_time() - c
                for (row, _), p, d, k in zip(pending, ph, dh, kept):
                    row.phash, row.dhash, row.content_fraction = int(p), int(d), float(k)
            # Rows in a chunk are decoded (status ok), so never replaced later: keys are stable.
            chunk = EmbedChunk([row.key for row, _ in pending], images) if self.want_emb else None
            pending.clear()
            return chunk

        for sample in iter_samples(ref, result, self.cfg.input.image_exts):
            row = rows.get(sample.key)
            if row is not None:
                # Members of this key were not contiguous: merge into the existing row.
                row.notes.append("members of this key are not contiguous in the tar")
                row.notes.extend(sample.notes)
                if row.status == Status.NO_IMAGE:
                    # The image came later: process this run as the sample, keeping the notes.
                    carried = row.notes
                    del rows[sample.key]
                    sample.notes[:0] = carried
                    row = None
                else:
                    ext2 = pick_image(sample, self.cfg.input.image_exts)[0]
                    if ext2:
                        row.notes.append(f"second image member {sample.name(ext2)!r} ignored; {row.image_name!r} used")
                    if row.caption_len is None:
                        row.caption_len = caption_length(sample)
                    continue
            row = _Row(sample.key, notes=list(sample.notes))
            rows[sample.key] = row
            row.caption_len = caption_length(sample)
            if sample.read_error:
                row.status, row.error = Status.READ_ERROR, sample.read_error
                continue
            ext, data, picked = pick_image(sample, self.cfg.input.image_exts)
            row.notes.extend(picked)
            if ext is None:
                row.status = Status.NO_IMAGE
                row.error = f"no member with an image extension or image content (members: {sorted(sample.members) or 'none'})"
                continue
            assert data is not None  # comes with ext
            row.image_member, row.image_name, row.file_size = ext, sample.name(ext), len(data)
            t, c = time.perf_counter(), time.thread_time()
            read = self.plan.read(data)
            timings["decode"] += time.perf_counter() - t
            timings["cpu_decode"] += time.thread_time() - c
            row.sha256, dec = read.sha256, read.decoded
            row.width, row.height, row.orig_mode, row.format = dec.width, dec.height, dec.orig_mode, dec.format
            if dec.status != Status.OK:
                row.status, row.error = dec.status, dec.error
                continue
            if self.want_hash or self.want_emb:
                assert dec.image is not None  # status OK
                pending.append((row, dec.image))
                if len(pending) >= self.batch:
                    chunk = flush()
                    if chunk is not None:
                        timings["cpu_scan"] += time.thread_time() - seg
                        yield chunk
                        seg = time.thread_time()
        chunk = flush()
        if chunk is not None:
            timings["cpu_scan"] += time.thread_time() - seg
            yield chunk
            seg = time.thread_time()
        timings["cpu_scan"] += time.thread_time() - seg
        yield ShardScan(rows, result, timings)

    def embed_images(self, images: list) -> tuple[np.ndarray | None, str | None]:
        """One chunk's embeddings as float16 ``[n, dim]``, or ``(None, error)``: a model failure
        marks that chunk's samples ``embed_error``, never the run. Rows that are not finite
        (NaN/inf, also after the cast to float16) are returned as they are: :meth:`assemble`
        fails only those samples, by key."""
        try:
            vecs = np.asarray(self.embedder.embed(images), dtype=np.float32)
            if vecs.shape != (len(images), self.dim):
                raise ValueError(f"embedder returned shape {vecs.shape}, expected {(len(images), self.dim)}")
        except Exception as e:  # noqa: BLE001 - recorded per sample
            return None, f"{type(e).__name__}: {e}"
        with np.errstate(over="ignore", invalid="ignore"):
            return vecs.astype(np.float16), None

    def assemble(
        self,
        ref: ShardRef,
        scan: ShardScan,
        embedded: list[tuple[list[str], np.ndarray | None, str | None]],
        timings: dict,
    ) -> tuple[pa.Table, ShardReadResult, dict]:
        """The features table from a scan and its chunks' embeddings (in chunk order)."""
        rows = scan.rows
        embeddings: list[np.ndarray] = []
        n_emb = 0
        for keys, vecs, err in embedded:
            if vecs is None:
                for k in keys:
                    rows[k].status, rows[k].error = Status.EMBED_ERROR, err
                continue
            _fail_nonfinite(ref, rows, keys, vecs)
            embeddings.append(vecs)
            for j, k in enumerate(keys):
                rows[k].emb_index = n_emb + j
            n_emb += len(keys)
        table = self._table(ref, rows, embeddings)
        counts: dict[str, int] = {}
        for r in rows.values():
            counts[r.status.value] = counts.get(r.status.value, 0) + 1
        cpu = ("cpu_decode", "cpu_hash", "cpu_scan", "cpu_embed", "cpu_total")  # absent from the Ray executor's
        timings = {**{k: timings.get(k, 0.0) for k in ("decode", "hash", "embed", "total")},
                   **{k: timings[k] for k in cpu if k in timings}}
        return table, scan.result, {"counts": counts, "timings": {k: round(v, 3) for k, v in timings.items()}}

    def _table(self, ref: ShardRef, rows: dict[str, _Row], embeddings: list[np.ndarray]) -> pa.Table:
        rs = list(rows.values())
        n = len(rs)
        cols = {
            "sample_id": [sample_id(ref.shard_id, r.key) for r in rs],
            "shard_id": [ref.shard_id] * n,
            "key": [r.key for r in rs],
            "status": [r.status.value for r in rs],
            "error": [_join_error(r) for r in rs],
            "image_member": [r.image_member for r in rs],
            "file_size": [r.file_size for r in rs],
            "caption_len": [r.caption_len for r in rs],
            "width": [r.width for r in rs],
            "height": [r.height for r in rs],
            "orig_mode": [r.orig_mode for r in rs],
            "format": [r.format for r in rs],
            "sha256": [r.sha256 for r in rs],
            "phash": [r.phash if r.status == Status.OK else None for r in rs],
            "dhash": [r.dhash if r.status == Status.OK else None for r in rs],
            "content_fraction": [r.content_fraction if r.status == Status.OK else None for r in rs],
        }
        meta = {
            "config_hash": self.features_hash,
            "model_tag": self.model_tag or "",
            "hash_size": "8",
            "shard_url": ref.url,
        }
        schema = features_schema(self.dim, meta)
        arrays = [pa.array(cols[f.name], type=f.type) for f in schema if f.name != "embedding"]
        if self.dim:
            allv = np.concatenate(embeddings) if embeddings else np.zeros((0, self.dim), np.float16)
            out = np.zeros((n, self.dim), np.float16)
            mask = np.array([r.emb_index >= 0 and r.status == Status.OK for r in rs], bool)
            if mask.any():
                out[mask] = allv[[r.emb_index for r, m in zip(rs, mask) if m]]
            flat = pa.array(out.reshape(-1), type=pa.float16())
            # Rows without an embedding get a null, not a zero vector.
            emb = pa.FixedSizeListArray.from_arrays(flat, self.dim, mask=pa.array(~mask))
            arrays.append(emb)
        return pa.Table.from_arrays(arrays, schema=schema)


def _fail_nonfinite(ref: ShardRef, rows: dict[str, _Row], keys: list[str], vecs: np.ndarray) -> None:
    """Mark the samples whose vector has a NaN/inf ``embed_error`` (only those), naming them."""
    bad = [keys[i] for i in np.flatnonzero(~np.isfinite(vecs).all(axis=1))]
    if not bad:
        return
    for k in bad:
        rows[k].status, rows[k].error = Status.EMBED_ERROR, "embedder produced a non-finite vector (NaN/inf) for this sample"
    shown = ", ".join(sample_id(ref.shard_id, k) for k in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    log.warning("embedder produced %d non-finite vector(s), marked embed_error: %s", len(bad), shown)


def _join_error(r: _Row) -> str | None:
    parts = ([r.error] if r.error else []) + r.notes
    return "; ".join(parts) if parts else None


def run_shard(extractor: FeatureExtractor, run: RunDir, ref: ShardRef) -> dict:
    """Compute and write one shard's features, then its done marker (last). Returns the marker."""
    fingerprint = shard_fingerprint_or_none(ref)
    table, result, info = extractor.extract(ref)
    return write_shard(extractor, run, ref, fingerprint, table, result, info)


def shard_fingerprint_or_none(ref: ShardRef) -> dict | None:
    """The shard's fingerprint, taken before it is read (None if it does not exist)."""
    try:
        return shard_fingerprint(ref.url)
    except FileNotFoundError:
        return None


def write_shard(
    extractor: FeatureExtractor, run: RunDir, ref: ShardRef, fingerprint: dict | None,
    table: pa.Table, result: ShardReadResult, info: dict,
) -> dict:
    """Write the features file, then the done marker (last). Returns the marker."""
    marker = {
        "shard_id": ref.shard_id,
        "url": ref.url,
        "fingerprint": fingerprint,
        "features_hash": extractor.features_hash,
        "schema_version": FEATURES_VERSION,
        "model_tag": extractor.model_tag,
        "condition": result.condition,
        "error": result.error,
        "rows": table.num_rows,
        "members": result.members,
        # Members that are part of no row (links, directories, names without a key), with why:
        # rows' members + these = every member of the tar.
        "ignored_members": result.ignored,
        "bytes_read": result.bytes_read,
        **info,
    }
    if result.condition == "missing":
        return marker  # nothing was read; no files, so a rerun tries again
    run.write_parquet(run.features(ref.shard_id), table)
    crash_point("features:before_marker")
    run.write_json(run.done(ref.shard_id), marker)
    return marker


def marker_is_current(run: RunDir, ref: ShardRef, features_hash: str) -> dict | None:
    """The shard's done marker if it matches the input fingerprint and feature config."""
    path = run.done(ref.shard_id)
    if not run.exists(path) or not run.exists(run.features(ref.shard_id)):
        return None
    try:
        marker = run.read_json(path)
        fp = shard_fingerprint(ref.url)
    except (OSError, ValueError):
        return None
    if marker.get("features_hash") != features_hash or marker.get("fingerprint") != fp:
        return None
    return marker
