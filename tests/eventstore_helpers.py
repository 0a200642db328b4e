"""The event store tests' backends: each opens stores on one backing (a directory, a
database) or on a fresh other one, and closes all of them at the end of the test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

from coordinator.codec import pack, unpack
from coordinator.eventstore import EventStore, FileEventStore, PostgresEventStore
from tests.postgres import PostgresServer


class Backend:
    kind = ""

    def __init__(self) -> None:
        self.opened: list[EventStore] = []

    def make(self, other: bool = False, count: int = 1) -> list[EventStore]:
        """``count`` stores on this test's backing, or on a fresh other one; not open."""
        raise NotImplementedError

    async def open(self, other: bool = False) -> EventStore:
        [store] = self.make(other)
        await store.open()
        self.opened.append(store)
        return store

    async def aclose(self) -> None:
        for store in reversed(self.opened):
            await store.aclose()


class FileBackend(Backend):
    kind = "file"

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        self.path = root / "events"
        self._others = 0

    def make(self, other: bool = False, count: int = 1) -> list[EventStore]:
        path = self.path
        if other:
            self._others += 1
            path = self.root / f"other-{self._others}"
        return [FileEventStore(path) for _ in range(count)]


class PostgresBackend(Backend):
    kind = "postgres"

    def __init__(self, server: PostgresServer, dsn: str) -> None:
        super().__init__()
        self.server = server
        self.dsn = dsn
        self._databases: list[str] = []

    def make(self, other: bool = False, count: int = 1) -> list[EventStore]:
        dsn = self.dsn
        if other:
            name = self.server.create_database()
            self._databases.append(name)
            dsn = self.server.dsn(name)
        return [PostgresEventStore(dsn) for _ in range(count)]

    async def aclose(self) -> None:
        await super().aclose()
        for name in self._databases:
            self.server.drop_database(name)


@pytest.fixture(params=["file", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    made: Backend
    if request.param == "file":
        made = FileBackend(tmp_path)
    else:
        server = request.getfixturevalue("postgres_server")
        made = PostgresBackend(server, request.getfixturevalue("postgres_dsn"))
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture
async def store(backend: Backend) -> EventStore:
    return await backend.open()


def events(first: int, last: int, tag: str = "") -> list[tuple[int, bytes]]:
    """Events ``first..last`` as the owner would move them: packed maps without id."""
    return [(i, pack({"source": "agent", "n": i, "tag": tag})) for i in range(first, last + 1)]


async def read_all(store: EventStore, sid: str, page: int = 1000) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    while batch := await store.read(sid, out[-1][0] if out else 0, page):
        out.extend(batch)
    return out


def check_log(stored: Iterable[tuple[int, bytes]], last: int) -> list[dict[str, Any]]:
    """Assert ``stored`` is ids 1..last, each once, in order, each a valid event; return them."""
    stored = list(stored)
    assert [i for i, _ in stored] == list(range(1, last + 1))
    decoded = [unpack(data) for _, data in stored]
    assert all(event["n"] == i for (i, _), event in zip(stored, decoded, strict=True))
    return decoded
