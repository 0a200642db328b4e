"""The chaos suite prints its figures as a table at the end of the run (also under -q)."""

from __future__ import annotations

import pytest

from tests.chaos.checks import RESULTS, SESSION_RESULTS, TABLE_HEADER


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not SESSION_RESULTS:
        return
    terminalreporter.section("chaos scenarios")
    terminalreporter.write_line(TABLE_HEADER)
    for result in SESSION_RESULTS:
        terminalreporter.write_line(result.row())
    terminalreporter.write_line(f"(written to {RESULTS})")
