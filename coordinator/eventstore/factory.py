"""Choosing the event store from the ``--event-store`` setting (no I/O until ``open``).

Accepted URLs:

- ``file:///abs/path`` (also ``file://localhost/abs/path``): a ``FileEventStore`` in that
  directory. Option ``?fsync=batch`` (default) or ``?fsync=none``. Relative paths
  (``file://dir``, ``file:dir``) are refused, not resolved: they would depend on the
  working directory of each node's service, and nodes on one machine must agree on one
  directory.
- ``postgresql://...`` or ``postgres://...``: a ``PostgresEventStore``; the URL is given
  to asyncpg as it is (libpq syntax, options in the query string).
- no setting: a ``FileEventStore`` at ``default_path()``.

Errors name the setting and show the URL with its password hidden.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from ..errors import ConfigError
from .base import EventStore
from .filestore import FileEventStore, FsyncPolicy
from .postgres import PostgresEventStore
from .redact import redact_url

SETTING = "--event-store"
SYSTEM_DIR = Path("/var/lib/coordinator/events")


def default_path(env: Mapping[str, str] | None = None) -> Path:
    """The machine's event store directory, the same whatever the working directory.

    ``$XDG_DATA_HOME/coordinator/events`` when ``XDG_DATA_HOME`` is set (an absolute
    path), else ``/var/lib/coordinator/events`` when it exists or can be created (a
    service running as root or as a user given that directory), else
    ``~/.local/share/coordinator/events``.
    """
    env = os.environ if env is None else env
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "coordinator" / "events"
    if _creatable(SYSTEM_DIR):
        return SYSTEM_DIR
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".local" / "share" / "coordinator" / "events"


def _creatable(path: Path) -> bool:
    """Whether ``path`` is a writable directory or could be made as one."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK)
    return False


def store_from_url(url: str | None) -> EventStore:
    """The store ``url`` names (see the module docstring), not yet open."""
    if url is None or not url.strip():
        return FileEventStore(default_path())
    shown = redact_url(url)
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:
        raise ConfigError(f"{SETTING}: cannot parse {shown!r}: {exc}") from None
    if "#" in url:  # not quoted: what follows may be the rest of a password
        raise ConfigError(
            f"{SETTING}: the URL holds a '#', which would cut it there (a #fragment names "
            "nothing here; in a password, write it %23)"
        )
    scheme = parts.scheme.lower()
    if scheme in ("postgresql", "postgres"):
        if not parts.netloc and not parts.path and not parts.query:
            raise ConfigError(f"{SETTING}: {shown!r} names no database")
        return PostgresEventStore(url.strip())
    if scheme == "file":
        return _file_store(parts.netloc, parts.path, parts.query, shown)
    raise ConfigError(
        f"{SETTING}: unsupported event store URL {shown!r}; expected file:///absolute/path "
        "or postgresql://user@host/database"
    )


def _file_store(host: str, path: str, query: str, shown: str) -> FileEventStore:
    if host not in ("", "localhost") or not path.startswith("/"):
        relative = f"{host}{path}" if host not in ("", "localhost") else path
        raise ConfigError(
            f"{SETTING}: {shown!r} is not an absolute path (file:// URLs take three slashes: "
            f"file:///abs/path); a relative path ({relative!r}) would depend on each "
            "node's working directory"
        )
    directory = unquote(path)
    if "\0" in directory:
        raise ConfigError(f"{SETTING}: {shown!r}: a path cannot hold a NUL byte (%00)")
    if Path(directory) == Path("/"):
        raise ConfigError(
            f"{SETTING}: {shown!r} names the root directory; give the store a directory of "
            "its own (e.g. file:///var/lib/coordinator/events)"
        )
    fsync: FsyncPolicy = "batch"
    options = parse_qsl(query, keep_blank_values=True)
    for key, value in options:
        if key != "fsync":
            raise ConfigError(f"{SETTING}: unknown option {key!r} in {shown!r} (known: fsync)")
        if len(options) > 1:
            raise ConfigError(f"{SETTING}: fsync is given {len(options)} times in {shown!r}")
        if value == "batch":
            fsync = "batch"
        elif value == "none":
            fsync = "none"
        else:
            raise ConfigError(f"{SETTING}: fsync must be 'batch' or 'none', got {value!r}")
    return FileEventStore(Path(directory), fsync=fsync)


def shown_url(url: str | None) -> str:
    """The store ``url`` names, as a node shows it (startup line, errors, Redis): the
    password hidden, the default directory spelled out."""
    if url is None or not url.strip():
        return f"file://{default_path()}"
    return redact_url(url.strip())


async def open_store(url: str | None) -> EventStore:
    """``store_from_url(url)``, opened (directories or tables created when missing)."""
    store = store_from_url(url)
    await store.open()
    return store
