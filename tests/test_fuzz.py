"""Property-based fuzzing (hypothesis) of what clients send: socket.io packets, REST
bodies and actions. Whatever the input, no exception escapes (no 500, no traceback in the
log), every packet is answered (its ack, or a close with a reason) and nothing changes in
Redis when the input is refused.

A real node serves in a thread of its own (hypothesis drives synchronous tests), against
the suite's Redis under its own key prefix; examples are bounded so the module runs in
seconds (``FUZZ_EXAMPLES`` raises them for a longer run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from coordinator.auth import issue_token
from coordinator.codec import (
    MAX_PACKED_BYTES,
    decode_published,
    open_envelope,
    pack,
    unpack,
    user_action,
)
from coordinator.errors import InvalidInput
from coordinator.server import NodeServer
from coordinator.serverconfig import NO_LIMITS, ServerConfig
from coordinator.tasks import cancel_and_wait
from tests.helpers import fast_config
from tests.server_fixtures import SECRET

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1"))


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples * EXAMPLES,
        deadline=None,
        derandomize=os.environ.get("FUZZ_RANDOM") is None,  # reproducible unless asked
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


PREFIX = "fuzz"
CONVERSATION = "fuzzed"
CLOSE_CODES = {1000, 1002, 1008, 1009}


class Problems(logging.Handler):
    """Every warning or error, and any record with a traceback, the node logged."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class ThreadedNode:
    """A NodeServer running in a thread with its own event loop."""

    def __init__(self, redis_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.node = NodeServer(
            fast_config(redis_url, "fuzz", key_prefix=PREFIX),
            SECRET,
            port=0,
            server_config=ServerConfig(**NO_LIMITS, max_message_bytes=16 * 1024),
        )

    def __enter__(self) -> NodeServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.node.start(), self.loop).result(30)
        return self.node

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _close(self) -> None:
        await self.node.aclose()
        # What engine.io left (its ping tasks) goes with the loop.
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await cancel_and_wait(rest, within=5)


@pytest.fixture(scope="module")
def node(redis_server: str) -> Iterator[tuple[NodeServer, Problems]]:
    problems = Problems()
    root = logging.getLogger()
    root.addHandler(problems)
    try:
        with ThreadedNode(redis_server) as server:
            yield server, problems
    finally:
        root.removeHandler(problems)


@pytest.fixture(scope="module")
def store(redis_server: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server)
    yield client
    client.close()


def last_event(store: redis.Redis) -> int:
    return int(store.hget(f"{PREFIX}:{{c:{CONVERSATION}}}:meta", "seq") or 0)


def assert_quiet(problems: Problems) -> None:
    bad = [r for r in problems.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [
        (r.getMessage(), "".join(traceback.format_exception(*r.exc_info)) if r.exc_info else "")
        for r in bad
    ]


# -- socket.io packets ------------------------------------------------------------------
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


@st.composite
def packets(draw: st.DrawFn) -> tuple[str | bytes, int | None]:
    """A websocket frame a client might send, and the ack id it asks for (if any)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=64)), None
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=40)), None  # anything at all, engine.io level
    if draw(st.integers(0, 19)) == 0:  # engine.io's own packets
        return draw(st.sampled_from(["0", "1", "2", "2probe", "3", "5", "6", "6x"])), None
    # Mostly events (what a client sends most), the rest of the protocol too.
    kind = draw(st.sampled_from("222222220123456789x"))
    attachments = draw(st.sampled_from(["", "", "", "", "", "1-", "2-", "17-", "99999999-"]))
    namespace = draw(st.sampled_from(["", "", "", "", "", "/", "/admin,", "/x?y=1,"]))
    ack = draw(st.sampled_from([None, None, 7, 123456789, 10**30]))
    name = draw(
        st.sampled_from(["oh_user_action", "connect", "disconnect", "connect_error", "probe"])
        | st.text(max_size=8)
    )
    body = draw(
        json_values.map(lambda v: dumps([name, v]))
        | st.lists(json_values, max_size=3).map(lambda vs: dumps([name, *vs]))
        | st.sampled_from(["", "[", "{", "[]", "null"])
        | json_values.map(dumps)
        | st.just(dumps([name, {"action": "message", "status": "STATUS$NODE_LOST"}]))
        | st.just("[" * 60 + "]" * 60)
    )
    packet = f"4{kind}{attachments}{namespace}{'' if ack is None else ack}{body}"
    plain = kind == "2" and not attachments and namespace in ("", "/")
    return packet, ack if plain and body[:1] in ("[", "{", "n") else None


def join(url: str) -> ClientConnection:
    # Entered as a context manager, left by Session.drop (websockets 17 asks for that).
    ws = connect(
        url.replace("http://", "ws://")
        + f"/socket.io/?EIO=4&transport=websocket&conversation_id={CONVERSATION}",
        open_timeout=10,
    ).__enter__()
    assert str(ws.recv(10)).startswith("0")
    ws.send("40" + json.dumps({"token": issue_token("fuzzer", SECRET)}))
    while not str(reply := ws.recv(10)).startswith(("40", "44")):
        pass  # the join's replay may come first
    assert str(reply).startswith("40"), reply
    return ws


def exchange(ws: ClientConnection, probe: int) -> dict[int, Any] | tuple[int, str]:
    """Send a probe (an unknown event asking for an ack: an error ack) and read until a
    probe is answered: every ack seen meanwhile, or (close code, reason) if the server
    closed. A frame the server still waits on (an attachment) may take a probe as its
    own: then another goes after a while."""
    got: dict[int, Any] = {}
    sent: set[int] = set()
    try:
        for attempt in range(3):
            sent.add(probe + attempt)
            ws.send(f"42{probe + attempt}" + json.dumps(["probe"]))
            while True:
                try:
                    frame = ws.recv(2)
                except TimeoutError:
                    break
                if frame == "2":
                    ws.send("3")
                elif isinstance(frame, str) and frame.startswith("43"):
                    digits = frame[2:].split("[", 1)[0]
                    got[int(digits)] = json.loads(frame[2 + len(digits) :])[0]
                    if int(digits) in sent:
                        return got
    except ConnectionClosed:
        return ws.close_code or 0, ws.close_reason or ""
    raise AssertionError(f"no probe answered; acks {got}")


class Session:
    def __init__(self, url: str) -> None:
        self.url = url
        self.ws: ClientConnection | None = None
        self.probe = 10**6

    def socket(self) -> ClientConnection:
        if self.ws is None:
            self.ws = join(self.url)
        return self.ws

    def drop(self) -> None:
        if self.ws is not None:
            self.ws.close()
            self.ws = None


@pytest.fixture(scope="module")
def session(node: tuple[NodeServer, Problems]) -> Iterator[Session]:
    s = Session(node[0].url)
    yield s
    s.drop()


@fuzz(250)
@given(packet=packets())
def test_every_packet_is_answered_and_a_refused_one_changes_nothing(
    packet: tuple[str | bytes, int | None],
    node: tuple[NodeServer, Problems],
    session: Session,
    store: redis.Redis,
) -> None:
    frame, ack_id = packet
    ws = session.socket()
    node[1].records.clear()
    before = last_event(store)
    ws.send(frame)
    session.probe += 10
    result = exchange(ws, session.probe)
    if isinstance(result, tuple):  # closed: with a reason, and nothing written
        code, reason = result
        assert code in CLOSE_CODES and reason, (frame, result)
        session.drop()
        assert last_event(store) == before
    else:
        if ack_id is not None:
            assert ack_id in result, (frame, result)  # answered
        accepted = [ack for ack in result.values() if isinstance(ack, dict) and ack.get("ok")]
        if not accepted:
            assert last_event(store) == before, frame
    assert_quiet(node[1])


# -- REST bodies ------------------------------------------------------------------------
bodies = (
    st.binary(max_size=200)
    | json_values.map(lambda v: dumps(v).encode())
    | st.dictionaries(
        st.sampled_from(["conversation_id", "initial_user_msg", "x"]),
        json_values | st.text(max_size=12),
        max_size=3,
    ).map(lambda v: dumps(v).encode())
    | st.just(b"[" * 5000 + b"]" * 5000)
)


def post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url + "/api/conversations",
        data=body,
        method="POST",
        headers={
            "Authorization": f"Bearer {issue_token('rest-fuzzer', SECRET)}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@fuzz(150)
@given(body=bodies)
def test_rest_bodies_never_fail_as_500_and_a_refused_one_changes_nothing(
    body: bytes, node: tuple[NodeServer, Problems], store: redis.Redis
) -> None:
    index = f"{PREFIX}:{{u:rest-fuzzer}}:convs"
    node[1].records.clear()
    before = store.zcard(index)
    status, answer = post(node[0].url, body)
    assert status in (200, 201, 400, 403, 413), (status, answer, body[:80])
    if status >= 400:
        assert set(answer) == {"error"} and answer["error"]
        assert store.zcard(index) == before
    assert_quiet(node[1])


# -- the action validator ---------------------------------------------------------------
actions = st.one_of(
    json_values,
    st.dictionaries(
        st.sampled_from(
            ["action", "args", "client_action_id", "id", "source", "timestamp", "status", "x"]
        ),
        json_values | st.binary(max_size=8) | st.sampled_from(["message", "run"]),
        max_size=5,
    ),
)


@fuzz(1000)
@given(action=actions)
def test_the_action_validator_accepts_or_refuses_clearly(action: Any) -> None:
    try:
        event, packed = user_action(action, 512)
    except InvalidInput as exc:
        assert str(exc)
        return
    assert event["source"] == "user" and isinstance(event["args"], dict)
    assert not {"status", "status_update", "observation"} & set(event)
    assert len(packed) <= 512 and unpack(packed) == event


# -- msgpack from Redis and other nodes -------------------------------------------------
def packed(value: Any) -> bytes:
    try:
        return pack(value)
    except OverflowError:  # an int msgpack has no room for: not something to decode
        return b""


@fuzz(500)
@given(
    data=st.binary(max_size=200)
    | json_values.map(packed)
    | st.integers(1, 5000).map(lambda depth: b"\x91" * depth + b"\xc0")
)
def test_what_comes_from_redis_or_a_peer_decodes_or_fails_as_value_error(data: bytes) -> None:
    """A node decodes msgpack it did not write itself: events on a conversation's
    channel, commands on its own. Anything malformed, too deep or too large is a
    ValueError (the subscription logs it and goes on), never another exception."""
    for decode in (unpack, decode_published, open_envelope):
        with contextlib.suppress(ValueError):
            decode(data)


def test_a_packed_value_larger_than_the_bound_is_refused_unread() -> None:
    with pytest.raises(ValueError, match="at most"):
        unpack(b"\xc0" * (MAX_PACKED_BYTES + 1))
