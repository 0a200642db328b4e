"""What the browser pages read: GET /api/nodes (live nodes' advertised public URLs) and
GET /api/dashboard (nodes and conversations, the caller's own unless admin), on real
uvicorn nodes and a real Redis; and the pages themselves, served from the package."""

from __future__ import annotations

from typing import Any

import aiohttp

from coordinator.auth import issue_token
from coordinator.server import NodeServer
from tests.helpers import fast_config, wait_until
from tests.server_fixtures import SECRET, ServerCluster


def admin_token(user: str = "root") -> str:
    return issue_token(user, SECRET, 3600, claims={"role": "admin"})


def rows(view: dict[str, Any], kind: str, key: str) -> dict[str, dict[str, Any]]:
    return {row[key]: row for row in view[kind]}


async def test_nodes_lists_live_public_urls_and_forgets_a_stopped_node(
    servers: ServerCluster, redis_url: str
) -> None:
    a, b = await servers.start(2)
    public = NodeServer(
        fast_config(redis_url, "n3"), SECRET, port=0, public_url="https://n3.example.test:8443/"
    )
    await public.start()
    servers.nodes.append(public)  # closed with the others

    status, body = await servers.request("GET", b, "/api/nodes")
    assert status == 401
    status, body = await servers.request("GET", b, "/api/nodes", user="alice")
    assert status == 200 and body["node_id"] == "n2"
    assert body["nodes"] == [
        {"node_id": "n1", "url": a.url},
        {"node_id": "n2", "url": b.url},
        {"node_id": "n3", "url": "https://n3.example.test:8443"},
    ]

    await public.aclose()  # a graceful stop withdraws the advertisement at once
    status, body = await servers.request("GET", a, "/api/nodes", user="alice")
    assert [n["node_id"] for n in body["nodes"]] == ["n1", "n2"]
    status, view = await servers.request("GET", a, "/api/dashboard", token=admin_token())
    assert set(rows(view, "nodes", "node_id")) == {"n1", "n2"}


async def test_dashboard_shows_the_callers_own_and_an_admin_everything(
    servers: ServerCluster,
) -> None:
    a, b = await servers.start(2)
    alice = await servers.join(a, "alice-1", "alice")
    await alice.wait_ids(await alice.say("hi"))
    status, _ = await servers.request(
        "POST", b, "/api/conversations", user="bob", json={"conversation_id": "bob-1"}
    )
    assert status == 201

    status, view = await servers.request("GET", b, "/api/dashboard", user="alice")
    assert status == 200 and view["user"] == "alice" and view["admin"] is False
    assert view["node_id"] == "n2"
    convs = rows(view, "conversations", "conversation_id")
    assert set(convs) == {"alice-1"}  # not bob's
    mine = convs["alice-1"]
    assert mine["owner"] == "n1" and mine["running"] is True and "user" not in mine
    assert mine["epoch"] >= 1 and mine["events"] >= 2 and mine["inbox"] == 0
    assert mine["connections"] == {"n1": 1} and mine["last_active"] is not None
    nodes = rows(view, "nodes", "node_id")
    assert set(nodes) == {"n1", "n2"} and all(n["status"] == "live" for n in nodes.values())
    # Only alice's share of each node, and no incarnations for an ordinary user.
    assert nodes["n1"]["loops"] == ["alice-1"] and nodes["n1"]["connections"] == 1
    assert nodes["n2"]["loops"] == [] and nodes["n2"]["connections"] == 0
    assert "incarnation" not in nodes["n1"]
    assert 0 <= nodes["n1"]["lease_age"] <= 3 and 0 < nodes["n1"]["lease_left"] <= 3
    assert nodes["n1"]["url"] == a.url

    status, view = await servers.request("GET", a, "/api/dashboard", token=admin_token())
    assert status == 200 and view["admin"] is True
    convs = rows(view, "conversations", "conversation_id")
    assert set(convs) == {"alice-1", "bob-1"}
    assert convs["bob-1"]["user"] == "bob" and convs["bob-1"]["owner"] == "n2"
    # Created without a message: its loop runs, and the record says "loading" until the
    # loop first commits an event (the state is written with each commit; README).
    assert convs["bob-1"]["state"] == "loading" and convs["bob-1"]["running"] is True
    nodes = rows(view, "nodes", "node_id")
    assert nodes["n2"]["loops"] == ["bob-1"] and nodes["n1"]["incarnation"].startswith("n1/")


async def test_a_killed_node_shows_as_lost(servers: ServerCluster) -> None:
    a, b = await servers.start(2)
    await a.manager.node.halt()  # like kill -9: nothing withdrawn or released

    async def lost() -> bool:
        _, view = await servers.request("GET", b, "/api/dashboard", user="alice")
        node = rows(view, "nodes", "node_id").get("n1")
        return node is not None and node["status"] == "lost"

    await wait_until(lost, timeout=15, what="n1 shown as lost")
    _, view = await servers.request("GET", b, "/api/dashboard", user="alice")
    node = rows(view, "nodes", "node_id")["n1"]
    assert node["live"] is False and node["lease_left"] is None and node["url"] == a.url
    _, body = await servers.request("GET", b, "/api/nodes", user="alice")
    assert [n["node_id"] for n in body["nodes"]] == ["n2"]


async def test_pages_are_served_from_the_package(servers: ServerCluster) -> None:
    (a,) = await servers.start(1)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for path, kind in [
            ("/ui/", "text/html"),
            ("/ui/chat.html", "text/html"),
            ("/ui/dashboard.html", "text/html"),
            ("/ui/chat.js", "text/javascript"),
            ("/ui/ui.css", "text/css"),
        ]:
            async with http.get(a.url + path) as resp:
                assert resp.status == 200 and resp.content_type == kind, path
                assert "default-src 'self'" in resp.headers["content-security-policy"]
                assert resp.headers["x-content-type-options"] == "nosniff"
        async with http.get(a.url + "/", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["location"] == "/ui/"
    # socket.io's browser client, vendored with its licence header.
    status, text = await servers.request("GET", a, "/ui/socket.io.min.js")
    assert text.startswith("/*!\n * Socket.IO v4") and "MIT License" in text[:200]
    status, text = await servers.request("GET", a, "/ui/socket.io.LICENSE.txt")
    assert status == 200 and "Permission is hereby granted" in text
    status, body = await servers.request("GET", a, "/ui/..%2Fpyproject.toml")
    assert status == 404
    status, body = await servers.request("GET", a, "/ui/nothing.html")
    assert status == 404 and body == {"error": "no such page: /ui/nothing.html"}


async def test_a_users_views_read_nothing_that_grows_with_the_other_users_loops(
    servers: ServerCluster,
) -> None:
    """A user's ``/api/cluster`` and ``/api/dashboard`` read the user's own indexes and
    records, not every node's list of loops (the probe: at 9,000 loops of others, 6-12 ms
    of node CPU per request of a user with none, 16 keep-alive clients a whole core); an
    admin's still read them. The user's share is the same either way."""
    a, b = await servers.start(2)
    for node, user, sid in ((a, "bob", "b1"), (b, "bob", "b2"), (b, "alice", "a1")):
        await servers.join(node, sid, user)
    read: list[str] = []
    state = a.manager.state
    for name in ("loads", "owned", "owned_by"):
        original = getattr(state, name)

        async def counted(*args: Any, _name: str = name, _original: Any = original) -> Any:
            read.append(_name)
            return await _original(*args)

        setattr(state, name, counted)
    status, cluster = await servers.request("GET", a, "/api/cluster", user="alice")
    assert status == 200 and cluster["loops"] == {"n1": [], "n2": ["a1"]}
    status, view = await servers.request("GET", a, "/api/dashboard", user="alice")
    assert status == 200
    assert {n["node_id"]: n["loops"] for n in view["nodes"]} == {"n1": [], "n2": ["a1"]}
    assert read == []
    status, view = await servers.request("GET", a, "/api/dashboard", token=admin_token())
    assert {n["node_id"]: n["loops"] for n in view["nodes"]} == {"n1": ["b1"], "n2": ["a1", "b2"]}
    assert "loads" in read
