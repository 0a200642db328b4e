"""A node's metrics on prometheus_client, in a registry of the node's own.

Several nodes may share a process (the tests run many), so each ``NodeMetrics`` has its
own ``CollectorRegistry`` and never touches prometheus_client's global one; every series
carries a ``node`` label. Values come three ways:

- counters and histograms that the code updates as things happen (``actions_accepted``,
  ``events_delivered``, the latency histograms and their ``observe_*`` methods);
- values read at scrape time from whoever owns them (``gauge_from``/``counter_from``:
  loops, connections, the lease, the runner's speculation counts, the lease age);
- ``redis_up`` and Redis' memory, which need Redis asked, set by ``/metrics`` before it
  renders.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# What generate_latest writes: the Prometheus text format 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Histogram buckets, in seconds (upper bounds; +Inf is added).
# An ack waits for the action's accept: one Redis round trip (well under 1 ms on a LAN)
# unless Redis or the inbox is slow; 5 s is the manager's redis_timeout.
ACK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Accept to the agent's first answer: milliseconds for the echo agent, seconds to minutes
# for an agent that calls an LLM.
ANSWER_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1, 2.5, 5, 10, 30, 60, 120, 300),
)
# Commit to the write onto the connection: a pub/sub hop and the event loop's queue, so
# milliseconds; seconds mean an overloaded node or a slow catch-up read.
DELIVERY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# The connect handler: token, admission, the join's Redis calls and the first replay page;
# a join queued behind max_concurrent_joins may wait join_wait (10 s by default).
JOIN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# A lost node to its conversation served again: a dead node is noticed once its lease
# expires (node_ttl, 6 s by default) plus the reaper's sweep and the restart.
FAILOVER_BUCKETS = (0.5, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 30, 60, 120)
# How late a 50 ms tick of the node's event loop ran (looplag.py): under a millisecond
# when idle, tens near the rate a node sustains, seconds for a blocked loop.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

Read = Callable[[], "float | None"]
ReadMany = Callable[[], Mapping[str, float]]


@dataclass(frozen=True)
class Reading:
    """A value read at scrape time; ``read`` returning None leaves the sample out."""

    name: str
    kind: str  # gauge | counter
    help: str
    read: Read
    # A gauge with one more label: ``read_many`` gives its value per label value.
    label: str = ""
    read_many: ReadMany | None = None


class _Readings(Collector):
    """The collector of every ``Reading`` of one node, keyed by metric name."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.by_name: dict[str, Reading] = {}

    def collect(self) -> Iterator[Metric]:
        for r in list(self.by_name.values()):
            family: GaugeMetricFamily | CounterMetricFamily
            labels = ["node", r.label] if r.read_many is not None else ["node"]
            if r.kind == "counter":
                family = CounterMetricFamily(r.name, r.help, labels=labels)
            else:
                family = GaugeMetricFamily(r.name, r.help, labels=labels)
            try:
                if r.read_many is not None:
                    for key, many in r.read_many().items():
                        family.add_metric([self.node_id, key], float(many))
                    value = None
                else:
                    value = r.read()
            except Exception:
                # One broken reading must not fail the whole scrape.
                log.warning("metric %s could not be read", r.name, exc_info=True)
                value = None
            if value is not None:
                family.add_metric([self.node_id], float(value))
            yield family


# Sample lines whose value is integral, e.g. ``x{node="a"} 3.0``: written as ``3``.
_INTEGRAL = re.compile(rb"^([^#\n][^\n]* -?[0-9]+)\.0$", re.M)


class CollectorPauses:
    """The cyclic garbage collector's pauses in this process (``gc.callbacks``): a full
    collection walks every live object and the event loop serves no one meanwhile, so
    its count and its time belong beside a node's latencies (BENCHMARKS.md, #17)."""

    def __init__(self) -> None:
        self.full = 0  # full collections (generation 2)
        self.seconds = 0.0  # time in every collection
        self.longest = 0.0  # the longest one, seconds
        self._began = 0.0

    def __call__(self, phase: str, info: Mapping[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        took = time.perf_counter() - self._began
        self.seconds += took
        self.longest = max(self.longest, took)
        if info.get("generation") == 2:
            self.full += 1


# One per process, installed with the first node's metrics: nodes sharing a process
# (tests) report the same collector.
GC_PAUSES = CollectorPauses()


class NodeMetrics:
    """The counters, gauges and histograms of one node, and their exposition."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.registry = CollectorRegistry()
        self._readings = _Readings(node_id)
        self.registry.register(self._readings)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, ["node"], registry=self.registry).labels(node_id)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["node"], registry=self.registry).labels(node_id)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            made = Histogram(name, doc, ["node"], registry=self.registry, buckets=buckets)
            return made.labels(node_id)

        # The hot path's counts are plain integers (an attribute increment, not a locked
        # prometheus_client counter), read at scrape time like the speculation counts.
        self.actions = 0
        self.deliveries = 0
        self.counter_from(
            "coordinator_actions_accepted",
            "User actions this node accepted durably.",
            lambda: self.actions,
        )
        self.counter_from(
            "coordinator_events_delivered",
            "Events this node delivered to its socket.io connections.",
            lambda: self.deliveries,
        )
        self.redis_up = gauge("coordinator_redis_up", "1 when Redis answers PING.")
        # At its maxmemory Redis refuses every write (README "Event store"): alert well
        # before used reaches max. Absent while Redis cannot be asked (show_redis_memory).
        self._redis_memory = [
            Gauge(name, doc, ["node"], registry=self.registry)
            for name, doc in (
                (
                    "coordinator_redis_memory_used_bytes",
                    "Redis' used_memory (the fullest master's on a Redis Cluster).",
                ),
                (
                    "coordinator_redis_maxmemory_bytes",
                    "That Redis' maxmemory, past which it refuses writes (0: no bound).",
                ),
            )
        ]
        self.ack_seconds = histogram(
            "coordinator_action_ack_seconds",
            "oh_user_action received to its ack sent (accepted or refused).",
            ACK_BUCKETS,
        )
        self.answer_seconds = histogram(
            "coordinator_action_answer_seconds",
            "An action accepted to the first agent event answering it.",
            ANSWER_BUCKETS,
        )
        self.delivery_lag_seconds = histogram(
            "coordinator_event_delivery_lag_seconds",
            "An event's timestamp to its write onto a connection that joined before it "
            "(replays of older events are not counted; across nodes it includes clock skew).",
            DELIVERY_BUCKETS,
        )
        self.join_seconds = histogram(
            "coordinator_join_seconds",
            "The socket.io connect handler: received to joined or refused.",
            JOIN_BUCKETS,
        )
        self.loop_delay_seconds = histogram(
            "coordinator_event_loop_delay_seconds",
            "How late each tick of the node's event loop ran (one every 50 ms): every tick, "
            "where coordinator_event_loop_lag_seconds is the worst of the last second.",
            LAG_BUCKETS,
        )
        self.failover_seconds = histogram(
            "coordinator_failover_seconds",
            "A lost node's conversation: the node lost to the conversation served again.",
            FAILOVER_BUCKETS,
        )
        self.lease_age_from(lambda: None)
        # Counted on the action path, as plain integers (an attribute increment: the
        # runner's hot path), exposed at scrape time.
        self.speculative_dispatches = 0
        self.speculations_lost = 0
        self.writes_not_replicated = 0
        self.agent_errors = 0
        self.counter_from(
            "coordinator_agent_errors",
            "Actions whose agent raised (answered with an error observation).",
            lambda: self.agent_errors,
        )
        self.counter_from(
            "coordinator_writes_not_replicated",
            "Writes fewer replicas than --ack-replicas confirmed within --ack-timeout.",
            lambda: self.writes_not_replicated,
        )
        self.counter_from(
            "coordinator_speculative_dispatches",
            "Actions dispatched to their agent before their accept answered.",
            lambda: self.speculative_dispatches,
        )
        self.counter_from(
            "coordinator_speculations_lost",
            "Speculative dispatches not logged as predicted (answers dropped, agent replaced).",
            lambda: self.speculations_lost,
        )
        if GC_PAUSES not in gc.callbacks:
            gc.callbacks.append(GC_PAUSES)
        self.counter_from(
            "coordinator_gc_full_collections",
            "Full collections of the process's cyclic garbage collector.",
            lambda: GC_PAUSES.full,
        )
        self.counter_from(
            "coordinator_gc_pause_seconds",
            "Seconds the process's cyclic garbage collector held the event loop, in all.",
            lambda: GC_PAUSES.seconds,
        )
        self.gauge_from(
            "coordinator_gc_longest_pause_seconds",
            "The longest collection of the process's cyclic garbage collector so far.",
            lambda: GC_PAUSES.longest,
        )

    # -- for the core: things only it can see happen -----------------------------------
    def speculated(self) -> None:
        """An action was dispatched before its accept answered (``speculation.py``)."""
        self.speculative_dispatches += 1

    def not_replicated(self) -> None:
        """A write was not confirmed by enough replicas in time (``state/writes.py``)."""
        self.writes_not_replicated += 1

    def agent_failed(self) -> None:
        """An agent raised on an action (``runner.py``)."""
        self.agent_errors += 1

    def speculation_lost(self) -> None:
        """A speculative dispatch was not logged as predicted."""
        self.speculations_lost += 1

    def show_redis_memory(self, memory: tuple[int, int] | None) -> None:
        """Redis' ``(used_memory, maxmemory)`` as last read; None (Redis did not answer)
        takes both series out, rather than show a stale reading or a 0 that means no
        bound."""
        for gauge, value in zip(self._redis_memory, memory or (None, None), strict=True):
            if value is not None:
                gauge.labels(self.node_id).set(value)
            else:
                with contextlib.suppress(KeyError):  # not shown
                    gauge.remove(self.node_id)

    def observe_answer(self, seconds: float) -> None:
        """An action was answered ``seconds`` after its accept (its first agent event)."""
        self.answer_seconds.observe(seconds)

    def observe_failover(self, seconds: float) -> None:
        """A lost node's conversation was served again ``seconds`` after the loss."""
        self.failover_seconds.observe(seconds)

    def lease_age_from(self, read: Read) -> None:
        """Read ``coordinator_lease_renewal_age_seconds`` (seconds since the last
        successful lease renewal; None: no lease yet) from ``read`` at each scrape."""
        self.gauge_from(
            "coordinator_lease_renewal_age_seconds",
            "Seconds since this node's membership lease was last renewed.",
            read,
        )

    # -- values owned elsewhere, read at scrape time -------------------------------------
    def gauge_from(self, name: str, doc: str, read: Read) -> None:
        """Expose gauge ``name`` as whatever ``read()`` returns at scrape time."""
        self._readings.by_name[name] = Reading(name, "gauge", doc, read)

    def counter_from(self, name: str, doc: str, read: Read) -> None:
        """Expose counter ``name`` (``_total`` is appended) as ``read()`` at scrape time;
        ``read`` must be monotonic, like a count its owner keeps."""
        self._readings.by_name[name] = Reading(name, "counter", doc, read)

    def gauges_from(self, name: str, doc: str, label: str, read: ReadMany) -> None:
        """Expose gauge ``name`` with one more label, ``label``: one sample per entry of
        the mapping ``read()`` returns at scrape time (label value -> value)."""
        self._labelled("gauge", name, doc, label, read)

    def counters_from(self, name: str, doc: str, label: str, read: ReadMany) -> None:
        """As ``gauges_from``, for a counter (each value monotonic)."""
        self._labelled("counter", name, doc, label, read)

    def _labelled(self, kind: str, name: str, doc: str, label: str, read: ReadMany) -> None:
        self._readings.by_name[name] = Reading(
            name, kind, doc, lambda: None, label=label, read_many=read
        )

    # -- exposition --------------------------------------------------------------------
    def render(self) -> bytes:
        """The registry in the Prometheus text format (``CONTENT_TYPE``).

        Integral values are written as integers (``3``, not prometheus_client's ``3.0``):
        the format allows both, and the hand-written exposition this replaced wrote
        integers, which scripts and tests matching ``\\d+$`` rely on."""
        return _INTEGRAL.sub(rb"\1", generate_latest(self.registry))
