"""A private PostgreSQL for the tests: ``initdb`` + ``pg_ctl`` in a temporary directory,
listening on a free 127.0.0.1 port, started once per session and only if a test asks.

Each test gets a fresh database (``postgres_dsn``), owned by a password-protected
non-superuser role, so the store's migrations run with the rights a deployment would
give it and error messages can be checked for the password. ``stop()`` and ``start()``
are there for fault tests; the next test finds the server running whatever a test did.

Binaries come from PATH, else the newest ``/usr/lib/postgresql/*/bin`` (Debian);
without them the tests fail with how to install them (``make test`` does, as root).
``initdb`` refuses to run as root: then the server runs as the ``postgres`` user
(``runuser``), in a directory owned by it. The directory and the server go at the end
of the session, also when tests fail.

Use the fixtures (registered in conftest.py)::

    async def test_x(postgres_dsn: str) -> None: ...       # fresh database
    def test_y(postgres_server: PostgresServer) -> None:    # the server, for stop/start
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from coordinator.embedded import free_port

ROLE = "coord"
SERVER_USER = "postgres"
START_TIMEOUT = 60


def postgres_bin_dir() -> Path:
    """The directory holding initdb, pg_ctl and postgres; fails with how to get them."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += [
        Path(p).parent
        for p in sorted(
            glob.glob("/usr/lib/postgresql/*/bin/initdb"),
            key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parts[-3].split(".")],
            reverse=True,
        )
    ]
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return directory
    raise AssertionError(
        "PostgreSQL server binaries (initdb, pg_ctl) are not installed: the event store "
        "tests need them (`apt-get install -y postgresql`, which `make test` does as root)"
    )


class PostgresServer:
    """One private cluster; ``start()``, ``stop()``, ``cleanup()``. With ``primary``: a
    streaming replica of that server (``pg_basebackup``: its roles and databases), to be
    ``promote()``d when the primary is lost."""

    def __init__(self, primary: PostgresServer | None = None) -> None:
        self.bin = postgres_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="coord-pg-"))
        self.data = self.root / "data"
        self.logfile = self.root / "server.log"
        self.port = free_port()
        self.password = primary.password if primary else "pw-" + secrets.token_hex(12)
        self._as_root = os.geteuid() == 0
        if self._as_root:
            try:
                account = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise AssertionError(
                    f"running as root, the test PostgreSQL needs a {SERVER_USER!r} user to "
                    "run as (the postgresql package creates it)"
                ) from None
            os.chown(self.root, account.pw_uid, account.pw_gid)
        if primary is None:
            self._initdb()
        else:  # its replication is trusted over the primary's socket, as its superuser's
            self._run(
                "pg_basebackup", "-h", str(primary.root), "-p", str(primary.port),
                "-U", "postgres", "-D", str(self.data), "-R", "-X", "stream", "-c", "fast",
            )  # fmt: skip

    def _cmd(self, *args: str) -> list[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if not self._as_root:
            return command
        if shutil.which("runuser"):
            return ["runuser", "-u", SERVER_USER, "--", *command]
        return ["su", SERVER_USER, "-s", "/bin/sh", "-c", subprocess.list2cmdline(command)]

    def _run(self, *args: str, stdin: str | None = None, timeout: float = 120) -> None:
        done = subprocess.run(
            self._cmd(*args), input=stdin, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise AssertionError(
                f"{' '.join(args[:2])} failed ({done.returncode}):\n{done.stdout}\n"
                f"{done.stderr}\n{self.log_tail()}"
            )

    def _initdb(self) -> None:
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "-E", "UTF8",
            "--auth-local=trust", "--auth-host=scram-sha-256", "--no-instructions",
        )  # fmt: skip
        # The tests' role, made in single-user mode before the server first starts.
        self._run(
            "postgres", "--single", "-D", str(self.data), "-c", "exit_on_error=true", "postgres",
            stdin=f"CREATE ROLE {ROLE} LOGIN PASSWORD '{self.password}';\n",
        )  # fmt: skip

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        return "(no server log)"

    @property
    def running(self) -> bool:
        done = subprocess.run(
            self._cmd("pg_ctl", "status", "-D", str(self.data)), capture_output=True, timeout=30
        )
        return done.returncode == 0

    def start(self) -> None:
        options = " ".join([
            f"-p {self.port}", "-c listen_addresses=127.0.0.1", f"-k {self.root}",
            # A test server: durability is not under test here; speed on a shared machine is.
            "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
            "-c max_connections=60", "-c shared_buffers=32MB",
        ])  # fmt: skip
        self._run(
            "pg_ctl", "start", "-D", str(self.data), "-l", str(self.logfile),
            "-w", "-t", str(START_TIMEOUT), "-o", options,
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``fast`` ends sessions and shuts down cleanly; ``immediate`` is a crash."""
        if self.running:
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w")

    def promote(self) -> None:
        """A replica becomes a primary (as a failover manager would make it)."""
        self._run("pg_ctl", "promote", "-D", str(self.data), "-w", "-t", str(START_TIMEOUT))

    async def execute(self, sql: str, database: str = "postgres") -> Any:
        """``sql``'s first value, run as the superuser over the server's socket."""
        conn = await asyncpg.connect(
            host=str(self.root), port=self.port, user="postgres", database=database
        )
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    def ensure_running(self) -> None:
        if not self.running:
            self.start()

    def cleanup(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, database: str) -> str:
        """The URL the store gets: the tests' role with its password, over TCP."""
        return f"postgresql://{ROLE}:{self.password}@127.0.0.1:{self.port}/{database}"

    async def admin(self) -> asyncpg.Connection:
        """A superuser connection over the server's socket (trusted locally)."""
        return await asyncpg.connect(
            host=str(self.root), port=self.port, user="postgres", database="postgres"
        )

    async def _admin_execute(self, sql: str) -> None:
        conn = await self.admin()
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def admin_execute(self, sql: str) -> None:
        """Run ``sql`` as the superuser, from sync code (its own loop, in a thread: the
        caller may be a fixture of a test whose loop is not running yet)."""
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, self._admin_execute(sql)).result(timeout=60)

    def create_database(self) -> str:
        name = "t_" + secrets.token_hex(6)
        self.admin_execute(f"CREATE DATABASE {name} OWNER {ROLE}")
        return name

    def drop_database(self, name: str) -> None:
        self.admin_execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the session's server (restarted if a test stopped it)."""
    postgres_server.ensure_running()
    name = postgres_server.create_database()
    try:
        yield postgres_server.dsn(name)
    finally:
        postgres_server.ensure_running()
        postgres_server.drop_database(name)
