"""The file store's index of each user's conversations: ``users/u-USER/SID``, an empty
marker file per conversation the user has stored (``filestore.py``).

A marker is written (and its directory synced) before its conversation's first record,
and removed with the conversation (purge); a crash between the two leaves a marker whose
log is empty, which counting and listing skip, never a stored conversation without one.
Its modification time is when the store first recorded the conversation. Everything
here does blocking I/O: the store calls it from its threads (``listed``, bounded, also
from its event loop).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from . import filelog


class UserIndex:
    """The markers under ``root/users`` of the logs under ``root/conversations``."""

    def __init__(self, root: Path, *, durable: bool) -> None:
        self._users = root / "users"
        self._conversations = root / "conversations"
        self._durable = durable

    def _folder(self, user: str) -> Path:
        return self._users / f"u-{user}"

    def add(self, sid: str, user: str) -> None:
        """Mark ``sid`` as ``user``'s (before its first record is written)."""
        marker = self._folder(user) / sid
        if marker.exists():
            return
        marker.parent.mkdir(mode=0o700, exist_ok=True)
        marker.touch(mode=filelog.FILE_MODE)
        if self._durable:
            filelog.fsync_dir(marker.parent)
            # Every time: a process that crashed after its mkdir may not have synced it.
            filelog.fsync_dir(self._users)

    def remove(self, sid: str, user: str) -> None:
        (self._folder(user) / sid).unlink(missing_ok=True)

    def count(self, user: str, below: int = 0) -> int:
        """``user``'s stored conversations; a count under ``below`` may be an upper bound
        (the markers alone, without reading each log)."""
        if below and (markers := self.listed(user, below - 1)) is not None:
            return markers  # a marker may outlive its log (a crash), never the reverse
        try:
            sids = os.listdir(self._folder(user))
        except FileNotFoundError:
            return 0
        return sum(self._stored(sid, user) for sid in sids)

    def listed(self, user: str, most: int) -> int | None:
        """How many markers ``user`` has, if at most ``most``; else None (the listing
        stops there, so it costs a few system calls whatever the user holds)."""
        try:
            with os.scandir(self._folder(user)) as entries:
                n = 0
                for _ in entries:
                    n += 1
                    if n > most:
                        return None
                return n
        except FileNotFoundError:
            return 0

    def newest(self, user: str, limit: int) -> list[tuple[str, int]]:
        """Up to ``limit`` of ``user``'s stored conversations, newest first by their
        markers' times, each with that time (ms since the epoch)."""
        folder = self._folder(user)
        try:
            with os.scandir(folder) as entries:
                names = [entry.name for entry in entries]
        except FileNotFoundError:
            return []
        markers = []
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # purged meanwhile
                markers.append((os.stat(folder / name).st_mtime_ns, name))
        markers.sort(key=lambda m: (-m[0], m[1]))
        listed: list[tuple[str, int]] = []
        for mtime_ns, sid in markers:
            if len(listed) == limit:
                break
            if self._stored(sid, user):
                listed.append((sid, mtime_ns // 1_000_000))
        return listed

    def created(self, sid: str, user: str) -> int:
        """When ``sid`` was first stored for ``user`` (ms since the epoch; its marker's
        time, as ``newest`` lists it), 0 without a marker."""
        try:
            return os.stat(self._folder(user) / sid).st_mtime_ns // 1_000_000
        except FileNotFoundError:
            return 0

    def _stored(self, sid: str, user: str) -> bool:
        return filelog.stored_for(self._conversations / f"{sid}.log", user)
