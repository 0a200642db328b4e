"""A real JavaScript client (socket.io-client from npm, run by Node.js) against 2 nodes.

tests/js/client.mjs connects to node A, sends messages (acknowledged) and waits for the
echoes, disconnects and prints DISCONNECTED with the last event id it saw. Meanwhile a
Python client on node A sends more. The JS client then reconnects to node B with
``latest_event_id`` and must receive exactly the missed events, then live ones. Every
event it receives must pass OpenHands' web client guards (written in client.mjs from
their documented shape): ``id``, ``source``, ``message``, ``timestamp``; a string
``action`` or ``observation``; messages by ``source`` + ``action: "message"``; status
updates as ``{status_update, type, id: CODE, message}``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from tests.e2e_checks import assert_gap_free, brief, wait_echoed
from tests.processes import ProcessCluster
from tests.server_fixtures import SioClient

JS_DIR = Path(__file__).resolve().parent / "js"
CLIENT = JS_DIR / "client.mjs"
MESSAGES = 5  # sent by the JS client before it disconnects
MISSED = 4  # sent by the Python client while the JS client is away
LIVE = 3  # sent by the JS client after it reconnected


def node_binary() -> str:
    found = shutil.which("node")
    assert found, "Node.js is not installed: this test needs `node` (Debian package nodejs)"
    return found


def ensure_node_modules() -> None:
    """`npm ci` in tests/js when socket.io-client is not installed yet."""
    if (JS_DIR / "node_modules" / "socket.io-client" / "package.json").exists():
        return
    npm = shutil.which("npm")
    assert npm, "npm is not installed: needed to install socket.io-client in tests/js"
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"npm ci in {JS_DIR} failed:\n{done.stdout}\n{done.stderr}"


async def test_js_client_replays_missed_events_on_another_node(
    process_cluster: ProcessCluster,
) -> None:
    node = node_binary()
    ensure_node_modules()
    node_a, node_b = await process_cluster.async_start(2)
    token = await asyncio.to_thread(process_cluster.token, "alice")
    conversation = f"js-{uuid.uuid4().hex[:12]}"

    js = await asyncio.create_subprocess_exec(
        node, str(CLIENT),
        "--url", node_a.url,
        "--reconnect-url", node_b.url,
        "--conversation", conversation,
        "--token", token,
        "--messages", str(MESSAGES),
        "--live-messages", str(LIVE),
        "--wait-stdin",
        "--await-close",
        cwd=JS_DIR,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert js.stdin is not None and js.stdout is not None and js.stderr is not None
    other = SioClient("python-on-A")
    try:
        line = (await asyncio.wait_for(js.stdout.readline(), 60)).decode()
        if not line.startswith("DISCONNECTED "):
            rest = await asyncio.wait_for(js.communicate(), 30)
            raise AssertionError(
                f"JS client did not reach DISCONNECTED: {line}{rest[0].decode()}\n"
                f"stderr: {rest[1].decode()}"
            )
        last_id = int(json.loads(line.split(" ", 1)[1])["last_event_id"])

        # While the JS client is away: events happen, sent through node A.
        await other.connect(node_a.url, conversation, token, latest_event_id=last_id)
        missed_contents = [f"py-{conversation}-{i}" for i in range(MISSED)]
        for content in missed_contents:
            await other.say(content)
        await wait_echoed(other, missed_contents)
        expect_through = max(other.ids)

        js.stdin.write(json.dumps({"expect_through": expect_through}).encode() + b"\n")
        await js.stdin.drain()
        js.stdin.close()
        # Then the conversation is closed through node A's REST API: the JS client on
        # node B gets the closed notice and its status update, and is disconnected.
        line = (await asyncio.wait_for(js.stdout.readline(), 90)).decode()
        if not line.startswith("CLOSE_ME "):
            rest = await asyncio.wait_for(js.communicate(), 30)
            raise AssertionError(f"JS client did not reach CLOSE_ME: {line}{rest[0].decode()}")
        async with aiohttp.ClientSession() as http:
            closing = await http.delete(
                f"{node_a.url}/api/conversations/{conversation}",
                headers={"authorization": f"Bearer {token}"},
            )
            assert closing.status == 200, await closing.text()
        out, err = await asyncio.wait_for(js.communicate(), 90)
        lines = out.decode().strip().splitlines()
        assert js.returncode == 0 and lines, (
            f"JS client failed (exit {js.returncode}):\n{out.decode()}\nstderr: {err.decode()}"
        )
        summary: dict[str, Any] = json.loads(lines[-1])
        assert summary["ok"] is True, summary

        # The Python client sees everything the JS client saw live.
        js_last = max(e["id"] for e in summary["phase2"]["events"])
        await other.wait_for(lambda: max(other.ids, default=0) >= js_last, "the JS live events")
    finally:
        await other.close()
        if js.returncode is None:
            js.kill()
            await js.wait()

    phase1, phase2 = summary["phase1"], summary["phase2"]
    # Every event passed OpenHands' client guards (client.mjs fails otherwise), the
    # status update of the close among them.
    assert summary["checked_shapes"] >= len(phase1["events"]) + len(phase2["events"]) > 0
    (update,) = phase2["updates"]
    assert update["status_update"] is True and update["id"] == "STATUS$CONVERSATION_CLOSED"
    assert phase1["url"] == node_a.url and phase2["url"] == node_b.url
    # As OpenHands' client sees it: out of "loading" (its input enabled) before its first
    # message, "running" while each is answered, awaiting input after.
    assert phase1["input_enabled_by"] == "awaiting_user_input"
    states = phase1["states"]
    assert states[0] == states[-1] == "awaiting_user_input" and "running" in states, states

    # Phase 1: every message acknowledged, user event and echo received, ids gap-free.
    ids1 = [e["id"] for e in phase1["events"]]
    assert_gap_free(ids1, what="JS phase 1")
    assert len(phase1["ack_ids"]) == MESSAGES
    assert ids1[-1] == last_id == summary["last_event_id"]
    agent1 = [e["content"] for e in phase1["events"] if e["source"] == "agent"]
    assert sorted(agent1) == sorted(phase1["sent"])

    # Phase 2 on node B: starts right after the last id seen, no gap, no duplicate.
    ids2 = [e["id"] for e in phase2["events"]]
    assert_gap_free(ids2, first=last_id + 1, what="JS phase 2")

    # Replay: exactly the missed events, as the Python client saw them happen.
    replayed = [e for e in phase2["events"] if e["id"] <= expect_through]
    happened = [brief(e) for e in other.events if e["id"] <= expect_through]
    assert replayed == happened
    assert len(replayed) == expect_through - last_id
    assert {e["content"] for e in replayed if e["source"] == "user"} == set(missed_contents)
    assert {e["content"] for e in replayed if e["source"] == "agent"} == set(missed_contents)

    # Live: the JS client's new messages came after the replay, in the same order for both.
    assert all(i > expect_through for i in phase2["ack_ids"])
    live = [e for e in phase2["events"] if e["id"] > expect_through]
    assert {e["content"] for e in live if e["source"] == "agent"} >= set(phase2["sent"])
    seen_by_other = {e["id"]: brief(e) for e in other.events}
    assert [seen_by_other.get(e["id"]) for e in live] == live


async def test_js_client_is_refused_with_a_reason(process_cluster: ProcessCluster) -> None:
    node = node_binary()
    ensure_node_modules()
    (node_a,) = await process_cluster.async_start(1)
    forged = await asyncio.to_thread(process_cluster.token, "alice")
    forged = forged[:-4] + ("AAAA" if not forged.endswith("AAAA") else "BBBB")
    js = await asyncio.create_subprocess_exec(
        node, str(CLIENT), "--url", node_a.url, "--conversation", "js-refused", "--token", forged,
        cwd=JS_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(js.communicate(), 60)
    assert js.returncode == 1
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["ok"] is False
    prefix = f"connect_error from {node_a.url}: "
    assert summary["reason"].startswith(prefix), summary["reason"]
    assert summary["reason"][len(prefix) :].strip(), "the refusal carries a message"
    assert summary["phase1"]["events"] == []
