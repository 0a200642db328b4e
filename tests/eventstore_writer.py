"""A writer process for tests/test_eventstore_file.py: moves events 1..TOTAL of one
conversation into a file store shared with other writers, each batch starting at what it
last saw stored (or a little before), and prints how many events it wrote.

    python -m tests.eventstore_writer DIR SID TOTAL NAME GO_FILE

It touches ``GO_FILE.NAME.ready`` once its store is open and starts when ``GO_FILE``
exists, so that the writers race.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path

from coordinator.codec import pack
from coordinator.eventstore import FileEventStore

START_TIMEOUT = 30.0


async def move(path: str, sid: str, total: int, name: str, go: Path) -> int:
    async with FileEventStore(path, fsync="none") as store:
        go.with_name(f"{go.name}.{name}.ready").touch()
        deadline = time.monotonic() + START_TIMEOUT
        while not go.exists():  # noqa: ASYNC240  (a child polling for its start signal)
            if time.monotonic() > deadline:
                raise SystemExit(f"{name}: no go signal within {START_TIMEOUT}s")
            await asyncio.sleep(0.005)
        rng = random.Random(name)
        written = 0
        while (last := await store.last_id(sid)) < total:
            start = max(1, last + 1 - rng.randint(0, 3))
            end = min(total, start + rng.randint(0, 40))
            batch = [
                (i, pack({"source": "agent", "n": i, "w": name})) for i in range(start, end + 1)
            ]
            result = await store.append(sid, 1, batch, user="u")
            if result.status != "ok":
                raise SystemExit(f"{name}: append {start}..{end} answered {result}")
            written += result.written
        return written


def main() -> None:
    path, sid, total, name, go = sys.argv[1:6]
    written = asyncio.run(move(path, sid, int(total), name, Path(go)))
    print(json.dumps({"name": name, "written": written}))


if __name__ == "__main__":
    main()
