"""The floor under a cross-node hop: a message published to Redis, read by a subscriber.

``python -m bench.run --only pubsub``. A node hears other nodes' actions and events on
the conversations' channels through ``coordinator.subscriptions.Subscriptions`` (its own
connection, hiredis parsing in the protocol's ``data_received``); a cross-node action
crosses it twice (the action to the loop's node, its answer back). Measured here, on a
private Redis, from the publish's write to the listener's call, at two gaps between
messages: that subscriber; redis-py's ``PubSub.get_message`` in a loop (what it was
built on before); and the least a subscriber can do in asyncio (a bare protocol parsing
with hiredis), each reading in this process while a raw connection publishes. Then the
CPU of a subscribe and its confirmation, through ``Subscriptions.add`` and through
redis-py's ``PubSub.subscribe``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import hiredis
import redis.asyncio as aioredis

from bench.common import Mode, by_gap, private_redis, table
from coordinator.links import Endpoint
from coordinator.subscriptions import Subscriptions

OURS = "Subscriptions (own link, hiredis)"
REDIS_PY = "redis-py PubSub.get_message"

GAPS_MS = (2.0, 20.0)
CHANNEL = "bench:pubsub"


class _Publisher(asyncio.Protocol):
    """PUBLISH the time of the write; replies are not read (nothing depends on them)."""

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def publish(self) -> None:
        self.transport.write(hiredis.pack_command(("PUBLISH", CHANNEL, repr(time.perf_counter()))))


class _Latencies:
    """Each message's latency; ``heard`` wakes the publisher for the next one."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.heard = asyncio.Event()

    def record(self, data: bytes) -> None:
        self.latencies.append((time.perf_counter() - float(data)) * 1e6)
        self.heard.set()


class _RawSubscriber(asyncio.Protocol, _Latencies):
    def __init__(self) -> None:
        _Latencies.__init__(self)
        self.reader = hiredis.Reader()
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if reply[0] == b"message":
                self.record(reply[2])
            elif reply[0] == b"subscribe" and not self.subscribed.done():
                self.subscribed.set_result(None)


class _Recorder(_Latencies):
    """A ``Listener`` for ``Subscriptions``."""

    async def message(self, channel: str, data: bytes) -> None:
        self.record(data)

    async def reconnected(self) -> None:
        pass


async def _publish(pub: _Publisher, sub: _Latencies, count: int, gap: float) -> list[float]:
    """``count`` messages, each read before the next one is published; their latencies."""
    sub.latencies = []
    for _ in range(count):
        sub.heard.clear()
        pub.publish()
        async with asyncio.timeout(5):
            await sub.heard.wait()
        await asyncio.sleep(gap / 1000)
    return sub.latencies


async def _measure(host: str, port: int, url: str, count: int) -> dict[str, dict[str, list[float]]]:
    loop = asyncio.get_running_loop()
    _, pub = await loop.create_connection(_Publisher, host, port)
    out: dict[str, dict[str, list[float]]] = {}
    # The coordinator's subscriber, as a node runs it.
    client = aioredis.from_url(url)
    subs = Subscriptions(Endpoint.from_url(url), client.publish, CHANNEL + ":probe")
    recorder = _Recorder()
    await subs.start()
    listening = asyncio.ensure_future(subs.run(recorder))
    try:
        await subs.add(CHANNEL)  # confirmed through the listener
        out[OURS] = {}
        for gap in GAPS_MS:
            out[OURS][f"{gap:g}"] = await _publish(pub, recorder, count, gap)
    finally:
        await subs.aclose()
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
    # redis-py's pub/sub, read as the coordinator read it before.
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(CHANNEL)
    recorder = _Recorder()

    async def read() -> None:
        while True:
            msg = await pubsub.get_message(timeout=1.0)
            if msg is not None:
                await recorder.message(msg["channel"], msg["data"])

    listening = asyncio.ensure_future(read())
    try:
        out[REDIS_PY] = {}
        for gap in GAPS_MS:
            out[REDIS_PY][f"{gap:g}"] = await _publish(pub, recorder, count, gap)
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
        await client.aclose()
    # The least an asyncio subscriber does.
    transport, raw = await loop.create_connection(_RawSubscriber, host, port)
    try:
        transport.write(hiredis.pack_command(("SUBSCRIBE", CHANNEL)))
        async with asyncio.timeout(5):
            await raw.subscribed
        out["protocol + hiredis in data_received"] = {}
        for gap in GAPS_MS:
            out["protocol + hiredis in data_received"][f"{gap:g}"] = await _publish(
                pub, raw, count, gap
            )
    finally:
        transport.close()
        pub.transport.close()
    return out


async def _subscribe_cpu(url: str, count: int) -> list[list[Any]]:
    """CPU microseconds per subscribe, its confirmation read (``count`` channels each)."""
    client = aioredis.from_url(url)
    subs = Subscriptions(Endpoint.from_url(url), client.publish, CHANNEL + ":probe")
    await subs.start()
    listening = asyncio.ensure_future(subs.run(_Recorder()))
    try:
        t0 = time.process_time()
        for i in range(count):
            await subs.add(f"{CHANNEL}:ours:{i}")
        ours = (time.process_time() - t0) / count * 1e6
    finally:
        await subs.aclose()
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
    pubsub = client.pubsub(ignore_subscribe_messages=False)
    try:
        t0 = time.process_time()
        for i in range(count):
            await pubsub.subscribe(f"{CHANNEL}:redis-py:{i}")
            while await pubsub.get_message(timeout=1.0) is None:
                pass
        theirs = (time.process_time() - t0) / count * 1e6
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
        await client.aclose()
    return [[OURS, round(ours, 1)], [REDIS_PY, round(theirs, 1)]]


async def run(mode: Mode) -> dict[str, Any]:
    count = mode.pick(300, 1000)
    with private_redis() as redis:
        results = await _measure("127.0.0.1", redis.port, redis.url, count)
        cpu = await _subscribe_cpu(redis.url, count)
    text, summary = by_gap(
        f"Publish to the listener's call, {count} messages per gap (one at a time)",
        "subscriber",
        "gap between messages",
        results,
    )
    cpu_text = table(
        f"CPU per subscribe, confirmation awaited ({count} channels, one at a time)",
        ["subscriber", "us of CPU"],
        cpu,
    )
    return {
        "tables": [text, cpu_text],
        "json": {"count": count, "latency": summary, "subscribe_cpu_us": dict(cpu)},
    }
