"""The ``coordinator`` command line, run as real processes (``python -m coordinator``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
import pytest

from coordinator import ManagerConfig
from coordinator.auth import (
    TokenSettings,
    TokenVerifier,
    as_verifier,
    issue_token,
    verify_token,
)
from coordinator.cli import _reason, build_config, build_parser, main
from coordinator.embedded import free_port
from coordinator.errors import ConfigError, InvalidInput
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


async def run(
    *args: str, within: float = 30.0, stdin: bytes = b"", **env: str
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "coordinator",
        *args,
        cwd=REPO,
        env=child_env(**env),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(
            f"`coordinator {' '.join(args)}` still running after {within}s"
        ) from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def spawn(*args: str, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "coordinator",
        *args,
        cwd=REPO,
        env=child_env(**env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def read_until(
    proc: asyncio.subprocess.Process, pattern: str, within: float = 30
) -> list[str]:
    """Lines of the process's stdout up to the first one matching ``pattern``."""
    assert proc.stdout is not None
    lines: list[str] = []

    async def reader() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            lines.append(line.decode().rstrip("\n"))
            if re.search(pattern, lines[-1]):
                return
        err = (await proc.stderr.read()).decode() if proc.stderr is not None else ""
        raise AssertionError(f"process ended before printing {pattern!r}: {lines}\n{err}")

    try:
        await asyncio.wait_for(reader(), within)
    except TimeoutError:
        raise AssertionError(f"no line matching {pattern!r} within {within}s: {lines}") from None
    return lines


async def stop(proc: asyncio.subprocess.Process, sig: int, within: float = 20) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        # Both pipes read to their end: one left open outlives the test's event loop.
        _, err = await asyncio.wait_for(proc.communicate(), within)
        code = await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"process did not stop within {within}s of signal {sig}") from None
    return code, err.decode()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def get_json(url: str, token: str | None = None) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


# -- in-process: help and token ------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["serve"], ["cluster"], ["token"], ["chat"]])
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: coordinator {' '.join(command)}".rstrip())
    assert len(out.splitlines()) > 5


@pytest.mark.parametrize("nodes", ["0", "-1", "33", "1000"])
def test_cluster_refuses_a_node_count_it_cannot_mean(
    nodes: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cluster", "--nodes", nodes]) == 2
    assert f"--nodes must be 1-32 (each a process with workers), got {nodes}" in (
        capsys.readouterr().err
    )


def test_token_prints_only_the_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COORDINATOR_SECRET", raising=False)
    assert main(["token", "alice", "--secret", "s", "--ttl", "60"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert verify_token(out.strip(), "s") == "alice"
    monkeypatch.setenv("COORDINATOR_SECRET", "from-env")
    assert main(["token", "bob"]) == 0
    assert verify_token(capsys.readouterr().out.strip(), "from-env") == "bob"
    monkeypatch.delenv("COORDINATOR_SECRET")
    assert main(["token", "bob"]) == 2
    assert "error: token needs a secret" in capsys.readouterr().err
    assert main(["token", "bad user", "--secret", "s"]) == 2
    assert "invalid user id 'bad user'" in capsys.readouterr().err


def test_token_with_issuer_and_audience(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COORDINATOR_TOKEN_AUDIENCE", "coordinator")
    assert main(["token", "alice", "--secret", "s", "--token-issuer", "https://idp"]) == 0
    token = capsys.readouterr().out.strip()
    verifier = TokenVerifier.from_settings(
        TokenSettings(secret="s", issuer="https://idp", audience="coordinator")
    )
    assert verifier.verify(token).user == "alice"  # its iss and aud are the ones expected
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["iss"], claims["aud"]) == ("https://idp", "coordinator")
    assert claims["exp"] - claims["iat"] == 86_400


def test_serve_help_names_the_token_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in (
        "--token-algorithm {HS256,RS256,ES256}",
        "--token-public-key FILE",
        "--token-jwks FILE",
        "--token-issuer ISS",
        "--token-audience AUD",
        "--token-max-lifetime SECONDS",
        "env COORDINATOR_TOKEN_JWKS",
        "(default: 604800)",
        "required with HS256",
    ):
        assert text in out, text


# -- processes -----------------------------------------------------------------------
async def test_token_command_as_a_process(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("file-secret\n")
    (
        (rc, out, err),
        (rc_env, out_env, err_env),
        (rc_bad, _, err_bad),
        (rc_f, out_f, err_f),
    ) = await asyncio.gather(
        run("token", "alice", "--secret", "s", "--ttl", "30"),
        run("token", "bob", COORDINATOR_SECRET="env-secret"),
        run("token", "carol"),
        run("token", "root", "--admin", "--org", "acme", "--secret-file", str(secret_file)),
    )
    # On the command line the secret works, with a warning that `ps` shows it.
    assert rc == 0 and err.startswith("warning: --secret on the command line is visible")
    assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\n", out)  # a JWT
    assert verify_token(out.strip(), "s") == "alice"
    assert (rc_env, err_env) == (0, "") and verify_token(out_env.strip(), "env-secret") == "bob"
    assert rc_bad == 2
    assert err_bad == (
        "error: token needs a secret: pass --secret-file, set COORDINATOR_SECRET or pass --secret\n"
    )
    assert (rc_f, err_f) == (0, "")
    identity = as_verifier("file-secret").verify(out_f.strip())
    assert (identity.user, identity.admin, identity.org) == ("root", True, "acme")


async def test_serve_configuration_errors(redis_url: str) -> None:
    cases = [
        (
            ["serve"],
            {},
            2,
            "error: serve needs a secret: pass --secret-file, set COORDINATOR_SECRET",
        ),
        (
            ["serve", "--secret", "s", "--close-delay", "-1"],
            {},
            2,
            "error: close_delay must be > 0, got -1.0",
        ),
        (["serve", "--secret", "s"], {"COORDINATOR_CLOSE_DELAY": "-3"}, 2, "got -3.0"),
        (
            ["serve", "--secret", "s", "--close-delay", "soon"],
            {},
            2,
            "argument --close-delay: expected a number, got 'soon'",
        ),
        (
            ["serve", "--secret", "s", "--speculative-dispatch", "maybe"],
            {},
            2,
            "expected on or off, got 'maybe'",
        ),
        (["serve", "--secret", "s"], {"COORDINATOR_SPECULATIVE_DISPATCH": "never"}, 2, "on or off"),
        (
            ["serve", "--secret", "s", "--heartbeat-interval", "5"],
            {},
            2,
            "heartbeat_interval must leave room",
        ),
        (
            ["serve", "--secret", "s", "--port", "0", "--redis-url", redis_url, "--agent", "x:Y"],
            {},
            2,
            "cannot import agent module 'x'",
        ),
        (
            ["serve", "--secret", "s", "--redis-url", "redis://127.0.0.1:1"],
            {},
            1,
            "error: Redis at redis://127.0.0.1:1 is unreachable",
        ),
        (
            ["serve", "--redis-url", "redis://127.0.0.1:1"],
            {"COORDINATOR_SECRET": "s"},
            1,
            "redis://127.0.0.1:1",
        ),
    ]
    allowed = sorted(os.sched_getaffinity(0))
    cases += [
        (
            ["serve", "--secret", "s", "--agent-cpus", "two"],
            {},
            2,
            "error: agent_cpus must be 'auto' or a CPU list such as 1-3,6, got 'two'",
        ),
        (["serve", "--secret", "s"], {"COORDINATOR_AGENT_CPUS": "3-1"}, 2, "not a CPU range"),
        (
            ["serve", "--secret", "s", "--agent-cpus", "8000"],
            {},
            2,
            "names CPUs 8000, which this node may not use",
        ),
        (
            ["serve", "--secret", "s", "--agent-cpus", ",".join(map(str, allowed))],
            {},
            2,
            "leaves no CPU for the node",
        ),
        (
            ["serve", "--secret", "s", "--agent-cpus", "auto", "--agent-isolation", "none"],
            {},
            2,
            "agent_cpus places agent worker processes: it needs agent_isolation process",
        ),
        (
            ["serve", "--secret", "s", "--agent-dispatch-timeout", "1e6"],
            {},
            2,
            "error: agent_dispatch_timeout must be at most 86400 seconds (0: none), "
            "got 1000000.0\n",
        ),
        (
            ["serve", "--secret", "s"],
            {"COORDINATOR_AGENT_START_TIMEOUT": "86401"},
            2,
            "error: agent_start_timeout must be at most 86400 seconds (0: none), got 86401.0\n",
        ),
    ]
    missing = "/nonexistent/idp.pem"
    cases += [
        (
            ["serve", "--token-algorithm", "RS256"],
            {},
            2,
            "error: RS256 tokens need a public key file or a JWKS file (one of them)",
        ),
        (
            ["serve", "--token-public-key", missing],
            {"COORDINATOR_TOKEN_ALGORITHM": "rs256"},
            2,
            f"error: cannot read token key file {missing}: No such file or directory",
        ),
        (["serve", "--token-algorithm", "none"], {}, 2, "invalid choice: 'NONE'"),
        (
            ["serve", "--secret", "s", "--token-max-lifetime", "0"],
            {},
            2,
            "token max lifetime must be > 0 seconds",
        ),
        (
            ["serve", "--secret", "s", "--token-jwks", missing],
            {},
            2,
            "HS256 tokens are verified with the secret, not a key file",
        ),
    ]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    cases.append(
        (
            ["serve", "--secret", "s", "--port", port, "--redis-url", redis_url],
            {},
            1,
            f"error: cannot listen on 127.0.0.1:{port}: Address already in use",
        )
    )
    with busy:
        results = await asyncio.gather(*(run(*args, within=15, **env) for args, env, _, _ in cases))
    for (args, _, code, message), (rc, out, err) in zip(cases, results, strict=True):
        assert rc == code, (args, rc, err)
        assert message in err, (args, err)
        assert "Traceback" not in err, (args, err)
        assert "serving on" not in out


async def test_serve_with_embedded_redis_chat_and_graceful_stop() -> None:
    proc = await spawn("serve", "--port", "0", "--secret", "s3", "--log-level", "warning")
    try:
        lines = await read_until(proc, r"serving on http://")
        embedded = re.search(r"started a private embedded Redis at (redis://\S+)", lines[0])
        assert embedded, lines
        redis_port = int(embedded.group(1).rsplit(":", 1)[1].split("/")[0])
        match = re.fullmatch(
            r"node (\S+) serving on (http://127\.0\.0\.1:(\d+)) \(standalone Redis at .*\)",
            lines[-1],
        )
        assert match, lines
        node_id, url = match.group(1), match.group(2)
        # The event store it uses, whatever its working directory: the machine's default.
        (store,) = await read_until(proc, r"event store")
        events = os.path.join(os.environ["XDG_DATA_HOME"], "coordinator", "events")
        assert store == f"node {node_id} keeps history in the event store file://{events}"
        status, body = await get_json(f"{url}/healthz")
        assert status == 200 and body["node_id"] == node_id

        rc, out, err = await run(
            "chat",
            "--url",
            url,
            "--conversation",
            "talk",
            "--secret",
            "s3",
            "--user",
            "alice",
            stdin=b"hello\n\nworld\n",
        )
        assert rc == 0, err
        # The chat sends "world" once "hello" is acknowledged, so the answer to "hello"
        # may be logged before or after it (with the agent in a worker process it often
        # comes after): ids in order, each answer after what it answers.
        shown = [re.fullmatch(r"\[(\d+)\] (\w+): (.+)", line) for line in out.splitlines()]
        assert all(shown), out
        assert [int(m[1]) for m in shown if m] == list(range(1, len(shown) + 1)), out
        # Between the messages, the agent's state changes: "(agent running)" and so on.
        notes = [m[3] for m in shown if m and m[2] == "environment"]
        assert notes and all(re.fullmatch(r"\(agent \w+\)", n) for n in notes), out
        events = [(int(m[1]), m[2], m[3]) for m in shown if m and m[2] != "environment"]
        assert len(events) == 4, out
        for source in ("user", "agent"):
            assert [t for _, s, t in events if s == source] == ["hello", "world"], out
        assert events[0][1:] == ("user", "hello") and events[3][1:] == ("agent", "world"), out
        asked = next(i for i, s, t in events if (s, t) == ("user", "world"))
        assert f"connected to node {node_id}" in err
        assert f"agent loop runs on node {node_id} (this node)" in err

        # Replay from an id, and an ack error shown for an oversize message.
        big = b"x" * 70_000 + b"\n"
        rc, out, err = await run(
            "chat", "--url", url, "--conversation", "talk", "--secret", "s3", "--user", "alice",
            "--latest-event-id", str(asked), "--wait", "2", stdin=big,
        )  # fmt: skip
        assert rc == 0, err
        assert [line for line in out.splitlines() if "(agent " not in line] == [
            f"[{events[3][0]}] agent: world"
        ]
        assert "the limit is 65536" in err

        # Another user cannot join it.
        rc, out, err = await run(
            "chat", "--url", url, "--conversation", "talk", "--secret", "s3", "--user", "bob",
        )  # fmt: skip
        assert rc == 1
        assert "forbidden: conversation 'talk' belongs to another user" in err
    finally:
        code, err = await stop(proc, signal.SIGTERM)
    assert code == 0, err
    assert "Traceback" not in err
    assert not port_open(redis_port), "the embedded Redis outlived its node"


async def test_a_second_signal_stops_waiting_for_the_drain() -> None:
    """SIGTERM drains: the node waits for its loops to close (this agent takes two
    minutes). A second SIGTERM stops waiting: the node exits at once with code 130 and
    says so, and its embedded Redis goes with it."""
    proc = await spawn(
        "serve", "--port", "0", "--secret", "s4", "--log-level", "warning",
        "--agent", "tests.agents:SlowCloseAgent", "--drain-timeout", "300",
    )  # fmt: skip
    try:
        lines = await read_until(proc, r"serving on http://")
        embedded = re.search(r"started a private embedded Redis at (redis://\S+)", lines[0])
        assert embedded, lines
        redis_port = int(embedded.group(1).rsplit(":", 1)[1].split("/")[0])
        url = re.search(r"serving on (\S+)", lines[-1]).group(1)  # type: ignore[union-attr]
        rc, out, err = await run(
            "chat", "--url", url, "--conversation", "slow", "--secret", "s4", "--user", "sam",
            stdin=b"hi\n",
        )  # fmt: skip
        said = [line.split("] ", 1)[-1] for line in out.splitlines() if "(agent " not in line]
        assert rc == 0 and said == ["user: hi", "agent: hi"], err
        proc.send_signal(signal.SIGTERM)

        # The drain now waits for the agent; /healthz says so while it does.
        async def draining() -> bool:
            return await _status(url) == 503

        await wait_until(draining, timeout=10, interval=0.1, what="draining")
        assert proc.returncode is None
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    code, err = await stop(proc, signal.SIGTERM, within=15)
    assert code == 130, err
    assert "stopped before its drain finished" in err
    assert "Traceback" not in err
    assert not port_open(redis_port), "the embedded Redis outlived its node"


async def test_a_stop_signal_to_the_whole_process_group_is_a_plain_drain() -> None:
    """systemd's stop (and a terminal's Ctrl-C) signals every process of the service:
    the agent workers too. They leave their stop to the node, which drains in order; and
    should the node die, its workers go with it. Before, a SIGTERM to the group killed the
    workers first: "worker died; replacing it" at ERROR, and new workers spawned while
    the node was stopping."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator", "serve", "--port", "0", "--secret", "s5",
        "--log-level", "info", "--agent-workers", "2",
        cwd=REPO,
        env=child_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group, as a service's
    )  # fmt: skip
    try:
        lines = await read_until(proc, r"serving on http://")
        url = re.search(r"serving on (\S+)", lines[-1]).group(1)  # type: ignore[union-attr]
        rc, _, err = await run(
            "chat", "--url", url, "--conversation", "grp", "--secret", "s5", stdin=b"hi\n"
        )
        assert rc == 0, err
        workers = _agent_workers_of(proc.pid)
        assert len(workers) == 2, workers
        os.killpg(proc.pid, signal.SIGTERM)
        _, err_bytes = await asyncio.wait_for(proc.communicate(), 30)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    err = err_bytes.decode()
    assert proc.returncode == 0, err
    assert "worker died" not in err and "ERROR" not in err, err
    assert "Traceback" not in err
    assert not any(map(_running, workers)), workers


def _agent_workers_of(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [c for c in map(int, children) if b"workers.process" in _cmdline(c)]


def _cmdline(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


async def _status(url: str) -> int:
    try:
        status, _ = await get_json(f"{url}/healthz")
    except aiohttp.ClientError:
        return 0
    return status


async def test_cluster_starts_nodes_and_stops_them_on_ctrl_c() -> None:
    """Its nodes share the machine: an agent_cpus from the environment (which would pin
    every node's event loop to one CPU) is not passed on, and it says so."""
    base = free_port(2)
    proc = await spawn(
        "cluster", "--nodes", "2", "--base-port", str(base), COORDINATOR_AGENT_CPUS="auto"
    )
    try:
        lines = await read_until(proc, r"Press Ctrl-C", within=45)
        text = "\n".join(lines)
        assert "COORDINATOR_AGENT_CPUS is not passed to the local cluster's nodes" in text
        nodes = re.findall(r"^  (node\d)  (http://\S+)  \(pid (\d+)\)$", text, re.M)
        assert [(name, url) for name, url, _ in nodes] == [
            ("node1", f"http://127.0.0.1:{base}"),
            ("node2", f"http://127.0.0.1:{base + 1}"),
        ]
        for _, _, pid in nodes:
            assert os.sched_getaffinity(int(pid)) == os.sched_getaffinity(0)
        secret = re.search(r"^secret: (\S+)$", text, re.M)
        token = re.search(r'^token for user "demo": (\S+)$', text, re.M)
        assert secret and token
        assert verify_token(token.group(1), secret.group(1)) == "demo"
        chat = re.search(
            f"coordinator chat --url http://127.0.0.1:{base} --url http://127.0.0.1:{base + 1} "
            r"--conversation demo1 --secret-file (\S+)$",
            text,
            re.M,
        )
        assert chat, text
        with open(chat.group(1), encoding="utf-8") as f:  # noqa: ASYNC230 (a few bytes)
            assert f.read() == secret.group(1) + "\n"
        assert os.stat(chat.group(1)).st_mode & 0o777 == 0o600
        status, body = await get_json(f"http://127.0.0.1:{base + 1}/api/cluster", token.group(1))
        assert status == 200 and sorted(body["nodes"]) == ["node1", "node2"]  # type: ignore[call-overload]
    finally:
        code, err = await stop(proc, signal.SIGINT, within=30)
    assert code == 0, err
    assert "Traceback" not in err
    await wait_until(
        lambda: not port_open(base) and not port_open(base + 1), timeout=5, what="ports closed"
    )


def test_speculative_dispatch_switch_from_flag_and_environment(monkeypatch: Any) -> None:
    def config(*argv: str) -> ManagerConfig:
        args = build_parser().parse_args(["serve", "--secret", "s", *argv])
        return build_config(args, "redis://127.0.0.1:6379/0")

    assert config().speculative_dispatch is True
    assert config("--speculative-dispatch", "off").speculative_dispatch is False
    assert config("--speculative-dispatch", "ON").speculative_dispatch is True
    monkeypatch.setenv("COORDINATOR_SPECULATIVE_DISPATCH", "false")
    assert config().speculative_dispatch is False
    assert config("--speculative-dispatch", "on").speculative_dispatch is True


# -- bad input: one line on stderr, never a traceback, never a secret ----------------
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    # argparse has no public way to list a parser's subparsers and actions: _actions it is.
    command = next(a for a in build_parser()._actions if a.dest == "command")
    return dict(command.choices)  # type: ignore[arg-type]


def _flag(action: argparse.Action) -> str:
    return next(f for f in action.option_strings if f.startswith("--"))


def _env_name(flag: str) -> str:
    return "COORDINATOR_" + flag[2:].replace("-", "_").upper()


async def test_serve_refuses_malformed_redis_urls_in_one_line(redis_url: str) -> None:
    port = urlsplit(redis_url).port
    malformed = [
        ("redis://u:S3CRET/PW@127.0.0.1:6399/0", "must be percent-encoded"),
        ("redis://127.0.0.1:notaport/0", "the port is not a number"),
        ("redis://[::1", "its host cannot be read"),
        ("redis://127.0.0.1:6379999/0", "the port is not a number"),
        (f"redis://127.0.0.1:{port}/0?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
        (f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=bogus", "Certificate Requirements Flag"),
        ("redis://", "no host: redis://HOST[:PORT][/DB]"),  # not localhost:6379
        ("redis+sentinel://[::1:26379/mymaster", "its host cannot be read"),
    ]
    base = ["serve", "--port", "0", "--log-level", "warning"]
    runs = [
        run(*base, "--redis-url", url, within=20, COORDINATOR_SECRET="s" * 32)
        for url, _ in malformed
    ]
    runs += [
        run(*base, within=20, COORDINATOR_SECRET="s" * 32, COORDINATOR_REDIS_URL=url)
        for url, _ in malformed
    ]
    results = await asyncio.gather(*runs)
    for (url, why), (rc, out, err) in zip(malformed * 2, results, strict=True):
        assert rc == 2, (url, rc, err)
        lines = [x for x in err.splitlines() if not x.startswith("warning: ")]
        assert len(lines) == 1, (url, err)
        line = lines[0]
        assert line.startswith("error: redis_url ") and why in line, (url, err)
        assert "S3CRET" not in err and "PW" not in err and "Traceback" not in err, (url, err)
        assert "serving on" not in out


async def test_redis_url_passwords_stay_out_of_errors_and_are_warned_about(
    redis_url: str,
) -> None:
    """A password with a space (wrong for this Redis, which has none) or an '@'. (A
    plain password given to a Redis that has none is taken, as redis-py takes it:
    test_preflight.py.)"""
    parts = urlsplit(redis_url)
    if parts.password or parts.username:
        pytest.skip("needs a Redis that has no password (REDIS_URL has one)")
    address = f"{parts.hostname}:{parts.port}"
    cases = [
        (
            f"redis://u:S3CRET PW@{address}/0",
            f"error: Redis at redis://u:***@{address}/0 refused the login (",
        ),
        ("redis://u:S3CRET@PW@127.0.0.1:1/0", "error: Redis at redis://u:***@127.0.0.1:1/0 is"),
    ]
    results = await asyncio.gather(
        *(
            run(
                "serve",
                "--port",
                "0",
                "--redis-url",
                url,
                "--log-level",
                "warning",
                within=30,
                COORDINATOR_SECRET="s" * 32,
            )
            for url, _ in cases
        )
    )
    for (url, message), (rc, out, err) in zip(cases, results, strict=True):
        assert rc == 1, (url, err)
        assert err.startswith("warning: --redis-url carries a password"), (url, err)
        (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
        assert line.startswith(message), (url, err)
        assert "S3CRET" not in err + out and "Traceback" not in err, (url, err)


@pytest.mark.parametrize("command", [["serve"], ["token", "alice"], ["chat"], ["cluster"]])
def test_help_never_shows_a_secret_from_the_environment(
    command: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    token = issue_token("alice", "s" * 32)
    monkeypatch.setenv("COORDINATOR_SECRET", "TOPSECRET")
    monkeypatch.setenv("COORDINATOR_TOKEN", token)
    monkeypatch.setenv("COORDINATOR_REDIS_URL", "redis://u:REDISPW@redis:6379/0")
    monkeypatch.setenv("COORDINATOR_EVENT_STORE", "postgresql://u:PGPW@db/events")
    monkeypatch.setenv("COORDINATOR_TOKEN_ISSUER", "https://u:URLPW@idp.example.test")
    monkeypatch.setenv("COORDINATOR_HOST", "0.0.0.0")
    monkeypatch.setenv("COORDINATOR_NODE_TTL", "9")
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for secret in ("TOPSECRET", token, token[:20], "REDISPW", "PGPW", "URLPW"):
        assert secret not in out, secret
    if command != ["cluster"]:  # whose help says "(default: generated)"
        assert "(default: set, from $COORDINATOR_SECRET)" in out
    if command == ["chat"]:
        assert "(default: set, from $COORDINATOR_TOKEN)" in out
    if command[0] in ("serve", "token"):
        issuer = "https://u:***@idp.example.test, from $COORDINATOR_TOKEN_ISSUER"
        assert f"(default: {issuer})" in out
    if command == ["serve"]:
        assert "(default: 0.0.0.0, from $COORDINATOR_HOST)" in out
        # Flags whose help writes its own default say the environment's instead.
        redis = "redis://u:***@redis:6379/0, from $COORDINATOR_REDIS_URL"
        assert f"(default: {redis})" in out and "private embedded one" not in out
        assert "(default: 9, from $COORDINATOR_NODE_TTL)" in out


def test_environment_is_checked_against_each_flags_choices(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """argparse converts a default taken from the environment but never checks it
    against the flag's choices: every flag with choices and a variable is checked."""
    checked = []
    for name, parser in _subparsers().items():
        for action in parser._actions:
            variable = _env_name(_flag(action)) if action.option_strings else ""
            if action.choices is None or not variable or variable not in (action.help or ""):
                continue
            monkeypatch.setenv(variable, "verbose")
            with pytest.raises(SystemExit) as info:
                build_parser().parse_args([name])
            assert info.value.code == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: {variable}: invalid choice: "), err
            # The flag given overrides its variable, a wrong one included.
            good = str(next(iter(action.choices)))
            args = build_parser().parse_args([name, _flag(action), good])
            assert getattr(args, action.dest) == action.type(good) if action.type else good
            monkeypatch.delenv(variable)
            checked.append(variable)
    assert sorted(checked) == [
        "COORDINATOR_LOG_FORMAT",
        "COORDINATOR_LOG_LEVEL",
        "COORDINATOR_TOKEN_ALGORITHM",
    ]
    monkeypatch.setenv("COORDINATOR_LOG_LEVEL", "DEBUG")  # converted, then checked
    assert build_parser().parse_args(["serve"]).log_level == "debug"


def _numeric_flags() -> list[tuple[str, str, str]]:
    """(command, flag, kind) of every flag that takes a number or a size."""
    found = []
    for name, parser in _subparsers().items():
        for action in parser._actions:
            kind = getattr(action.type, "__name__", "")
            if action.option_strings and kind in ("number", "_size", "int"):
                found.append((name, _flag(action), kind))
    return found


def test_every_numeric_flag_refuses_nan_inf_and_overflow(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = _numeric_flags()
    assert {f for _, f, k in flags if k != "int"} >= {
        "--ttl", "--token-max-lifetime", "--node-ttl", "--handshake-timeout",
        "--redis-retention", "--drain-timeout", "--log-window-bytes", "--wait",
    }  # fmt: skip
    positional = {"token": ["alice"]}
    for command, flag, _ in flags:
        for value in ("nan", "inf", "-inf", "1e400", "NaN", "1e300"):  # 1e300: past Redis
            argv = [command, *positional.get(command, []), flag, value]
            with pytest.raises(SystemExit) as info:
                build_parser().parse_args(argv)
            assert info.value.code == 2, argv
            err = capsys.readouterr().err
            assert f"error: argument {flag}: " in err and "_size" not in err, (argv, err)
        if command == "serve":  # and its environment variable
            monkeypatch.setenv(_env_name(flag), "nan")
            with pytest.raises(SystemExit):
                build_parser().parse_args(["serve"])
            assert capsys.readouterr().err.startswith(f"error: {_env_name(flag)}: "), flag
            monkeypatch.delenv(_env_name(flag))
    sizes = {"512M": 512 << 20, "2g": 2 << 30, "1T": 1 << 40, "64KiB": 64 << 10, "off": 0}
    for text, size in sizes.items():  # the README's own spellings ("128M to 128T")
        args = build_parser().parse_args(["serve", "--agent-memory-limit", text])
        assert args.agent_memory_limit == size, text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-agent-event-bytes", "1e308G"])
    assert "expected a size such as 512M, got '1e308G'" in capsys.readouterr().err
    # The Python API's config too: finite, but past what Redis takes.
    for field, value in [("redis_retention", 1e300), ("log_window_events", 2**60)]:
        with pytest.raises(ConfigError, match=f"{field} must be at most"):
            ManagerConfig(**{field: value})
    for ttl in (math.nan, math.inf, -math.inf):  # the library refuses them too
        with pytest.raises(InvalidInput, match="token ttl must be a positive number"):
            issue_token("alice", "s" * 32, ttl)


async def test_secrets_that_are_not_utf8_are_refused_in_one_line(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(b"\xff\xfe not text\n")
    chat = ["chat", "--url", "http://127.0.0.1:1", "--conversation", "c"]
    from_file = [["token", "alice"], ["serve", "--port", "0"], chat]
    from_env = [["token", "alice"], chat]
    results = await asyncio.gather(
        *(run(*argv, "--secret-file", str(secret_file)) for argv in from_file),
        # os.environ keeps bytes that are not UTF-8 as lone surrogates.
        *(run(*argv, COORDINATOR_SECRET="\udcff") for argv in from_env),
    )
    expected = [f"error: --secret-file {secret_file} is not UTF-8 text\n"] * len(from_file)
    expected += ["error: the token secret must be UTF-8 text\n"] * len(from_env)
    for argv, want, (rc, out, err) in zip(from_file + from_env, expected, results, strict=True):
        assert (rc, out, err) == (2, "", want), argv


async def test_chat_refuses_bad_urls_and_leaks_no_session_or_password() -> None:
    down = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            down.append(s.getsockname()[1])  # closed: nothing listens there
    talk = ["--conversation", "x", "--reconnect-for", "3"]
    bad = ["notaurl", "http://[::1", "http://127.0.0.1:99999", "ftp://u:PASSX@127.0.0.1/"]
    bad += ["http://u:PASSX@127.0.0.1:1/path", "http://127.0.0.1:1/?x=1"]  # half used
    results = await asyncio.gather(
        *(run("chat", "--url", url, *talk, COORDINATOR_SECRET="s" * 32) for url in bad),
        run(
            "chat", "--url", f"http://127.0.0.1:{down[0]}",
            "--url", f"http://user:PASSX@127.0.0.1:{down[1]}", *talk,
            COORDINATOR_SECRET="s" * 32,
        ),
    )  # fmt: skip
    for url, (rc, _, err) in zip(bad, results[:-1], strict=True):
        assert rc == 2 and err.startswith("error: --url ") and err.count("\n") == 1, (url, err)
        assert "PASSX" not in err, err
    rc, _, err = results[-1]
    assert rc == 1, err
    assert f"! cannot connect to http://user:***@127.0.0.1:{down[1]}: " in err, err
    assert "PASSX" not in err and "Unclosed" not in err and "Traceback" not in err, err


def test_an_error_without_text_is_reported_by_its_class() -> None:
    """A start-up that times out waiting (for a subscription's confirmation, say) raises
    a TimeoutError with no text: the error line names it instead of ending in nothing."""
    assert _reason(TimeoutError()) == "TimeoutError"
    assert _reason(ConnectionError("Error 111 connecting")) == "Error 111 connecting"


async def test_two_stop_signals_back_to_back_stop_at_once_without_a_traceback(
    redis_url: str,
) -> None:
    """``timeout`` and a service manager may signal twice at once (the node and then its
    process group): the second signal can arrive before the first woke the node. Either
    way the node stops as documented (code 130 and why, or a finished drain: 0), never
    with a traceback. Two SIGTERMs sent together may reach it as one (a signal pending
    is not queued twice), a SIGTERM and a SIGINT do not."""
    for attempt in range(4):
        proc = await spawn(
            "serve", "--port", "0", "--redis-url", redis_url, "--log-level", "warning",
            "--agent-workers", "1", COORDINATOR_SECRET="s" * 32,
        )  # fmt: skip
        try:
            await read_until(proc, r"serving on http://")
            proc.send_signal(signal.SIGTERM)
        except BaseException:
            proc.kill()
            await proc.wait()
            raise
        code, err = await stop(proc, signal.SIGINT)
        assert "Traceback" not in err, (attempt, err)
        assert code in (0, 130), (attempt, code, err)
        if code == 130:
            assert "stopped before its drain finished" in err, err


async def test_a_secret_file_that_cannot_give_the_secret_is_a_one_line_error(
    tmp_path: Path,
) -> None:
    """``--secret-file`` missing, empty, not UTF-8, or given beside ``--secret``: exit 2
    with one line naming the problem, no traceback."""
    empty, binary = tmp_path / "empty", tmp_path / "binary"
    empty.write_text("\n")
    binary.write_bytes(b"\xff\xfe\n")
    cases = [
        (["--secret-file", str(tmp_path / "none")], "cannot read --secret-file"),
        (["--secret-file", str(empty)], f"--secret-file {empty} is empty"),
        (["--secret-file", str(binary)], f"--secret-file {binary} is not UTF-8 text"),
        (["--secret", "s", "--secret-file", str(empty)], "give the secret once"),
    ]
    results = await asyncio.gather(*(run("token", "bob", *args) for args, _ in cases))
    for (rc, out, err), (_, said) in zip(results, cases, strict=True):
        assert (rc, out) == (2, ""), (rc, out, err)
        assert err.startswith("error: ") and said in err and err.count("\n") == 1, err


async def test_a_stop_signal_while_starting_stops_at_once(redis_url: str) -> None:
    """A node restarted within its node_ttl after a kill -9 waits for its old lease to
    expire (it cannot tell a dead run from another process with its id). SIGTERM
    meanwhile stops it at once (exit 0, one line saying so) instead of after the wait,
    the start and a drain; the wait is said once, not every 250 ms."""
    args = ["serve", "--port", "0", "--secret", "s6", "--redis-url", redis_url,
            "--node-id", "twin", "--node-ttl", "30", "--log-level", "info"]  # fmt: skip
    first = await spawn(*args)
    try:
        await read_until(first, r"serving on http://")
    finally:
        first.kill()
        await first.communicate()
    second = await spawn(*args)
    assert second.stderr is not None
    try:
        async with asyncio.timeout(30):
            while b"still leased" not in (line := await second.stderr.readline()):
                assert line, "the second run ended before it waited"
        await asyncio.sleep(1.0)  # four more tries of the lease
    except BaseException:
        second.kill()
        await second.wait()
        raise
    code, err = await stop(second, signal.SIGTERM, within=5)
    assert code == 0, err
    assert "node twin stopped before it finished starting" in err
    assert "still leased" not in err, err  # said once (read above)
    assert "Traceback" not in err


async def test_the_log_as_json_lines_for_collectors() -> None:
    """``--log-format json`` (or COORDINATOR_LOG_FORMAT): every line on stderr, the agent
    workers' too (with their pid as ``worker``), is one JSON object with time, level,
    logger, node and message, redacted as the text log is; a bad value is refused
    naming the flag's choices."""
    proc = await spawn(
        "serve", "--port", "0", "--log-level", "debug", "--node-id", "jsonnode",
        COORDINATOR_SECRET="a-secret-long-enough-for-hs256-0123456789",
        COORDINATOR_LOG_FORMAT="json",
    )  # fmt: skip
    try:
        lines = await read_until(proc, r"serving on http://")
        url = re.search(r"serving on (\S+)", lines[-1]).group(1)  # type: ignore[union-attr]
        # A token in a URL reaches the log only redacted (the access log, at debug).
        status, _ = await get_json(f"{url}/nowhere?token=eyJhbGciOiJIUzI1NiJ9.e30.c2lnbg")
        assert status == 404
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    code, err = await stop(proc, signal.SIGTERM)
    assert code == 0, err
    records = [json.loads(line) for line in err.splitlines()]
    assert records, err
    for record in records:
        assert {"time", "level", "logger", "node", "message"} <= record.keys(), record
        assert record["node"] == "jsonnode" and record["time"].endswith("Z"), record
    assert any(r["message"] == "node jsonnode stopping" for r in records), records
    assert any("worker" in r for r in records), "the agent workers' lines are JSON too"
    assert any("/nowhere?token=" in r["message"] for r in records), records
    assert "c2lnbg" not in err
    rc, _, err = await run("serve", "--log-format", "xml", "--secret", "s")
    assert rc == 2 and "--log-format: invalid choice: 'xml'" in err, err


async def test_a_secret_rotation_accepts_the_previous_secrets_tokens(tmp_path: Path) -> None:
    """``--previous-secret-file``: a node with the new secret still takes tokens signed
    with the old one (a rotation without logging anyone out), not others; a file that
    cannot give secrets is a one-line error, exit 2."""
    new, old = "new-secret-" + "n" * 32, "old-secret-" + "o" * 32
    previous = tmp_path / "previous"
    previous.write_text(f"{old}\n\n")
    proc = await spawn(
        "serve", "--port", "0", "--previous-secret-file", str(previous),
        COORDINATOR_SECRET=new,
    )  # fmt: skip
    try:
        lines = await read_until(proc, r"serving on http://")
        url = re.search(r"serving on (\S+)", lines[-1]).group(1)  # type: ignore[union-attr]
        for secret, status in ((new, 200), (old, 200), ("x" * 40, 401)):
            got, _ = await get_json(f"{url}/api/conversations", issue_token("ann", secret))
            assert got == status, (secret[:3], got)
    finally:
        code, err = await stop(proc, signal.SIGTERM)
    assert code == 0 and old not in err, err
    empty = tmp_path / "empty"
    empty.write_text("\n \n")
    for path, said in (
        (tmp_path / "none", "cannot read --previous-secret-file"),
        (empty, f"--previous-secret-file {empty} holds no secret"),
    ):
        rc, _, err = await run("serve", "--previous-secret-file", str(path), COORDINATOR_SECRET="s")
        assert rc == 2 and err.startswith("error: ") and said in err, err
        assert "Traceback" not in err
