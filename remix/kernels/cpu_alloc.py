"""Keep large CPU tensors out of mmap: glibc gives every allocation over 128 KiB fresh pages by mmap,
so each [T, 1536] float32 activation with T >= 22 pays ~1 page fault per 4 KiB on first touch. A
forward pass allocates hundreds of them; raising the mmap and trim thresholds lets freed blocks be
reused instead (the same thing tcmalloc/jemalloc preloads achieve in other serving stacks)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_done: list[bool] = []


def tune_cpu_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Raise glibc's mmap/trim thresholds for this process (idempotent; False where not glibc)."""
    if _done:
        return _done[0]
    ok = False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError) as e:
        log.info("allocator tuning unavailable: %s", e)
    _done.append(ok)
    return ok
