"""The whole Redis key schema, in one place.

Every key carries a hash tag so that the design runs unchanged on Redis Cluster:
``{c:SID}`` for a conversation, ``{u:USER}`` for a user, ``{n:NODE}`` for a node and
``{cluster}`` for the few cluster-wide keys (the node registry and the reaper lock).
Lua scripts only ever touch keys of one tag.
"""

from __future__ import annotations

from dataclasses import dataclass

# The version of this schema, and of the scripts' and the node bus's contracts over it:
# nodes of one cluster must share it (``layout.py``). Raise it in a release whose nodes
# could not share a Redis with the release before (a key's type or meaning, a script's
# arguments, a bus command changed), and say in its notes what becomes of the data.
LAYOUT = 1


@dataclass(frozen=True, slots=True)
class KeySchema:
    prefix: str = "coord"
    # The database the keys are in. Pub/sub channels are server-wide, whatever the
    # database: two deployments sharing a server and a prefix in two databases would hear
    # each other's events; a channel of database N > 0 says so in its name.
    db: int = 0

    @property
    def _channels(self) -> str:
        return f"{self.prefix}:db{self.db}" if self.db else self.prefix

    # -- per conversation ------------------------------------------------------------
    def conv(self, sid: str) -> str:
        """Hash: user, owner, inc, epoch, state, seq, applied, refs, created, last_active."""
        return f"{self.prefix}:{{c:{sid}}}:meta"

    def conv_pattern(self) -> str:
        """SCAN pattern of every conversation's record (``conv``; the prefix has no glob
        character: ``ManagerConfig`` allows none)."""
        return f"{self.prefix}:{{c:*}}:meta"

    def sid_of_conv(self, key: str) -> str | None:
        """The conversation whose record ``key`` is (None for another key)."""
        return _between(key, f"{self.prefix}:{{c:", "}:meta")

    def events(self, sid: str) -> str:
        """Stream: the bounded event log; entry id ``<event id>-0``."""
        return f"{self.prefix}:{{c:{sid}}}:events"

    def inbox(self, sid: str) -> str:
        """Stream: accepted user actions not yet processed by the loop (trimmed as applied)."""
        return f"{self.prefix}:{{c:{sid}}}:inbox"

    def accepted(self, sid: str) -> str:
        """Sorted set: tokens of the last accepted actions -> event id (retry dedupe)."""
        return f"{self.prefix}:{{c:{sid}}}:accepted"

    def conv_conns(self, sid: str) -> str:
        """Hash: connection id -> incarnation of the node holding it."""
        return f"{self.prefix}:{{c:{sid}}}:conns"

    def attempts(self, sid: str) -> str:
        """Hash: action id -> dispatches of it that failed their agent worker, ``ID:why``
        -> why the last one did (poison actions: ``state/attempts.py``)."""
        return f"{self.prefix}:{{c:{sid}}}:attempts"

    def purging(self, sid: str) -> str:
        """String, with a TTL: a purge of the conversation is under way; no node takes it
        (ACQUIRE) until the purge has deleted it everywhere (``ConversationManager.purge``)."""
        return f"{self.prefix}:{{c:{sid}}}:purging"

    def conv_channel(self, sid: str) -> str:
        """Pub/sub channel carrying the conversation's events as ``[id, event]``."""
        return f"{self._channels}:{{c:{sid}}}:ch"

    def conv_barrier(self, sid: str) -> str:
        """A channel nobody subscribes to, in the conversation's slot: a PUBLISH to it
        moves the reader's replication offset past what it read, so that ``WAIT`` after a
        read of the log tells whether replicas hold it (``StateCore._confirmed_read``)."""
        return f"{self._channels}:{{c:{sid}}}:barrier"

    def sid_from_channel(self, channel: str) -> str | None:
        return _between(channel, f"{self._channels}:{{c:", "}:ch")

    # -- per user --------------------------------------------------------------------
    def user_claims(self, user: str) -> str:
        """Sorted set: the user's conversations that should run, scored by last update."""
        return f"{self.prefix}:{{u:{user}}}:claims"

    def user_loops(self, user: str) -> str:
        """Hash: sid -> ``live:INC`` / ``stopping:INC``: loops that may be running now."""
        return f"{self.prefix}:{{u:{user}}}:loops"

    def user_conns(self, user: str) -> str:
        """Hash: connection id -> sid for the user's connections on every node."""
        return f"{self.prefix}:{{u:{user}}}:conns"

    def user_convs(self, user: str) -> str:
        """Sorted set: the user's conversations, scored by creation time, but those that
        retired with events (the event store lists them)."""
        return f"{self.prefix}:{{u:{user}}}:convs"

    def user_org(self, user: str) -> str:
        """String: the organisation of the user's last token with an ``org`` claim (the
        org cap of a loop restarted without a token)."""
        return f"{self.prefix}:{{u:{user}}}:org"

    # -- per organisation --------------------------------------------------------------
    def org_loops(self, org: str) -> str:
        """Hash: sid -> ``USER INC:EPOCH`` of the start that holds one of the org's cap
        places; an entry whose loop no longer holds its user's slot is stale (pruned)."""
        return f"{self.prefix}:{{o:{org}}}:loops"

    # -- per node incarnation ---------------------------------------------------------
    # An incarnation is ``NODE/hex``: one registration of a node process. Its keys carry
    # the node's tag, so one script can touch the lease and the incarnation's keys, and a
    # reaper can drop a dead incarnation's keys whole without touching its successor's.
    def node_lease(self, node: str) -> str:
        """String: the node's current incarnation, with the heartbeat TTL."""
        return f"{self.prefix}:{{n:{node}}}:lease"

    def node_owned(self, inc: str) -> str:
        """Hash: sid -> user for the loops this incarnation runs."""
        node, _, tail = inc.rpartition("/")
        return f"{self.prefix}:{{n:{node}}}:owned:{tail}"

    def node_conns(self, inc: str) -> str:
        """Hash: connection id -> sid for the connections this incarnation holds."""
        node, _, tail = inc.rpartition("/")
        return f"{self.prefix}:{{n:{node}}}:conns:{tail}"

    def node_idle(self, inc: str) -> str:
        """Sorted set: sid -> last active (ms) of this incarnation's loops (idle index)."""
        node, _, tail = inc.rpartition("/")
        return f"{self.prefix}:{{n:{node}}}:idle:{tail}"

    def node_channel(self, node: str) -> str:
        """Pub/sub channel for commands addressed to the node."""
        return f"{self._channels}:{{n:{node}}}:cmd"

    # -- cluster-wide ----------------------------------------------------------------
    def registry(self) -> str:
        """Hash: node id -> its current incarnation."""
        return f"{self.prefix}:{{cluster}}:nodes"

    def retired(self) -> str:
        """Hash: replaced incarnation -> node id, until everything it held is released."""
        return f"{self.prefix}:{{cluster}}:retired"

    def node_urls(self) -> str:
        """Hash: node id -> its advertisement (JSON: public URL, node_ttl, time written);
        refreshed by each node while it serves, read to find other nodes' URLs."""
        return f"{self.prefix}:{{cluster}}:urls"

    def revoked(self) -> str:
        """Sorted set: user -> when (ms) their tokens issued until then were revoked
        (``revocations.py``); entries older than the tokens' longest lifetime pruned."""
        return f"{self.prefix}:{{cluster}}:revoked"

    def layout(self) -> str:
        """Hash: the layout (``LAYOUT``) the cluster's data is in, and the node and
        release that recorded it: a node of another layout is refused while one of this
        one runs."""
        return f"{self.prefix}:{{cluster}}:layout"

    def event_store(self) -> str:
        """Hash: the cluster's event store (identity, its URL shown without password, the
        node that recorded it first): every node must use that one."""
        return f"{self.prefix}:{{cluster}}:store"

    def unstored(self) -> str:
        """Sorted set: conversations left without an owner while the event store may lack
        some of their events (score: ms when noted); any node's archiver moves them."""
        return f"{self.prefix}:{{cluster}}:unstored"

    def store_audit(self) -> str:
        """String: the node checking every conversation against the event store (SET NX
        PX; ``storeaudit.StoreAudit``)."""
        return f"{self.prefix}:{{cluster}}:store-audit"

    def store_audits(self) -> str:
        """Hash: the checks of every conversation against the event store, numbered:
        ``began`` the last one's number, ``done`` the last one's that ended; ``server``
        the store's server the nodes last reached (``EventStore.server``), ``owed`` the
        number a check must reach to settle what is owed (``scripts.STORE_SERVER``)."""
        return f"{self.prefix}:{{cluster}}:store-audits"

    def reaper_lock(self) -> str:
        """String: the node currently reaping dead nodes (SET NX PX)."""
        return f"{self.prefix}:{{cluster}}:reaper"

    # -- limits (coordinator/state/limits.py) ------------------------------------------
    # In the user's tag, so a limit and the user's connections hash share a slot.
    def user_bucket(self, user: str, limit: str) -> str:
        """Hash: the token bucket of one of the user's rate limits (tokens, at ms)."""
        return f"{self.prefix}:{{u:{user}}}:bucket:{limit}"


def _between(name: str, head: str, tail: str) -> str | None:
    """What ``name`` holds between ``head`` and ``tail`` (None unless it has both)."""
    if name.startswith(head) and name.endswith(tail) and len(name) >= len(head) + len(tail):
        return name[len(head) : len(name) - len(tail)]
    return None
