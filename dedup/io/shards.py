"""Shard listing (directories, globs, brace patterns, fsspec URLs) and tar streaming.

Tars are streamed member by member (never extracted) with :mod:`tarfile` in stream mode over
an fsspec file, and members are grouped into samples by WebDataset's key convention (the key
is the member path up to the first dot of its basename). Two traps are handled here:

* a tar cut exactly at a header boundary reads as a shorter *valid* tar; we detect it by
  checking that an end-of-archive block follows the last member (and that every byte of the
  file was read), and flag the shard ``truncated``;
* members of one key that are not contiguous are merged into one sample (first image wins;
  a repeated member name is noted, never a second row).

Every member of the tar is accounted for: it is part of a sample (one manifest row per key),
or it is listed in :attr:`ShardReadResult.ignored` with the reason (directories, symlinks and
hard links, special files, and names with no WebDataset key: no extension or a hidden
dot-name; WebDataset's own loader skips all of these too). The features phase writes that list
into the shard's done marker (``ignored_members``), so ``members == rows' members + ignored``.

``.tar.gz``/``.tgz`` shards (gzip, recognised by their magic bytes, not their name) are read
through :class:`gzip.GzipFile`, which reports a cut stream; the end-of-archive check then runs
on the decompressed bytes, where the tar offsets live.
"""

from __future__ import annotations

import gzip
import os
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from braceexpand import braceexpand
from fsspec.core import url_to_fs

from dedup import extras
from dedup.errors import ConfigError
from dedup.records import ShardRef

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_GLOB_CHARS = "*?["
_GZIP_MAGIC = b"\x1f\x8b"
# Sidecars that are text by convention: never taken for an image, whatever their bytes.
_TEXT_EXTS = frozenset({"txt", "text", "json", "jsonl", "cls", "cls2", "caption", "csv", "tsv", "xml", "html", "yaml", "yml", "md"})


def split_key(name: str) -> tuple[str | None, str | None]:
    """WebDataset convention: ``dir/a.v2.jpg`` -> (``dir/a``, ``v2.jpg``)."""
    d, base = posixpath.split(name)
    if "." not in base or base.startswith("."):
        return None, None
    stem, ext = base.split(".", 1)
    return (posixpath.join(d, stem) if d else stem), ext


def _strip_tar(path: str) -> str:
    for s in TAR_SUFFIXES:
        if path.endswith(s):
            return path[: -len(s)]
    return path


def _static_prefix(pattern: str, chars: str = _GLOB_CHARS) -> str:
    """Directory part of a glob (or brace) pattern before its first wildcard."""
    cut = min((pattern.find(c) for c in chars if c in pattern), default=len(pattern))
    return pattern[:cut].rsplit("/", 1)[0] if "/" in pattern[:cut] else ""


def _brace_root(raw: str) -> str | None:
    """The fs path of the directory before a brace pattern's first ``{`` (or wildcard): the
    shared root of all its expansions, as a glob's static prefix is for its matches (so
    ``coll/{a,b}/s.tar`` gives ids ``a/s`` and ``b/s``). None when there is no such directory."""
    prefix = _static_prefix(raw, _GLOB_CHARS + "{")
    if not prefix or prefix.endswith(":/") or prefix.endswith(":"):
        return None
    fs, path = url_to_fs(prefix)
    return _norm(fs, path).rstrip("/") or None


def _norm(fs, path: str) -> str:
    """Local paths normalised (``wds/../wds/x.tar`` is ``wds/x.tar``); other filesystems'
    paths (object keys) are left exactly as given."""
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return os.path.normpath(path)
    return path


def list_shards(inputs: list[str]) -> tuple[list[ShardRef], list[ShardRef]]:
    """Resolve INPUT arguments into shards.

    Returns ``(found, missing)``: ``missing`` holds explicit paths (not patterns) that do not
    exist; they become shard-level failures in the run, never a silent drop.
    ``shard_id`` = path relative to the input's root (the directory given, or the static
    directory prefix of a pattern, or the file's parent), without ``.tar``/``.tar.gz``/``.tgz``.
    All expansions of a brace pattern share its static prefix as root. Local paths are
    normalised first, so one file given twice under two spellings is one input.
    """
    found: dict[str, ShardRef] = {}
    missing: list[ShardRef] = []
    for raw in inputs:
        brace_root = _brace_root(raw) if "{" in raw else None
        for item in braceexpand(raw) if "{" in raw else [raw]:
            fs, path = extras.url_to_fs(item)  # a missing s3fs: one line naming [s3]
            path = _norm(fs, path)
            proto = item.split("://", 1)[0] + "://" if "://" in item else ""

            def url(p: str, proto: str = proto) -> str:
                return proto + p if proto else p

            if any(c in path for c in _GLOB_CHARS):
                root = _static_prefix(path)
                matches = sorted(p for p in fs.glob(path) if p.endswith(TAR_SUFFIXES))
                if not matches:
                    raise ConfigError(f"input pattern {item!r} matched no .tar/.tar.gz files")
                pairs = [(p, root) for p in matches]
            elif fs.isdir(path):
                root = path.rstrip("/")
                matches = sorted(p for p in fs.find(path) if p.endswith(TAR_SUFFIXES))
                if not matches:
                    raise ConfigError(f"input directory {item!r} holds no .tar/.tar.gz files")
                pairs = [(p, root) for p in matches]
            elif fs.exists(path):
                pairs = [(path, posixpath.dirname(path))]
            else:
                root = brace_root if brace_root is not None and path.startswith(brace_root + "/") else posixpath.dirname(path)
                missing.append(ShardRef(url(path), _strip_tar(posixpath.relpath(path, root) if root else path.lstrip("/"))))
                continue
            for p, root in pairs:
                if brace_root is not None and (p + "/").startswith(brace_root + "/"):
                    root = brace_root
                rel = posixpath.relpath(p, root) if root else p.lstrip("/")
                ref = ShardRef(url(p), _strip_tar(rel))
                prev = found.get(ref.shard_id)
                if prev is not None and prev.url != ref.url:
                    raise ConfigError(
                        f"two inputs give the same shard_id {ref.shard_id!r}: {prev.url} and {ref.url}; "
                        "pass their common parent directory instead so that ids stay unique"
                    )
                found[ref.shard_id] = ref
    return sorted(found.values(), key=lambda r: r.shard_id), missing


def shard_fingerprint(url: str) -> dict:
    """Cheap identity of a shard's content for resume checks: size plus mtime/etag if known."""
    fs, path = url_to_fs(url)
    info = fs.info(path)
    fp: dict[str, int | str] = {"size": int(info.get("size") or 0)}
    for k in ("mtime", "ETag", "etag", "LastModified", "last_modified"):
        if k in info and info[k] is not None:
            fp["version"] = str(info[k])
            break
    return fp


@dataclass
class Sample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes
    notes: list[str] = field(default_factory=list)
    read_error: str | None = None
    names: dict[str, str] = field(default_factory=dict)  # extension -> member name as in the tar

    def name(self, ext: str) -> str:
        return self.names.get(ext, f"{self.key}.{ext}")


@dataclass
class ShardReadResult:
    """What the reader learnt about the shard as a whole (filled while iterating)."""

    condition: str = "ok"  # ok | truncated | empty | unreadable | missing
    error: str | None = None
    bytes_read: int = 0
    members: int = 0  # every member header read, of any type
    # Members that are part of no sample: {"name", "type", "why"} each.
    ignored: list[dict] = field(default_factory=list)


class CountingReader:
    """Wraps a binary file: counts bytes and keeps the last ``keep`` bytes read."""

    def __init__(self, f, keep: int = 1 << 20):
        self._f = f
        self.pos = 0
        self.keep = keep
        self.tail = bytearray()

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        self.pos += len(b)
        if not self.keep:
            return b
        self.tail += b
        if len(self.tail) > 2 * self.keep:
            del self.tail[: len(self.tail) - self.keep]
        return b

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def bytes_at(self, offset: int, n: int) -> bytes | None:
        start = offset - (self.pos - len(self.tail))
        if start < 0:
            return None
        return bytes(self.tail[start : start + n])


class _Prefixed:
    """A binary stream with bytes already read from it put back in front."""

    def __init__(self, head: bytes, f):
        self._head, self._f = head, f

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._f.read(n)
        if n is None or n < 0:
            b, self._head = self._head + self._f.read(), b""
            return b
        b, self._head = self._head[:n], self._head[n:]
        return b + (self._f.read(n - len(b)) if len(b) < n else b"")


def tar_stream(f) -> tuple[object, bool]:
    """``(stream of the tar's bytes, gzipped)`` for a binary file holding a tar or a gzipped
    tar (told apart by the gzip magic, whatever the file's name). A cut gzip stream raises
    ``EOFError`` and a damaged one ``gzip.BadGzipFile``/``zlib.error`` while reading (see
    :data:`STREAM_ERRORS`)."""
    head = f.read(2)
    src = _Prefixed(head, f)
    if head == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=src, mode="rb"), True  # type: ignore[call-overload]  # reads only: no seek needed
    return src, False


# What a damaged or cut (possibly gzipped) tar stream raises. Not OSError at large: an I/O
# error of the filesystem (a network hiccup) must fail the worker, which retries the shard.
STREAM_ERRORS = (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error)


def _member_type(m: tarfile.TarInfo) -> str:
    if m.isdir():
        return "directory"
    if m.issym():
        return "symlink"
    if m.islnk():
        return "hardlink"
    if m.ischr() or m.isblk():
        return "device"
    if m.isfifo():
        return "fifo"
    return "other"


def _why_not_followed(m: tarfile.TarInfo, kind: str) -> str:
    if kind == "directory":
        return "directory member: holds no data"
    if kind == "symlink":
        return f"link member (symlink to {m.linkname!r}), not followed"
    if kind == "hardlink":
        return f"link member (hard link to {m.linkname!r}; no data in a tar stream), not followed"
    return f"{kind} member: holds no data"


def iter_samples(ref: ShardRef, result: ShardReadResult, image_exts: tuple[str, ...]) -> Iterator[Sample]:
    """Yield the samples of one shard, one per contiguous run of members with the same key.

    Memory stays bounded to one sample. A key whose members are not contiguous comes out
    once per run, all with the same key; the features phase merges them into one row.
    Members that belong to no sample go to ``result.ignored`` (see the module doc).
    Never raises for a damaged shard: the condition goes into ``result``.
    """
    try:
        fs, path = url_to_fs(ref.url)
        f = fs.open(path, "rb")
    except FileNotFoundError:
        result.condition, result.error = "missing", f"shard not found: {ref.url}"
        return
    except Exception as e:  # noqa: BLE001 - any open failure is a shard failure, recorded
        result.condition, result.error = "unreadable", f"cannot open shard: {type(e).__name__}: {e}"
        return
    with f:
        raw = CountingReader(f, keep=0)  # bytes of the file
        try:
            stream, gzipped = tar_stream(raw)
            reader = CountingReader(stream)  # bytes of the tar (decompressed), where offsets live
            tf = tarfile.open(fileobj=reader, mode="r|")  # type: ignore[call-overload]  # "r|" only reads
        except STREAM_ERRORS as e:
            _drain_quietly(raw)
            result.bytes_read = raw.pos
            if raw.pos == 0:
                result.condition, result.error = "empty", "zero-byte file: not a tar archive"
            elif gzipped and isinstance(e, EOFError):
                result.condition, result.error = "truncated", f"gzip stream cut short before the first member: {e}"
            else:
                what = "gzipped tar" if gzipped else "tar archive"
                result.condition, result.error = "unreadable", f"not a {what}: {type(e).__name__}: {e}"
            return
        current: Sample | None = None
        try:
            while True:
                try:
                    m = tf.next()
                except STREAM_ERRORS as e:  # damaged header mid-archive, or a cut gzip stream
                    result.condition, result.error = "truncated", f"damaged tar header after {result.members} members: {_err(e)}"
                    break
                if m is None:
                    break
                result.members += 1
                key, ext = split_key(m.name)
                if not m.isfile():
                    kind = _member_type(m)
                    why = _why_not_followed(m, kind)
                    result.ignored.append({"name": m.name, "type": kind, "why": why})
                    if current is not None and key is not None and key == current.key:
                        current.notes.append(f"member {m.name!r}: {why}")
                    continue
                if key is None:
                    # No WebDataset key (no extension, or a hidden dot-name): part of no sample.
                    try:
                        head = tf.extractfile(m).read(64)
                    except STREAM_ERRORS as e:
                        result.ignored.append({"name": m.name, "type": "file", "why": f"cut short: {_err(e)}"})
                        result.condition, result.error = "truncated", f"shard ends inside member {m.name!r}"
                        break
                    result.ignored.append({"name": m.name, "type": "file", "why": _why_no_key(m.name, head)})
                    continue
                if current is not None and current.key != key:
                    yield current
                    current = None
                if current is None:
                    current = Sample(key)
                assert ext is not None  # a key comes with an extension
                ext = ext.lower()
                try:
                    data = tf.extractfile(m).read()
                except (*STREAM_ERRORS, OSError) as e:
                    current.read_error = f"member {m.name!r} cut short: {_err(e)}"
                    result.condition, result.error = "truncated", f"shard ends inside member {m.name!r}"
                    break
                if ext in current.members:
                    current.notes.append(f"duplicate member {m.name!r} ignored (first kept)")
                else:
                    current.members[ext] = data
                    current.names[ext] = m.name
            if current is not None:
                yield current
                current = None
        except STREAM_ERRORS as e:  # pragma: no cover - defensive
            result.condition, result.error = "truncated", f"tar error: {_err(e)}"
            if current is not None:
                current.read_error = current.read_error or str(e)
                yield current
        if result.condition == "ok":
            # A valid archive ends with a zero block right where tarfile stopped.
            offset = tf.offset
            try:
                reader.drain()
            except STREAM_ERRORS as e:  # a gzip stream cut (or damaged) after the last member
                result.condition, result.error = "truncated", f"gzip stream cut short after the last member: {_err(e)}"
            else:
                block = reader.bytes_at(offset, 512)
                if block is None or len(block) < 512 or block.count(0) != 512:
                    result.condition = "truncated"
                    result.error = (
                        f"no end-of-archive block after the last member at byte {offset} "
                        f"(tar has {reader.pos} bytes{' decompressed' if gzipped else ''}): "
                        "the shard was probably cut at a header boundary"
                    )
        _drain_quietly(raw)
        result.bytes_read = raw.pos


def _err(e: BaseException) -> str:
    return str(e) if isinstance(e, tarfile.TarError) else f"{type(e).__name__}: {e}"


def _drain_quietly(r: CountingReader) -> None:
    """Read to the end (for ``bytes_read``); an I/O error there only leaves the count short."""
    try:
        r.drain()
    except OSError:
        pass


def _why_no_key(name: str, head: bytes) -> str:
    base = posixpath.basename(name)
    why = "hidden dot-name" if base.startswith(".") else "name has no extension"
    fmt = sniff_image(head)
    content = f"; its bytes are a {fmt} image" if fmt else ""
    return f"{why}: no WebDataset key, part of no sample{content}"


def sniff_image(data: bytes) -> str | None:
    """The Pillow format name of an image recognised by its magic bytes (JPEG, PNG, GIF, WEBP,
    BMP, TIFF), else None. Signatures are checked strictly enough that text never matches."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[:2] == b"BM" and len(data) >= 18 and int.from_bytes(data[14:18], "little") in (12, 40, 52, 56, 64, 108, 124):
        return "BMP"  # "BM" + a known DIB header size (a caption starting "BM" does not have one)
    return None


def pick_image(sample: Sample, image_exts: tuple[str, ...]) -> tuple[str | None, bytes | None, list[str]]:
    """``(extension, bytes, notes)`` of the sample's image.

    The first member (in ``image_exts`` order) whose LAST extension component is an image
    extension (``v2.jpg`` counts as jpg); any other image-extension member is named in a note.
    When no member has an image extension, the first member whose bytes are an image by
    content (:func:`sniff_image`; text sidecars such as ``.txt``/``.json`` are never
    considered) is used, with a note saying so.
    """
    by_last: dict[str, list[str]] = {}
    for ext in sample.members:
        by_last.setdefault(ext.rsplit(".", 1)[-1], []).append(ext)
    ranked = [ext for want in image_exts for ext in by_last.get(want, [])]
    if ranked:
        used = ranked[0]
        notes = [f"second image member {sample.name(e)!r} ignored; {sample.name(used)!r} used" for e in ranked[1:]]
        return used, sample.members[used], notes
    for ext, data in sample.members.items():
        if ext.rsplit(".", 1)[-1] in _TEXT_EXTS:
            continue
        fmt = sniff_image(data[:64])
        if fmt:
            note = f"image found by content in member {sample.name(ext)!r} ({fmt}): no member has an image extension"
            return ext, data, [note]
    return None, None, []


def image_member(sample: Sample, image_exts: tuple[str, ...]) -> tuple[str | None, bytes | None]:
    """The sample's image member ``(extension, bytes)``: see :func:`pick_image`."""
    ext, data, _ = pick_image(sample, image_exts)
    return ext, data


def caption_length(sample: Sample) -> int | None:
    import json

    if "txt" in sample.members:
        return len(sample.members["txt"].decode("utf-8", "replace"))
    if "json" in sample.members:
        try:
            obj = json.loads(sample.members["json"])
            if isinstance(obj, dict):
                for k in ("caption", "text", "TEXT"):
                    if isinstance(obj.get(k), str):
                        return len(obj[k])
        except ValueError:
            return None
    return None
