"""The ``coordinator`` command line, run as real processes (``python -m coordinator``)."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from coordinator import ManagerConfig
from coordinator.auth import TokenSettings, TokenVerifier, as_verifier, verify_token
from coordinator.cli import build_config, build_parser, main
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
        (["serve", "--secret", "s", "--close-delay", "soon"], {}, 2, "invalid float value"),
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


async def _status(url: str) -> int:
    try:
        status, _ = await get_json(f"{url}/healthz")
    except aiohttp.ClientError:
        return 0
    return status


def free_port_pair() -> int:
    """A port p with p and p + 1 free, below the ephemeral range: the cluster's embedded
    Redis takes an OS-assigned port, which must not land on p + 1 meanwhile."""
    rng = random.Random()
    while True:
        base = rng.randrange(20_000, 32_000)
        if _bindable(base) and _bindable(base + 1):
            return base


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_cluster_starts_nodes_and_stops_them_on_ctrl_c() -> None:
    """Its nodes share the machine: an agent_cpus from the environment (which would pin
    every node's event loop to one CPU) is not passed on, and it says so."""
    base = free_port_pair()
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
        assert (
            f"coordinator chat --url http://127.0.0.1:{base} --url http://127.0.0.1:{base + 1} "
            f"--conversation demo1 --secret={secret.group(1)}" in text
        )
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
