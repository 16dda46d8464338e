from __future__ import annotations

import ctypes
import ctypes.util
import platform
from pathlib import Path

import pytest

from runtime.memory import release_freed_memory

BLOCK = 64 * 1024  # below glibc's mmap threshold: served from the heap, as activations are
BLOCKS = 1600  # 100 MiB


def _rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")
def test_release_returns_freed_heap_pages_that_glibc_keeps() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(BLOCK) for _ in range(BLOCKS)]
    assert all(blocks)
    try:
        for block in blocks:
            ctypes.memset(block, 1, BLOCK)
        touched = _rss_mib()
        # The last block stays live on top of the freed ones, so free() cannot shrink the heap
        # by itself: this is the fragmentation that varying batch shapes leave behind.
        for block in blocks[:-1]:
            libc.free(block)
        kept = _rss_mib()
        assert kept > touched - 20, (touched, kept)
        assert release_freed_memory() is True
        released = _rss_mib()
    finally:
        libc.free(blocks[-1])
    assert kept - released > 80, (kept, released)


def test_release_is_safe_to_call_repeatedly() -> None:
    first = release_freed_memory()
    assert release_freed_memory() is first
