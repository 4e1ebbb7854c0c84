"""dedup.compute.signals (one place for bytes → sha256, decode, hashes), the features phase's
decode/embed overlap (prefetch) and the inference thread count."""

from __future__ import annotations

import hashlib
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from dedup.compute.decode import decode_image
from dedup.compute.hashes import HASH_MIN_SIZE, content_hashes
from dedup.compute.signals import SignalPlan, decode_plan, hash_batch
from dedup.compute.threads import cpu_threads
from dedup.phases.features import prefetch
from dedup.records import Status


def _jpeg(size=(640, 480)) -> bytes:
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)).resize(size)
    b = io.BytesIO()
    im.save(b, "JPEG", quality=90)
    return b.getvalue()


def test_plan_read_is_sha_plus_the_runs_decode():
    data = _jpeg()
    plan = SignalPlan.build(True, 10**8, ("JPEG", "PNG"), want_hash=True, embed_size=None)
    assert (plan.min_size, plan.gray) == decode_plan(True, True, None) == (HASH_MIN_SIZE, True)
    read = plan.read(data)
    assert read.ok and read.sha256 == hashlib.sha256(data).digest()
    ref = decode_image(data, plan.policy, min_size=HASH_MIN_SIZE, gray=True)
    assert read.decoded.image is not None and ref.image is not None
    assert read.decoded.image.mode == "L" and np.array_equal(np.asarray(read.decoded.image), np.asarray(ref.image))
    ph, dh, kept = hash_batch([read.decoded.image])
    assert (ph, dh, kept) == tuple(a for a in content_hashes([ref.image]))


def test_plan_read_bad_bytes_and_policy():
    plan = SignalPlan.build(True, 1000, ("PNG",), want_hash=True, embed_size=288)
    assert plan.read(b"").decoded.status == Status.EMPTY and plan.read(b"").sha256 is None
    assert plan.read(None).decoded.status == Status.EMPTY
    assert plan.read(b"not an image").decoded.status == Status.DECODE_ERROR
    assert plan.read(_jpeg()).decoded.status == Status.UNSUPPORTED_FORMAT  # JPEG not allowed here
    assert plan.min_size == 288 and plan.gray is False


def test_hash_batch_empty():
    ph, dh, kept = hash_batch([])
    assert ph.dtype == np.uint64 and dh.dtype == np.uint64 and len(ph) == len(dh) == len(kept) == 0


def test_prefetch_keeps_order_and_bounds_lead():
    produced = []

    def gen():
        for i in range(20):
            produced.append(i)
            yield i

    it = prefetch(gen(), 2)
    assert next(it) == 0
    time.sleep(0.3)
    assert len(produced) <= 4  # one consumed, at most depth queued, one being put
    assert list(it) == list(range(1, 20))


def test_prefetch_raises_the_producers_error():
    def gen():
        yield 1
        raise ValueError("broken shard")

    it = prefetch(gen(), 2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="broken shard"):
        next(it)


def test_prefetch_stops_the_producer_when_the_consumer_stops():
    before = threading.active_count()

    def gen():
        i = 0
        while True:
            yield i
            i += 1

    it = prefetch(gen(), 1)
    assert next(it) == 0
    it.close()  # the consumer gives up (an error or an interrupt in the embedder)
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_cpu_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    import os

    assert cpu_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert cpu_threads() == len(os.sched_getaffinity(0))


def test_prefetch_thread_only_with_enough_cores_or_a_gpu_model(monkeypatch):
    """The decode/hash prefetch thread competes with a CPU model's own threads on few cores
    (measured slower on 2: benchmarks/pipeline.py), so it runs from OVERLAP_MIN_CORES cores."""
    from dedup.config import Config
    from dedup.phases import features

    cfg = Config.model_validate({"methods": ["phash", "embedding"], "embedding": {"spec": "pixel"}})
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert features.FeatureExtractor(cfg).overlap is False
    monkeypatch.setenv("OMP_NUM_THREADS", str(features.OVERLAP_MIN_CORES))
    assert features.FeatureExtractor(cfg).overlap is True
    hashes_only = Config.model_validate({"methods": ["phash"]})
    assert features.FeatureExtractor(hashes_only).overlap is False  # nothing to overlap with
