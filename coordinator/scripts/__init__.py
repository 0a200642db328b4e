"""Lua scripts: every multi-step state change that must be atomic.

Each script touches keys of a single hash tag only (Redis Cluster safe). Times come
from Redis ``TIME`` so that every node orders recency by one clock. Event ids are
per-conversation integers stored as stream entry ids ``<id>-0``; events are published
as the msgpack array ``[id, event]`` built by prefixing 0x92 to the packed id and the
already-packed event.

One module per concern: ``ownership``, ``log``, ``cap``, ``store``, ``claims``, ``attempts`` (poison
actions), ``buckets`` (per-user rate limits); ``ALL`` names them
for the state layer, which loads them (``state/core.py``).
"""

from __future__ import annotations

from .attempts import ATTEMPTS
from .buckets import TAKE_TOKENS
from .cap import ADMIT, ORG_ADMIT, ORG_PRUNE, RELEASE_SLOT
from .claims import CLAIM
from .clock import NOW
from .log import ACCEPT, COMMIT, READ, REWIND
from .ownership import ACQUIRE, ATTACH, DELETE_IF, ENROLL, HDEL_IF, RELEASE, RENEW
from .store import AUDIT_DONE, MARK_STORED, REWIND_STORED, STORE_SERVER, UNSTORED

__all__ = [
    "ACCEPT",
    "ACQUIRE",
    "ADMIT",
    "ALL",
    "ATTACH",
    "ATTEMPTS",
    "AUDIT_DONE",
    "CLAIM",
    "COMMIT",
    "DELETE_IF",
    "ENROLL",
    "HDEL_IF",
    "MARK_STORED",
    "NOW",
    "ORG_ADMIT",
    "ORG_PRUNE",
    "READ",
    "RELEASE",
    "RELEASE_SLOT",
    "RENEW",
    "REWIND",
    "REWIND_STORED",
    "STORE_SERVER",
    "TAKE_TOKENS",
    "UNSTORED",
    "for_deployment",
]

ALL = {
    "acquire": ACQUIRE,
    "release": RELEASE,
    "accept": ACCEPT,
    "commit": COMMIT,
    "admit": ADMIT,
    "release_slot": RELEASE_SLOT,
    "org_admit": ORG_ADMIT,
    "org_prune": ORG_PRUNE,
    "enroll": ENROLL,
    "renew": RENEW,
    "delete_if": DELETE_IF,
    "hdel_if": HDEL_IF,
    "attach": ATTACH,
    "rewind": REWIND,
    "read": READ,
    "claim": CLAIM,
    "unstored": UNSTORED,
    "mark_stored": MARK_STORED,
    "rewind_stored": REWIND_STORED,
    "store_server": STORE_SERVER,
    "audit_done": AUDIT_DONE,
    "attempts": ATTEMPTS,
    "take_tokens": NOW + TAKE_TOKENS,
}


def for_deployment(*, sharded: bool) -> dict[str, str]:
    """The scripts for a deployment: on Redis Cluster they publish with SPUBLISH, so a
    message reaches only the shard of its conversation (its channel carries the
    conversation's hash tag, the script's slot), never every node of the cluster."""
    if not sharded:
        return dict(ALL)
    return {
        name: src.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
        for name, src in ALL.items()
    }
