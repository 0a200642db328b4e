"""REST, /healthz and /metrics of real uvicorn nodes against real Redis."""

from __future__ import annotations

import asyncio
import gc
import logging
import re

import pytest
from redis.asyncio import Redis

from coordinator.auth import issue_token
from coordinator.embedded import EmbeddedRedis
from coordinator.server import NodeServer
from tests.helpers import fast_config, wait_until
from tests.server_fixtures import SECRET, ServerCluster


async def test_rest_status_codes(servers: ServerCluster) -> None:
    a, b = await servers.start(2)
    req = servers.request

    # 401 without or with a bad token, with a reason.
    status, body = await req("GET", a, "/api/conversations")
    assert status == 401 and body == {
        "error": "authentication failed: missing token: send 'Authorization: Bearer <token>'"
    }
    status, body = await req("GET", a, "/api/conversations", token="nope")
    assert (status, body["error"]) == (401, "authentication failed: malformed token")
    forged = issue_token("alice", "other-secret")
    status, body = await req("GET", a, "/api/node", token=forged)
    assert (status, body["error"]) == (401, "authentication failed: bad token signature")
    expired = issue_token("alice", SECRET, 1, now=0)
    status, body = await req("GET", a, "/api/cluster", token=expired)
    assert (status, body["error"]) == (401, "authentication failed: token expired")

    # 404 unknown path / conversation, 405 wrong method, 400 bad input.
    status, body = await req("GET", a, "/api/nothing", user="alice")
    assert status == 404 and body["error"] == "no such endpoint: /api/nothing"
    status, body = await req("PUT", a, "/api/conversations", user="alice")
    assert status == 405 and "use GET, POST" in body["error"]
    status, body = await req("DELETE", a, "/api/conversations/ghost", user="alice")
    assert status == 404 and body["error"] == "no such conversation: 'ghost'"
    status, body = await req("GET", a, "/api/conversations/ghost", user="alice")
    assert status == 404
    status, body = await req("DELETE", a, "/api/conversations/bad%20id", user="alice")
    assert status == 400 and "invalid conversation id" in body["error"]
    status, body = await req("POST", a, "/api/conversations", user="alice", data=b"{nope")
    assert status == 400 and "not valid JSON" in body["error"]
    status, body = await req("POST", a, "/api/conversations", user="alice", json=[1])
    assert status == 400 and body["error"] == "the request body must be a JSON object"
    for bad in ({"conversation_id": "a b"}, {"conversation_id": 7}):
        status, body = await req("POST", a, "/api/conversations", user="alice", json=bad)
        assert status == 400 and "invalid conversation id" in body["error"]
    status, body = await req(
        "POST", a, "/api/conversations", user="alice", json={"initial_user_msg": 5}
    )
    assert (status, body["error"]) == (400, "initial_user_msg must be a string")
    status, body = await req(
        "POST", a, "/api/conversations", user="alice", json={"initial_user_msg": "x" * 70_000}
    )
    assert status == 400 and "the limit is 65536" in body["error"]
    status, body = await req(
        "POST", a, "/api/conversations", user="alice", data=b"{" + b" " * 300_000 + b"}"
    )
    assert status == 413
    status, body = await req("GET", a, "/api/conversations", user="alice")
    assert body == {"conversations": [], "next_page_id": None}

    # 201 create (id generated, first message accepted), 200 when it exists.
    status, body = await req(
        "POST", a, "/api/conversations", user="alice", json={"initial_user_msg": "hello"}
    )
    assert status == 201 and body["running"] is True and body["owner"] == "n1"
    generated = body["conversation_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    await wait_until(lambda: _count(a, generated, 2), timeout=10, what="first message answered")
    status, body = await req(
        "POST", b, "/api/conversations", user="alice", json={"conversation_id": "named"}
    )
    assert (status, body) == (201, {"conversation_id": "named", "running": True, "owner": "n2"})
    status, body = await req(
        "POST", a, "/api/conversations", user="alice", json={"conversation_id": "named"}
    )
    assert (status, body) == (200, {"conversation_id": "named", "running": True, "owner": "n2"})

    status, body = await req("GET", b, "/api/conversations", user="alice")
    assert status == 200
    listed = {c["conversation_id"]: c for c in body["conversations"]}
    assert set(listed) == {generated, "named"}
    assert listed[generated]["owner"] == "n1" and listed["named"]["owner"] == "n2"
    assert listed[generated]["events"] == 2 and listed[generated]["running"] is True
    status, body = await req("GET", b, f"/api/conversations/{generated}", user="alice")
    assert status == 200 and body["owner"] == "n1" and "user" not in body

    # Close through the node that does not run the loop, then again.
    status, body = await req("DELETE", b, f"/api/conversations/{generated}", user="alice")
    assert (status, body) == (200, {"closed": True})
    status, body = await req("DELETE", a, f"/api/conversations/{generated}", user="alice")
    assert (status, body) == (200, {"closed": False})
    status, body = await req("GET", a, f"/api/conversations/{generated}", user="alice")
    assert body["running"] is False and body["owner"] == ""

    # Cluster and node views.
    status, body = await req("GET", a, "/api/cluster", user="alice")
    assert status == 200
    assert set(body["nodes"]) == {"n1", "n2"}
    assert body["nodes"]["n1"] == a.manager.inc
    assert body["loops"] == {"n1": [], "n2": ["named"]}
    assert body["connections"] == {"n1": 0, "n2": 0}
    status, body = await req("GET", b, "/api/node", user="alice")
    assert body == {
        "node_id": "n2",
        "incarnation": b.manager.inc,
        "draining": False,
        "loops": ["named"],
        "connections": 0,
    }
    status, body = await req("GET", b, "/api/node")
    assert status == 401


async def test_rest_query_parameters_are_read_one_way(servers: ServerCluster) -> None:
    """A parameter given twice, digits of other scripts, an id past Redis' stream ids:
    400 with the reason, nothing done; a client's long input is quoted cut short."""
    (a,) = await servers.start(1)
    req = servers.request
    status, _ = await req(
        "POST", a, "/api/conversations", user="alice", json={"conversation_id": "q"}
    )
    assert status == 201
    events = "/api/conversations/q/events"
    for query, reason in [
        ("after=18446744073709551616", "after must be from 0 to 9223372036854775807"),
        ("after=9223372036854775808", "after must be from 0 to 9223372036854775807"),
        ("after=" + "9" * 5000, "after must be an integer, got '99999"),
        ("limit=%D9%A3", "limit must be an integer, got '\u0663'"),
        ("limit=1_0", "limit must be an integer"),
        ("limit=+5", "limit must be an integer"),
        ("limit=5&limit=abc", "limit is given 2 times; give it once"),
        ("limit=abc&limit=5", "limit is given 2 times; give it once"),
    ]:
        status, body = await req("GET", a, f"{events}?{query}", user="alice")
        assert status == 400 and reason in body["error"], (query, body)
        assert len(body["error"]) < 200, body
    status, body = await req("GET", a, f"{events}?after=9223372036854775807&limit=5", user="alice")
    assert (status, body["events"]) == (200, [])

    # Which of two purge flags counts is not guessed: nothing is closed or deleted.
    for query in ("purge=false&purge=true", "purge=true&purge=false", "purge="):
        status, body = await req("DELETE", a, f"/api/conversations/q?{query}", user="alice")
        assert status == 400, (query, body)
    status, body = await req("GET", a, "/api/conversations/q", user="alice")
    assert status == 200 and body["running"] is True

    status, body = await req("GET", a, "/api/conversations/" + "x" * 10_000, user="alice")
    assert status == 400 and len(body["error"]) < 200, body


async def test_a_list_of_conversations_comes_in_pages(servers: ServerCluster) -> None:
    """``limit`` and ``page_id``: pages newest first, each after the last one's place, so
    a conversation created between two pages is not listed twice (it goes to the top) and
    none is skipped; a page_id no list gave, or a limit out of bounds, is a 400."""
    a, b = await servers.start(2)
    req = servers.request

    async def create(node: NodeServer, sid: str) -> None:
        status, _ = await req(
            "POST", node, "/api/conversations", user="alice", json={"conversation_id": sid}
        )
        assert status == 201

    for i in range(7):
        await create((a, b)[i % 2], f"c{i}")
    status, whole = await req("GET", a, "/api/conversations?limit=1000", user="alice")
    everyone = [c["conversation_id"] for c in whole["conversations"]]
    assert sorted(everyone) == [f"c{i}" for i in range(7)] and whole["next_page_id"] is None
    newest_first = [(c["created"], c["conversation_id"]) for c in whole["conversations"]]
    assert newest_first == sorted(newest_first, reverse=True)

    status, first = await req("GET", a, "/api/conversations?limit=3", user="alice")
    assert status == 200 and first["next_page_id"]
    await create(a, "late")  # newest of all: on a first page, not on the ones after
    pages, page_id = [first["conversations"]], first["next_page_id"]
    while page_id is not None:
        status, body = await req(
            "GET",
            (a, b)[len(pages) % 2],
            f"/api/conversations?limit=3&page_id={page_id}",
            user="alice",
        )
        assert status == 200, body
        pages.append(body["conversations"])
        page_id = body["next_page_id"]
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [c["conversation_id"] for page in pages for c in page] == everyone
    status, body = await req("GET", b, "/api/conversations?limit=1", user="alice")
    assert [c["conversation_id"] for c in body["conversations"]] == ["late"]
    status, body = await req("GET", b, "/api/conversations", user="bob")  # not alice's
    assert body == {"conversations": [], "next_page_id": None}

    for query, reason in [
        ("page_id=nope", "page_id 'nope' is malformed; give the next_page_id of a list"),
        ("page_id=", "page_id '' is malformed"),
        ("page_id=%E2%9C%93", "is malformed"),
        ("page_id=MTI", "is malformed"),  # "12": no id
        ("limit=0", "limit must be from 1 to 1000"),
        ("limit=1001", "limit must be from 1 to 1000"),
        ("limit=2&limit=3", "limit is given 2 times; give it once"),
    ]:
        status, body = await req("GET", a, f"/api/conversations?{query}", user="alice")
        assert status == 400 and reason in body["error"], (query, body)


async def test_repeated_creates_and_closes_change_nothing_more(servers: ServerCluster) -> None:
    """A create retried (one after the other, or two at once on two nodes) sends its
    message once, as the seed's ``maybe_start_agent_loop`` does (only with the loop's
    start); a close of a closed conversation with no connection writes no notice again."""
    a, b = await servers.start(2)
    req = servers.request
    body = {"conversation_id": "once", "initial_user_msg": "hello"}
    answers = [
        await req("POST", node, "/api/conversations", user="alice", json=body) for node in (a, b)
    ]
    assert [status for status, _ in answers] == [201, 200]
    twin = {"conversation_id": "twin", "initial_user_msg": "hi"}
    answers = await asyncio.gather(
        *(req("POST", node, "/api/conversations", user="alice", json=twin) for node in (a, b))
    )
    assert sorted(status for status, _ in answers) == [200, 201]
    for sid in ("once", "twin"):
        await wait_until(lambda sid=sid: _count(a, sid, 2), timeout=10, what=f"{sid} answered")
        await asyncio.sleep(0.3)  # a second message would have been accepted by now
        sent = [e for e in await a.manager.events(sid) if e.get("source") == "user"]
        assert len(sent) == 1, sent

    status, body = await req("DELETE", b, "/api/conversations/once", user="alice")
    assert (status, body) == (200, {"closed": True})
    last = (await req("GET", a, "/api/conversations/once", user="alice"))[1]["events"]
    for node in (a, b, a):
        status, body = await req("DELETE", node, "/api/conversations/once", user="alice")
        assert (status, body) == (200, {"closed": False})
    status, body = await req("GET", b, "/api/conversations/once", user="alice")
    assert body["events"] == last  # no closed notice per close


async def test_an_admin_reads_closes_and_purges_any_conversation(servers: ServerCluster) -> None:
    (a,) = await servers.start(1)
    req = servers.request
    status, _ = await req(
        "POST", a, "/api/conversations", user="alice", json={"conversation_id": "c1"}
    )
    assert status == 201
    admin = issue_token("ops", SECRET, 3600, claims={"role": "admin"})
    status, body = await req("GET", a, "/api/conversations/c1", token=admin)
    assert status == 200 and body["user"] == "alice" and body["running"] is True
    status, body = await req("GET", a, "/api/conversations/c1", user="bob")
    assert status == 404
    status, body = await req("DELETE", a, "/api/conversations/c1", user="bob")
    assert status == 404
    status, body = await req("DELETE", a, "/api/conversations/c1", token=admin)
    assert (status, body) == (200, {"closed": True})
    status, body = await req("DELETE", a, "/api/conversations/c1?purge=true", token=admin)
    assert status == 200 and body["purged"]["redis_keys"] > 0
    status, body = await req("GET", a, "/api/conversations/c1", token=admin)
    assert status == 404


async def test_rest_refuses_what_it_would_otherwise_guess(servers: ServerCluster) -> None:
    """An unknown body field (a misspelling would be dropped), two Authorization headers
    (which counts would be a guess), an integer past 64 bits (refused unread): 400/401
    with the reason; the probes answer HEAD as GET, headers only."""
    (a,) = await servers.start(1)
    req = servers.request
    typo = {"conversation_id": "t1", "initial_msg": "hi"}
    status, body = await req("POST", a, "/api/conversations", user="alice", json=typo)
    assert status == 400 and body["error"].startswith("unknown field 'initial_msg' in the body")
    status, body = await req(
        "POST", a, "/api/conversations", user="alice", data=b'{"close_delay": ' + b"9" * 5000 + b"}"
    )
    assert status == 400 and "an integer of 5000 digits is out of range" in body["error"]
    assert "set_int_max_str_digits" not in body["error"]
    status, body = await req(
        "POST", a, "/api/conversations", user="alice", json={"max_running_time": -1}
    )
    assert (status, body["error"]) == (400, "max_running_time must be > 0, got -1")
    assert await a.manager.conversation("t1") == {}

    http = servers._http
    assert http is not None
    both = [("Authorization", f"Bearer {servers.token(u)}") for u in ("alice", "bob")]
    async with http.get(a.url + "/api/conversations", headers=both) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == (
            "authentication failed: more than one Authorization header; send one"
        )
    for path in ("/healthz", "/livez"):
        async with http.head(a.url + path) as resp:
            assert resp.status == 200 and await resp.read() == b""


async def test_creates_of_one_id_at_once_answer_one_201(servers: ServerCluster) -> None:
    """Five creates of one new id at once, on two nodes: one made it (201), the others
    found it (200); before, each that looked before any was made answered 201."""
    a, b = await servers.start(2)
    body = {"conversation_id": "race"}
    answers = await asyncio.gather(
        *(
            servers.request("POST", node, "/api/conversations", user="alice", json=body)
            for node in (a, b, a, b, a)
        )
    )
    assert sorted(status for status, _ in answers) == [200, 200, 200, 200, 201], answers
    assert {answer["owner"] for _, answer in answers} in ({"n1"}, {"n2"})


async def _count(node: NodeServer, sid: str, n: int) -> bool:
    return len(await node.manager.events(sid)) >= n


async def test_healthz_and_metrics(servers: ServerCluster) -> None:
    (a,) = await servers.start(1)
    status, body = await servers.request("GET", a, "/healthz")
    assert (status, body) == (
        200,
        {
            "status": "ok",
            "node_id": "n1",
            "redis": "ok",
            "registered": True,
            "draining": False,
            "loops": 0,
            "connections": 0,
            "event_store": "ok",
        },
    )
    client = await servers.join(a, "conv", "alice")
    for i in range(3):
        await client.say(f"m{i}")
    await client.wait_ids(6)
    status, body = await servers.request("GET", a, "/healthz")
    assert status == 200 and body["loops"] == 1 and body["connections"] == 1

    status, text = await servers.request("GET", a, "/metrics")
    assert status == 200
    values = {}
    for name, kind in [
        ("coordinator_local_loops", "gauge"),
        ("coordinator_local_connections", "gauge"),
        ("coordinator_actions_accepted_total", "counter"),
        ("coordinator_events_delivered_total", "counter"),
        ("coordinator_speculative_dispatches_total", "counter"),
        ("coordinator_speculations_lost_total", "counter"),
        ("coordinator_redis_up", "gauge"),
        ("coordinator_lease_valid", "gauge"),
        ("coordinator_event_store_ok", "gauge"),
    ]:
        assert f"# HELP {name} " in text
        assert f"# TYPE {name} {kind}\n" in text
        match = re.search(rf'^{name}{{node="n1"}} (\d+)$', text, re.M)
        assert match, name
        values[name] = int(match.group(1))
    # Each action reaches the agent speculatively if the loop was idle when it came.
    assert 0 <= values.pop("coordinator_speculative_dispatches_total") <= 3
    assert values == {
        "coordinator_speculations_lost_total": 0,
        "coordinator_local_loops": 1,
        "coordinator_local_connections": 1,
        "coordinator_actions_accepted_total": 3,
        "coordinator_events_delivered_total": 6,
        "coordinator_redis_up": 1,
        "coordinator_lease_valid": 1,
        "coordinator_event_store_ok": 1,
    }


async def test_metrics_count_the_garbage_collectors_pauses(servers: ServerCluster) -> None:
    (a,) = await servers.start(1)

    async def gc_values() -> dict[str, float]:
        status, text = await servers.request("GET", a, "/metrics")
        assert status == 200
        found = re.findall(r'^(coordinator_gc_\w+){node="n1"} ([0-9.e+-]+)$', text, re.M)
        return {name: float(value) for name, value in found}

    before = await gc_values()
    assert set(before) == {
        "coordinator_gc_full_collections_total",
        "coordinator_gc_pause_seconds_total",
        "coordinator_gc_longest_pause_seconds",
    }
    gc.collect()  # a full collection, timed like any
    after = await gc_values()
    assert after["coordinator_gc_full_collections_total"] >= (
        before["coordinator_gc_full_collections_total"] + 1
    )
    assert (
        after["coordinator_gc_pause_seconds_total"] > before["coordinator_gc_pause_seconds_total"]
    )
    assert (
        0
        < after["coordinator_gc_longest_pause_seconds"]
        <= (after["coordinator_gc_pause_seconds_total"])
    )


async def test_healthz_reports_redis_down() -> None:
    redis = EmbeddedRedis().start()
    node = NodeServer(fast_config(redis.url, "lonely"), SECRET, port=0)
    cluster = ServerCluster(redis.url)
    try:
        await node.start()
        cluster.nodes.append(node)
        status, body = await cluster.request("GET", node, "/healthz")
        assert status == 200
        redis.stop(kill=True)
        status, body = await cluster.request("GET", node, "/healthz")
        assert status == 503 and body["status"] == "degraded"
        assert body["redis"] == "down" and body["registered"] is False
        # Liveness is the event loop's, not Redis': an outage restarts no node.
        status, alive = await cluster.request("GET", node, "/livez")
        assert status == 200 and alive == {"status": "alive", "node_id": "lonely"}
        assert body["reason"].startswith("redis")
        if a_lease_still_valid := node.manager.node.membership.lease_valid():
            # Its lease runs on for node_ttl: not "invalid", as it said before.
            assert "lease" not in body["reason"], body
        assert a_lease_still_valid or "lease is not valid" in body["reason"]
        status, text = await cluster.request("GET", node, "/metrics")
        assert 'coordinator_redis_up{node="lonely"} 0' in text
        # REST calls that need Redis answer 503 with a clear message, not a stack trace.
        status, body = await cluster.request("GET", node, "/api/conversations", user="alice")
        assert status == 503 and "Redis" in body["error"]
    finally:
        await cluster.aclose()
        redis.cleanup()


async def test_a_command_redis_refuses_is_a_server_error_not_redis_away(
    servers: ServerCluster, redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Another application's key under the coordinator's prefix (WRONGTYPE), like a
    permission its ACL user lacks (NOPERM), is refused by Redis the same way every time:
    a 500 that says so and a stack trace in the log, not a 503 "cannot reach Redis" that
    would send an operator after the network. Nothing is changed."""
    (a,) = await servers.start(1)
    await redis_client.set("coord:{c:clash}:meta", "another application's value")
    caplog.set_level(logging.INFO, "coordinator")

    status, body = await servers.request("GET", a, "/api/conversations/clash", user="alice")
    assert status == 500, body
    assert body["error"] == (
        "internal error: Redis refused the coordinator's command (the server log says why)"
    )
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert logged and "failed: ResponseError: WRONGTYPE" in logged[0].getMessage()

    caplog.clear()
    why = await servers.client().refused(a.url, "clash", servers.token("alice"))
    assert why == body["error"]
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert logged and "WRONGTYPE" in str(logged[0].exc_info[1])  # type: ignore[index]
    status, text = await servers.request("GET", a, "/metrics")
    assert 'coordinator_joins_refused_total{node="n1",reason="error"} 1\n' in text, text
    assert 'reason="redis"' not in text
    assert await redis_client.get("coord:{c:clash}:meta") == b"another application's value"
