"""One Redis call failing at the wrong moment (the rest of the node's calls reach a real
Redis): nothing is left owned by a node that runs no loop for it, and no acknowledged
action is left without a loop."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MasterDownError

from coordinator.codec import pack
from tests.helpers import wait_until


def fail_once(obj: Any, name: str, when: Callable[..., bool] = lambda *a, **k: True) -> list[int]:
    """Make ``obj.name`` raise a Redis ConnectionError on its first call that ``when``
    accepts, as a connection lost at that moment would; the calls that failed, counted."""
    real = getattr(obj, name)
    failed: list[int] = []

    async def call(*args: Any, **kwargs: Any) -> Any:
        if not failed and when(*args, **kwargs):
            failed.append(1)
            raise RedisConnectionError("connection lost (injected)")
        return await real(*args, **kwargs)

    setattr(obj, name, call)
    return failed


async def test_a_stop_whose_release_fails_is_released_on_a_later_heartbeat(make_nodes) -> None:
    (a,) = await make_nodes(1)
    await a.join_conversation("lost-release", "ca", {}, "ruth")
    inc = a.node.membership.inc
    failed = fail_once(a.node.state, "release_loop")
    await a.disconnect_from_session("ca")
    assert await a.close_session("lost-release", "ruth")
    assert failed and a.local_loops() == set()
    meta = await a.conversation("lost-release")
    assert meta["inc"] == inc  # Redis still names this node, which runs no loop for it

    async def released() -> bool:
        record = await a.conversation("lost-release")
        slots = await a.state.user_loops("ruth")
        return record["inc"] == "" and "lost-release" not in slots

    await wait_until(released, timeout=5, what="the deferred release")
    assert (await a.conversation("lost-release"))["state"] == "stopped"


async def test_a_restart_round_that_fails_on_redis_keeps_its_conversations(make_nodes) -> None:
    """An action acknowledged while no loop runs waits in the inbox; the round that would
    restart it fails to read the inboxes: it is tried again on a later heartbeat."""
    (a,) = await make_nodes(1)
    await a.join_conversation("waiting", "ca", {}, "sam")
    await a.disconnect_from_session("ca")
    assert await a.close_session("waiting", "sam")
    action = pack({"action": "message", "args": {"content": "hi"}})
    accepted = await a.state.accept("waiting", "sam", action, 100, 10, floor=0)
    failed = fail_once(a.node.state, "inbox_lengths")
    with pytest.raises(RedisConnectionError):
        await a.node.restarts.resume_pending([("waiting", "sam")])
    assert failed

    async def answered() -> bool:
        return int((await a.conversation("waiting")).get("applied", 0)) == accepted.event_id

    await wait_until(answered, timeout=10, what="the action answered after the retry")
    assert a.local_loops() == {"waiting"}


async def test_a_catch_up_waits_out_a_refusal_of_the_moment(
    make_nodes: Any, redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis refusing reads for a moment (MASTERDOWN here, a replica whose master is
    away; LOADING while a restarted Redis reads its AOF) makes a live connection's
    catch-up retry, not end: a soak saw 60 of 60 clients dropped at each Redis restart
    ("Redis refused to read the log"), each reconnecting."""
    caplog.set_level(logging.DEBUG, logger="coordinator.catchup")
    (a,) = await make_nodes(1)
    sink = make_nodes.sinks["node1"]
    await a.join_conversation("steady", "c1", {}, "alice")
    await a.send_to_event_stream("c1", {"action": "message", "args": {"content": "hi"}})
    await wait_until(lambda: len(sink.events["c1"]) >= 2, what="the answer")
    await redis_client.config_set("replica-serve-stale-data", "no")
    await redis_client.execute_command("REPLICAOF", "127.0.0.1", "1")  # nobody listens
    try:
        with pytest.raises(MasterDownError):
            await redis_client.xrange(a.keys.events("steady"))
        a.node.connections.catch_up_all()  # what a pub/sub reconnect does

        def retries() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "replay for c1 failed" in r.getMessage()]

        await wait_until(lambda: len(retries()) >= 3, what="the catch-up retrying")
        # Said once at WARNING, the retries after at DEBUG (hundreds of connections).
        assert [r.levelno for r in retries()][:3] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    finally:
        await redis_client.execute_command("REPLICAOF", "NO", "ONE")
        await redis_client.config_set("replica-serve-stale-data", "yes")
    await wait_until(lambda: not a.node.connections.get("c1").replaying, what="caught up")
    assert sink.disconnected == [] and a.local_connections() == {"c1": "steady"}
    assert not any("dropped" in r.getMessage() for r in caplog.records)
