"""Invariants checked from the durable event logs, the clients and the observer; the
figures each scenario reports; the results file and table.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis

from coordinator.codec import unpack
from coordinator.keys import KeySchema
from tests.chaos.observer import Observer
from tests.chaos.workload import ChaosClient, Workload

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "chaos.json"
HISTORY = 50  # scenario results kept in the file
SESSION_RESULTS: list[ScenarioResult] = []  # this pytest session's, for the summary table


Entries = list[tuple[bytes, dict[bytes, bytes]]]  # a stream range as Redis returns it


@dataclass(frozen=True)
class Logged:
    id: int
    event: dict[str, Any]
    epoch: int | None  # the writer's fencing epoch (agent events); None for user actions

    @property
    def source(self) -> str:
        return str(self.event.get("source", ""))

    @property
    def content(self) -> str | None:
        args = self.event.get("args")
        return str(args.get("content")) if isinstance(args, dict) else None

    @property
    def at(self) -> float:
        return datetime.fromisoformat(str(self.event["timestamp"])).timestamp()


async def read_log(
    redis: aioredis.Redis, keys: KeySchema, sid: str, *, last: int | None = None
) -> list[Logged]:
    """The conversation's event log straight from its Redis stream (its ``last`` entries)."""
    if last is None:
        rows = cast(Entries, await redis.xrange(keys.events(sid)))
    else:
        rows = cast(Entries, await redis.xrevrange(keys.events(sid), count=last))[::-1]
    return [_logged(entry) for entry in rows]


def _logged(entry: tuple[bytes, dict[bytes, bytes]]) -> Logged:
    entry_id, fields = entry
    epoch = fields.get(b"e")
    return Logged(
        int(entry_id.decode().split("-")[0]),
        unpack(fields[b"d"]),
        int(epoch) if epoch is not None else None,
    )


async def read_logs(
    redis: aioredis.Redis, keys: KeySchema, sids: list[str]
) -> dict[str, list[Logged]]:
    return {sid: await read_log(redis, keys, sid) for sid in sids}


def replies(log: list[Logged]) -> Counter[str]:
    return Counter(e.content for e in log if e.source == "agent" and e.content is not None)


def unanswered(logs: dict[str, list[Logged]]) -> list[str]:
    """Logged user actions without an agent reply (acknowledged or not)."""
    out = []
    for log in logs.values():
        answered = replies(log)
        out += [
            e.content
            for e in log
            if e.source == "user" and e.content is not None and not answered[e.content]
        ]
    return out


def first_reply_after(log: list[Logged], t: float) -> float | None:
    return next((e.at for e in log if e.source == "agent" and e.at > t), None)


@dataclass
class Verdict:
    """What broke, by invariant (empty lists: all held)."""

    lost: list[str] = field(default_factory=list)  # (a) acknowledged, never answered
    duplicates: list[str] = field(default_factory=list)  # (b) answered or logged twice
    gaps: list[str] = field(default_factory=list)  # (c) a client's ids not 1..N
    double_loops: list[str] = field(default_factory=list)  # (d) one conversation, two nodes
    over_cap: list[str] = field(default_factory=list)  # (e) a user above the cap
    other: list[str] = field(default_factory=list)  # order, acks, fencing epochs, unanswered

    def problems(self) -> list[str]:
        out = []
        for name, items in asdict(self).items():
            out += [f"{name}: {item}" for item in items[:10]]
            if len(items) > 10:
                out.append(f"{name}: ... {len(items) - 10} more")
        return out


def check(
    logs: dict[str, list[Logged]],
    workload: Workload,
    observer: Observer,
) -> Verdict:
    v = Verdict(double_loops=list(observer.double_loops), over_cap=list(observer.over_cap))
    for sid, log in logs.items():
        _check_log(sid, log, v)
    for client in workload.clients:
        _check_client(client, logs[client.sid], v)
    v.other += [f"stall: {s}" for s in workload.stalls]
    return v


def _check_log(sid: str, log: list[Logged], v: Verdict) -> None:
    ids = [e.id for e in log]
    if ids != list(range(1, len(ids) + 1)):
        v.other.append(f"{sid}: log ids are not 1..{len(ids)}")
    users = Counter(e.content for e in log if e.source == "user" and e.content is not None)
    v.duplicates += [f"{sid}: action {c!r} logged {n} times" for c, n in users.items() if n > 1]
    answered = replies(log)
    v.duplicates += [f"{sid}: {c!r} answered {n} times" for c, n in answered.items() if n > 1]
    v.other += [f"{sid}: reply to {c!r}, never asked" for c in answered if c not in users]
    # In order: the replies come in the order the actions were logged, each after its action.
    asked = [e.content for e in log if e.source == "user" and answered[e.content or ""]]
    told = [e.content for e in log if e.source == "agent" and users[e.content or ""]]
    if asked != told:
        v.other.append(f"{sid}: replies out of action order")
    logged_at = {e.content: e.id for e in log if e.source == "user"}
    v.other += [
        f"{sid}: reply {e.id} to {e.content!r} precedes the action"
        for e in log
        if e.source == "agent" and logged_at.get(e.content, 0) > e.id
    ]
    # Fencing: once a newer owner wrote, no older owner writes again.
    epochs = [e.epoch for e in log if e.epoch is not None and e.epoch > 0]
    v.other += [
        f"{sid}: epoch {b} wrote after epoch {a}" for a, b in itertools.pairwise(epochs) if b < a
    ]
    v.other += [f"{sid}: logged action {c!r} never answered" for c in users if not answered[c]]


def _check_client(client: ChaosClient, log: list[Logged], v: Verdict) -> None:
    by_id = {e.id: e for e in log}
    answered = replies(log)
    for ack in client.acked:
        logged = by_id.get(ack.event_id)
        if logged is None or logged.source != "user" or logged.content != ack.content:
            v.other.append(f"{client.name}: ack id {ack.event_id} is not {ack.content!r}")
        if not answered[ack.content]:
            v.lost.append(f"{client.name}: {ack.content!r} (id {ack.event_id})")
    ids = client.ids
    if ids != list(range(1, len(log) + 1)):
        v.gaps.append(f"{client.name}: received {_runs(ids)}, log has 1..{len(log)}")
        return
    for got in client.events:
        want = by_id[int(got["id"])].event
        if {k: got.get(k) for k in want} != want:
            v.gaps.append(f"{client.name}: event {got['id']} differs from the log")
            return


def _runs(ids: list[int]) -> str:
    """Ids as runs, e.g. '1-40, 39-52, 60-61' (shows gaps and repeats briefly)."""
    if not ids:
        return "nothing"
    runs, start, prev = [], ids[0], ids[0]
    for i in ids[1:]:
        if i != prev + 1:
            runs.append(f"{start}-{prev}")
            start = i
        prev = i
    runs.append(f"{start}-{prev}")
    return ", ".join(runs[:12]) + (" ..." if len(runs) > 12 else "")


@dataclass
class ScenarioResult:
    scenario: str
    passed: bool
    detect_s: float | None  # fault -> lost node's conversations released (see docs)
    served_again_s: float | None  # fault -> first echo in every affected conversation (max)
    actions_acked: int
    actions_lost: int
    duplicates: int
    affected: list[str]
    details: dict[str, Any]
    problems: list[str]
    at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))

    def row(self) -> str:
        return (
            f"{self.scenario:<14} {_s(self.detect_s):>9} {_s(self.served_again_s):>13} "
            f"{self.actions_acked:>6} {self.actions_lost:>5} {self.duplicates:>5}  "
            f"{'ok' if self.passed else 'FAILED'}"
        )


TABLE_HEADER = (
    f"{'scenario':<14} {'detect':>9} {'served again':>13} {'acked':>6} {'lost':>5} "
    f"{'dups':>5}  result"
)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def record(result: ScenarioResult, path: Path = RESULTS) -> None:
    """Add the result to the results file: latest per scenario, plus a bounded history."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    entry = asdict(result)
    data.setdefault("latest", {})[result.scenario] = entry
    data["history"] = [*data.get("history", []), entry][-HISTORY:]
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
