"""The chaos suite prints its figures as a table at the end of the run (also under -q),
and, should a scenario still run shortly before its timeout, the stacks of the test's
asyncio tasks (pytest-timeout shows only threads, and an awaiting task is invisible
there)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import pytest

from tests.chaos.checks import RESULTS, SESSION_RESULTS, TABLE_HEADER

DUMP_BEFORE_TIMEOUT = 15.0  # seconds before the scenario's timeout


@pytest.fixture(autouse=True)
async def tasks_dumped_before_a_timeout(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    marker = request.node.get_closest_marker("timeout")
    if marker is None or not marker.args:
        yield
        return
    handle = asyncio.get_running_loop().call_later(
        float(marker.args[0]) - DUMP_BEFORE_TIMEOUT, _dump_tasks
    )
    yield
    handle.cancel()


def _dump_tasks() -> None:
    print(f"----- asyncio tasks {DUMP_BEFORE_TIMEOUT:g}s before the timeout -----")
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stdout)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not SESSION_RESULTS:
        return
    terminalreporter.section("chaos scenarios")
    terminalreporter.write_line(TABLE_HEADER)
    for result in SESSION_RESULTS:
        terminalreporter.write_line(result.row())
    terminalreporter.write_line(f"(written to {RESULTS})")
