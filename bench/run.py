"""Run the benchmarks: ``python -m bench.run [--quick|--full] [--only NAME[,NAME]]``.

Each benchmark prints Markdown tables and writes ``bench/results/NAME-MODE.json``.
Quick mode (the default) finishes in a few minutes on 2 cores and scales some workloads
down (each table says what it ran); full mode runs the sizes issue #5 names.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
from typing import Any

from bench.common import Mode, git_commit, raise_nofile, write_json

# name -> module with ``async def run(mode) -> {"tables": [...], "json": {...}}``
BENCHMARKS = {
    "roundtrip": "bench.roundtrip",
    "rediscost": "bench.rediscost",
    "fanout": "bench.fanout",
    "scale": "bench.scale",
    "growth": "bench.growth",
    "failover": "bench.failover",
    "profile": "bench.profile",
    "timeline": "bench.timeline",
    "deployments": "bench.deployments",
    "storm": "bench.storm",
    "pubsub": "bench.pubsub",
    "saturation": "bench.saturation",
    "isolation": "bench.isolation",
    "attacks": "bench.attacks",
    "store": "bench.store",
    "replaymem": "bench.replaymem",
    "trimcost": "bench.trimcost",
    "churn": "bench.churn",
}
# Run only when named with --only (profile needs py-spy and adds a minute; churn holds a
# node under load for one minute, ten with --full).
ON_REQUEST = {"profile", "churn"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="scaled-down run (default)")
    group.add_argument("--full", action="store_true", help="the sizes issue #5 names")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated benchmarks to run, of: {', '.join(BENCHMARKS)}",
    )
    args = parser.parse_args(argv)
    mode = Mode("full" if args.full else "quick")
    names = [n.strip() for n in args.only.split(",") if n.strip()] or [
        n for n in BENCHMARKS if n not in ON_REQUEST
    ]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {list(BENCHMARKS)}")
    raise_nofile()
    failed = []
    t_all = time.monotonic()
    for name in names:
        print(f"\n## {name} ({mode.name})", flush=True)
        t0 = time.monotonic()
        commit = git_commit()  # what the processes started below run
        try:
            module = importlib.import_module(BENCHMARKS[name])
            out: dict[str, Any] = asyncio.run(module.run(mode))
        except Exception as exc:
            failed.append(name)
            print(f"{name} FAILED: {type(exc).__name__}: {exc}", flush=True)
            import traceback

            traceback.print_exc()
            continue
        elapsed = time.monotonic() - t0
        for t in out["tables"]:
            print(t, flush=True)
        path = write_json(name, mode, {**out["json"], "elapsed_s": elapsed, "commit": commit})
        print(f"\n({name}: {elapsed:.0f} s; JSON in {path})", flush=True)
        if name == "roundtrip":
            try:
                from bench.plot import cdf_png

                png = cdf_png(path, path.with_name(f"roundtrip-cdf-{mode.name}.png"))
                print(f"(latency CDF plot: {png})", flush=True)
            except ImportError:
                print("(no plot: matplotlib is not installed; pip install -e '.[bench]')")
    print(f"\nall done in {time.monotonic() - t_all:.0f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
