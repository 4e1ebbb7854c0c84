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
