"""Children that end with their parent: Linux's ``PR_SET_PDEATHSIG``, which signals a
child when the thread that started it ends with its process (elsewhere: nothing, and
the parent's own cleanup still stops its children)."""

from __future__ import annotations

import ctypes
import signal
from typing import Any

PR_SET_PDEATHSIG = 1


def _prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # this process's libc
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()  # looked up here, not in a child between fork and exec


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Get ``sig`` when the parent dies: in a child, as a ``preexec_fn`` or as its own
    first step (which should then check that ``os.getppid()`` did not change meanwhile)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, sig)
