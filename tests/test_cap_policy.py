"""The cap policy (``--cap-policy reject``) and the organisation's cap
(``--max-concurrent-conversations-per-org``), exact across nodes, on real Redis: a start
over a cap is refused with CONCURRENCY_LIMIT_REACHED (REST 429, socket.io connect error),
nothing evicted."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from coordinator.auth import issue_token
from coordinator.errors import ConcurrencyLimitReached
from tests.server_fixtures import SECRET, SioClient


async def _starts(calls: list[Any]) -> tuple[int, list[ConcurrencyLimitReached]]:
    results = await asyncio.gather(*calls, return_exceptions=True)
    refused = [r for r in results if isinstance(r, ConcurrencyLimitReached)]
    others = [r for r in results if isinstance(r, BaseException) and r not in refused]
    assert not others, others
    return len(results) - len(refused), refused


async def test_reject_refuses_starts_over_the_user_cap_across_nodes(make_nodes: Any) -> None:
    nodes = await make_nodes(3, max_concurrent_conversations=3, cap_policy="reject")
    started, refused = await _starts(
        [nodes[i % 3].maybe_start_agent_loop(f"r-{i}", {}, "alice") for i in range(12)]
    )
    assert started == 3 and len(refused) == 9
    assert all((r.cap, r.current) == (3, 3) for r in refused)
    assert refused[0].details()["error"] == "CONCURRENCY_LIMIT_REACHED"
    running = await nodes[0].get_running_agent_loops("alice")
    assert len(running) == 3
    # Nothing was evicted: the first three run on, and a running one is no new start.
    for sid in running:
        owner = next(n for n in nodes if sid in n.local_loops())
        assert (await owner.maybe_start_agent_loop(sid, {}, "alice")).running
    # A slot freed is a start allowed.
    victim = sorted(running)[0]
    await nodes[0].close_session(victim, "alice")
    assert (await nodes[1].maybe_start_agent_loop("r-late", {}, "alice")).running
    assert len(await nodes[2].get_running_agent_loops("alice")) == 3


async def test_the_org_cap_holds_across_users_and_nodes(make_nodes: Any) -> None:
    nodes = await make_nodes(
        2, max_concurrent_conversations=5, max_concurrent_conversations_per_org=2
    )
    users = ["ann", "ben", "cat"]
    started, refused = await _starts(
        [
            nodes[i % 2].maybe_start_agent_loop(f"o-{i}", {}, users[i % 3], org="acme")
            for i in range(9)
        ]
    )
    assert started == 2 and len(refused) == 7
    assert all(
        (r.cap, r.current, r.limit) == (2, 2, "concurrent conversations per organisation")
        for r in refused
    )
    running = set().union(*[await nodes[0].get_running_agent_loops(u) for u in users])
    assert len(running) == 2
    # Another organisation, and a user without one, are not held by acme's cap.
    assert (await nodes[0].maybe_start_agent_loop("other-org", {}, "dan", org="globex")).running
    assert (await nodes[1].maybe_start_agent_loop("no-org", {}, "eve")).running
    # A loop that stops gives its place back (found stale by the next start).
    sid = sorted(running)[0]
    owner = next(n for n in nodes if sid in n.local_loops())
    meta = await owner.conversation(sid)
    await owner.close_session(sid, meta["user"])
    assert (await nodes[1].maybe_start_agent_loop("o-late", {}, "cat", org="acme")).running
    # A restart without a token (no org given) still counts: the user's org is recorded.
    with pytest.raises(ConcurrencyLimitReached):
        await nodes[0].maybe_start_agent_loop("o-no-token", {}, "cat")


async def test_rest_and_socketio_answer_concurrency_limit_reached(servers: Any) -> None:
    (a,) = await servers.start(1, max_concurrent_conversations=1, cap_policy="reject")
    status, _ = await servers.request("POST", a, "/api/conversations", user="zoe", json={})
    assert status == 201
    status, body = await servers.request("POST", a, "/api/conversations", user="zoe", json={})
    assert status == 429
    assert body["error"] == "CONCURRENCY_LIMIT_REACHED"
    assert (body["limit"], body["current"]) == (1, 1) and body["message"]

    client = SioClient("zoe")
    try:
        refusal = await client.refused(a.url, "over-cap", servers.token("zoe"))
        assert "has 1 conversations running, the limit is 1" in refusal
        data = client.refusal
        assert isinstance(data, dict) and data.get("data", {}).get("error") == (
            "CONCURRENCY_LIMIT_REACHED"
        ), data
    finally:
        await client.close()


async def test_the_org_claim_reaches_the_org_cap_through_rest(servers: Any) -> None:
    (a,) = await servers.start(1, max_concurrent_conversations_per_org=1)
    tokens = [issue_token(u, SECRET, claims={"org": "acme"}) for u in ("ivy", "joe")]
    status, _ = await servers.request("POST", a, "/api/conversations", token=tokens[0], json={})
    assert status == 201
    status, body = await servers.request("POST", a, "/api/conversations", token=tokens[1], json={})
    assert (status, body["error"], body["limit"]) == (429, "CONCURRENCY_LIMIT_REACHED", 1)


async def test_what_a_start_records_of_its_user_does_not_outlive_its_use(make_nodes: Any) -> None:
    """A user's organisation is recorded (``{u:USER}:org``) only for the organisation's
    cap, and for 30 days after the user's last start naming it: before, every user with
    an ``org`` claim left that key for good, the cap off or on. A node's per-user
    wake-up for waiting starts goes when the user's last start ends: before, one stayed
    per user that ever started a loop there (about 850 B each, never freed)."""
    (off,) = await make_nodes(1)
    (on,) = await make_nodes(1, max_concurrent_conversations_per_org=50)
    for i in range(20):
        node, user = (off, f"u{i}") if i % 2 else (on, f"v{i}")
        assert (await node.maybe_start_agent_loop(f"s{i}", {}, user, org="acme")).running
    redis = off.state.redis
    assert await redis.exists(*(off.state.keys.user_org(f"u{i}") for i in range(1, 20, 2))) == 0
    kept = [await redis.pttl(on.state.keys.user_org(f"v{i}")) for i in range(0, 20, 2)]
    assert all(29 * 86400_000 < ttl <= 30 * 86400_000 for ttl in kept), kept
    for node in (off, on):
        admission = node.node.loops.admission
        assert admission._slot_events == {} and not admission._admitting
