"""dedup: remove duplicate and near-duplicate images from WebDataset shards.

The Python API (``dedup.run``, ``dedup.open_run``, ``dedup.apply``, ``dedup.check``) is in
:mod:`dedup.api`; it is imported on first use, so ``import dedup`` stays light.
"""

__version__ = "0.1.0"

__all__ = ["CheckResult", "Run", "__version__", "apply", "check", "check_result", "open_run", "run"]


def __getattr__(name: str):
    if name in ("CheckResult", "Run", "apply", "check", "check_result", "open_run", "run"):
        from dedup import api

        return getattr(api, name)
    raise AttributeError(f"module 'dedup' has no attribute {name!r}")
