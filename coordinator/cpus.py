"""Which CPUs a node's agent workers run on, and its event loop (``agent_cpus``).

A node hands each action to a worker over a Unix socket. Such a write tells the kernel
that the writer is about to sleep, and the scheduler tends to wake the worker on the
writer's CPU; but a node's event loop goes on (the accept's reply, the ack to the
client) and the worker waits behind it for 200-300 us. Where the machine has no idle CPU
to steal it from there (a small VM), that wait is much of what isolation adds to an
action's round trip (BENCHMARKS.md, issue #18). ``agent_cpus`` keeps them apart: the
workers on the CPUs it names (``auto``: every CPU the node may use but the first), the
node's event loop on the others. Linux only (``os.sched_setaffinity``); off by default,
since nodes sharing a machine must each be started on CPUs of their own (``taskset``),
which ``auto`` then splits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ConfigError

AUTO = "auto"
MAX_CPUS = 8192  # Linux's own bound (NR_CPUS)


def parse(text: str) -> frozenset[int]:
    """A CPU list as ``taskset -c`` takes it ("1", "2-5", "0,4-7"); ConfigError if it is
    not one."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise ConfigError(
                f"agent_cpus must be 'auto' or a CPU list such as 1-3,6, got {text!r}"
            ) from None
        if low < 0 or high < low or high >= MAX_CPUS:
            raise ConfigError(f"agent_cpus: {part.strip()!r} is not a CPU range (in {text!r})")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def check(spec: str) -> None:
    """``spec`` (a config's ``agent_cpus``) is '', 'auto' or a CPU list."""
    if spec and spec != AUTO:
        parse(spec)


@dataclass(frozen=True)
class Placement:
    node: frozenset[int]  # the node's event loop
    workers: frozenset[int]  # every agent worker process

    def describe(self) -> str:
        return f"agent workers on CPUs {show(self.workers)}, the node's loop on {show(self.node)}"


def plan(spec: str) -> Placement | None:
    """Where the node's loop and its workers run for ``spec`` ('' : wherever the kernel
    puts them, None); ConfigError when the CPUs this process may use cannot be split so."""
    if not spec:
        return None
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError("agent_cpus needs Linux (os.sched_setaffinity); leave it unset")
    allowed = frozenset(os.sched_getaffinity(0))
    if spec == AUTO:
        if len(allowed) < 2:
            raise ConfigError(
                f"agent_cpus auto needs two CPUs or more; this node may use {show(allowed)}"
            )
        node = frozenset({min(allowed)})
        return Placement(node, allowed - node)
    workers = parse(spec)
    if not workers <= allowed:
        raise ConfigError(
            f"agent_cpus {spec!r} names CPUs {show(workers - allowed)}, which this node may "
            f"not use (it may use {show(allowed)})"
        )
    node = allowed - workers
    if not node:
        raise ConfigError(
            f"agent_cpus {spec!r} leaves no CPU for the node (it may use {show(allowed)}); "
            "leave one out"
        )
    return Placement(node, workers)


def pin_thread(cpus: frozenset[int]) -> frozenset[int]:
    """Run the calling thread on ``cpus`` (threads it starts later too); what it ran on
    before."""
    before = frozenset(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus)
    return before


def show(cpus: frozenset[int]) -> str:
    """``{0, 1, 2, 5}`` as ``0-2,5`` (what ``parse`` reads back)."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and ranges[-1][1] == cpu - 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
