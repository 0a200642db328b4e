"""The reconnect storm of ``bench/storm.py`` at a small scale, as a test: 3 node processes
on a private Redis, 60 conversations with two connections each; the node holding a third
of them is killed (kill -9) or drained (SIGTERM) and each of its clients reconnects to a
survivor at once (jittered over a second) with the last id it saw, retrying when refused,
then sends an action. The benchmark measures how fast; this asserts what must hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.storm import storm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.mark.parametrize("kind", ["kill", "drain"])
async def test_a_reconnect_storm_loses_doubles_and_refuses_nothing(
    kind: str, tmp_path: Path
) -> None:
    r = await storm(kind, conversations=60, logs=tmp_path)
    assert r["displaced"] == 40, r
    # Every displaced client rejoined and its action was answered; refusals (busy) were
    # retried, none for good.
    assert r["never"] == 0, r["errors"]
    # No event missed or seen twice by any client across its reconnect, no action
    # answered twice, and the survivors kept their leases.
    assert (r["gaps"], r["duplicates"], r["answered_twice"]) == (0, 0, 0), r
    assert r["lease_lapses"] == 0, r
