"""Real Redis Cluster and Sentinel deployments on 127.0.0.1, for tests (guarantee 10).

``RedisClusterServers``: three masters, and optionally one replica each, made of
``redis-server`` processes, each in its own directory with a config file that includes
deploy/redis-cluster.conf (the file docker-compose.yml's ``cluster`` profile runs) and
sets only the node's ports and paths. The cluster is created over redis-py
(SET-CONFIG-EPOCH, ADDSLOTSRANGE, MEET, REPLICATE), so no redis-cli is needed.

``SentinelServers``: one master, one replica and three sentinels whose config files are
deploy/sentinel.conf with only the port, the master's address and the paths changed.

Both need redis-server 7.0 or newer (tests/redis_process.py fails, never skips, when it
is older). They wait for conditions with deadlines (polling is
the only readiness signal another process offers) and stop every process they started,
also when a test fails. Blocking waits have ``async_`` twins that run in a thread, so a
test's clients keep running meanwhile.

Fixtures, registered in conftest.py: ``redis_cluster`` (3 masters, shared by a test
module: tests must not break it), ``redis_cluster_replicated`` (3 masters and 3
replicas, one per test, for fault injection), ``redis_sentinel`` (one per test)::

    async def test_failover(redis_cluster_replicated):
        cluster = redis_cluster_replicated
        old = cluster.master_of("conv:{42}")
        cluster.kill(old)
        new = await cluster.async_wait_failover(old)
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from coordinator.embedded import free_port
from tests.redis_process import (
    HOST,
    START_TIMEOUT,
    Address,
    RedisProcess,
    stop_all,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent
CLUSTER_CONF = REPO / "deploy" / "redis-cluster.conf"
SENTINEL_CONF = REPO / "deploy" / "sentinel.conf"
SENTINEL_NODE_CONF = REPO / "deploy" / "redis-sentinel-node.conf"
CLUSTER_CREATE_SCRIPT = REPO / "deploy" / "redis-cluster-create.sh"
SLOTS = 16384
CLUSTER_MASTERS = 3  # as in docker-compose.yml's `cluster` profile
SENTINELS = 3  # as in its `sentinel` profile


# --- settings shared with docker-compose.yml ------------------------------------------


def read_directives(path: Path) -> list[list[str]]:
    """The directives of a redis.conf-style file, each split into words."""
    directives = []
    for line in path.read_text().splitlines():
        words = line.split()
        if words and not words[0].startswith("#"):
            directives.append(words)
    return directives


def _directive(directives: list[list[str]], *names: str) -> list[str]:
    """The words after ``names`` in the last directive starting with them."""
    wanted = [n.lower() for n in names]
    found = [d for d in directives if [w.lower() for w in d[: len(wanted)]] == wanted]
    if not found:
        raise AssertionError(f"no `{' '.join(names)}` directive")
    return found[-1][len(wanted) :]


@dataclass(frozen=True)
class ClusterSettings:
    """What the fixtures (and the failover bound) take from deploy/redis-cluster.conf."""

    node_timeout_ms: int
    require_full_coverage: bool

    @classmethod
    def from_file(cls, path: Path = CLUSTER_CONF) -> ClusterSettings:
        d = read_directives(path)
        if _directive(d, "cluster-enabled") != ["yes"]:
            raise AssertionError(f"{path}: cluster-enabled is not yes")
        return cls(
            node_timeout_ms=int(_directive(d, "cluster-node-timeout")[0]),
            require_full_coverage=_directive(d, "cluster-require-full-coverage") == ["yes"],
        )

    @property
    def failover_bound(self) -> float:
        """Seconds within which a killed master's replica takes over.

        Failure detection takes one node timeout, the election about a second; an
        election lost to a split vote is retried after twice the failover auth timeout
        (max(2 x node timeout, 2 s)); plus slack for a loaded two-core machine.
        """
        timeout = self.node_timeout_ms / 1000
        return timeout + 1 + 2 * max(2 * timeout, 2.0) + 5


@dataclass(frozen=True)
class SentinelSettings:
    """What the fixtures (and the promotion bound) take from deploy/sentinel.conf."""

    master_name: str
    master_host: str
    master_port: int
    quorum: int
    down_after_ms: int
    failover_timeout_ms: int

    @classmethod
    def from_file(cls, path: Path = SENTINEL_CONF) -> SentinelSettings:
        d = read_directives(path)
        name, host, port, quorum = _directive(d, "sentinel", "monitor")
        down_name, down_after = _directive(d, "sentinel", "down-after-milliseconds")
        timeout_name, failover_timeout = _directive(d, "sentinel", "failover-timeout")
        if not name == down_name == timeout_name:
            raise AssertionError(f"{path}: settings for another master than {name}")
        return cls(name, host, int(port), int(quorum), int(down_after), int(failover_timeout))

    @property
    def promotion_bound(self) -> float:
        """Seconds within which a killed master's replica is promoted.

        The master is down after ``down-after-milliseconds``, a failover takes a second or
        two, and one that failed is retried after twice ``failover-timeout``; plus slack.
        """
        return (self.down_after_ms + 2 * self.failover_timeout_ms) / 1000 + 5


def sentinel_config(source: Path, master: Address) -> list[str]:
    """``source``'s lines, monitoring ``master``; the port is left for the caller to set."""
    lines = []
    for line in source.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#") or words[0].lower() == "port":
            continue
        if [w.lower() for w in words[:2]] == ["sentinel", "monitor"]:
            name, quorum = words[2], words[5]
            line = f"sentinel monitor {name} {master[0]} {master[1]} {quorum}"
        lines.append(line)
    return lines


@dataclass(frozen=True, order=True)
class SlotRange:
    """One row of CLUSTER SLOTS: slots ``start``..``end`` and the nodes serving them."""

    start: int
    end: int
    master: Address
    replicas: tuple[Address, ...]


def parse_cluster_slots(reply: list[Any]) -> list[SlotRange]:
    """CLUSTER SLOTS (RESP2, decoded): [[start, end, [ip, port, id, ...], replica...]...]."""
    ranges = []
    for row in reply:
        start, end, master, *replicas = row
        ranges.append(
            SlotRange(
                int(start),
                int(end),
                (str(master[0]), int(master[1])),
                tuple(sorted((str(r[0]), int(r[1])) for r in replicas)),
            )
        )
    return sorted(ranges)


def slot_ranges(masters: int) -> list[tuple[int, int]]:
    """The slots split evenly, as `redis-cli --cluster create` splits them."""
    per = SLOTS / masters
    return [(round(i * per), round((i + 1) * per) - 1) for i in range(masters)]


class RedisClusterServers:
    """A local Redis Cluster: ``masters`` masters, each with ``replicas`` (0-2) replicas.

    Nodes are ``node1``... in ``workdir`` (a temporary directory, removed by ``stop``, when
    none is given); the first ``masters`` nodes start as the masters.
    """

    def __init__(
        self, workdir: Path | None = None, *, masters: int = CLUSTER_MASTERS, replicas: int = 0
    ) -> None:
        if replicas not in (0, 1, 2):
            raise ValueError("replicas must be 0, 1 or 2 (per master)")
        self._owns_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="coord-cluster-"))
        self.settings = ClusterSettings.from_file(CLUSTER_CONF)
        self.masters_count = masters
        self.replicas = replicas
        self.nodes: list[RedisProcess] = []
        self._ids: dict[str, str] = {}
        self._killed_ranges: dict[str, list[tuple[int, int]]] = {}
        used: set[int] = set()

        def port() -> int:
            while (p := free_port()) in used:
                pass
            used.add(p)
            return p

        for i in range(masters * (1 + replicas)):
            name = f"node{i + 1}"
            self.nodes.append(
                RedisProcess(
                    name,
                    self.workdir / name,
                    [f'include "{CLUSTER_CONF}"', 'save ""'],
                    port=port(),
                    cluster_port=port(),
                )
            )

    def __enter__(self) -> RedisClusterServers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # addresses

    @property
    def seed_urls(self) -> list[str]:
        """Every node's URL (any of them is enough for a cluster client to find the rest)."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """The URL of a running node."""
        return self._alive()[0].url

    @property
    def addresses(self) -> list[Address]:
        return [node.address for node in self.nodes]

    def node_at(self, address: Address) -> RedisProcess:
        for node in self.nodes:
            if node.address == tuple(address):
                return node
        raise AssertionError(f"no node of this cluster at {address}")

    def node_id(self, node: RedisProcess) -> str:
        """The node's cluster id (kept in its nodes.conf across restarts)."""
        if node.name not in self._ids:
            with node.client() as c:
                self._ids[node.name] = str(c.execute_command("CLUSTER", "MYID"))
        return self._ids[node.name]

    # lifecycle

    def start(self, *, create: bool = True, timeout: float = START_TIMEOUT) -> RedisClusterServers:
        """Start every node; with ``create``, make them a cluster and wait until it serves.

        Without it the nodes are left empty (for deploy/redis-cluster-create.sh); call
        ``wait_converged`` once something else has created the cluster.
        """
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                node.wait_started(max(0.1, deadline - time.monotonic()))
            if create:
                self.create(max(0.1, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def create(self, timeout: float = START_TIMEOUT) -> None:
        """Make the started nodes a cluster, as redis-cli would, through redis-py."""
        deadline = time.monotonic() + timeout
        masters = self.nodes[: self.masters_count]
        for epoch, node in enumerate(self.nodes, 1):
            # Distinct epochs: no collision for the nodes to resolve after MEET.
            with node.client() as c:
                c.execute_command("CLUSTER SET-CONFIG-EPOCH", epoch)
        for node, (first, last) in zip(masters, slot_ranges(self.masters_count), strict=True):
            with node.client() as c:
                c.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
        with self.nodes[0].client() as c:
            for node in self.nodes[1:]:
                c.execute_command("CLUSTER MEET", HOST, node.port, node.cluster_port)
        wait_for(
            "every node knows every other one",
            self._all_met,
            max(0.1, deadline - time.monotonic()),
            self.state,
        )
        for index, replica in enumerate(self.nodes[self.masters_count :]):
            master = masters[index % self.masters_count]
            with replica.client() as c:
                c.execute_command("CLUSTER REPLICATE", self.node_id(master))
        self.wait_converged(max(0.1, deadline - time.monotonic()))

    def stop(self) -> None:
        """Stop every node (SIGTERM, SIGKILL after a timeout); idempotent."""
        stop_all(self.nodes)
        if self._owns_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # the slot map

    def cluster_slots(self, node: RedisProcess) -> list[SlotRange] | None:
        """``node``'s view of the slot map, or None if it does not answer."""
        try:
            with node.client() as c:
                return parse_cluster_slots(c.execute_command("CLUSTER", "SLOTS"))
        except redis.RedisError:
            return None

    def slot_map(self) -> list[SlotRange]:
        """The slot map as the first running node that answers sees it."""
        for node in self._alive():
            view = self.cluster_slots(node)
            if view is not None:
                return view
        raise AssertionError(f"no node answers CLUSTER SLOTS\n{self.state()}")

    def master_of(self, key: str | bytes) -> RedisProcess:
        """The process serving ``key``'s slot, according to the cluster's slot map."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for row in self.slot_map():
            if row.start <= slot <= row.end:
                return self.node_at(row.master)
        raise AssertionError(f"slot {slot} is not served\n{self.state()}")

    def masters(self) -> list[RedisProcess]:
        return sorted({self.node_at(row.master) for row in self.slot_map()}, key=self.nodes.index)

    def replica_of(self, master: RedisProcess) -> RedisProcess | None:
        for row in self.slot_map():
            if row.master == master.address and row.replicas:
                return self.node_at(row.replicas[0])
        return None

    # faults

    def kill(self, node: RedisProcess) -> None:
        """SIGKILL ``node`` (remembering the slots it served, for ``wait_failover``)."""
        self._killed_ranges[node.name] = [
            (row.start, row.end) for row in self.slot_map() if row.master == node.address
        ]
        node.kill()

    def wait_failover(self, old: RedisProcess, timeout: float | None = None) -> RedisProcess:
        """Wait until a running node serves every slot ``old`` served, every node agrees
        and says cluster_state:ok; return the new master. ``old`` must have been killed
        with ``kill`` while it was a master.
        """
        ranges = self._killed_ranges.get(old.name)
        if not ranges:
            raise ValueError(f"{old.name} was not a master when it was killed with kill()")

        def promoted() -> RedisProcess | None:
            view = self._converged_view(require_replicas=False)
            if view is None:
                return None
            owners = {
                row.master for first, _ in ranges for row in view if row.start <= first <= row.end
            }
            if len(owners) != 1:
                return None
            new = self.node_at(owners.pop())
            return new if new is not old and new.alive else None

        return wait_for(
            f"a replica of {old.name} takes over its slots",
            promoted,
            self.settings.failover_bound if timeout is None else timeout,
            self.state,
        )

    def restart(self, node: RedisProcess, timeout: float = START_TIMEOUT) -> None:
        """Start a killed node again and wait until it has rejoined (a former master
        comes back as a replica of the node that took its slots) and is in sync.
        """
        deadline = time.monotonic() + timeout
        node.start().wait_started(timeout)
        self.wait_converged(max(0.1, deadline - time.monotonic()))

    def wait_converged(self, timeout: float = START_TIMEOUT) -> list[SlotRange]:
        """Wait until every running node says cluster_state:ok and reports the same slot
        map, covering every slot with running masters; every running node is in it, and
        every running replica is in sync. With every node running, each master has its
        replica too. Returns the slot map.
        """
        return wait_for("the cluster converges", self._converged_view, timeout, self.state)

    async def async_wait_failover(
        self, old: RedisProcess, within: float | None = None
    ) -> RedisProcess:
        return await asyncio.to_thread(self.wait_failover, old, within)

    async def async_restart(self, node: RedisProcess, within: float = START_TIMEOUT) -> None:
        await asyncio.to_thread(self.restart, node, within)

    async def async_wait_converged(self, within: float = START_TIMEOUT) -> list[SlotRange]:
        return await asyncio.to_thread(self.wait_converged, within)

    # conditions

    def _alive(self) -> list[RedisProcess]:
        alive = [node for node in self.nodes if node.alive]
        if not alive:
            raise AssertionError("no node of the cluster is running")
        return alive

    def _all_met(self) -> bool | None:
        for node in self.nodes:
            try:
                with node.client() as c:
                    lines = str(c.execute_command("CLUSTER", "NODES")).splitlines()
            except redis.RedisError:
                return None
            if len(lines) != len(self.nodes) or any(
                "handshake" in line or "noaddr" in line for line in lines
            ):
                return None
        return True

    def _converged_view(self, require_replicas: bool = True) -> list[SlotRange] | None:
        alive = self._alive()
        views = []
        for node in alive:
            try:
                with node.client() as c:
                    info = str(c.execute_command("CLUSTER", "INFO"))
                    view = parse_cluster_slots(c.execute_command("CLUSTER", "SLOTS"))
            except redis.RedisError:
                return None
            if "cluster_state:ok" not in info:
                return None
            views.append(view)
        view = views[0]
        if any(other != view for other in views[1:]):
            return None
        if sum(row.end - row.start + 1 for row in view) != SLOTS:
            return None
        alive_addresses = {node.address for node in alive}
        listed = {row.master for row in view} | {r for row in view for r in row.replicas}
        if listed != alive_addresses:
            return None
        if require_replicas and len(alive) == len(self.nodes):
            masters = {row.master for row in view}
            if len(masters) != self.masters_count:
                return None
            if any(len(row.replicas) != self.replicas for row in view):
                return None
        for row in view:
            for address in row.replicas:
                replication = self.node_at(address).info("replication")
                if (
                    replication.get("master_link_status") != "up"
                    or replication.get("master_sync_in_progress")
                    or replication.get("master_port") != row.master[1]
                ):
                    return None
        return view

    def state(self) -> str:
        """Each node's view (for failure messages), then the tails of their logs."""
        lines = []
        for node in self.nodes:
            if not node.alive:
                lines.append(f"{node.name} :{node.port}: not running")
                continue
            try:
                with node.client() as c:
                    info = str(c.execute_command("CLUSTER", "INFO")).splitlines()
                    nodes = str(c.execute_command("CLUSTER", "NODES")).strip()
                lines.append(f"{node.name} :{node.port}: {info[0]}\n{nodes}")
            except redis.RedisError as exc:
                lines.append(f"{node.name} :{node.port}: {exc!r}")
        return "\n".join(lines + [node.log_tail(8) for node in self.nodes])


# --- Sentinel ------------------------------------------------------------------------


class SentinelServers:
    """One master, one replica and ``sentinels`` sentinels watching them.

    The sentinels are configured from deploy/sentinel.conf (master name, quorum,
    down-after, failover timeout), the data nodes from deploy/redis-sentinel-node.conf.
    """

    def __init__(self, workdir: Path | None = None, *, sentinels: int = SENTINELS) -> None:
        self._owns_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="coord-sentinel-"))
        self.settings = SentinelSettings.from_file(SENTINEL_CONF)
        data = [f'include "{SENTINEL_NODE_CONF}"', 'save ""']
        master = RedisProcess("redis1", self.workdir / "redis1", data)
        replica = RedisProcess(
            "redis2", self.workdir / "redis2", [*data, f"replicaof {HOST} {master.port}"]
        )
        self.data_nodes = [master, replica]
        self.sentinels = [
            RedisProcess(
                f"sentinel{i + 1}",
                self.workdir / f"sentinel{i + 1}",
                sentinel_config(SENTINEL_CONF, master.address),
                sentinel=True,
            )
            for i in range(sentinels)
        ]
        self._killed: RedisProcess | None = None

    def __enter__(self) -> SentinelServers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def master_name(self) -> str:
        return self.settings.master_name

    @property
    def sentinel_addresses(self) -> list[Address]:
        return [s.address for s in self.sentinels]

    def node_at(self, address: Address) -> RedisProcess:
        for node in self.data_nodes:
            if node.address == tuple(address):
                return node
        raise AssertionError(f"no data node at {address}")

    def start(self, timeout: float = START_TIMEOUT) -> SentinelServers:
        """Start everything; return once the sentinels know the master, its replica and
        each other, and the replica is in sync.
        """
        deadline = time.monotonic() + timeout
        master, replica = self.data_nodes
        try:
            for node in self.data_nodes:
                node.start()
            for node in self.data_nodes:
                node.wait_started(max(0.1, deadline - time.monotonic()))
            # A sentinel learns of replicas from the master's INFO, which it reads when it
            # connects and then every 10 s: the replica must be there at the first read.
            wait_for(
                f"{replica.name} is in sync with {master.name}",
                lambda: replica.info("replication").get("master_link_status") == "up" or None,
                max(0.1, deadline - time.monotonic()),
                self.state,
            )
            for node in self.sentinels:
                node.start()
            for node in self.sentinels:
                node.wait_started(max(0.1, deadline - time.monotonic()))
            wait_for(
                "the sentinels know the master, the replica and each other",
                self._ready,
                max(0.1, deadline - time.monotonic()),
                self.state,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process (SIGTERM, SIGKILL after a timeout); idempotent."""
        stop_all([*self.sentinels, *self.data_nodes])
        if self._owns_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def reported_masters(self) -> list[Address | None]:
        """What each sentinel answers to SENTINEL GET-MASTER-ADDR-BY-NAME (None: no answer
        in two tries of a second: a stopped one held an async test's event loop for 26 s
        with the client's default timeout and retries)."""
        answers: list[Address | None] = []
        for sentinel in self.sentinels:
            try:
                with sentinel.client(socket_timeout=1.0, retry=Retry(NoBackoff(), 1)) as c:
                    reply = c.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", self.master_name)
                answers.append((str(reply[0]), int(reply[1])) if reply else None)
            except redis.RedisError:
                answers.append(None)
        return answers

    def master_address(self) -> Address:
        """The master's address as a majority of the sentinels report it."""
        answers = [a for a in self.reported_masters() if a is not None]
        for address in set(answers):
            if answers.count(address) > len(self.sentinels) // 2:
                return address
        raise AssertionError(f"no majority of sentinels agrees on a master: {answers}")

    def master(self) -> RedisProcess:
        return self.node_at(self.master_address())

    def kill_master(self) -> RedisProcess:
        """SIGKILL the current master; returns it."""
        master = self.master()
        master.kill()
        self._killed = master
        return master

    def wait_promoted(
        self, timeout: float | None = None, old: RedisProcess | None = None
    ) -> RedisProcess:
        """Wait until every running sentinel names another running node than ``old``
        (default: the master killed with ``kill_master``) as master and that node says
        role:master; returns it.
        """
        old = old or self._killed
        if old is None:
            raise ValueError("no master was killed with kill_master()")

        def promoted() -> RedisProcess | None:
            answers = {
                a for s, a in zip(self.sentinels, self.reported_masters(), strict=True) if s.alive
            }
            if len(answers) != 1 or None in answers:
                return None
            address = answers.pop()
            assert address is not None
            new = self.node_at(address)
            if new is old or not new.alive:
                return None
            return new if new.info("replication").get("role") == "master" else None

        return wait_for(
            f"a replica replaces {old.name}",
            promoted,
            self.settings.promotion_bound if timeout is None else timeout,
            self.state,
        )

    async def async_wait_promoted(
        self, within: float | None = None, old: RedisProcess | None = None
    ) -> RedisProcess:
        return await asyncio.to_thread(self.wait_promoted, within, old)

    def _ready(self) -> bool | None:
        master, replica = self.data_nodes
        try:
            for sentinel in self.sentinels:
                with sentinel.client() as c:
                    state = c.sentinel_master(self.master_name)
                    replicas = c.sentinel_slaves(self.master_name)
                if (
                    not state["is_master"]
                    or state["is_sdown"]
                    or (state["ip"], state["port"]) != master.address
                    or state["num-other-sentinels"] != len(self.sentinels) - 1
                    or [(r["ip"], r["port"]) for r in replicas] != [replica.address]
                    or replicas[0]["master-link-status"] != "ok"
                ):
                    return None
            if replica.info("replication").get("master_link_status") != "up":
                return None
        except redis.RedisError:
            return None
        return True

    def state(self) -> str:
        lines = [f"sentinels report: {self.reported_masters()}"]
        for node in self.data_nodes:
            if node.alive:
                try:
                    role = node.info("replication").get("role")
                except redis.RedisError as exc:
                    role = repr(exc)
            else:
                role = "not running"
            lines.append(f"{node.name} :{node.port}: {role}")
        return "\n".join(lines + [p.log_tail(8) for p in [*self.data_nodes, *self.sentinels]])


# --- fixtures ------------------------------------------------------------------------


@contextlib.contextmanager
def _running(servers: RedisClusterServers | SentinelServers) -> Iterator[Any]:
    try:
        yield servers.start()
    finally:
        try:
            print(servers.state())  # pytest shows it only for a failed test
        finally:
            servers.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """Three masters, no replicas, shared by the tests of a module (do not break it)."""
    with _running(RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_replicated(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """Three masters with a replica each, for one test (kill, fail over, restart)."""
    with _running(RedisClusterServers(tmp_path / "redis-cluster", replicas=1)) as cluster:
        yield cluster


@pytest.fixture
def redis_sentinel(tmp_path: Path) -> Iterator[SentinelServers]:
    """A master, its replica and three sentinels, for one test."""
    with _running(SentinelServers(tmp_path / "redis-sentinel")) as servers:
        yield servers
