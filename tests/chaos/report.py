"""Aggregate the chaos results file into the Markdown table of docs/failures.md.

    .venv/bin/python -m tests.chaos.report [--last N]

Reads bench/results/chaos.json (written by every chaos test run) and prints, per scenario,
over its last N results: runs, passes, time to detect and time until served again
(median and worst), acknowledged actions, lost and duplicated ones (totals).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from typing import Any

from tests.chaos.checks import RESULTS

ORDER = ("kill -9", "SIGSTOP 5 s", "link cut 5 s", "Redis restart", "SIGTERM drain")


def _span(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} s / {max(values):.2f} s"


def table(history: list[dict[str, Any]], last: int) -> str:
    rows = [
        "| scenario | runs | passed | detect (median / max) | served again (median / max) "
        "| acked | lost | duplicates |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = [n for n in ORDER if any(r["scenario"] == n for r in history)]
    names += sorted({r["scenario"] for r in history} - set(names))
    for name in names:
        runs = [r for r in history if r["scenario"] == name][-last:]
        detect = [r["detect_s"] for r in runs if r["detect_s"] is not None]
        served = [r["served_again_s"] for r in runs if r["served_again_s"] is not None]
        rows.append(
            f"| {name} | {len(runs)} | {sum(r['passed'] for r in runs)} | {_span(detect)} "
            f"| {_span(served)} | {sum(r['actions_acked'] for r in runs)} "
            f"| {sum(r['actions_lost'] for r in runs)} | {sum(r['duplicates'] for r in runs)} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--last", type=int, default=10, help="results per scenario")
    args = parser.parse_args(argv)
    history = json.loads(RESULTS.read_text()).get("history", [])
    print(table(history, args.last))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
