"""``coordinator serve --check``, run as a real process against real Redis: what a node
needs to start, one line per check, nothing written to Redis, no port held."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.redis_topologies import RedisClusterServers, SentinelServers
from tests.server_fixtures import ServerCluster
from tests.test_cli import run

LONG_SECRET = "f" * 64


def lines(out: str) -> dict[str, tuple[str, str]]:
    """check name -> (status, detail), from the report's lines."""
    found = {}
    for line in out.splitlines():
        status, _, rest = line.partition("  ")
        what, _, detail = rest.strip().partition("  ")
        if status.strip() in ("ok", "warn", "FAIL", "skip"):
            found[what.strip()] = (status.strip(), detail.strip())
    return found


async def test_a_check_passes_then_names_each_problem_and_writes_nothing(
    redis_url: str, redis_client: aioredis.Redis, servers: ServerCluster, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(LONG_SECRET)
    store = f"file://{tmp_path}/store"
    args = ["serve", "--check", "--secret-file", str(secret), "--port", "0"]
    args += ["--redis-url", redis_url, "--event-store", store, "--node-id", "checked"]
    keys_before = sorted(await redis_client.keys("*"))

    code, out, err = await run(*args)
    assert code == 0, (out, err)
    found = lines(out)
    assert [status for status, _ in found.values()] == ["ok"] * 11, out
    assert found["layout"] == ("ok", "1 (no node has recorded the cluster's yet)")
    assert found["subscribe"] == ("ok", "allowed (the node's channels)")
    assert found["redis"][1].startswith("standalone Redis at redis://")
    assert "no node has recorded" in found["event store"][1]
    assert out.rstrip().endswith("check passed (0 warning(s))")
    assert sorted(await redis_client.keys("*")) == keys_before  # nothing written

    # A node of the cluster runs: it recorded its store and holds its node id and port.
    (node,) = await servers.start(1)
    bad = ["serve", "--check", "--secret-file", str(secret), "--port", str(node.port)]
    bad += ["--metrics-port", str(node.port)]
    bad += ["--redis-url", redis_url, "--event-store", store, "--node-id", "n1"]
    bad += ["--agent", "no_such_module:Agent"]
    await redis_client.config_set("maxmemory-policy", "allkeys-lru")
    await redis_client.config_set("maxmemory", 1 << 30)
    try:
        code, out, err = await run(*bad)
    finally:
        await redis_client.config_set("maxmemory", 0)
        await redis_client.config_set("maxmemory-policy", "noeviction")
    assert code == 1, (out, err)
    found = lines(out)
    assert found["eviction"][0] == "FAIL" and "allkeys-lru" in found["eviction"][1]
    assert found["node id"][0] == "warn" and "held by a live node" in found["node id"][1]
    assert found["event store"][0] == "FAIL" and "is not the cluster's" in found["event store"][1]
    assert found["agent"][0] == "FAIL" and "no_such_module" in found["agent"][1]
    assert found["port"] == ("FAIL", f"127.0.0.1:{node.port}: in use")
    assert found["metrics port"] == ("FAIL", f"{node.port} is also another of the node's ports")
    assert out.rstrip().endswith("check failed: 5 problem(s), 1 warning(s)")
    assert "Traceback" not in err
    assert found["layout"] == ("ok", "1 (the cluster's)")

    # The cluster's data in another layout (a newer release's) while its node runs.
    await redis_client.hset(node.manager.keys.layout(), mapping={"layout": "2", "release": "9"})
    try:
        code, out, _ = await run(*args[:-1], "other")
    finally:
        await redis_client.hset(node.manager.keys.layout(), "layout", "1")
    found = lines(out)
    assert code == 1 and found["layout"][0] == "FAIL", out
    assert "Redis holds this cluster's data in layout 2" in found["layout"][1]
    assert "nodes of it are running (n1)" in found["layout"][1]


async def test_a_check_of_an_unreachable_redis_says_so_without_its_password(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(LONG_SECRET)
    code, out, err = await run(
        "serve",
        "--check",
        "--secret-file",
        str(secret),
        "--port",
        "0",
        "--redis-url",
        "redis://:hunter2-secret@127.0.0.1:9/0",
    )
    assert code == 1, (out, err)
    status, detail = lines(out)["redis"]
    assert status == "FAIL" and "unreachable" in detail
    assert "hunter2" not in out + err
    assert lines(out)["agent"][0] == "ok"  # the checks that need no Redis still ran


async def test_a_check_refuses_what_serve_refuses_and_checks_what_needs_no_redis(
    redis_url: str, tmp_path: Path
) -> None:
    """Flags ``serve`` refuses are refused the same way (exit 2); with Redis refusing
    the login, the checks that need it are skipped and the others still run, the event
    store's included."""
    secret = tmp_path / "secret"
    secret.write_text(LONG_SECRET)
    base = ["serve", "--check", "--secret-file", str(secret), "--port", "0"]
    for flag, value, why in [
        ("--public-url", "ftp://x", "public URL must be http(s)://HOST[:PORT]"),
        ("--event-store", "file://relative/store", "event"),
        ("--event-store", "mysql://db/x", "event"),
    ]:
        code, out, err = await run(*base, flag, value)
        assert code == 2, (flag, value, out, err)
        assert why in err and out == "", (flag, value, out, err)

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    wrong = f"redis://nobody:not-the-password@{host}:{port}/0"
    code, out, err = await run(
        *base, "--event-store", f"file://{blocked}/store", "--redis-url", wrong
    )
    assert code == 1, (out, err)
    found = lines(out)
    status, detail = found["redis"]
    assert status == "FAIL" and "refused the login" in detail and "not-the-password" not in out
    assert found["scripts"] == ("skip", "Redis not reached")
    assert found["event store"][0] == "FAIL" and str(blocked) in found["event store"][1]
    assert found["agent"][0] == "ok"


async def test_a_check_of_a_redis_cluster_and_of_sentinel(
    redis_cluster: RedisClusterServers, redis_sentinel: SentinelServers, tmp_path: Path
) -> None:
    """A Redis Cluster (its state read: ok) and a Sentinel-managed master pass; a plain
    redis:// URL at a Sentinel's port is not taken for a Redis with no eviction."""
    secret = tmp_path / "secret"
    secret.write_text(LONG_SECRET)
    base = ["serve", "--check", "--secret-file", str(secret), "--port", "0"]
    base += ["--event-store", f"file://{tmp_path}/store"]
    code, out, err = await run(*base, "--redis-url", redis_cluster.url)
    assert code == 0, (out, err)
    assert lines(out)["redis"][1].startswith("cluster Redis at"), out
    sentinels = ",".join(f"{h}:{p}" for h, p in redis_sentinel.sentinel_addresses)
    url = f"redis+sentinel://{sentinels}/{redis_sentinel.master_name}"
    code, out, err = await run(*base, "--redis-url", url, "--ack-replicas", "1")
    assert code == 0, (out, err)
    assert lines(out)["replicas"] == ("ok", "1 or more per master (--ack-replicas 1)"), out
    host, port = redis_sentinel.sentinel_addresses[0]
    code, out, err = await run(*base, "--redis-url", f"redis://{host}:{port}/0")
    assert code == 1, (out, err)
    found = lines(out)
    assert found["eviction"][0] == "warn" and "redis+sentinel://" in found["eviction"][1], out
    assert found["scripts"][0] == "FAIL", out


async def test_a_password_for_a_redis_without_one_passes_as_the_node_would_run(
    redis_url: str, tmp_path: Path
) -> None:
    """redis-py takes a password that Redis has none for (its AUTH answered "called
    without any password configured"); the pub/sub and script links refused it, so the
    check said "ok redis" then "FAIL subscribe" and a node could not subscribe. Now the
    links take it as redis-py does. The password on the command line is a warning the
    report counts (it was printed apart, and the report said "0 warning(s)")."""
    secret = tmp_path / "secret"
    secret.write_text(LONG_SECRET)
    with_password = redis_url.replace("redis://", "redis://:unused-pw-42@", 1)
    code, out, err = await run(
        "serve", "--check", "--secret-file", str(secret), "--port", "0",
        "--redis-url", with_password,
    )  # fmt: skip
    assert code == 0, (out, err)
    found = lines(out)
    assert found["subscribe"] == ("ok", "allowed (the node's channels)")
    assert found["command line"][0] == "warn" and "--redis-url carries a password" in out
    assert out.rstrip().endswith("check passed (1 warning(s))")
    assert "unused-pw-42" not in out + err


async def test_a_full_redis_fails_the_check_and_the_start_says_so(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """Redis at its maxmemory takes no write, a node's registration included: the check
    passed, and the start failed saying to check --redis-url."""
    secret = tmp_path / "secret"
    secret.write_text(LONG_SECRET)
    args = ["--secret-file", str(secret), "--port", "0", "--redis-url", redis_url]
    policy = await redis_client.config_get("maxmemory-policy")
    await redis_client.config_set("maxmemory-policy", "noeviction")
    await redis_client.config_set("maxmemory", 1)
    try:
        code, out, err = await run("serve", "--check", *args)
        started, _, said = await run("serve", *args, within=30)
    finally:
        await redis_client.config_set("maxmemory", 0)
        await redis_client.config_set("maxmemory-policy", policy["maxmemory-policy"])
    assert code == 1, (out, err)
    status, detail = lines(out)["memory"]
    assert status == "FAIL" and detail.startswith("Redis is full ("), detail
    assert started == 1, said
    assert "is full (at its maxmemory)" in said and "check --redis-url" not in said, said


async def test_ack_replicas_on_a_master_without_replicas_fails_the_check(
    redis_url: str, tmp_path: Path
) -> None:
    """--ack-replicas 1 on a Redis without a replica refuses every write and replay of
    its conversations (a join took 23 s to be refused); the check passed."""
    secret = tmp_path / "secret"
    secret.write_text(LONG_SECRET)
    code, out, err = await run(
        "serve", "--check", "--secret-file", str(secret), "--port", "0",
        "--redis-url", redis_url, "--ack-replicas", "1",
    )  # fmt: skip
    assert code == 1, (out, err)
    status, detail = lines(out)["replicas"]
    assert status == "FAIL" and "has 0 replica(s); --ack-replicas 1 refuses" in detail, detail


async def test_a_node_started_with_more_ack_replicas_than_redis_has_says_so(
    make_nodes: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Without --check, such a node started quietly: its first sign was a join refused
    after the replicas' wait. It starts (replicas may be on their way), and warns."""
    caplog.set_level(logging.WARNING, logger="coordinator.backends")
    await make_nodes(1, ack_replicas=1)
    said = [r.getMessage() for r in caplog.records if "--ack-replicas 1 refuses" in r.getMessage()]
    assert len(said) == 1 and "has 0 replica(s)" in said[0], caplog.text
