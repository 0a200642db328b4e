"""A serving node's advertisement of its public URL (``status.Advertisement``).

Written when the node starts serving and again every ``every`` seconds, so it comes back
after Redis lost its data and its age tells when the node was last heard of; withdrawn
first thing when the node stops, so a draining node is not offered to clients. A node
that is killed leaves it behind: readers show it as lost, then prune it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit

from .directory import Directory
from .errors import REDIS_TROUBLE, ConfigError
from .status import Advertisement
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)
WITHDRAW_TROUBLE: tuple[type[Exception], ...] = (*REDIS_TROUBLE, TimeoutError)


def check_public_url(url: str) -> str:
    """``url`` without a trailing slash if it is an http(s) URL of a host (and port)
    with nothing else; else ConfigError."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        raise ConfigError(f"public URL {url!r} is not a URL") from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise ConfigError(f"public URL must be http(s)://HOST[:PORT] with no path, got {url!r}")
    return url.rstrip("/")


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the advertisement refresh failed", exc_info=task.exception())


class UrlAdvertiser:
    """Keeps one node's advertisement fresh; ``start`` then ``aclose``."""

    def __init__(self, directory: Directory, ad: Advertisement, *, every: float) -> None:
        self._directory = directory
        self._ad = ad
        self._every = every
        self._written = ""  # the value last written, to withdraw exactly that one
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Write the advertisement now (a failure is logged: the refresh retries)."""
        await self._write()
        self._task = asyncio.create_task(self._refresh(), name="advertise")
        self._task.add_done_callback(_log_failure)

    async def _write(self) -> None:
        ad = Advertisement(self._ad.node_id, self._ad.url, self._ad.node_ttl, time.time())
        try:
            self._written = await self._directory.advertise(ad)
        except REDIS_TROUBLE as exc:
            log.warning("could not advertise %s at %s: %s", ad.node_id, ad.url, exc)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            await self._write()

    async def aclose(self, within: float) -> None:
        """Stop refreshing and withdraw the advertisement, giving up after ``within``
        seconds (a Redis that does not answer held the drain back by its retries)."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait([task], within=5.0)
        if self._written:
            try:
                async with asyncio.timeout(within):
                    await self._directory.withdraw(self._ad.node_id, self._written)
            except WITHDRAW_TROUBLE as exc:
                why = exc if str(exc) else "Redis did not answer in time"
                log.warning("could not withdraw the advertisement of %s: %s", self._ad.node_id, why)
            self._written = ""
