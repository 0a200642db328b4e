"""Nodes that reach Redis the way a production deployment should: as a Redis ACL user
limited to the commands and keys a node needs (deploy/redis-users.acl, rendered by the
same script docker-compose runs), and over TLS with client certificates. Real
redis-server processes, in-process nodes serving socket.io."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from coordinator.embedded import free_port
from coordinator.links import Endpoint
from coordinator.subscriptions import Subscriptions
from tests.helpers import Heard, listening, wait_until
from tests.processes import REPO
from tests.redisproc import RedisProcess, make_tls, redis_args
from tests.server_fixtures import SECRET, ServerCluster
from tests.test_cli import run
from tests.test_preflight import lines

ACL_TEMPLATE = REPO / "deploy" / "redis-users.acl"
ACL_SCRIPT = REPO / "deploy" / "redis-acl.sh"
PASSWORD = "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6"
ADMIN = "user testadmin on >test-admin ~* &* +@all"


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[tuple[int, redis.Redis]]:
    """Redis with deploy/redis-users.acl, rendered by deploy/redis-acl.sh (the container
    entrypoint), plus an admin user for the test to read the ACL log."""
    port = free_port()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # The image's entrypoint execs its arguments; here it also adds the test's admin.
    fake = bin_dir / "docker-entrypoint.sh"
    fake.write_text(f'#!/bin/sh\necho "{ADMIN}" >> "$ACL_FILE"\nexec "$@"\n')
    fake.chmod(0o755)
    acl_file = tmp_path / "users.acl"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "COORDINATOR_REDIS_PASSWORD": PASSWORD,
        "ACL_TEMPLATE": str(ACL_TEMPLATE),
        "ACL_FILE": str(acl_file),
    }
    admin = redis.Redis(port=port, username="testadmin", password="test-admin")
    server = RedisProcess(
        ["sh", str(ACL_SCRIPT), *redis_args(port, tmp_path), "--aclfile", str(acl_file)],
        admin.ping,
        tmp_path,
        env,
    ).start()
    try:
        assert PASSWORD not in acl_file.read_text()  # the file holds its hash only
        yield port, admin
    finally:
        admin.close()
        server.stop()


async def test_a_node_loss_under_the_deploy_acl_user(acl_redis: tuple[int, redis.Redis]) -> None:
    port, admin = acl_redis
    url = f"redis://coordinator:{PASSWORD}@127.0.0.1:{port}/0"
    # The ACL holds: the default user may only PING, a wrong password gets nothing.
    with pytest.raises(redis.exceptions.NoPermissionError):
        redis.Redis(port=port).get("coord:x")
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port, username="coordinator", password="wrong").ping()
    coordinator = redis.Redis.from_url(url)
    with pytest.raises(redis.exceptions.NoPermissionError):
        coordinator.get("other:key")  # keys outside the coordinator's prefix
    with pytest.raises(redis.exceptions.NoPermissionError):
        coordinator.flushall()
    coordinator.close()
    admin.acl_log_reset()

    cluster = ServerCluster(url)
    try:
        a, b = await cluster.start(2, max_concurrent_conversations=1)
        status, body = await cluster.request(
            "POST", a, "/api/conversations", user="alice", json={"conversation_id": "acl"}
        )
        assert (status, body["owner"]) == (201, "n1")  # its loop runs on a
        client = await cluster.join(b, "acl", "alice")
        await client.say("before")
        await client.wait_ids(2)

        await a.manager.node.halt()  # what kill -9 leaves behind
        await client.say("after")  # acknowledged while nobody runs the loop
        await client.wait_ids(5, within=30)  # b reaped a, restarted the loop, answered
        assert client.ids == [1, 2, 3, 4, 5]
        assert client.events[3]["extras"]["reason"] == "STATUS$NODE_LOST"
        assert client.events[4]["args"]["content"] == "after"
        assert b.manager.local_loops() == {"acl"}
        # A second conversation over alice's cap of 1 evicts the first: its loop drains
        # what it acknowledged (the inbox's newest id) and stops.
        status, _ = await cluster.request(
            "POST", b, "/api/conversations", user="alice", json={"conversation_id": "acl2"}
        )
        assert status == 201
        await wait_until(lambda: b.manager.local_loops() == {"acl2"}, what="acl evicted")
        # The store audit's calls (run each sweep with a PostgreSQL store; here files).
        state = b.manager.state
        assert await state.store_server("one server") == (0, False)
        assert await state.store_server("another") == (1, True)
        assert await state.take_lock(state.keys.store_audit(), "n2", 1000)
        number = await state.audit_began()
        await state.audit_done(number)
        await state.audit_done(number - 1)  # a check that outlived its lock ends late
        assert await state.audits() == (number, number)
        await state.drop_lock(state.keys.store_audit(), "n2")
        assert await state.store_server("another") == (0, False)
    finally:
        await cluster.aclose()
    # Nothing any node sent was refused by the ACL.
    assert admin.acl_log() == []


@pytest.mark.skipif(sys.platform != "linux", reason="redis-server with TLS on Linux")
async def test_a_node_over_tls_with_client_certificates(tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    port = free_port()
    args = redis_args(0, tmp_path)  # no plain-text port at all
    args += [
        "--tls-port", str(port),
        "--tls-cert-file", str(tls.server_cert),
        "--tls-key-file", str(tls.server_key),
        "--tls-ca-cert-file", str(tls.ca),
        "--tls-auth-clients", "yes",
    ]  # fmt: skip
    query = (
        f"ssl_ca_certs={tls.ca}&ssl_certfile={tls.client_cert}&ssl_keyfile={tls.client_key}"
        "&ssl_cert_reqs=required"
    )
    url = f"rediss://127.0.0.1:{port}/0?{query}"
    probe = redis.Redis.from_url(url)
    server = RedisProcess(args, probe.ping, tmp_path).start()
    cluster = ServerCluster(url)
    try:
        (a,) = await cluster.start(1)
        client = await cluster.join(a, "tls", "alice")
        first = await client.say("over TLS")
        await client.wait_ids(2)
        assert client.events[1]["args"]["content"] == "over TLS" and first == 1
        # Accept and commit went over the script lane: the server has no plain-text
        # port, so its connection is TLS too.
        lanes = [c for c in probe.client_list() if c["name"] == "coordinator-lane"]
        assert len(lanes) == 1, probe.client_list()
        # Without a client certificate the server refuses the connection.
        bare = redis.Redis.from_url(
            f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tls.ca}&ssl_cert_reqs=required"
        )
        with pytest.raises(redis.exceptions.ConnectionError):
            bare.ping()
        bare.close()
    finally:
        await cluster.aclose()
        probe.close()
        server.stop()


async def test_a_subscription_redis_refuses_is_reported_with_its_reason(
    acl_redis: tuple[int, redis.Redis], caplog: pytest.LogCaptureFixture
) -> None:
    """Under the deploy ACL user a channel outside ``coord:`` is refused (NOPERM): the
    log says so, with Redis' reason, instead of an unexplained lost link, and the link is
    made again at a growing interval, not in a loop; once the channel is no longer
    wanted, the subscription comes back for the others and delivers."""
    port, _ = acl_redis
    url = f"redis://coordinator:{PASSWORD}@127.0.0.1:{port}"
    client = aioredis.Redis.from_url(url)
    subs = Subscriptions(Endpoint.from_url(url), client.publish, "coord:probe:t")
    listener = Heard()
    try:
        async with listening(subs, listener):
            await subs.add("coord:ok")
            with caplog.at_level(logging.WARNING, logger="coordinator.subscriptions"):
                await subs.add("elsewhere", wait=False)
                await asyncio.sleep(2.0)
            refused = [
                r for r in caplog.records if "Redis refused a subscription: NOPERM" in r.message
            ]
            assert refused, caplog.text
            assert len(refused) <= 8, f"reconnected {len(refused)} times in 2 s: no backoff"
            await subs.discard("elsewhere")
            assert subs.channels == {"coord:ok", "coord:probe:t"}

            async def delivered() -> bool:  # published until the subscription is back
                await client.publish("coord:ok", b"still here")
                return ("coord:ok", b"still here") in listener.heard

            await wait_until(delivered, timeout=15, interval=0.2, what="subscribed again")
    finally:
        await client.aclose()


async def test_a_start_up_refused_its_subscription_ends_at_once_naming_the_permission(
    acl_redis: tuple[int, redis.Redis],
) -> None:
    """A Redis user whose ACL lacks +subscribe: ``coordinator serve`` stops at its first
    refused subscription with one line naming the command refused (not retries ending
    in a timeout with an empty reason), and no password."""
    from tests.test_cli import run

    port, admin = acl_redis
    admin.acl_setuser(
        "nosub",
        enabled=True,
        passwords=["+S3CRET-nosub"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-subscribe", "-ssubscribe"],
    )
    url = f"redis://nosub:S3CRET-nosub@127.0.0.1:{port}/0"
    code, _, err = await run(
        "serve", "--port", "0", "--secret", "s", "--redis-url", url, "--log-level", "error",
        within=60,
    )  # fmt: skip
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1, err
    assert len(errors) == 1, err
    assert "NOPERM" in errors[0] and "'subscribe'" in errors[0], errors[0]
    assert "deploy/redis-users.acl" in errors[0]
    assert "S3CRET" not in err and "Traceback" not in err


async def test_a_check_under_the_deploy_acl_user_passes_and_sends_nothing_it_refuses(
    acl_redis: tuple[int, redis.Redis], tmp_path: Path
) -> None:
    """``deploy/redis-users.acl`` allows exactly what a node sends: the check sends
    nothing else (Redis' ACL log stays empty). Redis' default user there may only PING:
    a check as that user names the refusal."""
    port, admin = acl_redis
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    args = ["serve", "--check", "--secret-file", str(secret), "--port", "0"]
    args += ["--event-store", f"file://{tmp_path}/store"]
    url = f"redis://coordinator:{PASSWORD}@127.0.0.1:{port}/0"
    code, out, err = await run(*args, COORDINATOR_REDIS_URL=url)
    assert code == 0, (out, err)
    assert admin.acl_log() == []
    code, out, err = await run(*args, COORDINATOR_REDIS_URL=f"redis://127.0.0.1:{port}/0")
    assert code == 1, (out, err)
    status, detail = lines(out)["redis"]
    assert status == "FAIL" and "refused the node's command (NoPermissionError" in detail, detail
    assert "unreachable" not in detail
