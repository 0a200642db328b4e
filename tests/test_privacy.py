"""Private by default, and no secret in any log: a user sees only their own loops and
connections unless the token has the admin role; tokens, the shared secret and the Redis
password reach neither the node's log (at debug level, access log on) nor nginx's."""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
import redis
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel

from coordinator.auth import issue_token
from coordinator.embedded import free_port
from coordinator.redact import redact
from tests.nginx import NginxProcess, nginx_binary
from tests.processes import COORDINATOR, REPO, child_env
from tests.rawsocket import RawSocket
from tests.redisproc import RedisProcess, redis_args
from tests.server_fixtures import SECRET, ServerCluster, SioClient


def test_redact_takes_credentials_out_of_text() -> None:
    token = issue_token("alice", "s" * 32)
    text = (
        f'127.0.0.1:5 - "WebSocket /socket.io/?conversation_id=c&token={token}&EIO=4" [accepted]'
        " Redis at redis://coordinator:hunter2@redis:6379/0 and rediss://h/0?password=pw2"
        f" header Authorization: Bearer {token} and a bare {token}"
    )
    clean = redact(text)
    for secret in (token, "hunter2", "pw2"):
        assert secret not in clean
    assert "conversation_id=c&token=***&EIO=4" in clean
    assert "redis://coordinator:***@redis:6379/0" in clean and "Bearer ***" in clean
    # Percent-encoded, as a server decodes it: a parameter's name, the token, both twice.
    hidden = token.replace("e", "%65", 1)
    for query in (f"tok%65n={token}", f"token={hidden}", f"t={hidden}", "t=" + quote(hidden)):
        clean = redact(f'"GET /api/conversations?{query} HTTP/1.1" 200')
        assert token not in unquote(unquote(clean)) and "***" in clean, clean
    assert redact("100% of a 50%25 share") == "100% of a 50%25 share"  # nothing hidden
    # What websockets' debug log keeps of a CONNECT frame: its start and end around "...".
    cut = f'< TEXT \'40{{"token":"{token[:40]}...{token[-21:]}"}}\' [250 bytes]'
    clean = redact(cut)
    assert token[:40] not in clean and token[-21:] not in clean, clean
    assert redact('40{"token": "opaque-not-a-jwt"}') == '40{"token": "***"}'


async def test_a_sentinel_error_is_one_short_line_naming_each_sentinel() -> None:
    """redis-py's "No master found" quotes each Sentinel's client repr (1 KB of its
    settings apiece): a node logged 3.6 KB lines for each commit retry while no Sentinel
    answered. The log keeps each one's address and what it said."""
    closed = [("127.0.0.1", free_port()), ("127.0.0.1", free_port())]
    sentinel = Sentinel(closed, sentinel_kwargs={"password": "s3cret-pw"}, password="n0de-pw")
    with pytest.raises(MasterNotFoundError) as raised:
        await sentinel.discover_master("mymaster")
    line = redact(str(raised.value))
    assert len(str(raised.value)) > 1500 and len(line) < 400, line
    for host, port in closed:
        assert f"<Redis {host}:{port}> - " in line and f"connecting to {host}:{port}" in line
    assert "pw" not in line


async def test_cluster_and_node_views_show_a_user_only_their_own(servers: ServerCluster) -> None:
    a, b = await servers.start(2)
    for node, user, sid in ((a, "alice", "a1"), (b, "alice", "a2"), (a, "bob", "b1")):
        await servers.join(node, sid, user)
    await servers.join(b, "a1", "alice")  # a second connection of alice's, on b

    async def view(path: str, node: object, token: str) -> dict[str, object]:
        status, body = await servers.request("GET", node, path, token=token)  # type: ignore[arg-type]
        assert status == 200, body
        return dict(body)

    alice, bob = servers.token("alice"), servers.token("bob")
    admin = issue_token("ops", SECRET, claims={"role": "admin"})
    cluster = await view("/api/cluster", a, alice)
    assert cluster["loops"] == {"n1": ["a1"], "n2": ["a2"]}
    assert cluster["connections"] == {"n1": 1, "n2": 2}
    cluster = await view("/api/cluster", b, bob)
    assert cluster["loops"] == {"n1": ["b1"], "n2": []}
    assert cluster["connections"] == {"n1": 1, "n2": 0}
    cluster = await view("/api/cluster", b, admin)
    assert cluster["loops"] == {"n1": ["a1", "b1"], "n2": ["a2"]}
    assert cluster["connections"] == {"n1": 2, "n2": 2}
    assert set(cluster["nodes"]) == {"n1", "n2"}  # type: ignore[arg-type]

    node = await view("/api/node", a, bob)
    assert (node["loops"], node["connections"]) == (["b1"], 1)
    node = await view("/api/node", a, admin)
    assert (node["loops"], node["connections"]) == (["a1", "b1"], 2)


async def test_no_secret_reaches_the_node_log_or_nginx_log(tmp_path: Path) -> None:
    password = "redis-pass-7f3e"
    port = free_port()
    server = RedisProcess(
        [*redis_args(port, tmp_path), "--requirepass", password],
        redis.Redis(port=port, password=password).ping,
        tmp_path,
    ).start()
    secret = "node-secret-0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f"
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret + "\n")
    node_port = free_port()
    log = tmp_path / "node.log"
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    command = [
        *COORDINATOR, "serve", "--port", str(node_port), "--node-id", "quiet",
        "--secret-file", str(secret_file), "--log-level", "debug",
    ]  # fmt: skip
    # The Redis URL (with its password) from the environment, as deployments pass it.
    node = await asyncio.to_thread(_spawn, command, log, {"COORDINATOR_REDIS_URL": url})
    nginx = None
    tokens = [issue_token("alice", secret), issue_token("alice", "forged-secret-" * 3)]
    try:
        base = f"http://127.0.0.1:{node_port}"
        await _ready(base + "/healthz")
        nginx_binary()
        nginx = NginxProcess([f"127.0.0.1:{node_port}"], free_port(), tmp_path / "nginx")
        await asyncio.to_thread(nginx.start)
        for via in (base, nginx.url):
            # The token in the query string, as some clients send it.
            client = SioClient("alice")
            await client.connect(via, "c1", tokens[0], token_in_query=True)
            await client.say("hello")
            await client.close()
            forged = SioClient("mallory")
            assert "bad token signature" in await forged.refused(
                via, "c1", tokens[1], token_in_query=True
            )
            sock = await RawSocket.open(via, {"conversation_id": "c1", "token": tokens[0]})
            await sock.join(tokens[0])
            await sock.send_packet('2["oh_user_action",')  # malformed: logged, once
            await sock.closed()
            request = urllib.request.Request(
                via + "/api/conversations?token=" + tokens[0],
                headers={"Authorization": f"Bearer {tokens[0]}"},
            )
            body = await asyncio.to_thread(_read, request)
            assert json.loads(body)["conversations"]
    finally:
        node.terminate()
        node.wait(20)
        if nginx is not None:
            nginx.stop()
        server.stop()
    text = log.read_text()
    logs = {"node": text}
    if nginx is not None:
        logs["nginx"] = nginx.access_log.read_text() + nginx.error_log.read_text()
    for name, content in logs.items():
        for leaked in (password, secret, *tokens):
            assert leaked not in content, f"{name} log holds a secret: {leaked[:12]}..."
    assert "token=***" in text  # uvicorn's lines were there, redacted
    assert text.count("coordinator.sioserver: malformed packet") == 2  # once per connection
    assert "GET /api/conversations HTTP/1.1" in logs.get("nginx", "GET /api/conversations ")

    # A Redis URL with a password on the command line: a warning, and an error message
    # (Redis unreachable) that names the URL without the password.
    done = await asyncio.to_thread(
        subprocess.run,
        [*COORDINATOR, "serve", "--redis-url", f"redis://:{password}@127.0.0.1:1/0",
         "--secret-file", str(secret_file), "--port", "0"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=child_env(),
    )  # fmt: skip
    assert done.returncode == 1
    assert "warning: --redis-url carries a password" in done.stderr
    assert "redis://:***@127.0.0.1:1/0" in done.stderr
    assert password not in done.stderr + done.stdout and secret not in done.stderr
    # The same for an event store's password (before: no warning for it).
    done = await asyncio.to_thread(
        subprocess.run,
        [*COORDINATOR, "serve", "--event-store", f"postgresql://u:{password}@127.0.0.1:1/db",
         "--redis-url", "redis://127.0.0.1:1/0", "--secret-file", str(secret_file),
         "--port", "0"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=child_env(),
    )  # fmt: skip
    assert done.returncode == 1
    assert "warning: --event-store carries a password" in done.stderr
    assert password not in done.stderr + done.stdout


async def _ready(url: str, within: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            await asyncio.to_thread(urllib.request.urlopen, url, timeout=1)
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)  # another process: polling is the only signal


def _spawn(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=child_env(env)
        )


def _read(request: urllib.request.Request) -> bytes:
    with urllib.request.urlopen(request, timeout=5) as resp:
        return bytes(resp.read())
