"""Giving the C allocator's free pages back to the system (glibc's ``malloc_trim``).

Python hands the memory of its freed objects back to the C allocator (objects over 512
bytes at once, its own small-object arenas once empty), which keeps the pages for later
allocations rather than returning them. Under churn (conversations and connections
coming and going for minutes) glibc held more and more of them: a node's RSS rose about
1.8 MiB a minute for ten minutes while its Python objects stayed flat (BENCHMARKS.md,
"Churn"). ``malloc_trim(0)`` returns them: about a millisecond at a node's 100 MiB, but
tens of milliseconds on a fragmented heap of a GiB or more (60 ms at 0.5 GiB, 250 ms
at 2 GiB the first time), during which allocations of over 512 bytes in the process's
other threads wait. A node and each of its agent worker processes run
``keep_trimming``: a thread of their own, so never their event loop, trims every
``TRIM_EVERY`` seconds. Where the C library is not glibc (musl,
macOS) there is no such call, and nothing is done.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable

TRIM_EVERY = 10.0  # seconds between trims (read before each)

_started = threading.Lock()
_running = False  # this process's thread runs (a forked child has none: reset there)


def _forked() -> None:
    global _running
    _running = False


os.register_at_fork(after_in_child=_forked)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        call = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_size_t]
    call.restype = ctypes.c_int
    return call


_TRIM = _malloc_trim()


def trim() -> bool:
    """Return the C allocator's free pages to the system now; False without glibc."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


def keep_trimming(every: float | None = None) -> bool:
    """Trim every ``every`` seconds (None: ``TRIM_EVERY``, as it is then) from a daemon
    thread, one per process however often called; False where there is nothing to trim."""
    global _running
    if _TRIM is None:
        return False
    with _started:
        if not _running:
            _running = True
            threading.Thread(target=_trimming, args=(every,), name="heap-trim", daemon=True).start()
    return True


def _trimming(every: float | None) -> None:
    while True:
        time.sleep(TRIM_EVERY if every is None else every)
        trim()
