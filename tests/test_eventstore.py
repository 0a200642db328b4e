"""The event store's contract, on both backends: a real directory and a real private
PostgreSQL (tests/postgres.py). Backend-specific faults are in test_eventstore_file.py
and test_eventstore_postgres.py."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest

from coordinator.codec import pack, unpack
from coordinator.errors import ConversationNotFound, InvalidInput
from coordinator.eventstore import AppendResult, Batch, CheckpointTooLarge, EventStore
from tests.eventstore_helpers import Backend, backend, check_log, events, read_all, store

__all__ = ["backend", "store"]  # fixtures


async def test_round_trip_with_paging(store: EventStore) -> None:
    assert await store.read("c1") == []
    assert await store.last_id("c1") == 0
    assert await store.conversation("c1") is None
    written = events(1, 250)
    for first in range(0, 250, 100):
        result = await store.append("c1", 1, written[first : first + 100], user="alice")
        assert (result.status, result.written) == ("ok", min(100, 250 - first))
    assert result.last_id == 250 and result.epoch == 1

    assert await store.read("c1", 0, 250) == written
    assert await store.read("c1", 63, 2) == written[63:65]
    assert await store.read("c1", 64, 1) == written[64:65]
    assert await store.read("c1", 249, 10) == written[249:]
    assert await store.read("c1", 250, 10) == []
    assert await store.read("c1", 10_000, 10) == []
    pages = [await store.read("c1", after, 7) for after in range(0, 250, 7)]
    assert [e for page in pages for e in page] == written

    info = await store.conversation("c1")
    assert info is not None
    assert (info.user, info.epoch, info.last_id) == ("alice", 1, 250)
    assert info.size == await store.size("c1") == sum(len(d) for _, d in written)
    assert await store.last_id("c1") == 250


async def test_last_ids_of_many_at_once(store: EventStore) -> None:
    """The store audit's batched read: each conversation's last id, in the order asked,
    0 for one the store does not hold; a bad id is refused before anything is read."""
    assert await store.last_ids([]) == []
    await store.append("c1", 1, events(1, 3), user="alice")
    await store.append("c2", 1, events(1, 7), user="bob")
    assert await store.last_ids(["c2", "none", "c1", "c2"]) == [7, 0, 3, 7]
    with pytest.raises(InvalidInput):
        await store.last_ids(["c1", "not/valid"])


async def test_a_read_bounded_in_bytes_stops_at_the_event_that_reaches_the_bound(
    store: EventStore,
) -> None:
    """``max_bytes``: no event after those whose data reach it, at least one (a replay
    or a page of large events holds about a page, however many were asked for)."""
    written = [(i, pack({"n": i, "pad": "x" * (1000 if i % 3 == 0 else 10)})) for i in range(1, 31)]
    await store.append("c1", 1, written, user="alice")
    sizes = [len(d) for _, d in written]
    got = await store.read("c1", 0, 30, max_bytes=sizes[0] + sizes[1] + sizes[2])
    assert got == written[:3]  # the third reaches the bound
    assert await store.read("c1", 0, 30, max_bytes=1) == written[:1]  # one at least
    assert await store.read("c1", 2, 30, max_bytes=sizes[2] + 1) == written[2:4]
    assert await store.read("c1", 0, 2, max_bytes=10**9) == written[:2]  # the count first
    assert await store.read("c1", 0, 30, max_bytes=0) == written  # 0: no bound
    with pytest.raises(InvalidInput, match="max_bytes"):
        await store.read("c1", 0, 30, max_bytes=-1)


async def test_a_lookup_gives_the_conversation_or_its_users_count_in_one_call(
    store: EventStore,
) -> None:
    await store.append("c1", 2, events(1, 3), user="alice")
    await store.append("c2", 1, events(1, 1), user="alice")
    await store.append("c3", 1, events(1, 1), user="bob")
    found = await store.lookup("c1", "alice", quota=10)
    assert found.known == await store.conversation("c1")
    assert found.known is not None and (found.known.epoch, found.known.last_id) == (2, 3)
    assert found.count == 0  # held: nothing to count
    assert (await store.lookup("c1", "bob", quota=10)).known == found.known  # the caller checks
    assert (await store.lookup("new", "alice", quota=10)).count == 2
    assert (await store.lookup("new", "bob", quota=10)).count == 1
    assert (await store.lookup("new", "carol", quota=10)).count == 0
    assert (await store.lookup("new", "alice")).count == 0  # no quota: not counted
    assert (await store.lookup("new", "", quota=10)).count == 0
    with pytest.raises(InvalidInput):
        await store.lookup("../c1", "alice", quota=10)
    with pytest.raises(InvalidInput):
        await store.lookup("new", "a/b", quota=10)


async def test_a_retried_or_overlapping_batch_writes_nothing_twice(store: EventStore) -> None:
    first = events(1, 5, "first")
    assert (await store.append("c1", 1, first, user="u")).written == 5
    again = await store.append("c1", 1, first, user="u")
    assert (again.status, again.last_id, again.written) == ("ok", 5, 0)
    overlap = await store.append("c1", 1, events(3, 8, "second"), user="u")
    assert (overlap.status, overlap.last_id, overlap.written) == ("ok", 8, 3)
    assert await store.read("c1") == first + events(6, 8, "second")
    assert await store.size("c1") == sum(len(d) for _, d in first + events(6, 8, "second"))
    inside = await store.append("c1", 1, events(2, 4, "third"), user="u")
    assert (inside.status, inside.written) == ("ok", 0)
    assert (await store.append("c1", 1, [], user="u")).status == "ok"


async def test_a_gap_is_refused_whole(store: EventStore) -> None:
    assert (await store.append("c1", 1, events(1, 3), user="u")).written == 3
    gap = await store.append("c1", 1, events(5, 9), user="u")
    assert (gap.status, gap.last_id, gap.written) == ("gap", 3, 0)
    assert await store.last_id("c1") == 3
    # A conversation's first batch starts at id 1; a refused one leaves nothing behind.
    late = await store.append("c2", 1, events(2, 4), user="u")
    assert (late.status, late.last_id) == ("gap", 0)
    assert await store.conversation("c2") is None
    assert await store.count_conversations("u") == 1


async def test_many_conversations_in_one_call_each_get_their_own_outcome(
    store: EventStore,
) -> None:
    """The mover's call: one batch per conversation, each appended as ``append`` would
    (ok, idempotent, fenced, gap, a malformed or another user's batch refused), in order,
    none stopping the others."""
    await store.append("fenced", 5, events(1, 1), user="u")
    await store.append("bobs", 1, events(1, 1), user="bob")
    await store.append("again", 1, events(1, 2), user="u")
    batches = [Batch(f"c{n}", 1, tuple(events(1, n + 1, f"c{n}")), "u") for n in range(12)] + [
        Batch("fenced", 4, tuple(events(2, 3)), "u"),
        Batch("gap", 1, tuple(events(3, 4)), "u"),
        Batch("../bad", 1, tuple(events(1, 1)), "u"),
        Batch("bobs", 1, tuple(events(2, 2)), "u"),
        Batch("again", 1, tuple(events(1, 3)), "u"),
    ]
    done = await store.append_many(batches)
    for n, r in enumerate(done[:12]):
        assert isinstance(r, AppendResult) and (r.status, r.last_id, r.written) == (
            "ok",
            n + 1,
            n + 1,
        )
        assert await store.read(f"c{n}") == events(1, n + 1, f"c{n}")
    fenced, gap, bad, bobs, again = done[12:]
    assert isinstance(fenced, AppendResult) and (fenced.status, fenced.epoch) == ("fenced", 5)
    assert isinstance(gap, AppendResult) and gap.status == "gap"
    assert isinstance(bad, InvalidInput)
    assert isinstance(bobs, InvalidInput) and "another user" in str(bobs)  # as append
    assert isinstance(again, AppendResult) and (again.last_id, again.written) == (3, 1)
    assert await store.read("fenced") == events(1, 1)
    assert await store.read("bobs") == events(1, 1)
    assert await store.conversation("gap") is None
    assert await store.append_many([]) == []
    with pytest.raises(InvalidInput, match="one batch per conversation"):
        await store.append_many([Batch("c0", 1, (), "u"), Batch("c0", 1, (), "u")])


async def test_a_replaced_owners_late_batch_is_fenced(backend: Backend) -> None:
    store = await backend.open()
    assert (await store.append("c1", 1, events(1, 3, "old"), user="u")).status == "ok"
    assert (await store.append("c1", 2, events(4, 5, "new"), user="u")).status == "ok"
    late = await store.append("c1", 1, events(4, 7, "old"), user="u")
    assert (late.status, late.epoch, late.last_id, late.written) == ("fenced", 2, 5, 0)
    assert await store.read("c1") == events(1, 3, "old") + events(4, 5, "new")
    assert (await store.append("c1", 2, events(6, 6, "new"), user="u")).status == "ok"

    # A new owner fences its predecessor before it has anything to move.
    assert (await store.append("c1", 3, [], user="u")).epoch == 3
    assert (await store.append("c1", 2, events(7, 7), user="u")).status == "fenced"
    # Even a batch that is all stored already raises the fence.
    assert (await store.append("c1", 4, events(5, 6, "new"), user="u")).epoch == 4

    reopened = await backend.open()  # the fence is durable, not in the process
    assert (await reopened.append("c1", 3, events(7, 7), user="u")).status == "fenced"
    info = await reopened.conversation("c1")
    assert info is not None and (info.epoch, info.last_id) == (4, 6)


async def test_concurrent_appenders_never_interleave_or_duplicate(backend: Backend) -> None:
    """Writers on one store and on another store of the same backing (another node)
    race to move the same events, each batch starting at what it last saw stored."""
    one, two = await backend.open(), await backend.open()
    total = 1500

    async def mover(store: EventStore, name: str, seed: int) -> int:
        rng = random.Random(seed)
        written = 0
        while (last := await store.last_id("c1")) < total:
            start = max(1, last + 1 - rng.randint(0, 3))
            batch = events(start, min(total, start + rng.randint(1, 60)), name)
            result = await store.append("c1", 7, batch, user="u")
            assert result.status == "ok", result
            written += result.written
        return written

    counts = await asyncio.gather(
        mover(one, "a", 1), mover(one, "b", 2), mover(two, "c", 3), mover(two, "d", 4)
    )
    assert sum(counts) == total
    stored = await read_all(one, "c1")
    check_log(stored, total)
    assert await two.size("c1") == sum(len(d) for _, d in stored)


async def test_movers_of_overlapping_conversations_never_deadlock_or_duplicate(
    backend: Backend,
) -> None:
    """Two nodes' movers (two stores of one backing) and a single appender race over
    eight conversations, each mover with its own random subset per call in its own
    order: every call completes (locks are taken in one order) and each log is 1..N."""
    one, two = await backend.open(), await backend.open()
    sids, total = [f"m{n}" for n in range(8)], 300

    async def mover(store: EventStore, seed: int) -> None:
        rng = random.Random(seed)
        while True:
            lasts = {sid: await store.last_id(sid) for sid in sids}
            todo = [sid for sid in sids if lasts[sid] < total and rng.random() < 0.7]
            if not any(last < total for last in lasts.values()):
                return
            rng.shuffle(todo)
            batches = []
            for sid in todo:
                start = max(1, lasts[sid] + 1 - rng.randint(0, 3))
                batch = events(start, min(total, start + rng.randint(1, 40)), sid)
                batches.append(Batch(sid, 3, tuple(batch), "u"))
            for r in await store.append_many(batches):
                assert isinstance(r, AppendResult) and r.status == "ok", r

    async def single(store: EventStore) -> None:
        while (last := await store.last_id("m0")) < total:
            result = await store.append(
                "m0", 3, events(last + 1, min(total, last + 5), "m0"), user="u"
            )
            assert result.status == "ok", result

    async with asyncio.timeout(60):
        await asyncio.gather(mover(one, 1), mover(two, 2), mover(one, 3), single(two))
    for sid in sids:
        assert {e["tag"] for e in check_log(await read_all(two, sid), total)} == {sid}


async def test_a_cancelled_append_leaves_a_consistent_store(store: EventStore) -> None:
    """The owner's mover may be cancelled (shutdown, lost lease) mid-append: the batch is
    then stored whole or not at all, and sending it again completes it."""
    for first in range(1, 2001, 500):
        task = asyncio.create_task(store.append("c1", 1, events(first, first + 499), user="u"))
        for _ in range(first // 500):  # cancelled at different points
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert (await store.last_id("c1")) in (first - 1, first + 499)
        result = await store.append("c1", 1, events(first, first + 499), user="u")
        assert (result.status, result.last_id) == ("ok", first + 499)
    check_log(await read_all(store, "c1"), 2000)


async def test_checkpoints_are_bounded_fenced_and_never_go_back(store: EventStore) -> None:
    with pytest.raises(ConversationNotFound):
        await store.save_checkpoint("c1", 1, 0, b"state")
    assert await store.load_checkpoint("c1") is None
    await store.append("c1", 2, events(1, 10), user="u")

    assert await store.save_checkpoint("c1", 2, 5, b"s5") == "ok"
    assert await store.load_checkpoint("c1") == (5, b"s5")
    assert await store.save_checkpoint("c1", 2, 5, b"s5") == "ok"  # a retry
    assert await store.save_checkpoint("c1", 2, 4, b"s4") == "stale"
    assert await store.save_checkpoint("c1", 1, 9, b"old owner") == "fenced"
    assert await store.load_checkpoint("c1") == (5, b"s5")

    big = b"x" * (1024 * 1024 + 1)
    with pytest.raises(CheckpointTooLarge) as caught:
        await store.save_checkpoint("c1", 2, 10, big)
    assert isinstance(caught.value, InvalidInput)
    assert await store.load_checkpoint("c1") == (5, b"s5")
    assert await store.save_checkpoint("c1", 2, 10, big[:-1]) == "ok"
    assert await store.load_checkpoint("c1") == (10, big[:-1])

    # A newer owner's checkpoint raises the fence for appends too.
    assert await store.save_checkpoint("c1", 3, 10, b"s10") == "ok"
    assert (await store.append("c1", 2, events(11, 11), user="u")).status == "fenced"
    assert (await store.append("c1", 3, events(11, 11), user="u")).status == "ok"


async def test_purge_removes_everything_of_one_conversation(store: EventStore) -> None:
    kept = events(1, 4, "kept")
    await store.append("keep", 1, kept, user="u")
    gone = events(1, 130)
    await store.append("c1", 1, gone, user="u")
    await store.save_checkpoint("c1", 1, 100, b"state")
    assert await store.count_conversations("u") == 2

    assert await store.purge("c1") == (130, sum(len(d) for _, d in gone))
    assert await store.read("c1") == []
    assert await store.conversation("c1") is None
    assert await store.load_checkpoint("c1") is None
    assert (await store.size("c1"), await store.last_id("c1")) == (0, 0)
    assert await store.count_conversations("u") == 1
    assert await store.purge("c1") == (0, 0)
    assert await store.read("keep") == kept

    # The id can be used again, from id 1 and any epoch (the fence went too).
    assert (await store.append("c1", 1, events(1, 2), user="v")).status == "ok"
    assert await store.read("c1") == events(1, 2)


async def test_user_accounting(store: EventStore) -> None:
    before = int(time.time() * 1000)
    for sid, user in [("a1", "alice"), ("a2", "alice"), ("b1", "bob@example.com")]:
        await store.append(sid, 1, events(1, 2), user=user)
        await asyncio.sleep(0.02)  # apart by more than a file time's granularity
    await store.append("a3", 1, [], user="alice")  # recorded before it has events
    assert await store.count_conversations("alice") == 3
    assert await store.count_conversations("bob@example.com") == 1
    assert await store.count_conversations("..") == 0
    assert await store.count_conversations() == 4
    with pytest.raises(InvalidInput, match="another user"):
        await store.append("a1", 1, events(3, 3), user="bob@example.com")
    assert await store.last_id("a1") == 2

    # Listed newest first, with when each was first stored; a later append or a
    # refused one changes neither.
    listed = await store.list_conversations("alice", 10)
    assert [sid for sid, _ in listed] == ["a3", "a2", "a1"]
    times = [created for _, created in listed]
    assert times == sorted(times, reverse=True)
    assert before - 1000 <= times[-1] and times[0] <= time.time() * 1000 + 1000
    # A conversation's own answer says when it was first stored, as the list does.
    for sid, created in listed:
        known = await store.conversation(sid)
        assert known is not None and known.created == created, (sid, known)
        assert (await store.lookup(sid, "alice")).known == known
    await store.append("a1", 1, events(3, 4), user="alice")
    assert await store.list_conversations("alice", 10) == listed
    assert await store.list_conversations("alice", 2) == listed[:2]
    assert await store.list_conversations("nobody", 10) == []
    await store.purge("a2")
    assert await store.list_conversations("alice", 10) == [listed[0], listed[2]]
    for bad in (store.list_conversations("a b", 10), store.list_conversations("alice", 0)):
        with pytest.raises(InvalidInput):
            await bad


async def test_a_conversation_of_no_user_is_stored_too(store: EventStore) -> None:
    """The seed's ``user_id=None``: user '' (a single-user deployment's every
    conversation). Before, the store refused it as an invalid user: its events were
    never stored, and the mover retried it for good, holding back the node's others."""
    assert (await store.append("n1", 1, events(1, 3), user="")).status == "ok"
    assert (await store.append("n1", 1, events(4, 4), user="")).status == "ok"
    assert await store.read("n1") == events(1, 4)
    known = await store.conversation("n1")
    assert known is not None and (known.user, known.last_id) == ("", 4)
    found = await store.lookup("n1", "", quota=10)
    assert found.known == known
    with pytest.raises(InvalidInput, match="another user"):
        await store.append("n1", 1, events(5, 5), user="alice")
    await store.append("a1", 1, events(1, 1), user="alice")
    with pytest.raises(InvalidInput, match="another user"):
        await store.append("a1", 1, events(2, 2), user="")
    assert await store.count_conversations() == 2
    assert await store.purge("n1") == (4, sum(len(data) for _, data in events(1, 4)))
    assert await store.conversation("n1") is None


async def test_malformed_calls_change_nothing(store: EventStore) -> None:
    await store.append("c1", 1, events(1, 2), user="u")
    bad_calls = [
        store.append("../etc", 1, events(3, 3), user="u"),
        store.append("c1", 1, [(3, b"a"), (5, b"b")], user="u"),
        store.append("c1", 1, [(0, b"a")], user="u"),
        store.append("c1", -1, events(3, 3), user="u"),
        store.append("c1", 1, [(3, "text")], user="u"),  # type: ignore[list-item]
        store.append("c1", 1, events(3, 3), user="a b"),
        store.read("c1", -1, 10),
        store.read("c1", 0, 0),
        store.save_checkpoint("c1", 1, -1, b""),
    ]
    for call in bad_calls:
        with pytest.raises(InvalidInput):
            await call
    assert await store.read("c1") == events(1, 2)


async def test_identity_is_stable_and_names_one_store(backend: Backend) -> None:
    first = await backend.open()
    again = await backend.open()
    assert first.identity() == again.identity() and len(first.identity()) >= 16
    other = await backend.open(other=True)
    assert other.identity() != first.identity()
    # Nodes starting together on a fresh store agree on its identity.
    racers = backend.make(other=True, count=4)
    backend.opened.extend(racers)
    await asyncio.gather(*(s.open() for s in racers))
    assert len({s.identity() for s in racers}) == 1
    assert racers[0].identity() not in (first.identity(), other.identity())


async def test_100k_small_events_in_batches_of_500(backend: Backend) -> None:
    store = await backend.open()
    total, batch = 100_000, 500
    payload = [pack({"source": "agent", "n": i}) for i in range(1, total + 1)]
    started = time.perf_counter()
    for first in range(1, total + 1, batch):
        chunk = [(i, payload[i - 1]) for i in range(first, first + batch)]
        assert (await store.append("big", 1, chunk, user="u")).written == batch
    appended = time.perf_counter() - started
    started = time.perf_counter()
    stored = await read_all(store, "big", page=5000)
    read = time.perf_counter() - started
    assert [i for i, _ in stored] == list(range(1, total + 1))
    assert all(unpack(d)["n"] == i for i, d in stored[:: total // 100])
    assert [d for _, d in stored] == payload
    print(
        f"\n{backend.kind}: appended {total} events in batches of {batch} in {appended:.2f}s "
        f"({total / appended:,.0f}/s); read back in pages of 5000 in {read:.2f}s "
        f"({total / read:,.0f}/s)"
    )
