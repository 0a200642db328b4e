"""Node-to-node commands: one envelope (method, origin node, payload) on each node's channel.

A node sends a command to another node's channel (``keys.node_channel``) and hears its own
on its own channel, through the same subscription as conversation events. ``request``
adds a request id and waits for the ``reply`` that carries it back. Handlers are
registered by the parts that own what a command changes (``loops.py``); each received
command runs as its own task, so a slow handler holds up no other message.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from . import codec
from .errors import CoordinatorError
from .state import RedisState
from .tasks import TaskSet

log = logging.getLogger(__name__)

Payload = dict[str, Any]
Handler = Callable[[str, Payload], Coroutine[Any, Any, None]]  # (origin node, payload)


def node_of(inc: str) -> str:
    """The node id of an incarnation ``NODE/hex``."""
    return inc.rsplit("/", 1)[0]


class CommandBus:
    """Sends commands to other nodes and runs the handlers of those sent to this one.

    ``timeout``: how long ``request`` waits for its reply.
    """

    def __init__(self, state: RedisState, node_id: str, tasks: TaskSet, *, timeout: float):
        self._state = state
        self.node_id = node_id
        self._tasks = tasks
        self._timeout = timeout
        self._handlers: dict[str, Handler] = {"reply": self._on_reply}
        self._replies: dict[str, asyncio.Future[Payload]] = {}

    def on(self, method: str, handler: Handler) -> None:
        """Run ``handler(origin, payload)`` for each ``method`` command received."""
        self._handlers[method] = handler

    async def send(self, node: str, method: str, payload: Payload) -> None:
        await self._state.publish_command(node, codec.envelope(method, self.node_id, payload))

    async def send_to_owner(self, inc: str, method: str, payload: Payload) -> None:
        """Send to the node of incarnation ``inc``."""
        await self.send(node_of(inc), method, payload)

    async def request(self, inc: str, method: str, payload: Payload) -> Payload:
        """Send to ``inc``'s node and wait for its reply (CoordinatorError when none)."""
        rid = uuid.uuid4().hex
        fut: asyncio.Future[Payload] = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        try:
            await self.send_to_owner(inc, method, {**payload, "rid": rid})
            async with asyncio.timeout(self._timeout):
                return await fut
        except TimeoutError:
            raise CoordinatorError(f"node {inc} did not answer {method!r} in time") from None
        finally:
            self._replies.pop(rid, None)

    async def reply(self, origin: str, request: Payload, answer: Payload) -> None:
        await self.send(origin, "reply", {**answer, "rid": request["rid"]})

    def received(self, data: bytes) -> None:
        """A message on this node's channel: run its handler in a task of its own."""
        method, origin, payload = codec.open_envelope(data)
        handler = self._handlers.get(method)
        if handler is None:
            log.warning("unknown command %r from %s", method, origin)
            return
        self._tasks.spawn(handler(origin, payload), f"cmd:{method}")

    async def _on_reply(self, origin: str, payload: Payload) -> None:
        fut = self._replies.get(str(payload.get("rid")))
        if fut is not None and not fut.done():
            fut.set_result(payload)
