"""One place for what every image member turns into: bytes → decode status, sha256, content-box
pHash/dHash and the image handed to the embedder.

The features phase, ``dedup check`` (queries) and calibration/evaluation all go through
:class:`SignalPlan`, so a query or a calibration image is decoded and hashed exactly as the run
decoded and hashed its samples — same decode size, same luma-only drafts, same content box, the
same bits.

* :func:`decode_plan` / :meth:`SignalPlan.build` — how to decode for the signals a run computes.
* :meth:`SignalPlan.read` — one member: sha256 of the raw bytes and the decoded image (or its
  status). Never raises for bad bytes.
* :func:`hash_batch` — pHash/dHash of the content box of a batch of decoded images, and the share
  of the area the box keeps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dedup.compute.decode import Decoded, DecodePolicy, decode_image
from dedup.compute.hashes import HASH_MIN_SIZE, content_hashes
from dedup.records import Status

__all__ = ["ImageRead", "SignalPlan", "decode_plan", "hash_batch"]


def decode_plan(draft: bool, want_hash: bool, embed_size: int | None) -> tuple[int | None, bool]:
    """How to decode for the signals a run computes: ``(min_size, gray)`` for
    :func:`dedup.compute.decode.decode_image`.

    * ``min_size``: the smallest decoded short side that serves every signal (JPEG draft
      decoding): the embedder's input size, ``HASH_MIN_SIZE`` for hashes, 1 for exact-only
      runs (decode only to validate the image); None when ``decode.draft`` is off.
    * ``gray``: no embedder, so only grey pixels are needed: draft-decoded JPEGs come back as
      their luma channel (docs/hashing.md measures what that changes).
    """
    if not draft:
        return None, False
    sizes = []
    if embed_size is not None:
        sizes.append(int(embed_size))
    if want_hash:
        sizes.append(int(HASH_MIN_SIZE))
    return (max(sizes) if sizes else 1), embed_size is None


@dataclass(frozen=True)
class ImageRead:
    """One image member read: the sha256 of its bytes (None for zero bytes) and its decode."""

    sha256: bytes | None
    decoded: Decoded

    @property
    def ok(self) -> bool:
        return self.decoded.status == Status.OK


@dataclass(frozen=True)
class SignalPlan:
    """The decode settings every caller that must reproduce a run's signals shares."""

    policy: DecodePolicy
    min_size: int | None
    gray: bool

    @classmethod
    def build(cls, draft: bool, max_pixels: int, formats: Iterable[str], *, want_hash: bool,
              embed_size: int | None) -> SignalPlan:
        """From the run's ``decode`` settings, whether hashes are wanted and the embedder's
        input size (None: no embedder)."""
        min_size, gray = decode_plan(draft, want_hash, embed_size)
        return cls(DecodePolicy(max_pixels=int(max_pixels), formats=tuple(formats)), min_size, gray)

    def read(self, data: bytes | None) -> ImageRead:
        """sha256 + decode of one member's bytes, at the plan's size."""
        sha = hashlib.sha256(data).digest() if data else None
        return ImageRead(sha, decode_image(data or b"", self.policy, min_size=self.min_size, gray=self.gray))


def hash_batch(images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(phash, dhash, kept)`` of each image's content box (see
    :func:`dedup.compute.hashes.content_hashes`); empty arrays for no images."""
    if len(images) == 0:
        return np.empty(0, np.uint64), np.empty(0, np.uint64), np.empty(0, np.float32)
    return content_hashes(images)
