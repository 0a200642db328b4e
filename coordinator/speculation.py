"""Speculative dispatch: an action dispatched before its accept answered.

An action sent through the node that runs its loop, while the loop is idle and has seen
every event of the conversation, can only be logged as the next event id, unless another
node's action or a failure gets in first. If the agent allows it (``speculative = True``),
the runner dispatches it at once under that predicted id, while its accept is still on
the way to Redis, and the agent's commits carry the accept's token: the commit script
writes them only if that accept logged the action as predicted. So the action and its
answer travel to Redis together (one round trip, not two), and nothing reaches the log or
a client unless the prediction held. When it did not, the answers are dropped and the
loop gets a fresh agent, which sees the actions in log order, as a successor would after
a failover.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from workers.protocol import Event


@dataclass(eq=False, slots=True)
class Speculation:
    """An action dispatched before its accept answered, under the id it should get."""

    predicted: int
    token: str  # its accept's token
    event: Event  # the user event
    # The id its accept logged it under, 0 if the accept was refused or failed.
    landed: asyncio.Future[int]
    confirmed: bool = False  # Redis logged it as predicted, where a failover keeps it
    durable: bool = False  # its accept was confirmed by replicas (``--ack-replicas``)

    def settle(self, event_id: int, durable: bool = True) -> None:
        """The accept answered (``event_id``), confirmed by replicas or not (``durable``),
        or failed (0)."""
        if not self.landed.done():
            self.durable = durable
            self.landed.set_result(event_id)

    @property
    def lost(self) -> bool:
        return self.landed.done() and self.landed.result() != self.predicted

    @property
    def logged(self) -> bool:
        """Redis logged it as predicted (known once its accept answered)."""
        return self.confirmed or (self.landed.done() and not self.lost)

    def commit_token(self) -> str | None:
        """The accept token a commit answering this action carries: the script writes it
        only if that accept logged the action as predicted ('' once Redis confirmed the
        prediction where a failover keeps it; None once it was refuted: the answer must
        be dropped). An accept replicas did not confirm is checked by every commit: a
        failover can undo it and give its id to another action."""
        if self.logged and (self.confirmed or self.durable):
            self.confirmed = True
            return ""
        return None if self.lost else self.token
