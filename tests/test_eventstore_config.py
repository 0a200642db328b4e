"""Choosing the event store: ``--event-store`` URLs, the default directory, redaction."""

from __future__ import annotations

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
    store = PostgresEventStore("postgresql://coord:s3cret@127.0.0.1:1/db?sslmode=sometimes")
    with pytest.raises(ConfigError, match="sslmode") as caught:
        await store.open()
    assert "s3cret" not in str(caught.value) and "coord:***@" in str(caught.value)


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
    ],
)
def test_urls_are_shown_without_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    for secret in url_secrets(url):
        assert secret not in scrub(f"driver said: {url}", url_secrets(url))
