"""Keep large CPU tensors out of mmap: glibc gives every allocation over 128 KiB fresh pages by mmap,
so each [T, 1536] float32 activation with T >= 22 pays ~1 page fault per 4 KiB on first touch. A
forward pass allocates hundreds of them; raising the mmap and trim thresholds lets freed blocks be
reused instead (the same thing tcmalloc/jemalloc preloads achieve in other serving stacks)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import os

import torch

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


# ---- transparent huge pages for the memory a decode step streams (weights, KV cache)
#
# A decode step reads every weight and every live K/V position once. On 4 KiB pages that is one TLB miss per 4 KiB
# (the default base in bfloat16: ~66,000 pages of weights, plus the cache) and the hardware prefetchers stop at every
# page boundary; on 2 MiB pages neither happens. Most of the kernel's policies ("madvise", the common default) give huge
# pages only to memory that asks for them, and PyTorch asks only with C10_THP_MEM_ALLOC_ENABLE / THP_MEM_ALLOC_ENABLE
# set before it starts, and then only per tensor of >= 2 MiB (few of a small model's weights are). These helpers ask
# for one 2 MiB-aligned block instead. REMIX_HUGE_PAGES=0 turns them off.

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_THP_POLICY = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc
    except (OSError, AttributeError) as e:
        log.info("madvise unavailable: %s", e)
        return None


def thp_policy() -> str:
    """The kernel's transparent huge page policy as a word for a message: "always", "madvise", "never", "off
    (REMIX_HUGE_PAGES=0)" or "unavailable" (no such setting: not Linux, or a kernel without THP)."""
    if os.environ.get("REMIX_HUGE_PAGES", "1").strip().lower() in ("0", "false", "no", "off"):
        return "off (REMIX_HUGE_PAGES=0)"
    try:
        with open(_THP_POLICY) as f:
            policy = f.read()
    except OSError:
        return "unavailable"
    chosen = policy[policy.find("[") + 1:policy.find("]")] if "[" in policy else policy.strip()
    return chosen or "unavailable"


def huge_pages_available() -> bool:
    """True where a block can ask for transparent huge pages: Linux with THP "always" or "madvise", and
    REMIX_HUGE_PAGES not set to 0."""
    return thp_policy() in ("always", "madvise") and _libc() is not None


def _huge_block(nbytes: int) -> torch.Tensor:
    """Uninitialised uint8 [nbytes] on the CPU, starting on a 2 MiB boundary, advised MADV_HUGEPAGE before its first
    touch. From glibc's mmap threshold (32 MiB after tune_cpu_allocator) the block is freshly mapped, so its first touch
    faults in huge pages; a smaller one comes from the heap, where pages touched before keep 4 KiB until the kernel's
    khugepaged collapses them."""
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    length = (raw.numel() - start) // HUGE_PAGE * HUGE_PAGE  # whole huge pages inside the block only
    if length and _libc().madvise(raw.data_ptr() + start, length, _MADV_HUGEPAGE) != 0:
        log.debug("madvise(MADV_HUGEPAGE) failed: errno %d", ctypes.get_errno())
    return raw[start : start + nbytes]


def empty_huge(shape, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, on transparent huge pages where available and the tensor spans
    at least one (else a plain ``torch.empty``). Contiguous, 2 MiB-aligned."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE or not huge_pages_available():
        return torch.empty(shape, dtype=dtype)
    return _huge_block(nbytes).view(dtype).view(shape)


def move_to_huge_pages(tensors) -> int:
    """Move the storages of these CPU tensors (parameters included) into one block on transparent huge pages, in
    the order first seen, each tensor keeping its identity, dtype, shape, strides and offset (``Tensor.set_``):
    tensors that shared a storage (views, tied weights) still share one. Storage by storage, so an old one is freed
    as soon as it is copied (where nothing else holds it): the peak is the block plus one storage, not twice the
    weights. Returns the bytes moved (0 where huge pages are unavailable or the total is under one huge page). Call
    before anything binds the tensors' data pointers."""
    groups: dict[int, list] = {}  # storage data pointer -> [storage nbytes, byte offset in the block, its tensors]
    total = 0
    for t in tensors:
        if t is None or t.device.type != "cpu":
            continue
        s = t.untyped_storage()
        if s.nbytes() == 0:
            continue
        if s.data_ptr() not in groups:
            groups[s.data_ptr()] = [s.nbytes(), total, []]
            total += -(-s.nbytes() // 64) * 64  # each storage on a cache line (and any dtype's alignment)
        group = groups[s.data_ptr()][2]
        if not any(u is t for u in group):
            group.append(t)
    if total < HUGE_PAGE or not huge_pages_available():
        return 0
    block = _huge_block(total)
    target = block.untyped_storage()
    base = block.data_ptr() - target.data_ptr()  # the block's offset in its own storage (bytes)
    with torch.no_grad():
        for nbytes, at, group in groups.values():
            block[at : at + nbytes].copy_(torch.empty(0, dtype=torch.uint8).set_(group[0].untyped_storage()))
            for t in group:
                t.set_(target, (base + at) // t.element_size() + t.storage_offset(), t.size(), t.stride())
    return total


def huge_page_shares(*tensors: torch.Tensor) -> list[float | None]:
    """For each CPU tensor, the share of the 2 MiB-aligned part of its storage that sits on transparent huge pages now
    (0-1), from the AnonHugePages of the mappings it spans in /proc/self/smaps (read once for all of them); None where
    that cannot be read (not Linux) or the storage holds no whole huge page. A block that asked for huge pages
    (move_to_huge_pages, empty_huge) gets them only where the kernel found free 2 MiB frames at its first touch; on 4 KiB
    pages a decode step runs slower (a TLB miss a page, and the hardware prefetchers stop at every page boundary), so
    the engine reports this for its weights and its KV cache."""
    spans = []  # [lo, hi) of each tensor's storage, whole huge pages only
    for t in tensors:
        s = t.untyped_storage()
        spans.append((-(-s.data_ptr() // HUGE_PAGE) * HUGE_PAGE, (s.data_ptr() + s.nbytes()) // HUGE_PAGE * HUGE_PAGE))
    huge = [0] * len(spans)
    try:
        with open("/proc/self/smaps") as f:
            vma = None  # (start, end) of the mapping whose fields follow
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and not head.endswith(":"):
                    vma = tuple(int(x, 16) for x in head.split("-"))
                elif line.startswith("AnonHugePages:") and vma is not None:
                    a, b = vma
                    kb = int(line.split()[1])
                    for i, (lo, hi) in enumerate(spans):  # a mapping partly outside a span: counted by the overlap
                        if a < hi and b > lo:
                            huge[i] += kb * 1024 * (min(b, hi) - max(a, lo)) // (b - a)
    except (OSError, ValueError):
        return [None] * len(spans)
    return [min(1.0, h / (hi - lo)) if hi > lo else None for h, (lo, hi) in zip(huge, spans)]
