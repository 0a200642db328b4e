"""The Lua scripts on their own: outcomes that the manager relies on."""

from __future__ import annotations

from coordinator.codec import pack
from coordinator.keys import KeySchema
from coordinator.state import RedisState


async def test_commit_retry_after_a_lost_reply_is_not_applied_twice(redis_client) -> None:
    state = RedisState(redis_client, KeySchema("t"))
    own = await state.acquire("s1", "n1", "n1/a", "u", create=True)
    assert own.status == "created" and own.epoch == 1
    accepted = await state.accept("s1", "u", pack({"action": "message"}), 100, 10, floor=0)
    action = accepted.event_id
    first = await state.commit("s1", "n1/a", 1, [pack({"r": 1})], cause=action, floor=0)
    again = await state.commit("s1", "n1/a", 1, [pack({"r": 1})], cause=action, floor=0)
    more = await state.commit("s1", "n1/a", 1, [pack({"r": 2})], cause=action, index=1, floor=0)
    assert (first.status, again.status, more.status) == ("ok", "dup", "ok")
    assert [i for i, _ in await state.events_after("s1", 0)] == [1, 2, 3]
    assert await redis_client.xlen(state.keys.inbox("s1")) == 0


async def test_the_inbox_key_goes_once_no_action_waits(redis_client) -> None:
    """An empty stream costs ~400 B: the inbox is deleted once its last action was
    applied, and an accept after that makes it again (its ids are explicit)."""
    state = RedisState(redis_client, KeySchema("t"))
    await state.acquire("s1", "n1", "n1/a", "u", create=True)
    inbox = state.keys.inbox("s1")
    first = (await state.accept("s1", "u", pack({"n": 1}), 100, 10, floor=0)).event_id
    second = (await state.accept("s1", "u", pack({"n": 2}), 100, 10, floor=0)).event_id
    await state.commit("s1", "n1/a", 1, [pack({"r": 1})], cause=first, floor=0)
    assert await redis_client.xlen(inbox) == 1  # the second still waits
    await state.commit("s1", "n1/a", 1, [pack({"r": 2})], cause=second, floor=0)
    assert await redis_client.exists(inbox) == 0
    third = (await state.accept("s1", "u", pack({"n": 3}), 100, 10, floor=0)).event_id
    assert [i for i, _ in (await state.inbox_snapshot("s1", 0))[1]] == [third]


async def test_a_conversation_that_retires_leaves_its_users_index(
    redis_client,
) -> None:
    """Release says 2 when a conversation retires (its user's index drops it: the store
    lists it if it holds events), with events or without (it said 1 then, and the index
    kept the id for good); 1 when it only gives ownership up. With no owner ('') and no
    state ('') it retires a conversation whose last connection left, its state kept."""
    state = RedisState(redis_client, KeySchema("t"))
    for sid in ("empty", "told"):
        await state.acquire(sid, "n1", "n1/a", "u", create=True)
    action = (await state.accept("told", "u", pack({"n": 1}), 100, 10, floor=0)).event_id
    await state.commit("told", "n1/a", 1, [pack({"r": 1})], cause=action, floor=0)
    assert await state.release("told", "n1/a", 1, "stopped", retention_ms=60_000) == 1
    await state.acquire("told", "n1", "n1/a", "u", create=False)  # not stored yet: stays
    assert await redis_client.pttl(state.keys.conv("told")) == -1
    answer = (await state.unstored("told", 10, 1 << 20))[1][1]
    # A mark reads what the store still lacks (the mover's next batch), then nothing.
    assert await state.mark_stored("told", 1, 100, 1 << 20, 10, 1 << 20) == (1, [answer])
    assert await state.mark_stored("told", 2, 100, 1 << 20, 10, 1 << 20) == (2, [])
    assert await state.release("told", "n1/a", 2, "stopped", retention_ms=60_000) == 2
    assert await state.release("empty", "n1/a", 1, "stopped", retention_ms=60_000) == 2
    for sid in ("empty", "told"):
        assert 0 < await redis_client.pttl(state.keys.conv(sid)) <= 60_000
    await state.acquire("held", "n1", "n1/a", "u", create=True)
    await state.add_connections([("c1", "held", "u")], "n1/a")
    assert await state.release("held", "n1/a", 1, "finished", retention_ms=60_000) == 1
    assert await redis_client.pttl(state.keys.conv("held")) == -1  # watched: stays
    await state.remove_connections([("c1", "held", "u")], "n1/a", retention_ms=60_000)
    assert 0 < await redis_client.pttl(state.keys.conv("held")) <= 60_000
    assert (await state.meta("held"))["state"] == "finished"


async def test_an_unprompted_write_retried_after_a_lost_reply_is_not_applied_twice(
    redis_client,
) -> None:
    """Writes answering no action are known by (writer token, index): a retry is a
    'dup', another writer's (a new runner of the same epoch) or a later index is not."""
    state = RedisState(redis_client, KeySchema("t"))
    await state.acquire("s3", "n1", "n1/a", "u", create=True)

    async def write(writer: str, index: int) -> str:
        r = await state.commit(
            "s3", "n1/a", 1, [pack({"w": writer, "i": index})], writer=writer, index=index, floor=0
        )
        return r.status

    assert await write("w1", 1) == "ok"
    assert await write("w1", 1) == "dup"
    assert await write("w1", 2) == "ok"
    assert await write("w1", 1) == "dup"
    assert await write("w2", 1) == "ok"  # a new runner starts its own numbering
    assert await write("", 0) == "ok"  # no token: not deduplicated (system writes)
    assert await write("", 0) == "ok"
    logged = [e["w"] + str(e["i"]) for _, e in await state.events_after("s3", 0)]
    assert logged == ["w11", "w12", "w21", "0", "0"]


async def test_takeover_bumps_the_epoch_and_fences_the_old_owner(redis_client) -> None:
    state = RedisState(redis_client, KeySchema("t"))
    await state.acquire("s2", "n1", "n1/a", "u", create=True)
    refused = await state.acquire("s2", "n2", "n2/b", "u", create=True)
    assert refused.status == "owned" and refused.inc == "n1/a"
    taken = await state.acquire("s2", "n2", "n2/b", "u", create=True, dead_inc="n1/a")
    assert taken.status == "ok" and taken.epoch == 2
    late = await state.commit("s2", "n1/a", 1, [pack({"x": 1})], floor=0)
    assert late.status == "fenced"
    assert await state.events_after("s2", 0) == []
    forbidden = await state.acquire("s2", "n3", "n3/c", "mallory", create=True)
    assert forbidden.status == "forbidden"
    assert await state.release("s2", "n1/a", None, "stopped") == 0
    assert await state.release("s2", "n2/b", 2, "stopped") == 1
    system = await state.commit("s2", "", 0, [pack({"status": "x"})], floor=0)
    assert system.status == "ok"  # system writes only while unowned


async def test_a_start_over_its_own_failed_start_takes_a_new_epoch(redis_client) -> None:
    """A start that failed leaves its release to be retried; the next start of the same
    incarnation must not be undone by it (the late release names the old epoch)."""
    state = RedisState(redis_client, KeySchema("t"))
    failed = await state.acquire("s5", "n1", "n1/a", "u", create=True)
    again = await state.acquire("s5", "n1", "n1/a", "u", create=True)
    assert again.status == "mine" and again.epoch == failed.epoch + 1
    assert await state.release("s5", "n1/a", failed.epoch, "stopped") == 0
    answer = await state.commit("s5", "n1/a", again.epoch, [pack({"x": 1})], floor=0)
    assert answer.status == "ok"


async def test_admission_never_hands_out_more_slots_than_the_cap(redis_client) -> None:
    state = RedisState(redis_client, KeySchema("t"))
    got = [await state.admit("u", f"c{i}", "n1/a", 2, retry=False, score_ms=i) for i in range(2)]
    assert [a.status for a in got] == ["go", "go"]
    third = await state.admit("u", "c2", "n2/b", 2, retry=False, score_ms=0)
    # The newest claim wins even with an older clock; the oldest loop must stop first.
    assert third.status == "wait" and third.evicted == [("c0", "n1/a")]
    assert (await state.admit("u", "c2", "n2/b", 2, retry=True)).status == "wait"
    assert await state.release_slot("u", "c0", "n1/a")
    assert (await state.admit("u", "c2", "n2/b", 2, retry=True)).status == "go"
    loops = await state.user_loops("u")
    assert loops == {"c1": "live:n1/a", "c2": "live:n2/b"}
    # A waiter pushed out by newer claims before it could start learns it was evicted.
    for sid in ("c3", "c4", "c5"):
        assert (await state.admit("u", sid, "n1/a", 2, retry=False, score_ms=0)).status == "wait"
    assert (await state.admit("u", "c3", "n1/a", 2, retry=True)).status == "evicted"
    assert await redis_client.hlen(state.keys.user_loops("u")) == 2  # c1, c2 stopping


async def test_an_accept_retried_after_a_lost_reply_is_recorded_once(redis_client) -> None:
    state = RedisState(redis_client, KeySchema("t"))
    await state.acquire("s4", "n1", "n1/a", "u", create=True)
    k = state.keys
    action = pack({"action": "message"})
    first = await state.accept("s4", "u", action, 100, 10, token="token-1", floor=0)
    retry = await state.accept("s4", "u", action, 100, 10, token="token-1", floor=0)  # a resend
    other = await state.accept("s4", "u", action, 100, 10, token="token-2", floor=0)
    assert first.event_id == retry.event_id == 1 and other.event_id == 2
    assert await redis_client.xlen(k.inbox("s4")) == 2
    assert await redis_client.xlen(k.events("s4")) == 2


async def test_a_speculative_commit_goes_through_only_under_the_id_its_accept_gave(
    redis_client,
) -> None:
    """A commit carrying its action's accept token (the action was dispatched before the
    accept answered) is written only if that accept logged the action under the id the
    commit names: otherwise 'unaccepted', and nothing changes."""
    state = RedisState(redis_client, KeySchema("t"))
    await state.acquire("s4", "n1", "n1/a", "u", create=True)
    answer = [pack({"r": "answer"})]

    async def commit(cause: int, token: str) -> str:
        r = await state.commit("s4", "n1/a", 1, answer, cause=cause, accepted_as=token, floor=0)
        return r.status

    assert await commit(1, "tok-1") == "unaccepted"  # its accept has not run (yet)
    assert await state.events_after("s4", 0) == []
    # Another action is logged first: ours lands as 2, not as the predicted 1.
    await state.accept(
        "s4", "u", pack({"action": "message", "n": "other"}), 100, 10, token="tok-0", floor=0
    )
    await state.accept(
        "s4", "u", pack({"action": "message", "n": "ours"}), 100, 10, token="tok-1", floor=0
    )
    before = await state.meta("s4")
    assert await commit(1, "tok-1") == "unaccepted"
    assert await state.meta("s4") == before
    assert [i for i, _ in await state.events_after("s4", 0)] == [1, 2]
    # Under the id it was given it goes through, once.
    assert await commit(2, "tok-1") == "ok"
    assert await commit(2, "tok-1") == "dup"
    assert [e.get("r", e.get("n")) for _, e in await state.events_after("s4", 0)] == [
        "other",
        "ours",
        "answer",
    ]
    assert (await state.meta("s4"))["applied"] == "2"


async def test_only_an_acquire_that_takes_a_retiring_conversation_keeps_it(
    redis_client,
) -> None:
    """A retiring conversation's keys expire after the retention unless a node takes it:
    another user's attempt, a purge's mark or a join's cursor past its last event leave
    them expiring (before, any acquire made them persist: a stranger could keep them)."""
    state = RedisState(redis_client, KeySchema("t"))
    await state.acquire("r", "n1", "n1/a", "u", create=True)
    await state.release("r", "n1/a", 1, "stopped", retention_ms=60_000)
    meta = state.keys.conv("r")
    assert 0 < await redis_client.pttl(meta) <= 60_000
    stranger = await state.acquire("r", "n2", "n2/b", "mallory", create=False)
    ahead = await state.acquire("r", "n2", "n2/b", "u", create=False, latest=5)
    await state.mark_purging("r", 30)
    purging = await state.acquire("r", "n2", "n2/b", "u", create=False)
    assert (stranger.status, ahead.status, purging.status) == ("forbidden", "ahead", "purging")
    assert ahead.applied == 0  # the last event id, in place of applied
    assert 0 < await redis_client.pttl(meta) <= 60_000
    await state.unmark_purging("r")
    taken = await state.acquire("r", "n2", "n2/b", "u", create=False, latest=0)
    assert taken.status == "ok" and await redis_client.pttl(meta) == -1


async def test_every_write_keeps_the_largest_event_a_record_made_since_has_logged(
    redis_client,
) -> None:
    """``largest`` (the meta hash): the bytes of the largest event logged, kept by
    accept, commit and rewind, so that a reader can bound a plain XRANGE's bytes by its
    count (``state.SizeHint``); a record older than the field has none (unknown: read
    with the script) and no write makes one up."""
    state = RedisState(redis_client, KeySchema("t"))
    meta = state.keys.conv("big")

    async def largest() -> int | None:
        value = await redis_client.hget(meta, "largest")
        return None if value is None else int(value)

    await state.acquire("big", "n1", "n1/a", "u", create=True)
    assert await largest() == 0
    small, big = pack({"action": "message", "x": "y" * 10}), pack({"x": "z" * 5000})
    accepted = await state.accept("big", "u", small, 100, 10, floor=0)
    assert await largest() == len(small)
    await state.commit("big", "n1/a", 1, [small, big, small], cause=accepted.event_id, floor=0)
    assert await largest() == len(big)
    await state.accept("big", "u", small, 100, 10, floor=0)
    assert await largest() == len(big)
    await redis_client.hset(meta, "seq", 2)  # as if a failover lost events 3 and 4
    notice_id, _ = await state.rewind("big", 9, 2)
    assert notice_id == 10 and await largest() == len(big)
    await redis_client.hdel(meta, "largest")  # a record from before the field
    await state.accept("big", "u", pack({"x": "w" * 9000}), 100, 10, floor=0)
    await state.commit("big", "n1/a", 1, [big], floor=0)
    assert await largest() is None
