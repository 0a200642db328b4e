"""The PostgreSQL store's faults: the server stopped mid-run and restarted, unreachable
or refusing servers (no password in any message), migrations and their guards. A real
private server (tests/postgres.py)."""

from __future__ import annotations

import asyncio
import logging
import traceback

import asyncpg
import pytest

from coordinator.eventstore import (
    AppendResult,
    Batch,
    PostgresEventStore,
    StoreCorrupt,
    StoreUnavailable,
    open_store,
)
from coordinator.eventstore.pgschema import SCHEMA_VERSION
from tests.eventstore_helpers import check_log, events, read_all
from tests.helpers import wait_until
from tests.postgres import PostgresServer


def _shown(exc: BaseException) -> str:
    """Everything a log line or traceback of ``exc`` could show."""
    return "".join(traceback.format_exception(exc)) + repr(exc.args)


async def test_a_stopped_server_is_unavailable_then_works_after_restart(
    postgres_server: PostgresServer, postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """... and says so in a few lines: every call of a store that went away logged
    "connection lost; retrying" at INFO (937 lines from one node in 160 s of outage),
    and retried a connection the server had refused."""
    caplog.set_level(logging.INFO, logger="coordinator.eventstore.postgres")
    store = PostgresEventStore(postgres_dsn)
    await store.open()
    total, failures = 3000, []
    restarted = asyncio.Event()
    moved = [0]  # the next id to move

    async def mover() -> None:
        # Batches go on until the server was stopped and started again (then up to
        # ``total``), so the stop falls amid the moving however fast the machine is.
        first = 1
        while first <= total or not restarted.is_set():
            try:
                result = await store.append("c1", 1, events(first, first + 49), user="u")
            except StoreUnavailable as exc:
                failures.append(exc)
                await restarted.wait()
                continue  # the same batch again: whatever reached the store is skipped
            assert result.status == "ok"
            first = moved[0] = result.last_id + 1

    try:
        task = asyncio.create_task(mover())
        await wait_until(lambda: store.last_id("c1"), what="the first batches")
        await asyncio.to_thread(postgres_server.stop)
        await wait_until(lambda: failures or task.done(), what="an append to fail")
        assert failures and not task.done()
        with pytest.raises(StoreUnavailable) as caught:
            await store.read("c1")
        for _ in range(20):
            with pytest.raises(StoreUnavailable):
                await store.read("c1")
        retried = [r for r in caplog.records if "connection lost" in r.getMessage()]
        assert len(retried) <= 4, [r.getMessage() for r in retried]
        await asyncio.to_thread(postgres_server.start)
        restarted.set()
        await task
        check_log(await read_all(store, "c1"), moved[0] - 1)
        assert store.server_changes == 1  # another server, for all it knows (storeaudit.py)
    finally:
        await store.aclose()
    for exc in [*failures, caught.value]:
        assert postgres_server.password not in _shown(exc)
        assert "127.0.0.1" in str(exc) and "coord:***@" in str(exc)


async def test_a_role_that_may_not_ask_which_server_it_reached_still_uses_the_store(
    postgres_server: PostgresServer, postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each new connection asks which server it reached (``server_changes``: a failover
    starts a check of every conversation). With those functions revoked from the role
    (a hardened database), that question failed every connection: the store could not
    be opened. Now it is said once and the store works; only changes go uncounted."""
    database = postgres_dsn.rpartition("/")[2]
    await postgres_server.execute(
        "REVOKE EXECUTE ON FUNCTION pg_postmaster_start_time() FROM PUBLIC", database
    )
    store = PostgresEventStore(postgres_dsn)
    await store.open()
    try:
        assert (await store.append("c1", 1, events(1, 3), user="u")).status == "ok"
        check_log(await read_all(store, "c1"), 3)
        await asyncio.to_thread(postgres_server.stop)
        await asyncio.to_thread(postgres_server.start)
        await wait_until(lambda: _works(store), what="the store again")
        assert store.server_changes == 0
    finally:
        await store.aclose()
    said = [r.getMessage() for r in caplog.records if "cannot tell which server" in r.getMessage()]
    assert len(said) == 1 and "permission denied" in said[0]
    assert postgres_server.password not in said[0]


async def _works(store: PostgresEventStore) -> bool:
    try:
        return await store.last_id("c1") == 3
    except StoreUnavailable:
        return False


async def test_an_unreachable_server_is_a_clear_error_without_the_password(
    postgres_server: PostgresServer,
) -> None:
    from coordinator.embedded import free_port

    url = f"postgresql://coord:{postgres_server.password}@127.0.0.1:{free_port()}/db"
    with pytest.raises(StoreUnavailable) as caught:
        await open_store(url)
    assert "is unavailable" in str(caught.value)
    assert postgres_server.password not in _shown(caught.value)
    assert postgres_server.password not in repr(PostgresEventStore(url))


async def test_a_server_that_never_answers_is_unavailable_naming_the_time_it_had() -> None:
    """A server that takes the connection and says nothing (a hung host, a firewall that
    swallows packets): unavailable within the connect timeout, saying so ("TimeoutError:
    TimeoutError" before)."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = PostgresEventStore(f"postgresql://coord:pw@127.0.0.1:{port}/db", connect_timeout=0.5)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await store.open()
        assert "no answer in time (0.5s to connect" in str(caught.value), caught.value
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


async def test_a_refused_login_or_missing_database_is_unavailable(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    wrong = "guess-" + postgres_server.password[::-1]
    bad_login = postgres_dsn.replace(postgres_server.password, wrong)
    with pytest.raises(StoreUnavailable, match="password authentication failed") as caught:
        await PostgresEventStore(bad_login).open()
    assert wrong not in _shown(caught.value)

    no_db = postgres_dsn.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(StoreUnavailable, match="no_such_database") as caught:
        await PostgresEventStore(no_db).open()
    assert postgres_server.password not in _shown(caught.value)


async def test_migrations_run_once_and_refuse_a_newer_schema(postgres_dsn: str) -> None:
    stores = [PostgresEventStore(postgres_dsn) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))  # nodes starting together
    try:
        assert len({s.identity() for s in stores}) == 1
        await stores[0].append("c1", 1, events(1, 2), user="u")
    finally:
        await asyncio.gather(*(s.aclose() for s in stores))

    conn = await asyncpg.connect(postgres_dsn)
    try:
        meta = dict(await conn.fetch("SELECT key, value FROM coordinator.meta"))
        assert meta["schema_version"] == str(SCHEMA_VERSION)
        assert meta["store_id"] == stores[0].identity()
        async with PostgresEventStore(postgres_dsn) as again:  # nothing to do: data kept
            assert again.identity() == stores[0].identity()
            assert await again.read("c1") == events(1, 2)
        await conn.execute(
            "UPDATE coordinator.meta SET value = $1 WHERE key = 'schema_version'",
            str(SCHEMA_VERSION + 1),
        )
        with pytest.raises(StoreCorrupt, match="upgrade the coordinator"):
            await PostgresEventStore(postgres_dsn).open()
    finally:
        await conn.close()


async def test_events_past_the_recorded_last_id_are_reported(postgres_dsn: str) -> None:
    async with PostgresEventStore(postgres_dsn) as store:
        await store.append("c1", 1, events(1, 2), user="u")
        conn = await asyncpg.connect(postgres_dsn)
        try:  # what a hand-made change could leave: the conversation row out of step
            await conn.execute("INSERT INTO coordinator.events VALUES ('c1', 3, 1, '\\x00'::bytea)")
        finally:
            await conn.close()
        with pytest.raises(StoreCorrupt, match="after its recorded last id 2"):
            await store.append("c1", 1, events(3, 4), user="u")
        assert await store.last_id("c1") == 2  # the transaction was rolled back whole
        # In the mover's call, that conversation fails alone; the others are stored.
        done = await store.append_many(
            [Batch("c0", 1, tuple(events(1, 2)), "u"), Batch("c1", 1, tuple(events(3, 4)), "u")]
        )
        assert isinstance(done[1], StoreCorrupt) and "c1" in str(done[1])
        assert isinstance(done[0], AppendResult) and done[0].last_id == 2
        assert await store.read("c0") == events(1, 2) and await store.last_id("c1") == 2
