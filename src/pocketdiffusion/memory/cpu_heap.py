"""Give freed activation memory back to the OS at once on the CPU (glibc).

glibc serves an allocation above its mmap threshold with its own mmap, unmapped when freed; but
the threshold starts at 128 KiB and *rises* to the size of each such block freed (up to 32 MiB),
after which blocks of that size come from the malloc arenas, where freed memory mostly stays in
the process. A diffusion run frees tens-of-MiB activations all the time, so the resident set
ended up holding the peaks of several phases at once: measured on the mid-size model of
tests/test_plan_measured.py at 384x384, a minimal-mode generation peaked at 337 MiB with the
rising threshold and 178 MiB with it fixed; balanced at 920 and 709 MiB (docs/BENCHMARKS.md).
A fixed threshold also makes the peak what memory/estimate.py predicts: live tensors plus a
constant.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 256 * 1024  # tensors above this are their own mappings, returned when freed

_done = False


def return_freed_memory_to_os() -> bool:
    """Fix glibc's mmap threshold for this process (once; the setting is process-wide, like the
    allocator itself). True when it was set, False where there is no glibc (macOS, Windows, musl)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return _done
