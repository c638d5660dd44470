"""How the CPU's allocator (glibc malloc) holds freed memory, phase by phase.

Two costs pull against each other.

Memory: glibc serves an allocation above its mmap threshold with its own mmap, unmapped when
freed; but the threshold starts at 128 KiB and *rises* to the size of each such block freed (up
to 32 MiB), after which blocks of that size come from the malloc arenas, where freed memory
mostly stays in the process. A diffusion run frees tens-of-MiB activations all the time, so the
resident set ended up holding the peaks of several phases at once: measured on the mid-size model
of tests/test_plan_measured.py at 384x384, a minimal-mode generation peaked at 337 MiB with the
rising threshold and 178 MiB with it fixed at 256 KiB; balanced at 920 and 709 MiB
(docs/BENCHMARKS.md). A fixed threshold also makes the peak what memory/estimate.py predicts.

Time: a block that went back to the OS is mapped afresh when the next tensor needs it, one page
fault (and a zeroed page) per 4 KiB, and a UNet step allocates gigabytes of short-lived tensors
(its activations, oneDNN's reordered copy of every conv weight). Measured on the 2-core CPU,
full-size SD1.5 UNet at batch 2, 64x64 latents, fp32: 1.7 M minor faults and 8.2 s a call with
the 256 KiB threshold, 0.6-0.8 M and 7.0 s with glibc's defaults, 0.1 M and 6.5 s when no block
is mmapped and the heap's top is never trimmed (diffusers: 7.3 s in the same run).

So the heap follows the phases (`reuse_during`): while the UNet runs, no block is mmapped and the
heap is never trimmed, so every step after the first is served from memory the process already
holds; when the call returns, `malloc_trim(0)` hands every free page of the heap back (holes in
the middle included), and everywhere else (text encoding, the VAE) blocks above 256 KiB are
their own mappings again, unmapped when freed. The UNet's phase peak is its live tensors plus
the heap's fragmentation within one call (measured +140 MiB at SD1.5 512x512); the other phases
keep the tight, predictable peaks of the fixed threshold.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

from torch import nn

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD = 256 * 1024  # outside reuse phases, tensors above this are their own mappings
MMAP_MAX = 65536  # glibc's default count of mmapped blocks
TRIM_THRESHOLD = 128 * 1024  # glibc's default: outside reuse phases a free top above this is trimmed
NEVER_TRIM = 2 ** 31 - 1  # in a reuse phase the top is kept (trimmed by malloc_trim at its end)

_lock = threading.Lock()
_libc = None
_configured = False
_reusing = 0  # UNet calls in flight (reuse phases may nest or overlap across threads)


def _glibc():
    global _libc
    if _libc is None:
        if not sys.platform.startswith("linux"):
            _libc = False
        else:
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist (glibc, not musl)
                _libc = libc
            except (OSError, AttributeError):
                _libc = False
    return _libc


def return_freed_memory_to_os() -> bool:
    """Fix glibc's mmap threshold for this process (once; the setting is process-wide, like the
    allocator itself). True when set, False where there is no glibc (macOS, Windows, musl)."""
    global _configured
    libc = _glibc()
    if not libc:
        return False
    with _lock:
        if not _configured:
            _configured = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return _configured


def _enter_reuse(*_args) -> None:
    global _reusing
    with _lock:
        _reusing += 1
        if _reusing == 1:  # every block from the heap, reused without a fault; nothing trimmed meanwhile
            libc = _glibc()
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)


def _leave_reuse(*_args) -> None:
    global _reusing
    with _lock:
        _reusing -= 1
        if _reusing == 0:
            libc = _glibc()
            libc.mallopt(M_MMAP_MAX, MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            libc.malloc_trim(0)  # the call's freed blocks go back to the OS, holes in the heap included


def _trim(*_args) -> None:
    with _lock:
        if _reusing == 0:
            _glibc().malloc_trim(0)


def give_back() -> bool:
    """Hand the heap's free pages back to the OS now (after loading: quantizing tensor by tensor
    leaves the small int8 weights between the freed fp32 temporaries, holes that no top trim
    reaches; measured 128 MiB of heap for a 75 MiB int8 UNet). False where there is no glibc."""
    if not return_freed_memory_to_os():
        return False
    _trim()
    return True


def trim_after(module: nn.Module) -> bool:
    """Give the heap's free pages back after each call of `module` (a VAE decoder or encoder, a text
    encoder). Outside reuse phases big blocks are mmapped, but glibc first serves a request from
    a free chunk of the heap that fits, and after a UNet call the heap is full of them (trimmed,
    so not resident until such a request touches them again): what a decode tile puts there stays
    until the next trim. False where there is no glibc."""
    if not return_freed_memory_to_os():
        return False
    module.register_forward_hook(_trim, always_call=True)
    return True


class _Reuse:
    """The hooks of one module: no reuse on its first call, reuse on every later one."""

    def __init__(self) -> None:
        self.calls = 0
        self.active: list[bool] = []  # per call in flight: whether it entered a reuse phase

    def enter(self, *_args) -> None:
        self.calls += 1
        reuse = self.calls > 1
        self.active.append(reuse)
        if reuse:
            _enter_reuse()

    def leave(self, *_args) -> None:
        if self.active.pop():
            _leave_reuse()
        else:
            _trim()


def reuse_during(module: nn.Module) -> bool:
    """Keep freed memory in the heap for reuse while `module` runs (the UNet: the same tensors
    each step) and give it back when the call returns, even by an exception. Not on its first call:
    what that call creates to keep (oneDNN's scratchpad and primitive caches, ~70 MiB at SD1.5)
    would be born inside the heap and pin it, so that the heap could not shrink after the call and
    the next phase's blocks would land in its holes; measured at SD1.5 512x512, the step's peak
    over its live tensors was ~+190 MiB with the first call reusing and ~+50 MiB without. False
    (and nothing installed) where there is no glibc."""
    if not return_freed_memory_to_os():
        return False
    hooks = _Reuse()
    module.register_forward_pre_hook(hooks.enter)
    module.register_forward_hook(hooks.leave, always_call=True)
    return True
