"""Shard listing (directories, globs, brace patterns, fsspec URLs) and tar streaming.

Tars are streamed member by member (never extracted) with :mod:`tarfile` in stream mode over
an fsspec file, and members are grouped into samples by WebDataset's key convention (the key
is the member path up to the first dot of its basename). Two traps are handled here:

* a tar cut exactly at a header boundary reads as a shorter *valid* tar; we detect it by
  checking that an end-of-archive block follows the last member (and that every byte of the
  file was read), and flag the shard ``truncated``;
* members of one key that are not contiguous are merged into one sample (first image wins;
  a repeated member name is noted, never a second row).
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
from braceexpand import braceexpand
from fsspec.core import url_to_fs

from dedup.errors import ConfigError
from dedup.records import ShardRef

TAR_SUFFIXES = (".tar",)
_GLOB_CHARS = "*?["


def _split_key(name: str) -> tuple[str | None, str | None]:
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


def _static_prefix(pattern: str) -> str:
    """Directory part of a glob pattern before its first wildcard."""
    cut = min((pattern.find(c) for c in _GLOB_CHARS if c in pattern), default=len(pattern))
    return pattern[:cut].rsplit("/", 1)[0] if "/" in pattern[:cut] else ""


def list_shards(inputs: list[str]) -> tuple[list[ShardRef], list[ShardRef]]:
    """Resolve INPUT arguments into shards.

    Returns ``(found, missing)``: ``missing`` holds explicit paths (not patterns) that do not
    exist; they become shard-level failures in the run, never a silent drop.
    ``shard_id`` = path relative to the input's root (the directory given, or the static
    directory prefix of a pattern, or the file's parent), without ``.tar``.
    """
    found: dict[str, ShardRef] = {}
    missing: list[ShardRef] = []
    for raw in inputs:
        for item in braceexpand(raw) if "{" in raw else [raw]:
            fs, path = url_to_fs(item)
            proto = item.split("://", 1)[0] + "://" if "://" in item else ""

            def url(p: str, proto: str = proto) -> str:
                return proto + p if proto else p

            if any(c in path for c in _GLOB_CHARS):
                root = _static_prefix(path)
                matches = sorted(p for p in fs.glob(path) if p.endswith(TAR_SUFFIXES))
                if not matches:
                    raise ConfigError(f"input pattern {item!r} matched no .tar files")
                pairs = [(p, root) for p in matches]
            elif fs.isdir(path):
                root = path.rstrip("/")
                matches = sorted(p for p in fs.find(path) if p.endswith(TAR_SUFFIXES))
                if not matches:
                    raise ConfigError(f"input directory {item!r} holds no .tar files")
                pairs = [(p, root) for p in matches]
            elif fs.exists(path):
                pairs = [(path, posixpath.dirname(path))]
            else:
                sid = _strip_tar(posixpath.basename(path))
                missing.append(ShardRef(url(path), sid))
                continue
            for p, root in pairs:
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
    fp = {"size": int(info.get("size") or 0)}
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


@dataclass
class ShardReadResult:
    """What the reader learnt about the shard as a whole (filled while iterating)."""

    condition: str = "ok"  # ok | truncated | empty | unreadable | missing
    error: str | None = None
    bytes_read: int = 0
    members: int = 0


class _CountingReader:
    """Wraps a binary file: counts bytes and keeps the last ``keep`` bytes read."""

    def __init__(self, f, keep: int = 1 << 20):
        self._f = f
        self.pos = 0
        self.keep = keep
        self.tail = bytearray()

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        self.pos += len(b)
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


def iter_samples(ref: ShardRef, result: ShardReadResult, image_exts: tuple[str, ...]) -> Iterator[Sample]:
    """Yield the samples of one shard, one per contiguous run of members with the same key.

    Memory stays bounded to one sample. A key whose members are not contiguous comes out
    once per run, all with the same key; the features phase merges them into one row.
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
        reader = _CountingReader(f)
        try:
            tf = tarfile.open(fileobj=reader, mode="r|")
        except tarfile.ReadError as e:
            reader.drain()
            result.bytes_read = reader.pos
            if reader.pos == 0:
                result.condition, result.error = "empty", "zero-byte file: not a tar archive"
            else:
                result.condition, result.error = "unreadable", f"not a tar archive: {e}"
            return
        current: Sample | None = None
        try:
            while True:
                try:
                    m = tf.next()
                except tarfile.ReadError as e:  # damaged header mid-archive
                    result.condition, result.error = "truncated", f"damaged tar header after {result.members} members: {e}"
                    break
                if m is None:
                    break
                if not m.isfile():
                    continue
                result.members += 1
                key, ext = _split_key(m.name)
                if key is None:
                    continue  # no extension: not part of any sample (e.g. a README member)
                if current is not None and current.key != key:
                    yield current
                    current = None
                if current is None:
                    current = Sample(key)
                ext = ext.lower()
                try:
                    data = tf.extractfile(m).read()
                except (tarfile.ReadError, EOFError, OSError) as e:
                    current.read_error = f"member {m.name!r} cut short: {e}"
                    result.condition, result.error = "truncated", f"shard ends inside member {m.name!r}"
                    break
                if ext in current.members:
                    current.notes.append(f"duplicate member {m.name!r} ignored (first kept)")
                else:
                    current.members[ext] = data
            if current is not None:
                yield current
                current = None
        except tarfile.TarError as e:  # pragma: no cover - defensive
            result.condition, result.error = "truncated", f"tar error: {e}"
            if current is not None:
                current.read_error = current.read_error or str(e)
                yield current
        if result.condition == "ok":
            # A valid archive ends with a zero block right where tarfile stopped.
            offset = tf.offset
            reader.drain()
            block = reader.bytes_at(offset, 512)
            if block is None or len(block) < 512 or block.count(0) != 512:
                result.condition = "truncated"
                result.error = (
                    f"no end-of-archive block after the last member at byte {offset} "
                    f"(file has {reader.pos} bytes): the shard was probably cut at a header boundary"
                )
        result.bytes_read = reader.pos


def image_member(sample: Sample, image_exts: tuple[str, ...]) -> tuple[str | None, bytes | None]:
    """The sample's image: the first member (in ``image_exts`` order) whose LAST extension
    component is an image extension (``v2.jpg`` counts as jpg)."""
    by_last = {}
    for ext, data in sample.members.items():
        last = ext.rsplit(".", 1)[-1]
        by_last.setdefault(last, (ext, data))
    for want in image_exts:
        if want in by_last:
            return by_last[want]
    return None, None


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
