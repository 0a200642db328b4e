"""Agent settings from clients: a JSON object in socket.io's ``auth.settings`` (or the
``settings`` query parameter) and in the REST create body reaches the agent that the join
or the create starts; anything else is refused with a clear message and changes nothing.

The scripted agent answers each message ``replies`` times, so the settings it got show
in the events (real uvicorn nodes, real Redis).
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest
import socketio

from coordinator.inputs import MAX_SETTINGS_BYTES
from tests.server_fixtures import ServerCluster, SioClient

SCRIPTED = "workers.scripted:ScriptedAgent"


def agent_replies(client: SioClient) -> list[str]:
    return [e["args"]["content"] for e in client.events if e.get("source") == "agent"]


async def connect(
    client: SioClient, url: str, query: dict[str, str], auth: dict[str, object]
) -> None:
    await client.sio.connect(
        f"{url}?{urlencode(query)}", auth=auth, transports=["websocket"], wait_timeout=10
    )


async def test_socketio_settings_reach_the_agent(servers: ServerCluster) -> None:
    (a,) = await servers.start(1, agent=SCRIPTED)
    token = servers.token("alice")
    by_auth = servers.client("auth")
    settings = {"replies": 3, "think_time": 0, "reply_size": 8}
    await connect(
        by_auth, a.url, {"conversation_id": "s-auth"}, {"token": token, "settings": settings}
    )
    event_id = await by_auth.say("hello")
    await by_auth.wait_ids(event_id + 3)
    assert agent_replies(by_auth) == ["hello .."] * 3  # 8 bytes: the content, padded

    by_query = servers.client("query")
    query = {"conversation_id": "s-query", "settings": json.dumps({"replies": 2, "think_time": 0})}
    await connect(by_query, a.url, query, {"token": token})
    event_id = await by_query.say("hi")
    await by_query.wait_ids(event_id + 2)
    assert len(agent_replies(by_query)) == 2


async def test_rest_create_settings_reach_the_agent(servers: ServerCluster) -> None:
    (a,) = await servers.start(1, agent=SCRIPTED)
    body = {
        "conversation_id": "s-rest",
        "initial_user_msg": "first",
        "settings": {"replies": 2, "think_time": 0},
    }
    status, created = await servers.request(
        "POST", a, "/api/conversations", user="alice", json=body
    )
    assert status == 201 and created["running"] is True, created
    client = await servers.join(a, "s-rest", "alice")
    await client.wait_for(lambda: len(agent_replies(client)) == 2, "two replies")


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ([1, 2], "settings must be a JSON object"),
        ("{}", "settings must be a JSON object"),
        ({"big": "x" * MAX_SETTINGS_BYTES}, f"at most {MAX_SETTINGS_BYTES} bytes"),
        # JSON carries lone surrogates (an agent worker's msgpack cannot): a value, a key.
        ({"model": "x\ud800"}, "settings must be plain JSON: text that is not UTF-8"),
        ({"\udc00": 1}, "settings must be plain JSON: text that is not UTF-8"),
    ],
)
async def test_bad_settings_are_refused(
    servers: ServerCluster, settings: object, reason: str
) -> None:
    (a,) = await servers.start(1)
    token = servers.token("alice")
    client = servers.client()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await connect(
            client, a.url, {"conversation_id": "bad"}, {"token": token, "settings": settings}
        )
    assert reason in str(client.refusal), client.refusal

    body = {"conversation_id": "bad", "settings": settings}
    status, answer = await servers.request("POST", a, "/api/conversations", user="alice", json=body)
    assert status == 400 and reason in answer["error"], answer
    # Nothing was created by either refusal.
    status, _ = await servers.request("GET", a, "/api/conversations/bad", user="alice")
    assert status == 404


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        # JSON's integers have no bound; what an agent worker's msgpack carries has 64 bits.
        ({"seed": 2**64}, "an integer beyond 64 bits"),
        ({"seed": -(2**63) - 1}, "an integer beyond 64 bits"),
        # Nested no deeper than an action (msgpack itself gives up at 512 levels).
        ({"deep": json.loads("[" * 600 + "]" * 600)}, "nested too deeply"),
    ],
)
async def test_settings_an_agent_worker_cannot_carry_are_refused(
    servers: ServerCluster, settings: object, reason: str
) -> None:
    """Refused where they arrive, with the reason: REST, the query parameter, and the
    CONNECT packet's auth (as any CONNECT whose data the node cannot carry). Before, they
    passed, and the worker's OPEN failed to pack them: 'internal error' after the
    conversation was created."""
    (a,) = await servers.start(1)
    token = servers.token("alice")
    body = {"conversation_id": "bad", "settings": settings}
    status, answer = await servers.request("POST", a, "/api/conversations", user="alice", json=body)
    assert status == 400 and reason in answer["error"], answer

    by_query = servers.client()
    query = {"conversation_id": "bad", "settings": json.dumps(settings)}
    with pytest.raises(socketio.exceptions.ConnectionError):
        await connect(by_query, a.url, query, {"token": token})
    assert reason in str(by_query.refusal), by_query.refusal

    by_auth = servers.client()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await connect(
            by_auth, a.url, {"conversation_id": "bad"}, {"token": token, "settings": settings}
        )
    if reason != "nested too deeply":  # python-socketio's client cannot send that one
        assert reason in str(by_auth.refusal), by_auth.refusal
    # Nothing was created by any of them.
    status, _ = await servers.request("GET", a, "/api/conversations/bad", user="alice")
    assert status == 404


async def test_bad_settings_in_the_query_are_refused(servers: ServerCluster) -> None:
    (a,) = await servers.start(1)
    client = servers.client()
    query = {"conversation_id": "bad", "settings": "{not json"}
    with pytest.raises(socketio.exceptions.ConnectionError):
        await connect(client, a.url, query, {"token": servers.token("alice")})
    assert "settings are not valid JSON" in str(client.refusal), client.refusal
