"""What ``GET /api/dashboard`` answers: the cluster's nodes and conversations, as one
caller may see them.

An ordinary user sees every live node (and the lost ones still shown) with only their
own loops and connections counted on it, and their own conversations. An admin token
(``Identity.admin``) sees the whole cluster: every node's loops and connections, and
every conversation a live node runs or a live node's client watches, with its user.
"""

from __future__ import annotations

import time
from typing import Any

from .auth import Identity
from .directory import Directory
from .status import ConversationStatus, NodeStatus

OWN_LISTED = 200  # an ordinary user's newest conversations shown
ALL_LISTED = 500  # conversations shown to an admin


async def dashboard(directory: Directory, identity: Identity, node_id: str) -> dict[str, Any]:
    """The dashboard's view for ``identity``, answered by node ``node_id``."""
    nodes = await directory.node_statuses(loads=identity.admin)
    user = identity.user
    if identity.admin:
        sids = await directory.active_conversations(ALL_LISTED)
        listed = set(sids)
        sids += [
            s for s in await directory.recent_conversations(user, OWN_LISTED) if s not in listed
        ]
    else:
        sids = await directory.recent_conversations(user, OWN_LISTED)
        listed = set(sids)
        running = await directory.running_loops(user, None)
        sids += sorted(running - listed)
    conversations = await directory.conversation_statuses(sids)
    if not identity.admin:
        conversations = [c for c in conversations if c.user == user]
    conversations.sort(key=lambda c: c.last_active or c.created or 0, reverse=True)
    return {
        "node_id": node_id,
        "user": user,
        "admin": identity.admin,
        "time": round(time.time(), 3),
        "nodes": [_node_row(n, conversations, identity.admin) for n in nodes],
        "conversations": [c.view(with_user=identity.admin) for c in conversations],
    }


def _node_row(node: NodeStatus, shown: list[ConversationStatus], admin: bool) -> Any:
    if admin:
        return node.view()
    # Only the caller's share of the node: their loops there, their connections there
    # (from their conversations' records: the node's own lists were not read).
    row = node.view(
        loops=tuple(
            sorted(c.conversation_id for c in shown if c.running and c.owner == node.node_id)
        ),
        connections=sum(c.connections.get(node.node_id, 0) for c in shown),
    )
    del row["incarnation"]
    return row
