"""Hand memory that glibc's malloc keeps after a forward pass back to the operating system.

Every micro-batch has a new tensor shape (its size and its longest text), so the freed
activation buffers of one batch rarely fit the next. glibc keeps them in a heap that
fragments, and the resident set grows by hundreds of MiB over a few thousand requests without
a single live object leaking. ``malloc_trim(0)`` returns every free page of every arena.

The alternative, a fixed low mmap threshold (``mallopt(M_MMAP_THRESHOLD, 128 KiB)``), keeps
the resident set flat too, but maps and zeroes every large buffer afresh: it cost 40% of the
embedder's throughput (docs/reliability.md). A trim every few batches and when a stage goes
idle costs next to nothing. The batchers call it (runtime/batching.py, ``MemoryRelease``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        log.info("malloc_trim is not available in %s: freed memory stays with the allocator",
                 name)
        return None
    return trim


def release_freed_memory() -> bool:
    """Return the allocator's free pages to the OS; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
