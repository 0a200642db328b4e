"""Choosing the event store: ``--event-store`` URLs, the default directory, redaction."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from coordinator.errors import ConfigError
from coordinator.eventstore import (
    FileEventStore,
    PostgresEventStore,
    default_path,
    open_store,
    redact_url,
    store_from_url,
)
from coordinator.eventstore.redact import scrub, url_secrets
from tests.postgres import PostgresServer


def test_file_urls_need_an_absolute_path(tmp_path: Path) -> None:
    store = store_from_url(f"file://{tmp_path}/events")
    assert isinstance(store, FileEventStore)
    assert (store.path, store.fsync) == (tmp_path / "events", "batch")
    local = store_from_url("file://localhost/srv/my%20events?fsync=none")
    assert isinstance(local, FileEventStore)
    assert (local.path, local.fsync) == (Path("/srv/my events"), "none")

    for relative in ("file://events", "file://data/events", "file:events", "file:./events"):
        with pytest.raises(ConfigError, match=r"--event-store.*not an absolute path"):
            store_from_url(relative)
    with pytest.raises(ConfigError, match="fsync must be"):
        store_from_url("file:///srv/events?fsync=sometimes")
    with pytest.raises(ConfigError, match="unknown option 'sync'"):
        store_from_url("file:///srv/events?sync=none")
    with pytest.raises(ConfigError, match="fsync is given 2 times"):
        store_from_url("file:///srv/events?fsync=none&fsync=batch")
    with pytest.raises(ConfigError, match="NUL byte"):
        store_from_url("file:///srv/a%00b")
    for root in ("file:///", "file:///./", "file://localhost/"):
        with pytest.raises(ConfigError, match="names the root directory"):
            store_from_url(root)
    for fragment in ("file:///srv/e#x", "postgresql://u:pa#ss@db/events", "file:///srv/e#"):
        with pytest.raises(ConfigError, match="holds a '#'") as caught:
            store_from_url(fragment)
        assert "ss@" not in str(caught.value)  # nothing of a password after it
    # The URL an error quotes is the one given (it was rebuilt: "file:///events").
    with pytest.raises(ConfigError, match="'file:events' is not an absolute path"):
        store_from_url("file:events")


def test_postgres_urls_and_bad_urls() -> None:
    for url in ("postgresql://coord:s3cret@db.example:5432/events", "postgres://db/events"):
        store = store_from_url(url)
        assert isinstance(store, PostgresEventStore)
        assert "s3cret" not in repr(store)
    for bad in ("redis://127.0.0.1/0", "/var/lib/events", "events", "postgresql://"):
        with pytest.raises(ConfigError, match="--event-store"):
            store_from_url(bad)
    with pytest.raises(ConfigError) as caught:
        store_from_url("mysql://root:hunter2@db/events")
    assert "hunter2" not in str(caught.value) and "root:***@db" in str(caught.value)


async def test_a_dsn_asyncpg_cannot_use_is_a_config_error() -> None:
    for dsn, why in (
        ("postgresql://coord:s3cret@127.0.0.1:1/db?sslmode=sometimes", "sslmode"),
        ("postgresql://coord:s3cret@127.0.0.1:99999/db", "port must be 0-65535"),
    ):
        store = PostgresEventStore(dsn)
        with pytest.raises(ConfigError, match=why) as caught:
            await store.open()
        assert "s3cret" not in str(caught.value) and "coord:***@" in str(caught.value)


async def test_options_or_rights_the_server_refuses_are_config_errors(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    """What the server refuses for good at the first connection is a configuration error
    naming it, as a DSN asyncpg cannot read is (before: a stack trace)."""
    for option, why in (
        ("connect_timeout=10", 'unrecognized configuration parameter "connect_timeout"'),
        ("statement_timeout=abc", "statement_timeout"),
    ):
        store = PostgresEventStore(f"{postgres_dsn}?{option}")
        with pytest.raises(ConfigError, match=why) as caught:
            await store.open()
        assert postgres_server.password not in str(caught.value)
    await asyncio.to_thread(
        postgres_server.admin_execute, "CREATE ROLE weak LOGIN PASSWORD 'weak-pw-77'"
    )
    try:
        database = postgres_dsn.rsplit("/", 1)[1]
        weak = f"postgresql://weak:weak-pw-77@127.0.0.1:{postgres_server.port}/{database}"
        store = PostgresEventStore(weak)
        with pytest.raises(ConfigError, match="permission denied") as caught:
            await store.open()
        assert "weak-pw-77" not in str(caught.value)
    finally:
        await asyncio.to_thread(postgres_server.admin_execute, "DROP ROLE weak")


def test_no_setting_means_the_default_directory() -> None:
    store = store_from_url(None)
    assert isinstance(store, FileEventStore) and store.path == default_path()


def test_the_default_directory_is_per_machine_not_per_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xdg = {"XDG_DATA_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}
    assert default_path(xdg) == tmp_path / "xdg" / "coordinator" / "events"
    relative_xdg = {"XDG_DATA_HOME": "data", "HOME": str(tmp_path / "home")}
    chosen = default_path(relative_xdg)  # a relative XDG_DATA_HOME is ignored (the spec)
    assert chosen.is_absolute() and chosen in (
        Path("/var/lib/coordinator/events"),
        tmp_path / "home" / ".local" / "share" / "coordinator" / "events",
    )
    here = default_path()
    monkeypatch.chdir(tmp_path)
    assert default_path() == here and here.is_absolute()
    # /var/lib/coordinator when this user may write there, else the home directory.
    writable = os.access("/var/lib", os.W_OK) or os.access("/var/lib/coordinator", os.W_OK)
    home = {"HOME": str(tmp_path / "home")}
    expected = (
        Path("/var/lib/coordinator/events")
        if writable
        else tmp_path / "home" / ".local/share/coordinator/events"
    )
    assert default_path(home) == expected


async def test_open_store_opens_and_creates_the_directory(tmp_path: Path) -> None:
    store = await open_store(f"file://{tmp_path}/new/events")
    try:
        assert (tmp_path / "new" / "events" / "store-id").is_file()
        assert len(store.identity()) == 32
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://coord:s3cret@h:5432/db", "postgresql://coord:***@h:5432/db"),
        ("postgresql://coord:p%40ss@h/db", "postgresql://coord:***@h/db"),
        ("postgresql://coord:p@ss@h/db", "postgresql://coord:***@h/db"),
        ("postgresql://coord@h/db", "postgresql://coord@h/db"),
        ("postgresql://h/db?user=c&password=s3cret", "postgresql://h/db?user=c&password=***"),
        ("postgresql://u:s3cret@h1:5432,h2:5433/db", "postgresql://u:***@h1:5432,h2:5433/db"),
        ("file:///var/lib/events", "file:///var/lib/events"),
        # Shown as given, only the secret replaced (rebuilt, it was "postgresql:/db?...").
        ("postgresql:///db?host=/run/pg&password=s3", "postgresql:///db?host=/run/pg&password=***"),
        ("file:events", "file:events"),
    ],
)
def test_urls_are_shown_without_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    for secret in url_secrets(url):
        assert secret not in scrub(f"driver said: {url}", url_secrets(url))
