"""Accepting a user action: durable in Redis before it is acknowledged.

The path of one action, in a few hops: the socket.io handler (``app.py``) calls
``ConversationManager.send_to_event_stream``, which validates it (``codec.user_action``)
and calls ``Actions.accept``: the local loop may take it speculatively
(``LoopRunner.speculate``), the accept script logs it and queues it in the inbox (over the
script lane), and ``Delivery.user_event`` hands the user event to the loop and the
connections (or leaves it to the runner, which sends it with the answer). The runner
dispatches it to the agent and commits what the agent emits (``LoopRunner._commit``);
``Delivery.committed`` delivers that to this node's connections, and other nodes get it
through the conversation's channel.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import codec
from .config import ManagerConfig
from .delivery import Delivery
from .errors import (
    ConversationNotFound,
    Forbidden,
    InboxFull,
    LimitExceeded,
    NotReplicated,
    StoreBehind,
)
from .membership import Membership
from .metrics import NodeMetrics
from .runner import LoopRunner
from .state import Accepted, RedisState, accept_token


class Actions:
    """Accepts actions for this node: ``runners`` is the node's table of loops (read)."""

    def __init__(
        self,
        *,
        state: RedisState,
        config: ManagerConfig,
        membership: Membership,
        runners: Mapping[str, LoopRunner],
        delivery: Delivery,
        metrics: NodeMetrics,
    ) -> None:
        self._metrics = metrics
        self._state = state
        self._config = config
        self._membership = membership
        self._runners = runners
        self._delivery = delivery

    async def accept(self, sid: str, user: str, action: codec.Action) -> Accepted:
        """Log and enqueue ``action`` for ``sid`` as ``user``; raises the reason it was
        refused (ConversationNotFound, Forbidden, InboxFull, StoreBehind), changing nothing
        then, or NotReplicated (logged, not confirmed by replicas: the same token again
        is safe)."""
        event, packed = action
        key = event.get(codec.CLIENT_ACTION_ID)
        token = accept_token(None if key is None else str(key))
        floor = self._delivery.floor(sid)
        runner = self._runners.get(sid)
        # The local loop may start on it now, under the id it should get (speculation.py).
        spec = runner.speculate(event, token) if runner is not None else None
        landed, durable = 0, False
        try:
            r = await self._state.accept(
                sid,
                user,
                packed,
                self._config.log_window_events,
                self._config.inbox_max,
                self._membership.inc,
                token=token,
                floor=floor,
                window_bytes=self._config.log_window_bytes,
                max_bytes=self._config.max_conversation_bytes,
            )
            # Logged as this id even when unconfirmed: the loop answers it either way
            # (its commits check that the accept is still there: speculation.py).
            landed, durable = (r.event_id if r.status == "ok" else 0), not r.unconfirmed
        except Exception:
            if runner is not None:  # Redis full or away: the next would fail as well
                runner.last_refused = True
            raise
        finally:
            if spec is not None:
                spec.settle(landed, durable)
        if runner is not None:
            runner.last_refused = r.status != "ok"
        if r.unconfirmed:  # not acknowledged: the client's retry (same token) is safe
            self._metrics.not_replicated()
            raise NotReplicated(r.unconfirmed)
        if r.status == "missing":
            raise ConversationNotFound(sid)
        if r.status == "forbidden":
            raise Forbidden(sid)
        if r.status == "full":
            raise InboxFull(
                f"conversation {sid!r} has {self._config.inbox_max} unprocessed actions"
            )
        if r.status == "quota":
            raise LimitExceeded(
                "bytes per conversation",
                f"conversation {sid!r} holds {r.event_id} bytes of events; with this "
                f"action ({len(packed)} bytes) it would pass the limit of "
                f"{self._config.max_conversation_bytes} bytes; start another conversation",
            )
        if r.status == "behind":
            raise StoreBehind(
                f"conversation {sid!r}: the event store is behind ({r.event_id} events, "
                f"{r.unstored_bytes} bytes not stored yet; Redis keeps at most "
                f"{self._config.log_window_events} events and {self._config.log_window_bytes} "
                "bytes until the store has them); not acknowledged, try again later"
            )
        if r.notice is not None:  # Redis had lost events: clients are told first
            await self._delivery.committed(sid, r.notice[0], [r.notice[1]])
        await self._delivery.user_event(sid, r.event_id, event, spec)
        return r
