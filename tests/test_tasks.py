"""Stopping tasks that talk to Redis (coordinator/tasks.py)."""

from __future__ import annotations

import asyncio
import random

import redis.asyncio as aioredis

from coordinator.tasks import cancel_and_wait, keep_cancelling

ROUNDS = 200


async def test_tasks_cancelled_in_the_middle_of_redis_calls_all_stop(redis_url: str) -> None:
    """A loop of redis-py calls (with a socket timeout, as the nodes configure it) is
    cancelled at a random moment, 200 times: every one stops. On Python 3.11 a single
    cancel() is lost now and then (asyncio.wait_for in redis-py's socket writes), and the
    loop would run on for good; the count of those is printed."""
    redis = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    lost = 0

    async def loop() -> None:
        while True:
            await redis.hget("coord:probe", "f")
            await asyncio.sleep(0)

    try:
        for _ in range(ROUNDS):
            task = asyncio.create_task(loop())
            await asyncio.sleep(random.uniform(0, 0.003))
            assert not await cancel_and_wait([task], within=5)
            assert task.cancelled()
            lost += task.cancelling() > 1  # it took more than one cancel()
    finally:
        await redis.aclose()
    print(f"\n{lost} of {ROUNDS} loops ignored their first cancellation")


async def test_a_task_that_refuses_to_stop_is_reported() -> None:
    stop = asyncio.Event()

    async def stubborn() -> None:
        while not stop.is_set():
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                continue  # the bug this reports

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    try:
        assert await cancel_and_wait([task], within=0.3) == {task}
        assert not task.done()
    finally:
        stop.set()
        await cancel_and_wait([task], within=1)


async def test_keep_cancelling_ends_a_task_that_ignores_the_first_cancellations() -> None:
    """What a signal handler uses: it cannot wait, so the cancellation is repeated until
    the task is done (here the task ignores the first three, as a lost one would be)."""
    ignored = 0

    async def ignores_three() -> None:
        nonlocal ignored
        while True:
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                if ignored == 3:
                    raise
                ignored += 1

    task = asyncio.create_task(ignores_three())
    await asyncio.sleep(0)
    keep_cancelling(task, every=0.01)
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done == {task} and task.cancelled() and ignored == 3
