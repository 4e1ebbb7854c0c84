"""Output safety: one check, shared by every command that writes, before anything is written.

A data tool is trusted with the user's data; the rules here are what keeps that trust:

* An output location never overlaps a location the command reads: not equal to it, not
  inside it, not containing it. Inputs are the shard locations (the directories given, the
  directories of globbed or listed shards, and the shard files themselves) and run
  directories. ``dedup apply run/ --out shards/`` would otherwise replace input shards with
  filtered copies; ``--out shards/clean`` would put new ``.tar`` files where the next
  ``dedup run shards/`` finds them.
* Paths are compared after normalisation: ``~`` expanded, made absolute, ``..`` removed and
  symbolic links resolved (``os.path.realpath``) for local paths; ``proto://`` URLs compare
  by protocol and normalised key path.
* An existing file is never replaced unless it is this tool's own output (a run, a report)
  or the user says so (``--overwrite``).

Every refusal is a :class:`~dedup.errors.ConfigError` (one line, exit code 2).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

from dedup.errors import ConfigError

_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Location:
    """A normalised place: ``proto`` ('' for local files) and an absolute ``path``."""

    proto: str
    path: str
    shown: str  # as the user wrote it, for messages

    def contains(self, other: Location) -> bool:
        """True when ``other`` is this place or lies inside it."""
        if self.proto != other.proto:
            return False
        if self.path == other.path:
            return True
        base = self.path.rstrip("/") + "/"
        return other.path.startswith(base)

    def overlaps(self, other: Location) -> bool:
        return self.contains(other) or other.contains(self)

    @property
    def local(self) -> bool:
        return self.proto == ""


def locate(where: str) -> Location:
    """Normalise a local path or fsspec URL (``file://`` counts as local)."""
    raw = str(where)
    if "://" in raw:
        proto, rest = raw.split("://", 1)
        if proto == "file":
            return locate(rest)
        return Location(proto, posixpath.normpath("/" + rest.lstrip("/")), raw)
    return Location("", os.path.realpath(os.path.abspath(os.path.expanduser(raw))), raw)


def canonical(where: str) -> str:
    """A location as one comparable string (local: the real absolute path)."""
    loc = locate(where)
    return f"{loc.proto}://{loc.path.lstrip('/')}" if loc.proto else loc.path


def input_locations(inputs: Iterable[str], shard_urls: Iterable[str] = (), shard_dirs: bool = False) -> list[Location]:
    """The places a run reads: each input as given (a directory or a file; for a glob, the
    directory before its first wildcard), and every shard; with ``shard_dirs`` each shard's
    directory too (for outputs of ``.tar`` files, which a later run of that folder would read)."""
    from braceexpand import braceexpand

    out: list[Location] = []
    for raw in inputs:
        for item in braceexpand(raw) if "{" in raw else [raw]:
            cut = min((item.find(c) for c in _GLOB_CHARS if c in item), default=-1)
            if cut >= 0:
                head = item[:cut]
                item = head.rsplit("/", 1)[0] if "/" in head else "."
            out.append(locate(item))
    for url in shard_urls:
        loc = locate(url)
        out.append(loc)
        if shard_dirs:
            out.append(Location(loc.proto, posixpath.dirname(loc.path) or "/", posixpath.dirname(url) or "."))
    return _unique(out)


def _unique(locs: list[Location]) -> list[Location]:
    seen: set[tuple[str, str]] = set()
    out = []
    for loc in locs:
        if (loc.proto, loc.path) not in seen:
            seen.add((loc.proto, loc.path))
            out.append(loc)
    return out


def guard_dir_output(out: str, *, reads: Iterable[Location], runs: Iterable[str] = (), option: str = "--out") -> Location:
    """Refuse an output directory that is an existing file, or that overlaps anything read
    (``reads``: input locations; ``runs``: run directories read). Returns its location."""
    loc = locate(out)
    if loc.local and os.path.exists(loc.path) and not os.path.isdir(loc.path):
        raise ConfigError(f"{option} {out}: is an existing file, not a directory")
    for r in reads:
        if loc.overlaps(r):
            raise ConfigError(_overlap_message(option, out, loc, r, "input"))
    for run in runs:
        r = locate(run)
        if loc.overlaps(r):
            raise ConfigError(_overlap_message(option, out, loc, r, "run directory"))
    return loc


def guard_file_output(
    path: str, *, reads: Iterable[Location] = (), runs: Iterable[str] = (), overwrite: bool = False,
    ours: bool = False, option: str = "--out", flag: bool = True,
) -> Location:
    """Refuse an output file that is a directory, an input or inside an input directory, or an
    existing file of a run directory other than our own output; and any existing file unless
    ``overwrite`` or it is this tool's own earlier output (``ours``). ``flag``: the command
    has an ``--overwrite`` option (the message offers it)."""
    loc = locate(path)
    if loc.local and os.path.isdir(loc.path):
        raise ConfigError(f"{option} {path}: is a directory; give a file name")
    for r in reads:
        if r.path == loc.path or (r.contains(loc) and not _is_dir(r)):
            raise ConfigError(f"{option} {path}: is one of the inputs ({r.shown}); refusing to replace it")
        if r.contains(loc):
            raise ConfigError(f"{option} {path}: lies inside the input {r.shown}; write it outside the inputs")
    exists = loc.local and os.path.exists(loc.path)
    for run in runs:
        r = locate(run)
        if loc.contains(r):
            raise ConfigError(_overlap_message(option, path, loc, r, "run directory"))
        if r.contains(loc) and exists and not ours:
            raise ConfigError(f"{option} {path}: is a file of the run directory {run}; refusing to replace it")
    if exists and not (overwrite or ours):
        how = "pass --overwrite to replace it, or choose another name" if flag else "choose another name"
        raise ConfigError(f"{option} {path}: exists; {how}")
    return loc


def _is_dir(loc: Location) -> bool:
    return loc.local and os.path.isdir(loc.path)


def _overlap_message(option: str, out: str, loc: Location, other: Location, what: str) -> str:
    if loc.path == other.path:
        how = f"is the {what} {other.shown}"
    elif other.contains(loc):
        how = f"lies inside the {what} {other.shown}"
    else:
        how = f"contains the {what} {other.shown}"
    where = "inputs" if what == "input" else f"{what}s".replace("directorys", "directories")
    return f"{option} {out}: {how}; choose a location outside the {where} (nothing was written)"


def is_run_dir(loc: Location) -> bool:
    """A local directory that holds a dedup run (or one interrupted before run.json)."""
    if not loc.local or not os.path.isdir(loc.path):
        return False
    from dedup.io.rundir import TMP_MARK, RunDir

    run = RunDir(loc.path)
    if os.path.exists(run.run_json):
        return True
    names = os.listdir(loc.path)
    lock = posixpath.basename(run.lock)
    return bool(names) and all(n == lock or n.startswith(TMP_MARK) for n in names)


def dir_is_empty(loc: Location) -> bool:
    return not loc.local or not os.path.isdir(loc.path) or not os.listdir(loc.path)


def run_reads(run) -> list[Location]:
    """Every location a run read (its inputs and shards, normalised), from run.json (older
    runs: the done markers), so an output can be checked against them."""
    info = run.read_json(run.run_json)
    inputs = list(info.get("input_locations") or info.get("inputs") or [])
    urls = list((info.get("shard_urls") or {}).values())
    done_dir = run.done_dir
    if not urls and run.exists(done_dir):  # runs written before run.json listed the shards' urls
        for path in run.fs.ls(done_dir, detail=False):
            if path.endswith(".json"):
                try:
                    urls.append(run.read_json(path)["url"])
                except (OSError, ValueError, KeyError):
                    continue
    return input_locations(inputs, urls, shard_dirs=True)
