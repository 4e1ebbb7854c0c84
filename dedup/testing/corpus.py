"""A corpus of bad and awkward input, with what the pipeline must report for every sample.

``make_bad_corpus(out_dir)`` writes a few small tars (under 1 MB in all, built in about a
second) and returns the shard paths to pass to ``dedup run`` (one of them does not exist) and
an :class:`Expected`: the status of every row the manifest must hold, the condition of every
shard, and a note per case. Nothing may be lost: every sample readable from a shard gets a row,
and the good samples that share a shard with a bad one must come out ``ok``.

Shards (``shard_id`` = file name without ``.tar``):

``bad-00000``  cut inside the data of its last member: that sample ``read_error``, the ones
               before it ``ok``; shard ``truncated``.
``bad-00001``  cut exactly at a member header: reads as a shorter *valid* tar; the complete
               samples ``ok``, the cut-off sample is gone; shard ``truncated``.
``bad-00002``  zero bytes: shard ``empty``, no rows.
``bad-00003``  per-sample failures: zero-byte member, garbage, truncated JPEG, decompression
               bomb, ICO (unsupported format), sidecars without an image.
``bad-00004``  unusual but valid images: CMYK JPEG, 16-bit grey PNG, RGBA PNG, palette PNG
               with transparency, animated GIF, EXIF orientation 6 JPEG (a copy of
               ``bad-00004/good_b``), PNG bytes named ``.jpg``.
``bad-00005``  member layout quirks: dotted key, non-contiguous members, duplicate member
               names, a key with a dotted directory, ``.jpeg`` and ``.webp`` extensions.
``bad-00006``  listed but does not exist: shard ``missing``.

Unsupported format: the ICO sample is a real ``.ico`` member. The default
``input.image_exts`` includes ``ico`` (so the member is the sample's image) while the default
``decode.formats`` is JPEG, PNG, WEBP, GIF, BMP, TIFF, MPO, so it must come out
``unsupported_format`` — not ``decode_error`` and not ``no_image``.

Every decodable image is a different real photo (see :func:`dedup.testing.synth.real_photos`;
128 px, text scans left out) except the EXIF-rotated copy, so the only duplicate pair in the
corpus is the one in ``Expected.duplicates``. Payloads that are never decoded (cut members, the
truncated JPEG, the icon, the second ``dupname.jpg``) are smooth random colour fields, and so
are ok-images once the photos run out (without shared/data: 17 photos for 20 ok-images).
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dedup.records import Status, sample_id
from dedup.testing.synth import real_photos

_MTIME = 1_700_000_000
_SIDE = 128  # corpus photos are small: the cases are about bytes, not content
# Text scans carry too little detail at this size (their dHash is all ones): not used here.
_SKIP = ("page", "text")


@dataclass(frozen=True)
class Expected:
    sample_rows: dict[str, str]  # sample_id -> expected Status value
    shard_flags: dict[str, str]  # shard_id -> "ok" | "truncated" | "empty" | "missing"
    notes: dict[str, str]  # sample_id or shard_id -> what the case is
    duplicates: dict[str, str] = field(default_factory=dict)  # sample_id -> sample_id it is a copy of
    lost: tuple[str, ...] = ()  # sample_ids written into a shard but unreadable after the cut


# ---------------------------------------------------------------------------- image bytes
def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def bomb_png(side: int = 20_000) -> bytes:
    """A valid ``side``x``side`` 1-bit greyscale PNG of zeros (~50 KB for 20000), built
    row-block by row-block: the decoded image never exists in memory."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    block = row * 500
    parts = [comp.compress(block) for _ in range(side // 500)]
    parts.append(comp.compress(row * (side % 500)))
    parts.append(comp.flush())
    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b"")


def _gray16(im: Image.Image) -> bytes:
    a = np.asarray(im.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    return _save(Image.fromarray(a), "PNG")


def _rgba(im: Image.Image) -> bytes:
    w, h = im.size
    alpha = np.full((h, w), 200, dtype=np.uint8)  # translucent: composited on white it is paler
    alpha[: h // 4, : w // 4] = 0  # and a fully transparent corner
    rgba = im.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha))
    return _save(rgba, "PNG")


def _palette_trns(im: Image.Image) -> bytes:
    p = im.quantize(colors=64, dither=Image.Dither.NONE)
    return _save(p, "PNG", transparency=0)


def _gif(im: Image.Image) -> bytes:
    frames = [im.rotate(a, fillcolor=(255, 255, 255)).quantize(colors=128, dither=Image.Dither.NONE) for a in (0, 8, 16)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _exif_rotated(im: Image.Image) -> bytes:
    """JPEG whose pixels are stored rotated 90 deg counter-clockwise, with EXIF Orientation 6
    ("rotate 90 CW to display"): after exif_transpose it shows ``im``."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(im.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif.tobytes())


def _noise_field(seed: int, side: int = _SIDE) -> Image.Image:
    """A smooth random colour field: unrelated to any photo and to other seeds (pHash bits
    are independent). Used for payloads that are never decoded, and as a fallback photo."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((side, side * 3 // 4), Image.Resampling.BICUBIC)


def _ico(im: Image.Image) -> bytes:
    return _save(im.resize((64, 64), Image.Resampling.LANCZOS), "ICO", sizes=[(32, 32), (64, 64)])


# ---------------------------------------------------------------------------- tar writing
def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Members in exactly the given order (duplicates allowed), fixed metadata."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), _MTIME, 0o644
            ti.uname = ti.gname = "dedup"
            tf.addfile(ti, io.BytesIO(data))


def _member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """member name -> (header offset, data offset), last occurrence wins."""
    with tarfile.open(path) as tf:
        return {m.name: (m.offset, m.offset_data) for m in tf.getmembers()}


def _sidecars(key: str, caption: str) -> list[tuple[str, bytes]]:
    return [(f"{key}.json", json.dumps({"caption": caption}).encode()), (f"{key}.txt", caption.encode())]


# ---------------------------------------------------------------------------- the corpus
def make_bad_corpus(out_dir) -> tuple[list[str], Expected]:
    """Write the bad-input corpus under ``out_dir``; return (shard paths, expectations)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    photos = [p[1] for p in real_photos(_SIDE) if p[0] not in _SKIP]
    rows: dict[str, str] = {}
    flags: dict[str, str] = {}
    notes: dict[str, str] = {}
    dups: dict[str, str] = {}
    lost: list[str] = []

    n_fill = [0]

    def photo(non_square: bool = False) -> Image.Image:
        """The next unused real photo (``non_square``: the next one that is not square); a
        seeded noise field once they run out (only without shared/data, which adds five
        photos to the seventeen of scikit-image's used here)."""
        for i, im in enumerate(photos):
            if not non_square or im.width != im.height:
                return photos.pop(i)
        n_fill[0] += 1
        return _noise_field(1000 + n_fill[0])

    def jpg(im: Image.Image | None = None) -> bytes:
        return _save(im if im is not None else photo(), "JPEG", quality=90)

    def expect(shard: str, key: str, status: Status, note: str) -> str:
        sid = sample_id(shard, key)
        rows[sid] = status.value
        notes[sid] = note
        return sid

    def good(shard: str, key: str, members: list, ext: str = "jpg", data: bytes | None = None) -> str:
        members.append((f"{key}.{ext}", data if data is not None else jpg()))
        members.extend(_sidecars(key, f"good sample {key}"))
        return expect(shard, key, Status.OK, f"plain good .{ext} sample sharing the shard with bad cases: must survive")

    paths: list[str] = []

    # bad-00000: truncated inside member data ---------------------------------------------------
    sh = "bad-00000"
    m: list[tuple[str, bytes]] = []
    good(sh, "good_a", m)
    good(sh, "good_b", m)
    m.append(("cut_member.json", json.dumps({"caption": "cut"}).encode()))
    m.append(("cut_member.jpg", jpg(_noise_field(1))))
    p = out / f"{sh}.tar"
    _write_tar(p, m)
    hdr, data_off = _member_offsets(p)["cut_member.jpg"]
    size = len(m[-1][1])
    p.write_bytes(p.read_bytes()[: data_off + size // 2])
    expect(sh, "cut_member", Status.READ_ERROR, "the shard ends in the middle of this sample's .jpg data (its .json was read)")
    flags[sh] = "truncated"
    notes[sh] = f"cut at byte {data_off + size // 2}, inside the data of cut_member.jpg; the samples before it are complete"
    paths.append(str(p))

    # bad-00001: truncated exactly at a header boundary -----------------------------------------
    sh = "bad-00001"
    m = []
    good(sh, "good_a", m)
    good(sh, "good_b", m)
    m.append(("cut_off.jpg", jpg(_noise_field(2))))
    m.extend(_sidecars("cut_off", "never read"))
    p = out / f"{sh}.tar"
    _write_tar(p, m)
    hdr, _ = _member_offsets(p)["cut_off.jpg"]
    p.write_bytes(p.read_bytes()[:hdr])
    lost.append(sample_id(sh, "cut_off"))
    flags[sh] = "truncated"
    notes[sh] = (
        f"cut at byte {hdr}, exactly where the header of cut_off.jpg began: tarfile reads it as a shorter valid "
        "tar without error; only the missing end-of-archive blocks show the cut. cut_off is lost (no row)"
    )
    paths.append(str(p))

    # bad-00002: zero-byte tar ------------------------------------------------------------------
    sh = "bad-00002"
    p = out / f"{sh}.tar"
    p.write_bytes(b"")
    flags[sh] = "empty"
    notes[sh] = "zero-byte file: no rows, the shard is flagged"
    paths.append(str(p))

    # bad-00003: per-sample failures ------------------------------------------------------------
    sh = "bad-00003"
    m = []
    good(sh, "good_a", m)
    m.append(("zero_member.jpg", b""))
    m.extend(_sidecars("zero_member", "zero-byte image"))
    expect(sh, "zero_member", Status.EMPTY, "the .jpg member has zero bytes")
    m.append(("garbage.jpg", b"this is not an image, only text under a .jpg name\n" * 40))
    m.extend(_sidecars("garbage", "garbage"))
    expect(sh, "garbage", Status.DECODE_ERROR, "plain text bytes named .jpg")
    whole = jpg(_noise_field(3))
    m.append(("truncated_jpeg.jpg", whole[: len(whole) * 6 // 10]))
    m.extend(_sidecars("truncated_jpeg", "truncated jpeg"))
    expect(sh, "truncated_jpeg", Status.DECODE_ERROR, "a JPEG cut to 60% of its bytes (header intact, scan data cut)")
    m.append(("bomb.png", bomb_png()))
    m.extend(_sidecars("bomb", "decompression bomb"))
    expect(sh, "bomb", Status.TOO_LARGE, "20000x20000 1-bit PNG of zeros (4e8 px, ~50 KB): decompression bomb")
    m.append(("icon.ico", _ico(_noise_field(4))))
    m.extend(_sidecars("icon", "an icon"))
    expect(
        sh, "icon", Status.UNSUPPORTED_FORMAT,
        "a real ICO file as member .ico: 'ico' is in the default input.image_exts, ICO is not in the default "
        "decode.formats (JPEG, PNG, WEBP, GIF, BMP, TIFF, MPO)",
    )
    m.extend(_sidecars("no_image", "a caption without an image"))
    expect(sh, "no_image", Status.NO_IMAGE, "only .json and .txt members")
    good(sh, "good_b", m)
    p = out / f"{sh}.tar"
    _write_tar(p, m)
    flags[sh] = "ok"
    notes[sh] = "a complete tar holding per-sample decode failures between two good samples"
    paths.append(str(p))

    # bad-00004: unusual but valid images -------------------------------------------------------
    sh = "bad-00004"
    m = []
    good(sh, "good_a", m)
    base_b = photo(non_square=True)  # so that the rotation shows in the stored size
    good_b = good(sh, "good_b", m, data=jpg(base_b))
    cases = [
        ("cmyk", "jpg", _save(photo().convert("CMYK"), "JPEG", quality=90), "CMYK JPEG"),
        ("gray16", "png", _gray16(photo()), "16-bit greyscale PNG (mode I;16) spanning the full range"),
        ("rgba", "png", _rgba(photo()), "RGBA PNG, alpha 200 with a fully transparent corner"),
        ("palette_trns", "png", _palette_trns(photo()), "palette PNG (64 colours) with a transparent index (tRNS)"),
        ("animated", "gif", _gif(photo()), "animated GIF, 3 frames"),
        ("exif_rot6", "jpg", _exif_rotated(base_b), f"JPEG stored rotated, EXIF Orientation 6: a copy of {good_b}"),
        ("png_as_jpg", "jpg", _save(photo(), "PNG"), "PNG bytes under a .jpg member name"),
    ]
    for key, ext, data, note in cases:
        m.append((f"{key}.{ext}", data))
        m.extend(_sidecars(key, note))
        expect(sh, key, Status.OK, note)
    dups[sample_id(sh, "exif_rot6")] = good_b
    p = out / f"{sh}.tar"
    _write_tar(p, m)
    flags[sh] = "ok"
    notes[sh] = "a complete tar of unusual but valid images: all must decode"
    paths.append(str(p))

    # bad-00005: member layout quirks -----------------------------------------------------------
    sh = "bad-00005"
    m = [("noncontig.json", json.dumps({"caption": "sidecar first, image later"}).encode())]
    good(sh, "good_jpeg", m, ext="jpeg")
    m.append(("dotted.v2.jpg", jpg()))
    m.append(("dotted.json", json.dumps({"caption": "dotted"}).encode()))
    expect(
        sh, "dotted", Status.OK,
        "members dotted.v2.jpg + dotted.json: WebDataset splits at the FIRST dot of the basename, "
        "so one sample, key 'dotted', extensions 'v2.jpg' and 'json'",
    )
    m.append(("sub.dir/nested.jpg", jpg()))
    expect(sh, "sub.dir/nested", Status.OK, "member sub.dir/nested.jpg: the dot in the directory is not a key split -> key 'sub.dir/nested'")
    first, second = jpg(), jpg(_noise_field(5, side=64))
    m.append(("dupname.jpg", first))
    m.append(("dupname.jpg", second))
    m.extend(_sidecars("dupname", "two members with one name"))
    expect(
        sh, "dupname", Status.OK,
        "two members named dupname.jpg: one row, the FIRST is kept (a 128 px photo; the second is a 64x48 noise field)",
    )
    good(sh, "good_webp", m, ext="webp", data=_save(photo(), "WEBP", quality=90))
    m.append(("noncontig.jpg", jpg()))
    expect(sh, "noncontig", Status.OK, "noncontig.json is the first member, noncontig.jpg the last, other samples between: one row")
    p = out / f"{sh}.tar"
    _write_tar(p, m)
    flags[sh] = "ok"
    notes[sh] = "a complete tar whose member names and order are unusual"
    paths.append(str(p))

    # bad-00006: listed but missing -------------------------------------------------------------
    sh = "bad-00006"
    p = out / f"{sh}.tar"
    if p.exists():
        p.unlink()
    flags[sh] = "missing"
    notes[sh] = "the path is passed to dedup run but the file does not exist"
    paths.append(str(p))

    return paths, Expected(dict(sorted(rows.items())), flags, notes, dups, tuple(lost))
