"""Two or more versions of the coordinator side by side in one run: did a change help?

``python -m bench.compare [--rates 50,200] [--rounds 8] [--seconds 4] [--cross] SYSTEM...``

With ``--cross`` each system also gets a second node, and a second group of clients
connects to it while their conversations' loops run on the first (the cross-node round
trip; the plain baseline has no such path).

Each SYSTEM is a git revision (``HEAD``, ``68b6268``, ...) or ``worktree`` (the files as
they are now), optionally followed by ``@flag=value,...`` for ``coordinator serve``
(``HEAD@speculative-dispatch=off``). Every system gets its own node process, running the
``coordinator`` and ``workers`` packages of that revision (``git archive``), on one
private Redis; plain python-socketio with ``AsyncRedisManager`` runs beside them as the
reference. One load generator sends actions to 20 conversations per system at a fixed
rate, in rounds of a few seconds per system, shuffled in each round, so that the
machine's drift hits all alike. Prints, per rate, the answers' p50/p90/p99, their p50 over
plain's and over the first SYSTEM's (before/after, ``none``/``process``: the ratio at a
glance), the acks' p50/p99 and the servers' CPU per action, and writes
``bench/results/compare-full.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    Mode,
    Proc,
    baseline_proc,
    log_dir,
    new_secret,
    node_proc,
    percentile,
    private_redis,
    run_under,
    start_all,
    stop_all,
    table,
    tree_cpu_seconds,
    url_of,
    write_json,
)
from bench.driver import LoadGenProcess, join_group

PLAIN = "plain python-socketio"


def checkout(rev: str, into: Path) -> Path:
    """The coordinator and workers packages of ``rev`` (or the work tree) under ``into``."""
    if rev == "worktree":
        return REPO
    try:
        data = subprocess.run(
            ["git", "archive", rev, "coordinator", "workers"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"cannot read revision {rev!r}: {exc.stderr.decode().strip()}") from None
    target = into / rev.replace("/", "_")
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(target, filter="data")
    return target


def token_issuer(code: Path, secret: str) -> Callable[[list[str]], list[str]]:
    """Tokens as the revision whose packages are in ``code`` makes them (token formats
    change between revisions): its own ``issue_token``, in a child process."""

    def issue(users: list[str]) -> list[str]:
        script = (
            "import sys\n"
            "from coordinator.auth import issue_token\n"
            "print('\\n'.join(issue_token(u, sys.argv[1]) for u in sys.argv[2:]))"
        )
        done = subprocess.run(
            [sys.executable, "-c", script, secret, *users],
            cwd=code,
            env={**os.environ, "PYTHONPATH": str(code)},
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.split()

    return issue


def parse_system(spec: str) -> tuple[str, list[str]]:
    rev, _, extra = spec.partition("@")
    flags: list[str] = []
    for item in filter(None, extra.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"bad flag {item!r} in {spec!r}: expected flag=value")
        flags += [f"--{key}", value]
    return rev or "worktree", flags


async def compare(
    systems: list[str], rates: list[int], rounds: int, seconds: float, cross: bool = False
) -> dict[str, Any]:
    secret = new_secret()
    logs = log_dir("compare")
    code_root = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    # Bad revisions and flags fail here, before anything starts.
    code = {
        spec: (checkout(rev, code_root), flags)
        for spec in systems
        for rev, flags in [parse_system(spec)]
    }
    with private_redis() as redis:
        procs: dict[str, Proc] = {
            PLAIN: baseline_proc(
                "plain",
                "bench.baselines.redis_emit",
                logs,
                ["--secret", secret, "--redis-url", redis.url],
            )
        }
        # group -> (node its clients join, node that starts their loops first)
        groups: dict[str, tuple[Proc, Proc | None]] = {PLAIN: (procs[PLAIN], None)}
        issuers = {PLAIN: token_issuer(REPO, secret)}
        for spec, (path, flags) in code.items():
            name = re.sub(r"[^A-Za-z0-9_-]", "-", spec)  # a node id
            node = node_proc(name, redis.url, secret, logs, extra=flags)
            procs[spec] = run_under(node, "bench.serve_from", str(path))
            # In its code: its agent workers (python -m, the cwd first) import its own.
            procs[spec].cwd = path
            groups[spec] = (procs[spec], None)
            issuers[spec] = token_issuer(path, secret)
            if cross:
                other = node_proc(f"{name}-b", redis.url, secret, logs, extra=flags)
                procs[f"{spec} (b)"] = run_under(other, "bench.serve_from", str(path))
                procs[f"{spec} (b)"].cwd = path
                groups[f"{spec} cross"] = (procs[f"{spec} (b)"], procs[spec])
                issuers[f"{spec} cross"] = issuers[spec]
        gen = LoadGenProcess()
        try:
            start_all(list(procs.values()))
            await gen.start()
            for n, (name, (joins, setup)) in enumerate(groups.items()):
                setup_url = url_of(setup) if setup is not None else None
                await join_group(
                    gen,
                    name,
                    url_of(joins),
                    secret,
                    f"cmp{n}",
                    setup_url=setup_url,
                    issue=issuers[name],
                )
            rng = random.Random(7)
            results: dict[str, Any] = {}
            for rate in rates:
                lat: dict[str, list[float]] = {name: [] for name in groups}
                acks: dict[str, list[float]] = {name: [] for name in groups}
                cpu: dict[str, float] = dict.fromkeys(groups, 0.0)
                for _ in range(rounds):
                    order = list(groups)
                    rng.shuffle(order)
                    for name in order:
                        # The servers' CPU while this group runs alone: per answered action
                        # (a node's agent worker processes included).
                        roots = [p.pid for p in groups[name] if p is not None]
                        before = sum(tree_cpu_seconds(pid) for pid in roots)
                        r = await gen.request(
                            {"cmd": "run", "group": name, "rate": rate, "duration": seconds}
                        )
                        cpu[name] += sum(tree_cpu_seconds(pid) for pid in roots) - before
                        lat[name] += r["lat_ms"]
                        acks[name] += r["ack_ms"]
                results[str(rate)] = {name: samples for name, samples in lat.items()}
                results[f"{rate} ack_ms"] = acks
                results[f"{rate} cpu_ms_per_action"] = {
                    name: 1000 * cpu[name] / max(1, len(lat[name])) for name in groups
                }
        finally:
            await gen.aclose()
            stop_all(list(procs.values()))
    return results


def report(results: dict[str, Any], rounds: int, seconds: float) -> list[str]:
    tables = []
    for rate, lat in results.items():
        if rate.endswith(("cpu_ms_per_action", "ack_ms")):
            continue
        cpu = results.get(f"{rate} cpu_ms_per_action", {})
        acks = results.get(f"{rate} ack_ms", {})
        plain = percentile(lat[PLAIN], 50)
        first = next(name for name in lat if name != PLAIN)  # the first SYSTEM named
        base = percentile(lat[first], 50)
        rows = [
            [
                name,
                len(samples),
                percentile(samples, 50),
                percentile(samples, 90),
                percentile(samples, 99),
                percentile(samples, 50) / plain,
                percentile(samples, 50) / base,
                percentile(acks.get(name) or [float("nan")], 50),
                percentile(acks.get(name) or [float("nan")], 99),
                cpu.get(name, float("nan")),
            ]
            for name, samples in lat.items()
        ]
        tables.append(
            table(
                f"Round trip at {rate} actions/s, 20 conversations per system "
                f"({rounds} shuffled rounds x {seconds:g} s)",
                [
                    "system",
                    "answered",
                    "p50 ms",
                    "p90 ms",
                    "p99 ms",
                    "p50 x plain",
                    f"p50 x {first}",
                    "ack p50 ms",
                    "ack p99 ms",
                    "server CPU ms/action",
                ],
                rows,
            )
        )
    return tables


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("systems", nargs="+", metavar="SYSTEM", help="REV[@flag=value,...]")
    parser.add_argument("--rates", default="50,200", help="actions per second, comma-separated")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per rate")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per system per round")
    parser.add_argument(
        "--cross", action="store_true", help="also measure the cross-node round trip"
    )
    args = parser.parse_args(argv)
    try:
        rates = [int(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates must be integers, got {args.rates!r}")
    if len(set(args.systems)) != len(args.systems):
        parser.error("each SYSTEM once")
    results = asyncio.run(compare(args.systems, rates, args.rounds, args.seconds, args.cross))
    for t in report(results, args.rounds, args.seconds):
        print(t, flush=True)
    path = write_json(
        "compare",
        Mode("full"),
        {
            "systems": args.systems,
            "rates": rates,
            "rounds": args.rounds,
            "cross": args.cross,
            "results": results,
        },
    )
    print(f"(JSON in {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
