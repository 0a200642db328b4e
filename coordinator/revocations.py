"""Revoking a user's tokens: "log this user out everywhere", now.

An admin's ``POST /api/users/{user}/revoke`` records the time in Redis (``keys.revoked``);
from then on every token of that user issued until that time (its ``iat``; a token
without one, whenever it was issued) is refused wherever it is shown (socket.io connect,
REST, the browser pages: ``auth.TokenVerifier.revoked``), and the user's connections
holding one end on every node (``STATUS$TOKEN_REVOKED``, a server disconnect). Tokens
issued after it work. ``iat`` is whole seconds: a token issued in the same second as the
revocation is refused too.

Each node keeps the revocations in memory (a lookup per token shown, no Redis call):
the node that records one holds it at once and tells the others (a ``revoked`` command
to each, ``node.Node.revoked``), and every node reads them all again every ``REFRESH``
seconds (which catches a command it missed). A revocation is kept in Redis for the
tokens' longest lifetime (``--token-max-lifetime``), after which no token it refuses can
be valid anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .auth import Identity

log = logging.getLogger(__name__)

REFRESH = 1.0  # seconds between two reads of the revocations


class Revocations:
    """user -> when their tokens were revoked (Unix time); ``on_revoked(users)`` is told
    of the users revoked (again, later) since it last heard."""

    def __init__(self) -> None:
        self._at: dict[str, float] = {}
        self.on_revoked: Callable[[set[str]], None] = _ignore

    def revoked(self, who: Identity) -> bool:
        """Whether ``who``'s token was revoked (issued until its user's revocation)."""
        at = self._at.get(who.user)
        return at is not None and (who.issued is None or who.issued <= at)

    def update(self, found: dict[str, float]) -> None:
        """Revocations read from Redis, recorded here or heard of: merged, never older.
        None is dropped: one Redis has pruned (past the tokens' longest lifetime) refuses
        only tokens that expired anyway, and a read that began before a revocation was
        recorded cannot undo it."""
        changed = {u for u, at in found.items() if at > self._at.get(u, -1.0)}
        for user in changed:
            self._at[user] = found[user]
        if changed:
            log.info("tokens revoked: %s", ", ".join(sorted(changed)[:10]))
            self.on_revoked(changed)


def _ignore(users: set[str]) -> None:
    pass
