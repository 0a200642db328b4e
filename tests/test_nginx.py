"""End to end through nginx: the repository's deploy/nginx.conf in front of 3 node processes.

Several python-socketio clients (websocket transport, as the config requires) connect
through nginx: four share one conversation, three others have one each. Every client
must see every event of its conversation, in the same order, with gap-free ids, and the
connections must have landed on more than one node.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from coordinator.embedded import free_port
from tests.e2e_checks import assert_gap_free, brief, wait_echoed
from tests.nginx import NginxProcess, nginx_binary
from tests.processes import ProcessCluster
from tests.server_fixtures import SioClient

SHARED_CLIENTS = 4
SHARED_MESSAGES = 15  # per shared client
OTHER_MESSAGES = 5


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200, f"GET {url}: {resp.status}"
        body: dict[str, Any] = json.loads(resp.read())
        return body


async def wait_logged(lb: NginxProcess, count: int, within: float = 10.0) -> list[str]:
    """Upstreams of the websocket sessions nginx logged (it logs one when it closes)."""
    deadline = time.monotonic() + within
    while len(served := lb.upstreams_served(101)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"nginx logged {len(served)} websocket sessions, expected {count}:\n"
                + lb.access_log.read_text()
            )
        await asyncio.sleep(0.05)
    return served


async def test_clients_through_nginx_see_the_same_events_across_nodes(
    process_cluster: ProcessCluster, tmp_path: Path
) -> None:
    nginx_binary()  # fail, with how to install it, before starting anything
    nodes = await process_cluster.async_start(3)
    alice, bob = await asyncio.gather(
        asyncio.to_thread(process_cluster.token, "alice"),
        asyncio.to_thread(process_cluster.token, "bob"),
    )
    lb = NginxProcess([f"127.0.0.1:{n.port}" for n in nodes], free_port(), tmp_path / "nginx")
    await asyncio.to_thread(lb.start)
    try:
        clients: list[SioClient] = []
        try:
            # Plain HTTP is balanced too: /healthz through nginx answers from every node.
            answers = [await asyncio.to_thread(get_json, f"{lb.url}/healthz") for _ in range(9)]
            assert all(a["status"] == "ok" for a in answers), answers
            assert {a["node_id"] for a in answers} == {n.node_id for n in nodes}

            tag = uuid.uuid4().hex[:8]
            shared = f"shared-{tag}"
            shared_clients = [SioClient(f"shared-{i}") for i in range(SHARED_CLIENTS)]
            # (conversation, its one client, the owner's token)
            others = [
                (f"alice-2-{tag}", SioClient("alice-2"), alice),
                (f"bob-1-{tag}", SioClient("bob-1"), bob),
                (f"bob-2-{tag}", SioClient("bob-2"), bob),
            ]
            clients = shared_clients + [c for _, c, _ in others]

            # latest_event_id=0: every client gets the conversation from its first event.
            await shared_clients[0].connect(lb.url, shared, alice, latest_event_id=0)
            await asyncio.gather(
                *(c.connect(lb.url, shared, alice, latest_event_id=0) for c in shared_clients[1:]),
                *(c.connect(lb.url, sid, tok, latest_event_id=0) for sid, c, tok in others),
            )

            async def chat(client: SioClient, prefix: str, n: int) -> list[str]:
                contents = [f"{prefix}-{i}" for i in range(n)]
                for content in contents:
                    await client.say(content)
                return contents

            sent = await asyncio.gather(
                *(chat(c, f"{shared}-c{i}", SHARED_MESSAGES) for i, c in enumerate(shared_clients)),
                *(chat(c, sid, OTHER_MESSAGES) for sid, c, _ in others),
            )
            shared_sent = [m for batch in sent[:SHARED_CLIENTS] for m in batch]
            await asyncio.gather(*(wait_echoed(c, shared_sent) for c in shared_clients))
            for (_, c, _), batch in zip(others, sent[SHARED_CLIENTS:], strict=True):
                await wait_echoed(c, batch)

            # The shared conversation: one history, seen identically by all four clients,
            # up to the last event one of them had (the agent's closing state note may
            # still be on its way to the others, or to all of them, when it is taken).
            last = max(max(c.ids) for c in shared_clients)

            async def caught_up(client: SioClient) -> None:
                await client.wait_for(lambda: max(client.ids) >= last, f"event {last}")

            await asyncio.gather(*(caught_up(c) for c in shared_clients))
            histories = [[brief(e) for e in c.events if e["id"] <= last] for c in shared_clients]
            assert_gap_free(shared_clients[0].ids, first=1, what="shared conversation")
            for client, history in zip(shared_clients[1:], histories[1:], strict=True):
                assert history == histories[0], f"{client.name} saw another history"
            messages = [e for e in histories[0] if e["action"] == "message"]
            user = [e["content"] for e in messages if e["source"] == "user"]
            agent = [e["content"] for e in messages if e["source"] == "agent"]
            assert sorted(user) == sorted(shared_sent), "every action exactly once"
            assert sorted(agent) == sorted(shared_sent), "every echo exactly once"

            for (sid, client, _), batch in zip(others, sent[SHARED_CLIENTS:], strict=True):
                assert_gap_free(client.ids, first=1, what=sid)
                own = [brief(e) for e in client.events if e.get("action") == "message"]
                assert sorted(e["content"] for e in own if e["source"] == "user") == sorted(batch)
                assert sorted(e["content"] for e in own if e["source"] == "agent") == sorted(batch)
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        upstreams = await wait_logged(lb, len(clients))
    except BaseException:
        print(lb.log_tail())
        raise
    finally:
        await asyncio.to_thread(lb.stop)
    ports = {int(u.rsplit(":", 1)[1]) for u in upstreams}
    assert ports <= {n.port for n in nodes}
    assert len(ports) > 1, f"all websocket sessions went to one node: {upstreams}"
