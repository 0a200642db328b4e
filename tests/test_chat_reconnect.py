"""`coordinator chat` carries on when its node goes away (real processes, real Redis).

The chat joins a conversation with history on node1 (the replay prints after the
"connected" line), node1 is killed (SIGKILL) and the chat moves to node2, node2 drains
(SIGTERM) and the chat moves to node3; every message is answered, every event printed
once, in order.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import urllib.request

from tests.e2e_checks import LineReader, assert_gap_free
from tests.processes import ProcessCluster, child_env

FAST = ["--node-ttl", "3", "--heartbeat-interval", "0.5"]
EVENT = re.compile(r"^\[(\d+)\] (\w+): (.*)$")


def create_with_history(url: str, token: str, conversation: str) -> None:
    body = json.dumps({"conversation_id": conversation, "initial_user_msg": "before"}).encode()
    request = urllib.request.Request(
        f"{url}/api/conversations",
        data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 201


async def test_chat_reconnects_when_its_node_dies_or_drains(
    process_cluster: ProcessCluster,
) -> None:
    process_cluster.extra_args = FAST
    node1, node2, node3 = await process_cluster.async_start(3)
    token = await asyncio.to_thread(process_cluster.token, "alice")
    await asyncio.to_thread(create_with_history, node1.url, token, "talk")

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator", "chat",
        "--url", node1.url, "--url", node2.url, "--url", node3.url,
        "--conversation", "talk", "--token", token, "--wait", "20",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=child_env(),
    )  # fmt: skip
    chat = LineReader(proc)
    try:
        await chat.expect(r"^\[\d+\] agent: before$")
        await chat.write("one")
        await chat.expect(r"agent: one$")

        await asyncio.to_thread(node1.kill)
        await chat.write("two")
        await chat.expect(r"^connected to node node2 ")
        await chat.expect(r"agent: two$")

        node2.terminate()  # drains: tells its clients to go elsewhere
        await chat.expect(r"^connected to node node3 ")
        await chat.write("three")
        await chat.expect(r"agent: three$")

        assert proc.stdin is not None
        proc.stdin.close()
        async with asyncio.timeout(30):
            rest, _ = await proc.communicate()
        chat.lines += rest.decode().splitlines()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
    assert proc.returncode == 0, "\n".join(chat.lines)
    assert node2.wait_exit() == 0

    events = [m.groups() for line in chat.lines if (m := EVENT.match(line))]
    assert_gap_free([int(i) for i, _, _ in events], first=1, what="chat output")
    said = [(source, content) for _, source, content in events]
    for text in ("before", "one", "two", "three"):
        assert said.count(("user", text)) == 1 and said.count(("agent", text)) == 1, said
    # The history replayed on joining prints after the first "connected" line.
    assert chat.index(r"^connected to node node1 ") < chat.index(r"^\[\d+\] user: before$")
    assert "Traceback" not in "\n".join(chat.lines)
