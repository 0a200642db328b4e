"""The README's screenshots of the browser pages: ``python -m tests.screenshots DIR``
(``make screenshots`` writes docs/screenshots/).

Starts a private Redis and three `coordinator serve` processes, chats on node1 in a real
headless Chromium, kills node1 so the chat moves to another node, and takes the chat
(chat.png) and the dashboard under an admin token (dashboard.png), with node1 lost.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from coordinator.auth import issue_token
from coordinator.embedded import EmbeddedRedis
from tests.browser import Browser
from tests.processes import ProcessCluster
from tests.test_browser import FAST, answered_js, attr_js


async def take(out: Path, redis_url: str, logs: Path) -> None:
    with ProcessCluster(redis_url, logs, extra_args=FAST) as cluster:
        node1, node2, node3 = await cluster.async_start(3)
        token = issue_token("demo", cluster.secret)
        admin = issue_token("ops", cluster.secret, claims={"role": "admin"})
        async with Browser() as browser:
            url = f"{node1.url}/ui/chat.html#token={token}&conversation=demo1"
            await browser.open("chat", url)
            await browser.wait("chat", f"{attr_js('#node', 'nodeId')} === 'node1'")
            said = ["hello", "which node answers?", "and now?"]
            for text in said[:2]:
                await browser.type("chat", "#message", text)
            await browser.wait("chat", answered_js(said[:2]))
            await asyncio.to_thread(node1.kill)
            await browser.type("chat", "#message", said[2])
            await browser.wait("chat", answered_js(said), within=30)
            await browser.wait("chat", f"{attr_js('#owner', 'owner')} !== 'node1'", 30)
            await browser.wait("chat", "document.querySelector('#owner').dataset.owner")
            await browser.screenshot("chat", out / "chat.png")

            # Another user's conversation elsewhere, for the admin's view.
            await browser.open(
                "bob",
                f"{node3.url}/ui/chat.html#token="
                + issue_token("bob", cluster.secret)
                + "&conversation=bob-1",
            )
            await browser.type("bob", "#message", "hi from bob")
            await browser.wait("bob", answered_js(["hi from bob"]))

            await browser.open("dashboard", f"{node2.url}/ui/dashboard.html#token={admin}")
            await browser.wait(
                "dashboard",
                "document.querySelector('tr.node[data-node-id=node1]')?.dataset.status"
                " === 'lost' && document.querySelectorAll('tr.conversation').length >= 2",
            )
            await browser.screenshot("dashboard", out / "dashboard.png", full_page=True)
    print(f"wrote {out / 'chat.png'} and {out / 'dashboard.png'}")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/screenshots").resolve()
    out.mkdir(parents=True, exist_ok=True)
    redis = EmbeddedRedis().start()
    try:
        asyncio.run(take(out, redis.url, Path(tempfile.mkdtemp(prefix="screenshots-"))))
    finally:
        redis.cleanup()


if __name__ == "__main__":
    main()
