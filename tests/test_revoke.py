"""Revoking a user's tokens (an admin's ``POST /api/users/{user}/revoke``): real uvicorn
nodes on real Redis, python-socketio clients."""

from __future__ import annotations

import asyncio
import time

import pytest

from coordinator.auth import issue_token
from tests.helpers import wait_until
from tests.server_fixtures import SECRET, ServerCluster

MESSAGE = {"action": "message", "args": {"content": "hi"}}


async def test_a_revoked_user_is_logged_out_everywhere_and_signs_in_again(
    servers: ServerCluster,
) -> None:
    a, b, c = await servers.start(3)
    old = servers.token("alice")
    on_b = servers.client("alice@b")
    await on_b.connect(b.url, "shared", old)
    on_c = servers.client("alice@c")
    await on_c.connect(c.url, "mine", old)
    bob = await servers.join(b, "shared-bob", "bob")
    before = await on_b.say("before")

    status, body = await servers.request("POST", a, "/api/users/alice/revoke", user="alice")
    assert status == 403, body  # not an admin
    admin = issue_token("ops", SECRET, claims={"role": "admin"})
    status, body = await servers.request("POST", a, "/api/users/alice/revoke", token=admin)
    assert status == 200 and body["user"] == "alice", body
    assert body["revoked_at"] <= time.time()

    # Her connections on the other nodes end: told why, disconnected by the server.
    for client in (on_b, on_c):
        await wait_until(lambda client=client: not client.connected, timeout=10, what="ended")
        assert [u["id"] for u in client.updates] == ["STATUS$TOKEN_REVOKED"], client.updates
        assert client.disconnects == ["server disconnect"]
    assert bob.connected and (await bob.act(MESSAGE))["ok"]  # another user's untouched
    _, text = await servers.request("GET", b, "/metrics")
    assert 'coordinator_tokens_revoked_total{node="n2"} 1\n' in text, text

    # The old token is refused everywhere: socket.io, REST, every node.
    for node in (a, b, c):
        why = await servers.client().refused(node.url, "shared", old)
        assert why == "authentication failed: token revoked"
        status, body = await servers.request("GET", node, "/api/conversations", token=old)
        assert (status, body["error"]) == (401, "authentication failed: token revoked")
    # A node started after the revocation refuses it too (read at its start).
    (d,) = await servers.start(1)
    assert await servers.client().refused(d.url, "shared", old) == (
        "authentication failed: token revoked"
    )

    # A token issued after it works (iat is whole seconds: the next second).
    await asyncio.sleep(max(0.0, int(body_at := time.time()) + 1.05 - body_at))
    again = servers.client("alice again")
    await again.connect(c.url, "shared", servers.token("alice"), latest_event_id=before)
    assert (await again.act(MESSAGE))["ok"]
    status, body = await servers.request("POST", a, "/api/users/bad%20id/revoke", token=admin)
    assert status == 400, body


async def test_a_connection_joining_while_its_user_is_revoked_is_ended_once_joined(
    servers: ServerCluster,
) -> None:
    """The token was checked as the join began; the revocation came while the join
    waited for its agent to start, before the connection was among those a revocation
    ends. It is ended once joined (before, it stayed, receiving its conversation's
    events until the token expired)."""
    (a,) = await servers.start(1, agent="tests.agents:BadAgent", agent_start_timeout=10.0)
    joining = servers.client("alice")
    query = "conversation_id=slow&settings=" + '{"start_delay": 1.5}'.replace('"', "%22")
    connect = asyncio.ensure_future(
        joining.sio.connect(
            f"{a.url}?{query}",
            auth={"token": servers.token("alice")},
            transports=["websocket"],
            wait_timeout=10,
        )
    )
    await wait_until(lambda: "slow" in a.manager.node.loops.starting, what="the join under way")
    admin = issue_token("ops", SECRET, claims={"role": "admin"})
    status, _ = await servers.request("POST", a, "/api/users/alice/revoke", token=admin)
    assert status == 200
    await connect
    await wait_until(lambda: not joining.connected, timeout=10, what="ended once joined")
    assert [u["id"] for u in joining.updates] == ["STATUS$TOKEN_REVOKED"], joining.updates


async def test_the_other_nodes_are_told_of_a_revocation_at_once(
    servers: ServerCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node that records a revocation tells the others (a command to each): their
    connections end without waiting for their next read of the revocations (here a
    minute away)."""
    import coordinator.node as node_module

    monkeypatch.setattr(node_module, "REVOCATIONS_REFRESH", 60.0)
    a, b = await servers.start(2)
    alice = servers.client("alice")
    await alice.connect(b.url, "elsewhere", servers.token("alice"))
    admin = issue_token("ops", SECRET, claims={"role": "admin"})
    status, _ = await servers.request("POST", a, "/api/users/alice/revoke", token=admin)
    assert status == 200
    await wait_until(lambda: not alice.connected, timeout=10, what="ended by the command")
    assert [u["id"] for u in alice.updates] == ["STATUS$TOKEN_REVOKED"]


async def test_revocations_older_than_the_tokens_longest_lifetime_are_pruned(
    servers: ServerCluster,
) -> None:
    """A revocation is kept as long as a token it refuses could still be valid; the next
    one recorded after that prunes it."""
    (a,) = await servers.start(1)
    state = a.manager.state
    await state.revoke_user("old", 1_000, keep_ms=10_000)
    await state.revoke_user("kept", 5_000, keep_ms=10_000)
    await state.revoke_user("new", 12_000, keep_ms=10_000)  # prunes what is before 2,000
    assert await state.revocations() == {"kept": 5.0, "new": 12.0}
    await state.revoke_user("new", 11_000, keep_ms=10_000)  # never moved back
    assert (await state.revocations())["new"] == 12.0


async def test_an_action_on_a_connection_not_ended_yet_is_refused(servers: ServerCluster) -> None:
    """Between a revocation reaching a node and its connections being ended (a busy node
    ends them when its event loop gets to it), each action is checked on its own: one
    sent meanwhile is refused, not accepted on the revoked token."""
    (a,) = await servers.start(1)
    alice = await servers.join(a, "held", "alice")
    assert (await alice.act(MESSAGE))["ok"]
    a.manager.revocations.on_revoked = lambda users: None  # the ending held back
    admin = issue_token("ops", SECRET, claims={"role": "admin"})
    status, body = await servers.request("POST", a, "/api/users/alice/revoke", token=admin)
    assert status == 200, body
    ack = await alice.act(MESSAGE)
    assert ack == {"ok": False, "error": "authentication failed: token revoked; sign in again"}
    assert alice.connected and alice.updates == []
