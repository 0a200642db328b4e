"""The fault-injection TCP proxy itself: forward, cut (refuse or blackhole), restore."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.tcpproxy import TcpProxy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1024):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    server.close()


@pytest.fixture
async def proxy(echo_port: int) -> AsyncIterator[TcpProxy]:
    p = await TcpProxy(echo_port).start()
    yield p
    await p.aclose()


async def _roundtrip(port: int, data: bytes = b"ping") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(1024), 2)
    finally:
        writer.close()


async def test_forwards_both_ways(proxy: TcpProxy) -> None:
    assert await _roundtrip(proxy.port, b"hello") == b"hello"
    assert proxy.accepted == 1


async def test_cut_resets_open_connections_and_refuses_new_ones(proxy: TcpProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"a")
    assert await asyncio.wait_for(reader.read(10), 2) == b"a"
    assert proxy.connections == 1
    proxy.cut()
    assert await asyncio.wait_for(reader.read(10), 2) == b""  # reset: no more data
    writer.close()
    try:
        refused = await _roundtrip(proxy.port)
    except ConnectionError:
        refused = b""
    assert refused == b""
    proxy.restore()
    assert await _roundtrip(proxy.port, b"back") == b"back"


async def test_blackhole_holds_connections_silently_until_restore(proxy: TcpProxy) -> None:
    proxy.cut(blackhole=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"lost")
    await writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(10), 0.3)
    proxy.restore()
    assert await asyncio.wait_for(reader.read(10), 2) == b""
    writer.close()
    assert await _roundtrip(proxy.port, b"again") == b"again"


async def test_a_redis_client_fails_fast_while_cut_and_recovers(redis_server: str) -> None:
    port = int(redis_server.rsplit(":", 1)[1].split("/")[0])
    proxy = await TcpProxy(port).start()
    client = aioredis.Redis.from_url(proxy.url, socket_timeout=1, socket_connect_timeout=1)
    try:
        assert await client.ping()
        proxy.cut()
        with pytest.raises((RedisConnectionError, RedisTimeoutError)):
            await client.ping()
        proxy.restore()
        assert await client.ping()
    finally:
        await client.aclose()
        await proxy.aclose()
