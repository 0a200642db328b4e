"""Agent isolation without I/O: the node<->worker frames, the settings and their flags."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from coordinator import ConfigError, Fenced, ManagerConfig, SpeculationLost
from coordinator.cli import build_config, build_parser
from workers.channel import (
    DISPATCH,
    MAX_FRAME,
    ChannelError,
    FrameReader,
    describe,
    frame,
    refusal,
)


def test_frames_are_reassembled_from_any_split() -> None:
    messages = [
        [DISPATCH, i, 7, {"action": "message", "args": {"content": "x" * i}}] for i in range(5)
    ]
    stream = b"".join(frame(m) for m in messages)
    for size in (1, 3, 7, len(stream)):
        reader = FrameReader()
        got: list[list[Any]] = []
        for start in range(0, len(stream), size):
            got += reader.feed(stream[start : start + size])
        assert got == messages


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ((MAX_FRAME + 1).to_bytes(4, "big"), "announced"),
        (len(b"\xc1").to_bytes(4, "big") + b"\xc1", "undecodable"),
        (frame({"not": "a list"}), "non-empty array"),  # type: ignore[arg-type]
        (frame(["kind"]), "non-empty array"),
        # A map keyed by an array (a tuple key packed): msgpack cannot hash it back. It
        # had ended the worker's process, and every loop in it.
        (frame([1, {(1, 2): "x"}]), "undecodable"),
    ],
)
def test_a_frame_that_is_not_ours_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(ChannelError, match=why):
        FrameReader().feed(data)


def test_fenced_and_speculation_lost_cross_the_channel_by_name() -> None:
    for exc in (Fenced("c1", 3, 4), SpeculationLost("c1", 9)):
        kind, detail = describe(exc)
        back = refusal(kind, msgpack.unpackb(msgpack.packb(detail)))
        assert type(back) is type(exc) and str(back) == str(exc)
    kind, detail = describe(ValueError("boom"))
    assert (kind, detail) == ("error", "ValueError: boom")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"agent_isolation": "thread"}, "agent_isolation must be one of process, none"),
        ({"agent_workers": 0}, "agent_workers must be > 0"),
        ({"agent_stall_timeout": 0}, "agent_stall_timeout must be > 0"),
        ({"max_dispatch_attempts": 0}, "max_dispatch_attempts must be > 0"),
        ({"agent_memory_limit": 1 << 20}, "at least 128M"),
        ({"agent_dispatch_timeout": -1.0}, "agent_dispatch_timeout must be >= 0"),
        ({"agent_start_timeout": -1.0}, "agent_start_timeout must be >= 0"),
    ],
)
def test_agent_settings_are_checked(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ManagerConfig(**changes)


def test_agent_flags_and_their_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    def config(*argv: str) -> ManagerConfig:
        args = build_parser().parse_args(["serve", "--secret", "s", *argv])
        return build_config(args, "redis://127.0.0.1:6379/0")

    default = config()
    assert (default.agent_isolation, default.agent_memory_limit) == ("process", 0)
    assert default.agent_workers >= 1 and default.agent_dispatch_timeout == 0
    assert default.agent_start_timeout == 60
    got = config(
        *("--agent-isolation", "none", "--agent-workers", "3", "--agent-stall-timeout", "2.5"),
        *("--max-dispatch-attempts", "4", "--agent-memory-limit", "512M"),
        *("--agent-dispatch-timeout", "30", "--agent-start-timeout", "0"),
    )
    assert (got.agent_isolation, got.agent_workers, got.agent_stall_timeout) == ("none", 3, 2.5)
    assert (got.max_dispatch_attempts, got.agent_memory_limit) == (4, 512 << 20)
    assert (got.agent_dispatch_timeout, got.agent_start_timeout) == (30, 0)
    assert config("--agent-memory-limit", "1.5G").agent_memory_limit == 3 << 29
    assert config("--agent-memory-limit", "off").agent_memory_limit == 0
    monkeypatch.setenv("COORDINATOR_AGENT_ISOLATION", "none")
    monkeypatch.setenv("COORDINATOR_AGENT_MEMORY_LIMIT", "256MiB")
    monkeypatch.setenv("COORDINATOR_AGENT_START_TIMEOUT", "300")
    assert config().agent_start_timeout == 300
    assert (config().agent_isolation, config().agent_memory_limit) == ("none", 256 << 20)
    with pytest.raises(SystemExit):
        config("--agent-memory-limit", "lots")
