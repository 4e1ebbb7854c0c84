"""Optional dependencies by role, and the one-line error when a feature needs one.

The core install (``pip install .``) reads shards, hashes, searches, clusters and writes the
manifest and report. Heavier packages come with an extra (``pip install 'dedup[embed]'``);
the table is in docs/getting-started.md and pyproject.toml. A feature whose package is not
installed raises :class:`MissingExtra` (a :class:`ConfigError`: exit code 2, nothing written)
naming the extra, before any work.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from dedup.errors import ConfigError

# import name -> (distribution to name in the message, extra that installs it)
PACKAGES: dict[str, tuple[str, str]] = {
    "torch": ("torch", "embed"),
    "open_clip": ("open_clip_torch", "embed"),
    "onnxruntime": ("onnxruntime", "embed"),
    "ray": ("ray", "ray"),
    "matplotlib": ("matplotlib", "report"),
    "skimage": ("scikit-image", "demo"),
    "webdataset": ("webdataset", "demo"),
    "s3fs": ("s3fs", "s3"),
}


class MissingExtra(ConfigError):
    """A feature needs a package of an extra that is not installed (exit code 2)."""


def installed(module: str) -> bool:
    """Whether ``module`` (a top-level import name) can be found, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder refusing it; a half-imported module
        return False


def message(feature: str, modules: list[str], hint: str = "") -> str:
    """``FEATURE needs A and B: pip install 'dedup[X]'`` (+ ``; HINT``)."""
    names = [PACKAGES.get(m, (m, ""))[0] for m in modules]
    extras = sorted({PACKAGES[m][1] for m in modules if m in PACKAGES})
    what = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    text = f"{feature} needs {what}"
    if extras:
        text += f": pip install 'dedup[{','.join(extras)}]'"
    return text + (f" ({hint})" if hint else "")


def need(feature: str, *modules: str, hint: str = "") -> None:
    """Raise :class:`MissingExtra` when any of ``modules`` is not installed."""
    missing = [m for m in modules if not installed(m)]
    if missing:
        raise MissingExtra(message(feature, missing, hint))


def require(feature: str, module: str, hint: str = "") -> ModuleType:
    """Import ``module`` for ``feature``, or raise :class:`MissingExtra` naming its extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name is not None and e.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there but one of its own dependencies is broken: show it as is
        raise MissingExtra(message(feature, [module.split(".")[0]], hint)) from None


HASHES_ONLY = "or hashes only: --methods exact,phash,dhash"


def url_to_fs(url: str) -> tuple:
    """``fsspec.core.url_to_fs``, with a missing filesystem package as one line naming its extra."""
    from fsspec.core import url_to_fs as resolve

    try:
        return resolve(url)
    except ImportError as e:  # fsspec: "Install s3fs to access S3"
        proto = url.split("://", 1)[0]
        if proto in ("s3", "s3a"):
            raise MissingExtra(message(f"{proto}:// access", ["s3fs"])) from None
        raise ConfigError(f"{proto}:// paths: {e}") from None
