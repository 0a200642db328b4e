"""The file store's own faults and promises: torn tails, the index, several processes on
one directory, a purge seen through another store's cache. Real files in tmp_path."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from coordinator.codec import unpack
from coordinator.eventstore import FileEventStore, StoreCorrupt, StoreUnavailable, filelog, mounts
from coordinator.eventstore import framing as fr
from coordinator.eventstore.filestore import QUICK_LISTING
from tests.eventstore_helpers import check_log, events, read_all
from tests.helpers import wait_until
from tests.processes import REPO, child_env


@pytest.fixture
async def files(tmp_path: Path) -> AsyncIterator[list[FileEventStore]]:
    """Stores opened during the test (``await _open(files, path)``), closed after it."""
    opened: list[FileEventStore] = []
    yield opened
    for store in opened:
        await store.aclose()


async def _open(opened: list[FileEventStore], path: Path, **options: object) -> FileEventStore:
    store = FileEventStore(path, **options)  # type: ignore[arg-type]
    await store.open()
    opened.append(store)
    return store


def _log(path: Path, sid: str) -> Path:
    return path / "conversations" / f"{sid}.log"


def _whole_records(log: Path) -> int:
    """Bytes of whole records at the start of ``log`` (the rest would be a torn tail)."""
    fd = os.open(log, os.O_RDONLY)
    try:
        reader = fr.RecordReader(fd, fr.HEADER_SIZE)
        while reader.next() is not None:
            pass
        return reader.pos
    finally:
        os.close(fd)


TORN_TAILS = {
    "half a record": lambda: fr.event_record(11, 1, b"x" * 40)[:30],
    "zeros": lambda: bytes(4096),
    "a length past the end": lambda: b"\xff\xff\x00\x00" + bytes(12),
    "a bad checksum": lambda: bytes([1]) + fr.event_record(11, 1, b"abc")[1:],
}


@pytest.mark.parametrize("tail", TORN_TAILS, ids=list(TORN_TAILS))
async def test_a_torn_tail_is_cut_off_and_kept_aside(
    files: list[FileEventStore], tmp_path: Path, tail: str
) -> None:
    path = tmp_path / "events"
    first = await _open(files, path)
    await first.append("c1", 1, events(1, 10), user="u")
    log = _log(path, "c1")
    whole = log.stat().st_size
    with log.open("ab") as f:  # a crash in the middle of the next append
        f.write(TORN_TAILS[tail]())

    store = await _open(files, path)  # another node, or this one restarted
    assert await store.read("c1") == events(1, 10)  # readers stop at the tail
    assert await store.last_id("c1") == 10
    assert (await store.append("c1", 1, events(11, 12), user="u")).written == 2
    assert await store.read("c1") == events(1, 12)
    assert _whole_records(log) == log.stat().st_size
    aside = list((path / "torn").iterdir())
    assert [p.read_bytes() for p in aside] == [TORN_TAILS[tail]()]
    assert aside[0].name.startswith("c1.")
    assert await first.read("c1") == events(1, 12)  # the first store's cache follows
    assert log.stat().st_size > whole


async def test_a_cut_last_batch_ends_the_log_at_its_last_whole_event(
    files: list[FileEventStore], tmp_path: Path
) -> None:
    path = tmp_path / "events"
    store = await _open(files, path)
    await store.append("c1", 1, events(1, 10), user="u")
    log = _log(path, "c1")
    os.truncate(log, log.stat().st_size - 5)  # the last record lost its end

    again = await _open(files, path)
    assert await again.last_id("c1") == 9
    # The owner sends from the store's last id again (Redis still has the events).
    result = await again.append("c1", 1, events(9, 12), user="u")
    assert (result.status, result.written) == ("ok", 3)
    check_log(await again.read("c1"), 12)


@pytest.mark.parametrize("keep", [3, fr.HEADER_SIZE, fr.HEADER_SIZE + 5])
async def test_a_torn_first_write_leaves_an_empty_conversation(
    files: list[FileEventStore], tmp_path: Path, keep: int
) -> None:
    path = tmp_path / "events"
    store = await _open(files, path)
    await store.append("c1", 1, events(1, 3), user="u")
    os.truncate(_log(path, "c1"), keep)

    again = await _open(files, path)
    assert await again.conversation("c1") is None
    assert await again.read("c1") == []
    assert await again.count_conversations("u") == 0
    assert (await again.append("c1", 1, events(1, 2), user="u")).written == 2
    check_log(await again.read("c1"), 2)
    assert await again.count_conversations("u") == 1


async def test_reads_start_from_the_index_and_survive_losing_it(
    files: list[FileEventStore], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "events"
    store = await _open(files, path, fsync="none")
    total = 20_000
    for first in range(1, total + 1, 1000):
        await store.append("c1", 1, events(first, first + 999), user="u")
    index = path / "conversations" / "c1.idx"
    assert index.stat().st_size == fr.entries_for(total) * fr.ENTRY_SIZE
    log_size = _log(path, "c1").stat().st_size

    read_bytes = 0
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        nonlocal read_bytes
        data = real_pread(fd, n, offset)
        read_bytes += len(data)
        return data

    monkeypatch.setattr(os, "pread", counting_pread)
    assert await store.read("c1", total - 100, 5) == events(total - 99, total - 95)
    assert read_bytes < log_size / 2, "a read near the end scanned the log from its start"
    monkeypatch.undo()

    index.unlink()  # lost: reads scan, the next writer rebuilds it
    assert await store.read("c1", 12_345, 3) == events(12_346, 12_348)
    await store.append("c1", 1, events(total + 1, total + 1), user="u")
    assert index.stat().st_size == fr.entries_for(total + 1) * fr.ENTRY_SIZE

    # Damaged: entries that do not match the log are not used.
    with index.open("r+b") as f:
        f.seek(fr.ENTRY_SIZE * 100)
        f.write(os.urandom(fr.ENTRY_SIZE * 50))
    reopened = await _open(files, path)
    assert await reopened.read("c1", 6400 + 10, 2) == events(6411, 6412)
    check_log(await read_all(reopened, "c1", page=4096), total + 1)


async def test_writer_processes_share_one_directory(
    files: list[FileEventStore], tmp_path: Path
) -> None:
    """Two node processes and this one move the same conversation's events at once."""
    path, total, go = tmp_path / "events", 3000, tmp_path / "go"
    names = ["p1", "p2"]
    writer = [sys.executable, "-m", "tests.eventstore_writer", str(path), "shared", str(total)]
    procs = [
        await asyncio.create_subprocess_exec(
            *writer, name, str(go), cwd=REPO, env=child_env(), stdout=asyncio.subprocess.PIPE
        )
        for name in names
    ]
    store = await _open(files, path, fsync="none")
    await wait_until(lambda: all(go.with_name(f"go.{n}.ready").exists() for n in names), timeout=30)
    go.touch()
    written = 0
    while (last := await store.last_id("shared")) < total:
        batch = [(i, d) for i, d in events(last + 1, min(total, last + 25), "here")]
        written += (await store.append("shared", 1, batch, user="u")).written
    outputs = [await proc.communicate() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    counts = [json.loads(out)["written"] for out, _ in outputs]
    assert sum(counts) + written == total

    stored = await read_all(store, "shared")
    check_log(stored, total)
    writers = {unpack(data).get("w", "here") for _, data in stored}
    assert len(writers) >= 2, f"the writers did not overlap: {writers}"
    assert _whole_records(_log(path, "shared")) == _log(path, "shared").stat().st_size


async def test_a_purge_through_another_store_is_seen(
    files: list[FileEventStore], tmp_path: Path
) -> None:
    path = tmp_path / "events"
    one, two = await _open(files, path), await _open(files, path)
    await one.append("c1", 1, events(1, 3), user="u")
    assert await one.last_id("c1") == 3  # cached in `one`
    assert await two.purge("c1") == (3, sum(len(d) for _, d in events(1, 3)))
    assert (await one.append("c1", 1, events(4, 4), user="u")).status == "gap"
    assert (await one.append("c1", 1, events(1, 2, "new"), user="u")).written == 2
    assert await two.read("c1") == events(1, 2, "new")


async def test_a_quota_check_under_the_quota_counts_markers_without_reading_logs(
    files: list[FileEventStore], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "events"
    store = await _open(files, path)
    for sid in ("c1", "c2", "c3"):
        await store.append(sid, 1, events(1, 1), user="u")
    (path / "users" / "u-u" / "c4").touch()  # a marker whose log a crash never wrote
    assert await store.count_conversations("u") == 3
    assert (await store.lookup("new", "u", quota=4)).count == 3  # at the quota: exact
    read: list[Path] = []
    real = filelog.stored_for

    def stored_for(log: Path, user: str) -> bool:
        read.append(log)
        return real(log, user)

    monkeypatch.setattr(filelog, "stored_for", stored_for)
    assert 3 <= (await store.lookup("new", "u", quota=5)).count < 5
    assert read == []  # a user's 1,000 conversations are not 1,000 reads per creation
    assert (await store.lookup("new", "u", quota=4)).count == 3
    assert len(read) == 4


async def test_a_lookup_that_finds_no_log_is_answered_without_the_store_threads(
    files: list[FileEventStore], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "events"
    store = await _open(files, path)
    assert store._local == mounts.is_local(path)  # what open() found (ext4 here)
    store._local = True  # on a local file system, wherever the test runs
    await store.append("c1", 1, events(1, 2), user="u")
    hops: list[str] = []
    real = store._run

    async def counted(fn: Callable[..., Any], *args: object) -> Any:
        hops.append(fn.__name__)
        return await real(fn, *args)

    monkeypatch.setattr(store, "_run", counted)
    assert (await store.lookup("new", "u", quota=10)).count == 1
    assert (await store.lookup("new", "nobody", quota=10)).count == 0
    assert (await store.lookup("new", "u")).count == 0  # no quota: not counted
    assert hops == []
    found = await store.lookup("c1", "u", quota=10)  # a log: read on a thread
    assert found.known is not None and found.known.last_id == 2
    assert (await store.lookup("new", "u", quota=1)).count == 1  # at the quota: exact
    assert hops == ["_lookup_sync", "_lookup_sync"]
    many = path / "users" / "u-many"
    many.mkdir()
    for i in range(QUICK_LISTING + 1):  # markers a crash left without logs
        (many / f"m{i}").touch()
    assert (await store.lookup("new", "many", quota=1000)).count == QUICK_LISTING + 1
    assert hops[-1] == "_lookup_sync"  # too many markers to list on the event loop
    (many / "m0").unlink()
    assert (await store.lookup("new", "many", quota=1000)).count == QUICK_LISTING
    assert len(hops) == 3
    (path / "users" / "u-odd").write_text("")  # a user's folder that is not one
    with pytest.raises(StoreUnavailable):
        await store.lookup("new", "odd", quota=1000)
    store._local = False  # as on a network file system: every lookup on a thread
    assert (await store.lookup("new2", "u", quota=10)).count == 1
    assert len(hops) == 4


def test_the_file_system_of_a_path_is_that_of_its_deepest_mount(tmp_path: Path) -> None:
    table = "\n".join(
        [
            "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw",
            "40 27 0:50 / /srv/events rw,relatime shared:5 - nfs4 host:/export rw,vers=4.2",
            "41 27 0:51 / /srv/events rw,relatime - tmpfs tmpfs rw",  # over it, in effect
            "42 27 0:52 / /mnt/my\\040disk rw - fuse.sshfs me@host:/ rw",
            "43 27 0:53 / /srv/ev rw - nfs host:/ev rw",
            "a line that is not a mount",
        ]
    )
    assert mounts.file_system(Path("/srv/events/conversations"), table) == "tmpfs"
    assert mounts.file_system(Path("/srv/events"), table) == "tmpfs"
    assert mounts.file_system(Path("/srv/evening"), table) == "ext4"  # not under /srv/ev
    assert mounts.file_system(Path("/srv/ev/x"), table) == "nfs"
    assert mounts.file_system(Path("/mnt/my disk/events"), table) == "fuse.sshfs"
    assert mounts.file_system(Path("/var/lib"), table) == "ext4"
    assert mounts.file_system(Path("/var/lib"), "") == ""
    here = mounts.file_system(tmp_path.resolve(), mounts.MOUNTINFO.read_text())  # the real one
    assert here and mounts.is_local(tmp_path) == (here in mounts.LOCAL)


async def test_names_stay_inside_the_directory(files: list[FileEventStore], tmp_path: Path) -> None:
    path = tmp_path / "events"
    store = await _open(files, path)
    await store.append("c1", 1, events(1, 1), user="..")
    await store.append("c2", 1, events(1, 1), user=".")
    assert (path / "users" / "u-.." / "c1").is_file()
    assert (path / "users" / "u-." / "c2").is_file()
    assert await store.count_conversations("..") == 1
    assert sorted(os.listdir(tmp_path)) == ["events"]
    assert (path / "store-id").read_text().strip() == store.identity()


async def test_unusable_directories_and_foreign_files_are_clear_errors(
    files: list[FileEventStore], tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(StoreUnavailable, match="a-file"):
        await _open(files, tmp_path / "a-file" / "events")

    path = tmp_path / "events"
    store = await _open(files, path)
    _log(path, "c1").write_bytes(b"something else entirely")
    with pytest.raises(StoreCorrupt, match=r"c1\.log"):
        await store.append("c1", 1, events(1, 1), user="u")

    with pytest.raises(ValueError, match="fsync"):
        FileEventStore(path, fsync="sometimes")  # type: ignore[arg-type]

    # Its directory removed under a running node: unavailable, naming what is missing
    # (before: an AssertionError with no words, "cannot store events: ").
    shutil.rmtree(path / "conversations")
    with pytest.raises(StoreUnavailable, match=r"No such file or directory \(.*c2\.log\)"):
        await store.append("c2", 1, events(1, 1), user="u")


async def test_a_left_over_marker_does_not_count(
    files: list[FileEventStore], tmp_path: Path
) -> None:
    """A purge cut short by a crash can leave a user's marker behind; the conversation
    id may then be stored again for someone else."""
    path = tmp_path / "events"
    store = await _open(files, path)
    await store.append("c1", 1, events(1, 1), user="bob")
    (path / "users" / "u-alice").mkdir()
    (path / "users" / "u-alice" / "c1").touch()
    (path / "users" / "u-alice" / "gone").touch()
    assert await store.count_conversations("alice") == 0
    assert await store.count_conversations("bob") == 1
