"""Checks shared by the end-to-end tests that run real processes (JS client, nginx)."""

from __future__ import annotations

from typing import Any

from tests.server_fixtures import SioClient


def brief(event: dict[str, Any]) -> dict[str, Any]:
    """The fields tests/js/client.mjs keeps of an event in its summary."""
    args = event.get("args")
    return {
        "id": event.get("id"),
        "source": event.get("source"),
        "action": event["action"] if event.get("action") is not None else event.get("observation"),
        "content": args.get("content") if isinstance(args, dict) else None,
    }


def agent_contents(client: SioClient) -> set[str]:
    return {
        e["args"]["content"]
        for e in client.events
        if e.get("source") == "agent" and e.get("action") == "message"
    }


async def wait_echoed(client: SioClient, contents: list[str], within: float = 20.0) -> None:
    """Wait until the agent has answered every message in ``contents``."""
    wanted = set(contents)
    await client.wait_for(lambda: wanted <= agent_contents(client), "echoed", within)


def assert_gap_free(ids: list[int], first: int | None = None, what: str = "events") -> None:
    """Ids go up by one (from ``first`` when given): no gap, no duplicate."""
    assert ids, f"{what}: no events"
    start = ids[0] if first is None else first
    assert ids == list(range(start, start + len(ids))), f"{what}: ids not gap-free: {ids}"
