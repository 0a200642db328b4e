"""Stopping tasks reliably on Python 3.11.

On 3.11 ``asyncio.wait_for`` loses a cancellation that arrives in the same loop iteration
as its inner result: it returns the result and the caller runs on (CPython gh-86296,
fixed in 3.12). redis-py wraps every socket write in ``wait_for`` when a socket timeout
is set, so a task cancelled while it talks to Redis ignores the cancellation about half
the time (``tests/test_tasks.py`` prints how often), and a loop that talks to Redis never
stops. So: cancel until the task is done, and use ``asyncio.timeout`` (correct on 3.11)
instead of ``wait_for`` in this package (ruff bans it, see ``pyproject.toml``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, TypeVar

RECANCEL_EVERY = 0.05  # seconds between cancellations of a task that is still running

T = TypeVar("T", bound=asyncio.Future[Any])


def keep_cancelling(task: asyncio.Future[Any], every: float = RECANCEL_EVERY) -> None:
    """Cancel ``task`` now and again every ``every`` s until it is done (for a caller
    that cannot wait for it, such as a signal handler)."""
    if not task.done():
        task.cancel()
        asyncio.get_running_loop().call_later(every, keep_cancelling, task, every)


async def cancel_and_wait(tasks: Iterable[T], within: float) -> set[T]:
    """Cancel ``tasks`` again and again until each is done, for at most ``within`` s.

    Returns the ones still running then (a task that catches ``CancelledError`` and goes
    on is a bug; the caller logs it).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_EVERY, remaining))
    return pending
