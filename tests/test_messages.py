"""Error messages name what the user can act on: the sample, and our own setting."""

import io
import logging
import tarfile
import zlib

import numpy as np
from PIL import Image

from dedup.compute.decode import DecodePolicy, decode_image
from dedup.config import load_config
from dedup.phases.features import FeatureExtractor
from dedup.records import ShardRef, Status


def _zero_png(w, h):
    """A valid PNG of w×h black 1-bit pixels, tiny on disk (a decompression bomb when large)."""
    import struct

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    raw = zlib.compress(b"\0" * ((w + 7) // 8 + 1) * h, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_too_large_names_decode_max_pixels_not_pillows_limit():
    # 100 Mpx: above the default decode.max_pixels (= Pillow's warning threshold): Pillow warns.
    d = decode_image(_zero_png(10000, 10000))
    assert d.status is Status.TOO_LARGE
    assert "100000000 pixels exceeds decode.max_pixels=89478485" in d.error
    assert "--set decode.max_pixels=" in d.error and "178956970" not in d.error
    # From the header, with a policy below Pillow's limits.
    d = decode_image(_zero_png(2000, 1000), DecodePolicy(max_pixels=1_000_000))
    assert "2000x1000 = 2000000 pixels exceeds decode.max_pixels=1000000" in d.error


class _NanOnBlue:
    """A user embedder that yields NaN for blue pictures (as a broken model can)."""

    tag, dim, input_size = "nan-on-blue", 4, 32

    def embed(self, images):
        out = np.ones((len(images), self.dim), np.float32) / 2
        for i, im in enumerate(images):
            if np.asarray(im.convert("RGB"))[..., 2].mean() > 200:
                out[i] = np.nan
        return out


def test_nonfinite_vector_fails_only_its_sample_and_names_it(tmp_path, caplog):
    p = tmp_path / "s.tar"
    with tarfile.open(p, "w") as tf:
        for key, color in [("red", (255, 0, 0)), ("blue", (0, 0, 255)), ("green", (0, 255, 0))]:
            b = io.BytesIO()
            Image.new("RGB", (40, 40), color).save(b, "PNG")
            ti = tarfile.TarInfo(f"{key}.png")
            ti.size = len(b.getvalue())
            tf.addfile(ti, io.BytesIO(b.getvalue()))
    cfg = load_config(None, None, **{"methods": ["exact", "embedding"], "run.workers": 1})
    ex = FeatureExtractor(cfg, embedder=_NanOnBlue())
    with caplog.at_level(logging.WARNING):
        table, _, info = ex.extract(ShardRef(str(p), "s"))
    rows = {r["key"]: r for r in table.to_pylist()}
    assert rows["blue"]["status"] == "embed_error" and "non-finite" in rows["blue"]["error"]
    assert rows["blue"]["embedding"] is None
    assert rows["red"]["status"] == rows["green"]["status"] == "ok" and rows["red"]["embedding"] is not None
    assert "s/blue" in caplog.text
