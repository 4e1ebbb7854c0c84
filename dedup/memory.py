"""Handing memory a phase has freed back to the system (glibc's heaps, arrow's pool)."""

from __future__ import annotations

import pyarrow as pa

# glibc's malloc raises its mmap threshold up to 32 MB as large blocks are freed; blocks below
# it come from heaps that keep freed memory, which then counts in the resident set (measured at
# 10⁵ rows: 100–200 MB more RSS after each global phase than with a fixed threshold). A fixed
# 1 MiB threshold hands every larger array back to the system when it is freed.
_MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def return_freed_memory(setup: bool = False) -> None:
    """Give memory freed by a phase back to the system (glibc's heaps, arrow's pool); with
    ``setup``, first fix glibc's mmap threshold (see above). A no-op where these do not exist."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        if setup:
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    pa.default_memory_pool().release_unused()


class MappedTable:
    """A table moved out of the heap: written once to an uncompressed Arrow IPC file and read
    back zero-copy through a read-only file mapping, so its bytes are page cache, not heap.
    Only the pages a phase reads are resident (and counted in the resident set);
    :meth:`drop_pages` unmaps them from this process again (they stay in the page cache and are
    mapped back when read). The file's name is removed as soon as it is mapped: its space is
    freed with the mapping, even if the process is killed, so nothing is left behind.

    Measured at 10⁷ rows (docs/scale.md): the global phases' table is ~61 B a row (0.6 GB),
    which the outlier score never reads and the clusters read a few columns of."""

    def __init__(self, table: pa.Table, directory: str | None = None):
        import mmap
        import os
        import tempfile

        fd, path = tempfile.mkstemp(prefix="dedup-table-", suffix=".arrow", dir=directory)
        os.close(fd)
        self.path = path  # its name while written (gone once mapped)
        try:
            with pa.OSFile(path, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
                w.write_table(table)
            with open(path, "rb") as f:
                self._map: mmap.mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        finally:
            try:
                os.unlink(path)
            except OSError:  # pragma: no cover - a platform that keeps a mapped file's name
                import atexit
                import contextlib

                def remove() -> None:
                    with contextlib.suppress(OSError):
                        os.unlink(path)

                atexit.register(remove)
        self.nbytes = len(self._map)
        self.table: pa.Table = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(self._map))).read_all()

    @classmethod
    def of(cls, table: pa.Table, directory: str | None = None) -> MappedTable | None:
        """The table mapped from a file in ``directory`` (default: the temp dir), or None if it
        cannot be written there (no space, read-only: the caller keeps the table in memory)."""
        try:
            return cls(table, directory)
        except OSError as e:
            import logging

            logging.getLogger(__name__).warning("cannot move the features table (%.0f MB) into a file in %s (%s): "
                                                "it stays in memory", table.nbytes / 2**20, directory or "the temp dir", e)
            return None

    def drop_pages(self) -> None:
        """Unmap the pages read so far from this process."""
        unmap_resident(self._map)


def unmap_resident(m) -> None:
    """Drop the resident pages of a shared file mapping (``mmap.mmap``) from this process:
    they stay in the page cache (dirty ones are written back as usual) and are mapped again
    when read. A no-op where madvise is missing or the mapping is closed."""
    import mmap

    try:
        m.madvise(mmap.MADV_DONTNEED)
    except (AttributeError, ValueError, OSError):  # pragma: no cover - no madvise here, or a closed mapping
        pass
