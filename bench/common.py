"""Shared pieces: modes, processes (nodes, baselines, load generators), tables, JSON."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import re
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from coordinator.cliflags import NO_LIMIT_FLAGS
from coordinator.embedded import EmbeddedRedis, free_port

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PY = sys.executable


@dataclass(frozen=True)
class Mode:
    name: str  # quick | full

    @property
    def full(self) -> bool:
        return self.name == "full"

    def pick(self, quick: Any, full: Any) -> Any:
        return full if self.full else quick


def raise_nofile() -> int:
    """Raise this process's soft open-files limit to the hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def child_env() -> dict[str, str]:
    """Our environment without COORDINATOR_* settings, so flags alone configure a child."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# In-process nodes whose background work (heartbeats, flushes, sweeps, idle closes) stays
# out of a measurement unless the benchmark triggers it itself.
QUIET_NODE = dict(
    node_ttl=120.0,
    heartbeat_interval=30.0,
    lease_margin=5.0,
    idle_flush_interval=600.0,
    cleanup_interval=3600.0,
    close_delay=3600.0,
)


def new_secret() -> str:
    return f"bench-{secrets.token_hex(12)}"


class Proc:
    """A child process with its own log file, readiness by HTTP GET, kill -9 and SIGTERM."""

    def __init__(self, name: str, cmd: Sequence[str], log_dir: Path, ready_url: str) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_dir / f"{name}.log"
        self.ready_url = ready_url
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.cwd: Path = REPO  # another revision's node runs in its code (bench.compare)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Proc:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (open for the child's life)
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            env=child_env(),
            preexec_fn=raise_nofile,
        )
        return self

    def wait_ready(self, timeout: float = 30.0) -> Proc:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.ready_url, timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._close()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)


def node_proc(
    name: str,
    redis_url: str,
    secret: str,
    log_dir: Path,
    *,
    port: int | None = None,
    extra: Sequence[str] = (),
    limits: bool = False,
) -> Proc:
    """A ``coordinator serve`` node process (not started), without client limits unless
    ``limits`` (the benchmarks flood nodes on purpose; bench/attacks.py keeps them), on
    the event store of its Redis's cluster unless ``extra`` names one."""
    port = port or free_port()
    if "--event-store" not in extra:
        extra = ["--event-store", cluster_store(redis_url, log_dir), *extra]
    cmd = [
        PY, "-m", "coordinator", "serve",
        "--host", "127.0.0.1", "--port", str(port),
        "--redis-url", redis_url, "--node-id", name, "--secret", secret,
        "--log-level", "warning", *([] if limits else NO_LIMIT_FLAGS), *extra,
    ]  # fmt: skip
    proc = Proc(name, cmd, log_dir, f"http://127.0.0.1:{port}/healthz")
    proc.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return proc


_STORES: dict[str, str] = {}  # Redis URL -> its nodes' event store, in this process


def cluster_store(redis_url: str, log_dir: Path) -> str:
    """The event store of the nodes on ``redis_url`` (node processes and in-process nodes
    alike): a directory of their own beside the benchmark's logs (the first ``log_dir``
    asked with that URL: Redis records the store its nodes use and refuses a node of
    another). Not the machine's default directory:
    that one keeps conversations from run to run, and a benchmark's conversation ids,
    used again on a fresh Redis, would come back from the store instead of being new."""
    name = hashlib.sha256(redis_url.encode()).hexdigest()[:12]
    return _STORES.setdefault(redis_url, f"file://{log_dir / f'store-{name}'}")


def baseline_proc(
    name: str, module: str, log_dir: Path, args: Sequence[str], port: int | None = None
) -> Proc:
    port = port or free_port()
    cmd = [PY, "-m", module, "--port", str(port), *args]
    ready = f"http://127.0.0.1:{port}/socket.io/?EIO=4&transport=polling"
    proc = Proc(name, cmd, log_dir, ready)
    proc.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return proc


def run_under(proc: Proc, *wrapper: str) -> Proc:
    """Start ``proc``'s ``python -m MODULE ARGS`` as ``python -m WRAPPER... ARGS`` instead
    (a wrapper module that installs probes or imports another revision, then runs MODULE's
    entry point with ARGS)."""
    i = proc.cmd.index("-m")
    proc.cmd = [*proc.cmd[:i], "-m", *wrapper, *proc.cmd[i + 2 :]]
    return proc


def url_of(proc: Proc) -> str:
    return str(proc.url)  # type: ignore[attr-defined]


_SAMPLE = re.compile(rb"^([a-z_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", re.M)


def node_metrics(proc: Proc) -> dict[str, float] | None:
    """A node's /metrics, sample name (labels dropped: the last sample of a name wins)
    -> value; None for a server without them (the baselines)."""
    try:
        with urllib.request.urlopen(f"{url_of(proc)}/metrics", timeout=5) as resp:
            text = resp.read()
    except OSError:
        return None
    return {name.decode(): float(value) for name, value in _SAMPLE.findall(text)}


@contextlib.contextmanager
def private_redis() -> Any:
    """A private redis-server for one benchmark (nothing else talks to it)."""
    server = EmbeddedRedis().start()
    try:
        yield server
    finally:
        server.cleanup()


def log_dir(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# -- statistics and output ----------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (also readable in a terminal)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [f"\n### {title}\n"] if title else []
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    for row in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def by_gap(
    title: str, who: str, gap: str, results: dict[str, dict[str, list[float]]]
) -> tuple[str, dict[str, Any]]:
    """Latency samples in microseconds by ``who`` and by gap (in ms): the table of their
    p50/p90/p99 and, for the JSON, their p50 and p90."""
    rows = [
        [name, f"{float(g):g} ms", percentile(s, 50), percentile(s, 90), percentile(s, 99)]
        for name, gaps in results.items()
        for g, s in gaps.items()
    ]
    text = table(title, [who, gap, "p50 us", "p90 us", "p99 us"], rows)
    summary = {
        name: {
            g: {"p50_us": percentile(s, 50), "p90_us": percentile(s, 90)} for g, s in gaps.items()
        }
        for name, gaps in results.items()
    }
    return text, summary


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "coordinator", "workers"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def write_json(name: str, mode: Mode, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{mode.name}.json"
    payload = {
        "benchmark": name,
        "mode": mode.name,
        "machine": machine(),
        "commit": data.pop("commit", None) or git_commit(),
        **data,
    }
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, set | tuple):
        return list(value)
    return str(value)


def redis_version(url: str) -> str:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants alive now (a node and its agent worker processes)."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                out += process_tree(int(child))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_total(pid: int, read: Callable[[int], float]) -> float:
    """``read`` summed over ``pid`` and its descendants alive now (one that ended
    meanwhile counts nothing)."""
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            total += read(p)
    return total


def tree_cpu_seconds(pid: int) -> float:
    """CPU time so far of ``pid`` and its descendants: a node's is its own and its agent
    worker processes' (where ``--agent-isolation process`` runs its loops)."""
    return _tree_total(pid, cpu_seconds)


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (pages they share are counted in
    each: compare growths, not totals)."""
    return int(_tree_total(pid, rss_bytes))


def start_all(procs: Sequence[Proc], timeout: float = 60.0) -> None:
    """Start processes together, then wait until each is ready."""
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait_ready(max(1.0, deadline - time.monotonic()))


def stop_all(procs: Sequence[Proc]) -> None:
    for p in procs:
        if p.alive and p.proc is not None:
            p.proc.send_signal(signal.SIGCONT)
            p.proc.terminate()
    for p in procs:
        p.stop(10)
