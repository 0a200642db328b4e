"""The browser pages in a real headless Chromium against real `coordinator serve` processes.

The chat page opens on node A, sends messages and sees the answers; node A is killed
(SIGKILL); the page carries on through node B with every event id once, in order, and
the message typed meanwhile answered once. The dashboard then shows node A lost and the
conversation's loop on node B. Assertions read the DOM.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from tests.browser import Browser
from tests.e2e_checks import assert_gap_free
from tests.processes import NodeProcess, ProcessCluster

FAST = ["--node-ttl", "3", "--heartbeat-interval", "0.5"]
BEFORE = 3  # messages sent through node A

EVENTS_JS = """[...document.querySelectorAll('#events li.event')].map(li => ({
  id: Number(li.dataset.id), source: li.dataset.source, via: li.dataset.via,
  content: li.querySelector('.content').textContent}))"""


def answered_js(contents: list[str]) -> str:
    """A page expression: true once the agent answered each of ``contents``."""
    return f"""(() => {{
      const said = new Set([...document.querySelectorAll('#events li[data-source=agent] .content')]
        .map(e => e.textContent));
      return {json.dumps(contents)}.every(c => said.has(c));
    }})()"""


def attr_js(selector: str, name: str) -> str:
    return f"document.querySelector({json.dumps(selector)})?.dataset?.{name} ?? null"


def expected_errors(error: str, dead: NodeProcess) -> bool:
    """Console errors Chromium logs for requests to the killed node, and nothing else."""
    return "console:" in error and (f":{dead.port}" in error or "ERR_CONNECTION_REFUSED" in error)


async def test_chat_moves_to_another_node_and_the_dashboard_shows_the_lost_one(
    process_cluster: ProcessCluster,
) -> None:
    process_cluster.extra_args = FAST
    node_a, node_b = await process_cluster.async_start(2)
    token = await asyncio.to_thread(process_cluster.token, "alice")
    conversation = f"web-{uuid.uuid4().hex[:10]}"

    async with Browser() as browser:
        await browser.open(
            "chat", f"{node_a.url}/ui/chat.html#token={token}&conversation={conversation}"
        )
        await browser.wait("chat", f"{attr_js('#node', 'nodeId')} === 'node1'")
        # The token left the address bar; the page learnt node B's URL from node A.
        assert token not in await browser.eval("chat", "location.href")
        await browser.wait("chat", f"coordinatorChat.nodes.urls.includes('{node_b.url}')")

        before = [f"before-{i}" for i in range(BEFORE)]
        for text in before:
            await browser.type("chat", "#message", text)
        await browser.wait("chat", answered_js(before))
        await browser.wait("chat", f"{attr_js('#owner', 'owner')} === 'node1'")
        last_on_a = await browser.eval("chat", "coordinatorChat.lastId")

        await asyncio.to_thread(node_a.kill)
        await browser.type("chat", "#message", "after-kill")
        await browser.wait("chat", f"{attr_js('#node', 'nodeId')} === 'node2'", within=30)
        await browser.wait("chat", answered_js(["after-kill"]), within=30)
        await browser.wait("chat", f"{attr_js('#owner', 'owner')} === 'node2'", within=30)

        events = await browser.eval("chat", EVENTS_JS)
        counters = await browser.eval("chat", "({...document.querySelector('#events').dataset})")

        await browser.open("dashboard", f"{node_b.url}/ui/dashboard.html#token={token}")
        lost_or_gone = (
            "(() => { const a = document.querySelector('tr.node[data-node-id=node1]');"
            " const b = document.querySelector('tr.node[data-node-id=node2]');"
            " return b?.dataset.status === 'live' && (!a || a.dataset.status === 'lost'); })()"
        )
        await browser.wait("dashboard", lost_or_gone, within=20)
        row = f"tr.conversation[data-conversation-id={conversation}]"
        await browser.wait("dashboard", f"{attr_js(row, 'owner')} === 'node2'")
        served_by = await browser.eval("dashboard", attr_js("#served-by", "nodeId"))
        node_b_loops = await browser.eval(
            "dashboard", "document.querySelector('tr.node[data-node-id=node2] td.num').textContent"
        )

    # Every event once, in order, across the move: the page's own counters agree.
    assert_gap_free([e["id"] for e in events], first=1, what="chat page")
    assert counters == {"lastId": str(events[-1]["id"]), "duplicates": "0", "gaps": "0"}
    said = [(e["source"], e["content"]) for e in events if e["source"] in ("user", "agent")]
    for text in [*before, "after-kill"]:
        assert said.count(("user", text)) == 1 and said.count(("agent", text)) == 1, said
    # Events up to the kill came through node A, the rest through node B.
    assert {e["via"] for e in events if e["id"] <= last_on_a} == {node_a.url}
    assert {e["via"] for e in events if e["id"] > last_on_a} == {node_b.url}

    assert served_by == "node2" and int(node_b_loops) >= 1
    unexpected = [e for e in browser.errors if not expected_errors(e, node_a)]
    assert not unexpected, unexpected
