"""Process counters and their Prometheus text exposition (format 0.0.4), no dependency."""

from __future__ import annotations

from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Counters:
    """Monotonic counters of one node process."""

    actions_accepted: int = 0
    events_delivered: int = 0


@dataclass(frozen=True)
class Sample:
    name: str
    kind: str  # gauge | counter
    help: str
    value: float


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render(node_id: str, samples: list[Sample]) -> str:
    """Samples as Prometheus text, each with HELP and TYPE lines and a ``node`` label."""
    lines = []
    node = _label(node_id)
    for s in samples:
        lines.append(f"# HELP {s.name} {s.help}")
        lines.append(f"# TYPE {s.name} {s.kind}")
        lines.append(f'{s.name}{{node="{node}"}} {_number(s.value)}')
    return "\n".join(lines) + "\n"


def node_samples(
    counters: Counters,
    *,
    loops: int,
    connections: int,
    redis_up: bool,
    lease_valid: bool,
    speculated: int = 0,
    speculations_lost: int = 0,
) -> list[Sample]:
    return [
        Sample("coordinator_local_loops", "gauge", "Agent loops running on this node.", loops),
        Sample(
            "coordinator_local_connections",
            "gauge",
            "Socket.io connections joined on this node.",
            connections,
        ),
        Sample(
            "coordinator_actions_accepted_total",
            "counter",
            "User actions this node accepted durably.",
            counters.actions_accepted,
        ),
        Sample(
            "coordinator_events_delivered_total",
            "counter",
            "Events this node delivered to its socket.io connections.",
            counters.events_delivered,
        ),
        Sample(
            "coordinator_speculative_dispatches_total",
            "counter",
            "Actions dispatched to their agent before their accept answered.",
            speculated,
        ),
        Sample(
            "coordinator_speculations_lost_total",
            "counter",
            "Speculative dispatches not logged as predicted (answers dropped, agent replaced).",
            speculations_lost,
        ),
        Sample("coordinator_redis_up", "gauge", "1 when Redis answers PING.", int(redis_up)),
        Sample(
            "coordinator_lease_valid",
            "gauge",
            "1 while this node's membership lease is valid.",
            int(lease_valid),
        ),
    ]


@dataclass
class NodeMetrics:
    """What one node counts (the counters the core increments)."""

    speculative_dispatches: int = 0
    speculations_lost: int = 0

    def speculated(self) -> None:
        self.speculative_dispatches += 1

    def speculation_lost(self) -> None:
        self.speculations_lost += 1
