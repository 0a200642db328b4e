"""The Redis side of the event store: which store the cluster uses, how far the store
holds each conversation, and the hot window of its log (``archive.py`` moves the events).
"""

from __future__ import annotations

from .core import StateCore, text


class ArchiveOps(StateCore):
    async def claim_store(self, identity: str, shown: str, node: str) -> tuple[str, str, str]:
        """Record ``identity`` as the cluster's event store unless one is recorded; returns
        the recorded ``(identity, store URL shown, node that recorded it)``."""
        r = await self._run("claim_store", [self.keys.event_store()], [identity, shown, node])
        return text(r[0]), text(r[1]), text(r[2])
