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
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
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


class TaskSet:
    """The background tasks of one node: each is tracked, its failure logged, and all
    are stopped together (``aclose``). No fire-and-forget ``create_task`` elsewhere."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def every(
        self,
        seconds: float,
        step: Callable[[], Awaitable[Any]],
        name: str,
        expected: tuple[type[Exception], ...] = (),
    ) -> asyncio.Task[Any]:
        """Run ``step`` every ``seconds`` until stopped. A round that fails is logged
        (an ``expected`` error as a warning, any other with its traceback) and the next
        one goes on: no periodic duty of a node dies of one failure."""

        async def rounds() -> None:
            while True:
                await asyncio.sleep(seconds)
                try:
                    await step()
                except expected as exc:
                    self._log.warning("%s failed: %s", name, exc)
                except Exception:
                    self._log.exception("%s failed", name)

        return self.spawn(rounds(), name)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def named(self, name: str) -> list[asyncio.Task[Any]]:
        return [t for t in self._tasks if t.get_name() == name]

    async def cancel(self, tasks: Iterable[asyncio.Task[Any]], within: float = 5.0) -> None:
        """Stop ``tasks``; log the ones that would not stop within ``within`` s."""
        for task in await cancel_and_wait(list(tasks), within=within):
            self._log.error("task %s did not stop within %gs of cancellation", task, within)

    async def aclose(self, within: float = 5.0) -> None:
        """Stop every task."""
        await self.cancel(list(self._tasks), within)

    def __len__(self) -> int:
        return len(self._tasks)
