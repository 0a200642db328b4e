"""Which layout of the data in Redis a cluster's nodes share (``keys.LAYOUT``).

A rolling deploy runs two releases side by side for a while: fine while both read and
write one layout; nodes of two layouts would each misread what the other writes. So the
cluster records its layout (``{cluster}:layout``, with the node and release that recorded
it) and a node of another layout is refused, at start, while a node of the recorded one
is alive. None alive (the old release drained, every node stopped): the first node of the
new layout records its own and the cluster moves on. Two starts racing that way are
settled after registering: a node whose layout is no longer the recorded one steps down
(``verify``), so a node of the old release that registered beside a new one leaves.
"""

from __future__ import annotations

import logging
from importlib import metadata

from .errors import CoordinatorError
from .keys import LAYOUT as LAYOUT  # this node's (tests give it another)
from .state import RedisState
from .state.core import text

log = logging.getLogger(__name__)

FIELDS = ("layout", "node", "release")


def release() -> str:
    """This node's release (the package's version)."""
    try:
        return metadata.version("redis-conversation-coordinator")
    except metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


class LayoutMismatch(CoordinatorError):
    """The cluster's data in Redis is in a layout this node does not read or write."""


async def claim(state: RedisState, node: str) -> None:
    """Record this node's layout as the cluster's, or check it is the recorded one:
    LayoutMismatch while a node of another layout is alive; with none alive, this
    node's replaces it (logged)."""
    ours = {"layout": str(LAYOUT), "node": node, "release": release()}
    recorded = dict(zip(FIELDS, await state.claim(state.keys.layout(), ours), strict=True))
    if recorded["layout"] == ours["layout"]:
        return
    registry = await state.registry()
    alive = sorted(n for n in await state.live_leases(registry) if n != node)
    if alive:
        raise mismatch(recorded, alive, state)
    now = await state.claim(state.keys.layout(), ours, replacing=recorded["layout"])
    if now[0] != ours["layout"]:  # another layout's node recorded it meanwhile
        raise mismatch(dict(zip(FIELDS, now, strict=True)), [], state)
    log.warning(
        "Redis held layout %s (recorded by node %s, release %s) and no node of it is "
        "running: this node's layout %s (release %s) is the cluster's now",
        recorded["layout"],
        recorded["node"],
        recorded["release"],
        ours["layout"],
        ours["release"],
    )


async def verify(state: RedisState) -> None:
    """After registering: LayoutMismatch unless the recorded layout is still this
    node's (a node of another layout took the cluster over while this one started)."""
    found = await recorded(state)
    if found is not None and found["layout"] != str(LAYOUT):
        raise mismatch(found, [found["node"]], state)


async def recorded(state: RedisState) -> dict[str, str] | None:
    """The cluster's layout as recorded (``FIELDS``), None when none is; read only."""
    found = await state.redis.hmget(state.keys.layout(), *FIELDS)
    return None if found[0] is None else dict(zip(FIELDS, map(text, found), strict=True))


def mismatch(recorded: dict[str, str], alive: list[str], state: RedisState) -> LayoutMismatch:
    running = f"nodes of it are running ({', '.join(alive)})" if alive else "it is in use"
    return LayoutMismatch(
        f"Redis holds this cluster's data in layout {recorded['layout']} (recorded by node "
        f"{recorded['node']}, release {recorded['release']}) and {running}; this node "
        f"(release {release()}) reads and writes layout {LAYOUT}, and nodes of two layouts "
        "cannot share a Redis. Run one release at a time: drain the nodes of the other "
        "(SIGTERM) before starting these, or give this cluster its own --key-prefix "
        f"(its key: {state.keys.layout()})."
    )
