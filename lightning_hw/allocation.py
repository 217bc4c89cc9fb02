"""glibc malloc settings that keep large freed blocks for reuse.

glibc serves a large allocation from fresh mmap'd pages, and returns them to the
system when it is freed, whenever the block is above a threshold that adapts to
the process's history (and trims the heap's free top likewise). Whether a
tensor of a few MB lands above it depends on what the process allocated and
freed before, so the same training step runs in one of two modes from process
to process: reusing warm memory, or faulting in fresh zero pages for every
large tensor on every call. The second mode makes torch's CPU convolutions 2-5x
slower (e.g. a 3->32 3x3 conv on 128 CIFAR images: 17 ms instead of 3.3 ms),
ours too where they allocate, and the timed route choices (csrc/cpu/
route_choice.h) would depend on the mode the timing ran in.

Serving every block from the heap (mmap off for allocations) and giving heap
memory back only past 1 GiB of free top keeps every process in the first mode,
tensors of any size included (fixing the mmap threshold instead would stop at
glibc's cap of 32 MiB). The price is resident memory that stays at its
high-water mark, as with jemalloc or tcmalloc. `lightning_hw.ops` applies this
when it loads, unless LIGHTNING_HW_MALLOC_TUNING=0 or the user set glibc's own
malloc settings (GLIBC_TUNABLES with glibc.malloc, or MALLOC_MMAP_MAX_,
MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_).
"""

from __future__ import annotations

import ctypes
import os

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30

_state = "not applied"


def _user_settings() -> str | None:
    """Which of the user's own malloc settings is present, if any."""
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    for name in ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        if name in os.environ:
            return name
    return None


def keep_freed_memory() -> str:
    """Apply the settings once per process (see the module docstring); returns
    what was done, as `tuning()` does."""
    global _state
    if _state != "not applied":
        return _state
    user = _user_settings()
    if os.environ.get("LIGHTNING_HW_MALLOC_TUNING", "1") == "0":
        _state = "off (LIGHTNING_HW_MALLOC_TUNING=0)"
    elif user is not None:
        _state = f"off (the user's {user})"
    else:
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version  # glibc only: musl and others have their own allocator
            applied = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        except (OSError, AttributeError):
            applied = False
        _state = (
            f"on (glibc: every block from the heap, trimmed past {TRIM_THRESHOLD >> 30} GiB free)"
            if applied
            else "off (not glibc)"
        )
    return _state


def tuning() -> str:
    """What keep_freed_memory did in this process: "on (...)", "off (why)" or "not applied"."""
    return _state
