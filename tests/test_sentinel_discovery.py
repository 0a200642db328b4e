"""Which master the Sentinels name (``coordinator.backends.discovery``): the answer in
the newest configuration epoch, taken once more than half of the Sentinels agree on it,
so that neither a Sentinel behind on a failover nor one that hangs decides (the first
case against real Sentinels: test_redis_failover.py)."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.sentinel import MasterNotFoundError

from coordinator.backends.discovery import GRACE, AskingAll, KeeperAskingAll, Tally
from tests.helpers import wait_until
from tests.redis_process import free_port
from tests.redis_topologies import SentinelServers


def _masters(host: str, port: int, epoch: int, *flags: str) -> dict[str, Any]:
    """``SENTINEL MASTERS`` as redis-py parses it, for the one master "m"."""
    return {
        "m": {
            "ip": host,
            "port": port,
            "config-epoch": epoch,
            "is_master": "master" in flags or not flags,
            "is_sdown": "s_down" in flags,
            "is_odown": "o_down" in flags,
        }
    }


def _tally(*answers: dict[str, Any]) -> Tally:
    tally = Tally("m")
    for masters in answers:
        tally.add(masters)
    return tally


def test_the_master_named_is_the_best() -> None:
    assert _tally().best() is None
    assert _tally(_masters("a", 1, 1), _masters("a", 1, 1)).best() == ("a", 1)


def test_the_newest_epoch_wins_over_more_answers_in_an_older_one() -> None:
    tally = _tally(_masters("old", 1, 3), _masters("old", 1, 3), _masters("new", 2, 4))
    assert tally.best() == ("new", 2)


def test_a_newer_epoch_heard_after_an_older_majority_wins() -> None:
    """Right after a failover only its leader may know of it: the two others agree on
    the old master, and the leader's answer, the last, is the one taken."""
    tally = _tally(_masters("old", 1, 1), _masters("old", 1, 1))
    assert tally.best() == ("old", 1)
    tally.add(_masters("new", 2, 2))
    assert tally.best() == ("new", 2)


def test_no_master_while_the_newest_configurations_is_down() -> None:
    """The newest epoch's master is down (its failover under way): the master of an
    older one, replaced, is not taken; the caller asks again."""
    tally = _tally(_masters("new", 2, 2, "s_down", "master"), _masters("old", 1, 1))
    assert tally.best() is None
    assert "newest configuration (epoch 2) is down" in str(tally.not_found([]))


def test_answers_that_are_down_or_about_another_master_are_not_counted() -> None:
    tally = _tally(
        _masters("a", 1, 1, "s_down", "master"),
        _masters("a", 1, 1, "o_down", "master"),
        {"other": _masters("a", 1, 1)["m"]},
    )
    tally.add(["not", "a", "mapping"])
    assert tally.best() is None


def test_an_answer_that_says_nothing_of_the_master_is_no_answer() -> None:
    """A Sentinel that does not watch the master (restarted without its file) answers
    {}: it does not count toward "more than half answered"."""
    tally = Tally("m")
    assert not tally.add({}) and not tally.add(["not", "a", "mapping"])
    assert tally.add(_masters("a", 1, 1, "s_down", "master"))
    assert tally.add(_masters("a", 1, 1))


def test_a_disagreement_names_each_master_named() -> None:
    assert _tally(_masters("a", 1, 1), _masters("a", 1, 1)).disagreement() == ""
    tally = _tally(_masters("old", 1, 1), _masters("old", 1, 1), _masters("new", 2, 2))
    assert tally.disagreement() == "1 named new:2 (epoch 2); 2 named old:1 (epoch 1)"


def test_in_one_epoch_the_most_named_master_is_the_best() -> None:
    tally = _tally(_masters("a", 1, 0), _masters("b", 2, 0), _masters("b", 2, 0))
    assert tally.best() == ("b", 2)


async def test_a_sentinel_that_hangs_holds_up_no_discovery(
    redis_sentinel: SentinelServers,
) -> None:
    """The first Sentinel stopped (SIGSTOP) and a minute's socket timeout: the master is
    found from the two others (``GRACE`` after they answered); the question left with the
    stopped one is cancelled by ``aclose``. The blocking discovery (the lease keeper's)
    asks the others first next time, and not the stopped one once they agree."""
    servers = redis_sentinel
    hung = servers.sentinels[0]
    master = servers.master_address()
    asking = AskingAll(servers.sentinel_addresses, sentinel_kwargs={"socket_timeout": 60})
    keeper = KeeperAskingAll(servers.sentinel_addresses, sentinel_kwargs={"socket_timeout": 1})
    os.kill(hung.pid, signal.SIGSTOP)
    try:
        async with asyncio.timeout(20):  # a third of the hung Sentinel's timeout
            assert await asking.discover_master(servers.master_name) == master
        assert len(asking._asking) == 1  # the hung one's, still waiting
        assert await asyncio.to_thread(keeper.discover_master, servers.master_name) == master
        silent = keeper.sentinels[-1]
        assert silent.connection_pool.connection_kwargs["port"] == hung.port
        # Next time the two others agree first: the silent one is not asked (its
        # timeout would hold the keeper's renewal up).
        asked: list[str] = []
        real = silent.sentinel_masters

        def counted() -> Any:
            asked.append("asked")
            return real()

        silent.sentinel_masters = counted
        assert await asyncio.to_thread(keeper.discover_master, servers.master_name) == master
        assert asked == []
        await asking.aclose()
        assert not asking._asking
    finally:
        os.kill(hung.pid, signal.SIGCONT)
    for blocking in keeper.sentinels:
        blocking.close()


async def test_aclose_in_the_middle_of_a_discovery_leaves_no_question_out(
    redis_sentinel: SentinelServers,
) -> None:
    """Two Sentinels of three stopped: no answer can be taken before their timeouts.
    ``aclose`` then ends the discovery and every question it left."""
    servers = redis_sentinel
    hung = servers.sentinels[:2]
    asking = AskingAll(servers.sentinel_addresses, sentinel_kwargs={"socket_timeout": 60})
    for sentinel in hung:
        os.kill(sentinel.pid, signal.SIGSTOP)
    try:
        caller = asyncio.ensure_future(asking.discover_master(servers.master_name))
        await asyncio.sleep(0.5)
        assert not caller.done()
        await asking.aclose()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert all(t.done() for t in asking._asking)
        assert all(t.done() for t in asking._discovering.values())
    finally:
        for sentinel in hung:
            os.kill(sentinel.pid, signal.SIGCONT)


async def test_a_sentinel_that_hangs_through_a_failover_does_not_hide_its_end(
    redis_sentinel: SentinelServers,
) -> None:
    """The first Sentinel stopped, then the master killed: while the two others flag it
    down, none names a sound master, and each discovery waited for the stopped one's
    answer, a minute here (3 s by default, for every caller sharing the question): the
    promotion went unseen that long. Now each says "no master" GRACE after the two
    answered, and the next finds the new master."""
    servers = redis_sentinel
    old = servers.master()  # (asked before a Sentinel stops: it asks them all)
    replica = next(n for n in servers.data_nodes if n is not old)
    hung = servers.sentinels[0]
    asking = AskingAll(servers.sentinel_addresses, sentinel_kwargs={"socket_timeout": 60})
    os.kill(hung.pid, signal.SIGSTOP)
    said: list[str] = []
    try:
        old.kill()
        async with asyncio.timeout(40):  # well under the stopped Sentinel's timeout
            while True:
                try:
                    if await asking.discover_master(servers.master_name) == replica.address:
                        break
                except MasterNotFoundError as exc:
                    said.append(str(exc))
                await asyncio.sleep(0.1)
        assert said, "no discovery during the failover"
        await asking.aclose()
    finally:
        os.kill(hung.pid, signal.SIGCONT)


def test_the_keeper_skips_a_hung_sentinel_once_half_answered_or_refused() -> None:
    """One Sentinel answers, one refuses, one hangs: after the first time, the hung one
    is not asked while the others tell enough (each try would hold a renewal up for
    its timeout)."""
    a, b, c = _Told(_masters("m1", 1, 1)), _Told(None), _Told(None)
    keeper = KeeperAskingAll([])
    keeper.sentinels = [a, b, c]
    for _ in range(3):
        assert keeper.discover_master("m") == ("m1", 1)
    assert (a.asked, b.asked, c.asked) == (3, 3, 1)


async def test_sentinels_that_refuse_are_no_answers(redis_sentinel: SentinelServers) -> None:
    """Two Sentinels of three refuse at once (down), the third answers after GRACE: its
    answer is waited for. Counting the refusals as answers, the discovery ended GRACE
    after them, with no master, every time."""
    servers = redis_sentinel
    listed = [("127.0.0.1", free_port()), ("127.0.0.1", free_port())]
    asking = AskingAll([*listed, servers.sentinels[0].address])
    slow = asking.sentinels[2]
    real = slow.sentinel_masters

    async def later() -> Any:
        await asyncio.sleep(GRACE * 1.5)
        return await real()

    slow.sentinel_masters = later
    try:
        assert await asking.discover_master(servers.master_name) == servers.master_address()
    finally:
        await asking.aclose()


class _Told:
    """A Sentinel's client as the blocking discovery uses it (one method), with a set
    answer: the keeper's order of asking, not Sentinel, is what is tested here."""

    def __init__(self, answer: dict[str, Any] | None) -> None:
        self.answer = answer
        self.asked = 0

    def sentinel_masters(self) -> dict[str, Any]:
        self.asked += 1
        if self.answer is None:
            raise RedisTimeoutError("Timeout reading from socket")
        return self.answer


def test_the_keeper_asks_a_sentinel_silent_last_time_when_the_others_name_no_master() -> None:
    """c timed out once, and is not asked while a and b name a master; then a and b
    flag it down (a failover) and c, back, names the new one: it is asked again (at most
    once in REASK seconds: each try of a hung one holds the renewal up).
    Before, skipped while the others answered, it stayed silent for good and the keeper
    found no master until they caught up."""
    a, b, c = _Told(_masters("old", 1, 1)), _Told(_masters("old", 1, 1)), _Told(None)
    keeper = KeeperAskingAll([])
    keeper.sentinels = [a, b, c]
    assert keeper.discover_master("m") == ("old", 1)
    assert c.asked == 1 and keeper.sentinels[-1] is c  # timed out: silent, asked last
    assert keeper.discover_master("m") == ("old", 1)
    assert c.asked == 1  # the others answered: not asked
    a.answer = b.answer = _masters("old", 1, 1, "s_down", "master")
    c.answer = _masters("new", 2, 2)
    with pytest.raises(MasterNotFoundError):  # within REASK of its silence: not yet
        keeper.discover_master("m")
    assert c.asked == 1
    keeper.REASK = 0.0
    assert keeper.discover_master("m") == ("new", 2)
    assert c.asked == 2


async def test_one_sentinel_down_and_one_hung_cost_late_not_the_timeout(
    redis_sentinel: SentinelServers,
) -> None:
    """Of three Sentinels one refuses, one hangs (a minute's timeout here) and one
    answers: the one answer is taken LATE after, not when the hung one times out."""
    servers = redis_sentinel
    hung = servers.sentinels[1]
    master = servers.master_address()
    listed = [("127.0.0.1", free_port()), hung.address, servers.sentinels[2].address]
    asking = AskingAll(listed, sentinel_kwargs={"socket_timeout": 60})
    os.kill(hung.pid, signal.SIGSTOP)
    try:
        async with asyncio.timeout(20):  # a third of the hung Sentinel's timeout
            assert await asking.discover_master(servers.master_name) == master
    finally:
        os.kill(hung.pid, signal.SIGCONT)
        await asking.aclose()


async def test_callers_asking_at_once_share_one_question(redis_sentinel: SentinelServers) -> None:
    """Twenty pool connections made at once (a failover reconnects them all) ask each
    Sentinel once between them, not twenty times. (Sentinel keeps no command counts:
    each Sentinel client's calls are counted on their way to it.)"""
    servers = redis_sentinel
    asking = AskingAll(servers.sentinel_addresses)
    calls = [0] * len(asking.sentinels)
    for i, sentinel in enumerate(asking.sentinels):
        real = sentinel.sentinel_masters

        async def counted(real: Any = real, i: int = i) -> Any:
            calls[i] += 1
            return await real()

        sentinel.sentinel_masters = counted
    found = await asyncio.gather(*(asking.discover_master(servers.master_name) for _ in range(20)))
    assert set(found) == {servers.master_address()}
    await wait_until(lambda: not asking._asking, what="every Sentinel's answer")
    assert calls == [1, 1, 1]
    # Once answered, the next caller asks again.
    await asking.discover_master(servers.master_name)
    await wait_until(lambda: not asking._asking, what="every Sentinel's answer")
    assert calls == [2, 2, 2]
    await asking.aclose()


async def test_a_caller_cancelled_leaves_the_shared_question_to_the_others(
    redis_sentinel: SentinelServers,
) -> None:
    servers = redis_sentinel
    asking = AskingAll(servers.sentinel_addresses)
    first = asyncio.ensure_future(asking.discover_master(servers.master_name))
    second = asyncio.ensure_future(asking.discover_master(servers.master_name))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == servers.master_address()
    assert first.cancelled()
    await asking.aclose()


async def test_a_shared_question_that_failed_fails_every_caller_and_is_asked_again() -> None:
    asking = AskingAll([("127.0.0.1", 1)])
    said = await asyncio.gather(
        *(asking.discover_master("m") for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(e, MasterNotFoundError) for e in said), said
    with pytest.raises(MasterNotFoundError, match=r"No master found for 'm'.*Connection"):
        await asking.discover_master("m")
    await asking.aclose()


def test_no_sentinel_answering_is_said() -> None:
    keeper = KeeperAskingAll([("127.0.0.1", 1)], sentinel_kwargs={"socket_timeout": 1})
    with pytest.raises(MasterNotFoundError, match=r"No master found for 'm'.*Connection"):
        keeper.discover_master("m")
