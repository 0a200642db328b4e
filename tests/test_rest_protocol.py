"""The REST app's HTTP details clients and proxies rely on: headers, OPTIONS, 405, 413,
trailing slashes and websockets outside /socket.io/ (real uvicorn node, real Redis)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import pytest

from coordinator.http import MAX_BODY
from tests.server_fixtures import ServerCluster

COMMON = {
    "access-control-allow-headers": "authorization, content-type",
    "cache-control": "no-store",
}


async def _call(
    url: str, method: str, *, token: str | None = None, **kwargs: object
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http,
        http.request(method, url, headers=headers, **kwargs) as resp,  # type: ignore[arg-type]
    ):
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


def _has_common_headers(headers: dict[str, str]) -> bool:
    # No CORS origin unless the node is configured with some (tests/test_edge.py).
    return all(headers.get(k) == v for k, v in COMMON.items()) and (
        "access-control-allow-origin" not in headers
    )


async def test_headers_options_and_method_errors(servers: ServerCluster) -> None:
    (a,) = await servers.start(1)
    token = servers.token("alice")

    status, headers, body = await _call(a.url + "/healthz", "GET")
    assert status == 200 and headers["content-type"] == "application/json"
    assert _has_common_headers(headers) and int(headers["content-length"]) == len(body)

    status, headers, _ = await _call(a.url + "/metrics", "GET")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert _has_common_headers(headers)

    # OPTIONS answers 204 with the path's methods, whatever the token.
    for path, allow in [
        ("/api/conversations", "GET, POST"),
        ("/api/conversations/", "GET, POST"),
        ("/api/conversations/c1", "DELETE, GET"),
        ("/healthz", "GET, HEAD"),
    ]:
        status, headers, body = await _call(a.url + path, "OPTIONS")
        assert (status, headers["allow"], body) == (204, allow, b""), path
        assert _has_common_headers(headers)

    status, headers, body = await _call(a.url + "/api/conversations/c1", "POST", token=token)
    assert status == 405 and headers["allow"] == "DELETE, GET"
    assert b"method POST is not allowed here; use DELETE, GET" in body
    status, headers, _ = await _call(a.url + "/healthz", "DELETE")
    assert status == 405 and headers["allow"] == "GET, HEAD" and _has_common_headers(headers)

    # 401 names the scheme; errors carry the common headers too.
    status, headers, _ = await _call(a.url + "/api/node", "GET")
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert _has_common_headers(headers) and headers["content-type"] == "application/json"
    status, headers, body = await _call(a.url + "/nowhere", "GET")
    assert status == 404 and json.loads(body) == {"error": "no such endpoint: /nowhere"}
    assert _has_common_headers(headers)

    # With or without the trailing slash, no redirect.
    for path in ("/api/conversations", "/api/conversations/"):
        status, _, _ = await _call(a.url + path, "GET", token=token, allow_redirects=False)
        assert status == 200, path
    status, _, _ = await _call(a.url + "/healthz/", "GET", allow_redirects=False)
    assert status == 404


async def test_body_limit(servers: ServerCluster) -> None:
    (a,) = await servers.start(1)
    token = servers.token("alice")
    url = a.url + "/api/conversations"

    # Declared too large: refused before the body is read (aiohttp cannot send a
    # Content-Length that its body does not have, so this one is written by hand).
    reader, writer = await _open(a.url)
    request = (
        f"POST /api/conversations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n{{}}"
    )
    writer.write(request.encode())
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    writer.close()
    await writer.wait_closed()
    assert head.startswith("HTTP/1.1 413 "), head

    # Streamed (chunked, no length): refused once it grows past the limit.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(MAX_BODY // 4096 + 2):
            yield b" " * 4096

    status, headers, body = await _call(url, "POST", token=token, data=chunks())
    assert status == 413 and b"larger than" in body and _has_common_headers(headers)

    # Just under the limit is read (and then judged on its content).
    status, _, body = await _call(url, "POST", token=token, data=b" " * (MAX_BODY - 2) + b"{}")
    assert status == 201


async def _open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    return await asyncio.open_connection(parts.hostname, parts.port)


@pytest.mark.parametrize("path", ["/", "/api/node", "/ws"])
async def test_websocket_outside_socketio_is_refused(servers: ServerCluster, path: str) -> None:
    (a,) = await servers.start(1)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(a.url.replace("http", "ws") + path)
    assert info.value.status == 403
