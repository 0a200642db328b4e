"""``coordinator serve --check``, run as a real process against real Redis: what a node
needs to start, one line per check, nothing written to Redis, no port held."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis

from tests.server_fixtures import SECRET, ServerCluster
from tests.test_cli import run


def lines(out: str) -> dict[str, tuple[str, str]]:
    """check name -> (status, detail), from the report's lines."""
    found = {}
    for line in out.splitlines():
        status, _, rest = line.partition("  ")
        what, _, detail = rest.strip().partition("  ")
        if status.strip() in ("ok", "warn", "FAIL"):
            found[what.strip()] = (status.strip(), detail.strip())
    return found


async def test_a_check_passes_then_names_each_problem_and_writes_nothing(
    redis_url: str, redis_client: aioredis.Redis, servers: ServerCluster, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    store = f"file://{tmp_path}/store"
    args = ["serve", "--check", "--secret-file", str(secret), "--port", "0"]
    args += ["--redis-url", redis_url, "--event-store", store, "--node-id", "checked"]
    keys_before = sorted(await redis_client.keys("*"))

    code, out, err = await run(*args)
    assert code == 0, (out, err)
    found = lines(out)
    assert [status for status, _ in found.values()] == ["ok"] * 8, out
    assert found["redis"][1].startswith("standalone Redis at redis://")
    assert "no node has recorded" in found["event store"][1]
    assert out.rstrip().endswith("check passed (0 warning(s))")
    assert sorted(await redis_client.keys("*")) == keys_before  # nothing written

    # A node of the cluster runs: it recorded its store and holds its node id and port.
    (node,) = await servers.start(1)
    bad = ["serve", "--check", "--secret-file", str(secret), "--port", str(node.port)]
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
    assert out.rstrip().endswith("check failed: 4 problem(s), 1 warning(s)")
    assert "Traceback" not in err


async def test_a_check_of_an_unreachable_redis_says_so_without_its_password(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
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
