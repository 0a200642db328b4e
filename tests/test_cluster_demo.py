"""`coordinator cluster` (what `make run` runs) survives what it demonstrates.

Two nodes with the scripted agent (`--agent`); the chat command it prints runs as printed
from a fresh shell; a node killed by its pid stays down while the other serves and the
cluster keeps running; `restart 1` on its stdin and SIGUSR1 start dead nodes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from coordinator.cliargs import build_parser
from coordinator.cluster import NodeProcess, instructions
from coordinator.embedded import LOWEST_PICKED, free_port
from tests.e2e_checks import LineReader
from tests.processes import child_env

NODE_LINE = re.compile(r"^  (node\d)  (http://\S+)  \(pid (\d+)\)$")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as resp:
            return resp.status == 200 and json.loads(resp.read())["status"] == "ok"
    except OSError:
        return False


def test_free_ports_come_from_below_the_ephemeral_range() -> None:
    """Ports given to servers to listen on are not ones an outgoing connection may take
    meanwhile (a test's node once failed with EADDRINUSE so), all of a run free, none
    of those to avoid; with no room left there, the kernel's pick."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(50):
        port = free_port(3)
        assert port >= LOWEST_PICKED and port + 2 < low
    assert free_port(avoid=range(LOWEST_PICKED, low)) >= low


async def test_cluster_keeps_running_when_a_node_dies_and_restarts_it(tmp_path: Path) -> None:
    base = free_port(2)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator", "cluster", "--nodes", "2",
        "--base-port", str(base), "--agent", "workers.scripted:ScriptedAgent",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=child_env(),
    )  # fmt: skip
    out = LineReader(proc)
    try:
        await out.expect(r"Press Ctrl-C", within=60)
        nodes = {m[1]: (m[2], int(m[3])) for line in out.lines if (m := NODE_LINE.match(line))}
        assert set(nodes) == {"node1", "node2"}, out.lines
        (url1, pid1), (url2, pid2) = nodes["node1"], nodes["node2"]

        # The printed chat command, as printed, from a shell that knows nothing of the venv.
        at = out.lines.index(next(x for x in out.lines if x.startswith("chat in a terminal")))
        command = out.lines[at + 1].strip()
        program = command.split()[0]
        assert Path(program).is_absolute() and os.access(program, os.X_OK), command
        shell = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        )  # fmt: skip
        said, err = await asyncio.wait_for(shell.communicate(b"hi\n"), 60)
        assert shell.returncode == 0, err.decode()
        # The scripted agent (not the echo agent) answered: its replies are padded.
        assert re.search(r"^\[\d+\] agent: hi \.+$", said.decode(), re.M), said.decode()

        os.kill(pid1, signal.SIGKILL)
        await out.expect(r"^node1 exited with code -9; the others carry on")
        assert proc.returncode is None and healthy(url2)

        await out.write("restart 1")
        await out.expect(r"^node1 restarted at " + re.escape(url1))
        assert healthy(url1)

        os.kill(pid2, signal.SIGKILL)
        await out.expect(r"^node2 exited with code -9")
        proc.send_signal(signal.SIGUSR1)  # restarts every dead node
        await out.expect(r"^node2 restarted at " + re.escape(url2))
        assert healthy(url2) and proc.returncode is None

        await out.write("status")
        await out.expect(r"^  node1  \S+  running \(pid \d+\)$")
        await out.expect(r"^  node2  \S+  running \(pid \d+\)$")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(30):
                rest, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            rest, _ = await proc.communicate()
        out.lines += rest.decode().splitlines()
    assert proc.returncode == 0, "\n".join(out.lines)
    assert "Traceback" not in "\n".join(out.lines)
    assert not healthy(url1) and not healthy(url2)


def test_the_printed_chat_commands_parse_whatever_the_secret() -> None:
    """The printed chat commands read the secret from the run's file (an argument would
    be visible in ``ps``); a secret that file cannot hold (a line break) is passed as
    ``--secret=VALUE``, which the CLI takes for the secret even when it starts with "-"
    (seen in CI: "argument --secret: expected one argument")."""
    proc = cast(Any, SimpleNamespace(pid=1))
    nodes = [NodeProcess(f"node{i}", f"http://127.0.0.1:{i}", i, proc) for i in (1, 2)]
    cases = [
        ("-starts-with-a-dash", "/tmp/run dir/secret", "secret_file", "/tmp/run dir/secret"),
        ("plain_Secret-123", "/tmp/x/secret", "secret_file", "/tmp/x/secret"),
        ("with space and 'quote'", None, "secret", "with space and 'quote'"),
    ]
    for secret, secret_file, dest, value in cases:
        text = instructions(nodes, "redis://127.0.0.1:6379", secret, secret_file)
        lines = text.splitlines()
        commands = [
            lines[i + 1]
            for i, line in enumerate(lines)
            if line.startswith(("chat in a terminal", "a second terminal"))
        ]
        assert len(commands) == 2, lines
        for command in commands:
            argv = shlex.split(command)
            args = build_parser().parse_args(argv[argv.index("chat") :])
            assert getattr(args, dest) == value, command
            if dest == "secret_file":
                assert args.secret is None and secret not in command, command
    # Quoted over two lines, as a shell takes it when pasted.
    text = instructions(nodes, "redis://127.0.0.1:6379", "-two\nlines", "/tmp/x/secret")
    assert text.count("--conversation demo1 --secret='-two\nlines'") == 2
    assert "--secret-file" not in text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): reaped or not, it no longer runs.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            return False
    return True


def _redis_pid(cluster_pid: int) -> int:
    children = Path(f"/proc/{cluster_pid}/task/{cluster_pid}/children").read_text().split()
    for child in map(int, children):
        if "redis-server" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
            return child
    raise AssertionError(f"no redis-server among {children}")


async def _start(base: int, extra: dict[str, str] | None = None) -> tuple[Any, LineReader]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator", "cluster", "--nodes", "2", "--base-port", str(base),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=child_env(extra),
    )  # fmt: skip
    out = LineReader(proc)
    await out.expect(r"Press Ctrl-C", within=60)
    return proc, out


async def test_a_cluster_ends_with_its_terminal_its_redis_and_keeps_to_its_own(
    tmp_path: Path,
) -> None:
    """Closing its terminal (SIGHUP) stops it all, as Ctrl-C does; kill -9 of the
    supervisor takes its nodes and Redis along; its Redis killed under it stops it,
    saying so. What is one node's in the environment (a metrics port, a public URL) is not
    given to both, and its history is its own (beside its private Redis), not the
    machine's event store that another demo cluster may be writing."""
    shared = {
        "COORDINATOR_METRICS_PORT": str(free_port()),
        "COORDINATOR_PUBLIC_URL": "http://127.0.0.1:1",
        "XDG_DATA_HOME": str(tmp_path / "machine"),  # where the machine's store would be
    }
    for ending in ("hup", "kill", "redis"):
        base = free_port(2)
        proc, out = await _start(base, shared)
        text = "\n".join(out.lines)
        assert "COORDINATOR_METRICS_PORT is not passed" in text, text
        urls = [f"http://127.0.0.1:{base + i}" for i in (0, 1)]
        assert all(healthy(url) for url in urls)
        pids = [int(m[3]) for line in out.lines if (m := NODE_LINE.match(line))]
        redis = _redis_pid(proc.pid)
        if ending == "hup":
            proc.send_signal(signal.SIGHUP)
        elif ending == "kill":
            proc.kill()
        else:
            os.kill(redis, signal.SIGKILL)
        rest, _ = await asyncio.wait_for(proc.communicate(), 60)
        said = "\n".join(out.lines) + rest.decode()
        for pid in (*pids, redis):
            for _ in range(200):
                if not _alive(pid):
                    break
                await asyncio.sleep(0.1)
            assert not _alive(pid), (ending, pid, said)
        if ending == "redis":
            assert "the cluster's Redis exited with code -9; stopping" in said, said
            assert proc.returncode == 1
        assert "Traceback" not in said
    assert not (tmp_path / "machine").exists()  # the machine's store was not touched
