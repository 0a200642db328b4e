"""A headless Chromium for tests and screenshots: Debian's ``/usr/bin/chromium`` driven by
playwright-core through tests/js/browser.mjs (one JSON command per line).

``make test`` installs Chromium (Debian package, as root) and the npm packages; a test
run without them fails and says how to install them. Nothing here ever downloads a
browser: playwright-core has no browser of its own and is told where Chromium is.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any

JS_DIR = Path(__file__).resolve().parent / "js"
DRIVER = JS_DIR / "browser.mjs"
CHROMIUM = "/usr/bin/chromium"


def node_binary() -> str:
    found = shutil.which("node")
    assert found, "Node.js is not installed: this test needs `node` (Debian package nodejs)"
    return found


def ensure_node_modules(*packages: str) -> None:
    """`npm ci` in tests/js when one of ``packages`` is not installed there yet."""
    if all((JS_DIR / "node_modules" / p / "package.json").exists() for p in packages):
        return
    npm = shutil.which("npm")
    assert npm, f"npm is not installed: needed to install {', '.join(packages)} in tests/js"
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"},
    )
    assert done.returncode == 0, f"npm ci in {JS_DIR} failed:\n{done.stdout}\n{done.stderr}"


def chromium_binary() -> str:
    assert os.access(CHROMIUM, os.X_OK), (
        f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium; "
        "`make test` does it as root)"
    )
    return CHROMIUM


class BrowserError(AssertionError):
    pass


class Browser:
    """One Chromium with named tabs. ``async with Browser() as b: await b.open(...)``.

    Every answer's page errors (uncaught exceptions, console errors) are collected in
    ``errors``; tests assert it stays empty.
    """

    def __init__(self) -> None:
        self.errors: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Browser:
        ensure_node_modules("playwright-core", "socket.io-client")
        self._proc = await asyncio.create_subprocess_exec(
            node_binary(),
            str(DRIVER),
            "--executable",
            chromium_binary(),
            cwd=JS_DIR,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"},
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.returncode is None:
                assert proc.stdin is not None
                proc.stdin.write(b'{"cmd": "close"}\n')
                proc.stdin.close()
                async with asyncio.timeout(20):
                    await proc.wait()
        except (TimeoutError, OSError):
            pass
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def call(self, cmd: str, within: float = 60.0, **fields: Any) -> Any:
        """Send one command; its value, or BrowserError with the driver's reason."""
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        await proc.stdin.drain()
        async with asyncio.timeout(within):
            line = await proc.stdout.readline()
        if not line:
            assert proc.stderr is not None
            err = (await proc.stderr.read()).decode(errors="replace")
            raise BrowserError(f"the browser driver exited:\n{err}")
        answer = json.loads(line)
        self.errors += answer.get("errors", [])
        if not answer["ok"]:
            raise BrowserError(f"{cmd} {fields}: {answer['error']}")
        return answer["value"]

    async def open(self, page: str, url: str) -> None:
        await self.call("open", page=page, url=url)

    async def wait(self, page: str, js: str, within: float = 20.0) -> Any:
        """Wait until the page's expression ``js`` is truthy; its value."""
        return await self.call("wait", within + 30, page=page, js=js, timeout_ms=int(within * 1000))

    async def eval(self, page: str, js: str) -> Any:
        return await self.call("eval", page=page, js=js)

    async def type(self, page: str, selector: str, text: str) -> None:
        await self.call("type", page=page, selector=selector, text=text)

    async def screenshot(self, page: str, path: Path, *, full_page: bool = False) -> None:
        """A PNG of the tab at ``path``, which must be absolute (the driver runs in
        tests/js)."""
        assert path.is_absolute(), path
        await self.call("screenshot", page=page, path=str(path), full_page=full_page)
