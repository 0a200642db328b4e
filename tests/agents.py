"""Agents for tests that need one to misbehave (loaded by nodes with ``--agent``)."""

from __future__ import annotations

import asyncio

from workers.echo import EchoAgent


class SlowCloseAgent(EchoAgent):
    """Echoes, but takes two minutes to close: a graceful drain waits for it."""

    async def aclose(self) -> None:
        await asyncio.sleep(120)
        await super().aclose()
