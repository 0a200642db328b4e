"""Run the repository's deploy/nginx.conf in front of locally started nodes.

The local config is rendered from the canonical file that docker-compose.yml mounts:
only the upstream servers, the listen line and the pid/log/temp paths change, so the
proxying rules under test are the deployed ones.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parent.parent
NGINX_CONF = REPO / "deploy" / "nginx.conf"
UPSTREAM_NAME = "coordinator_nodes"

_PATH_DIRECTIVES = {
    "pid": "nginx.pid",
    "error_log": "error.log",
    "access_log": "access.log",
    "client_body_temp_path": "temp/client_body",
    "proxy_temp_path": "temp/proxy",
    "fastcgi_temp_path": "temp/fastcgi",
    "uwsgi_temp_path": "temp/uwsgi",
    "scgi_temp_path": "temp/scgi",
}


def nginx_binary() -> str:
    """Path of nginx; fails (never skips) with how to install it."""
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )
    if found is None:
        raise AssertionError(
            "nginx is not installed: the end-to-end test needs it "
            "(`apt-get install -y nginx`, which `make test` does when run as root)"
        )
    return found


def render_nginx_config(
    upstreams: Sequence[str], listen: str, workdir: Path, source: Path = NGINX_CONF
) -> str:
    """The canonical config with ``upstreams`` ("host:port"), ``listen`` and paths in ``workdir``.

    Server options (max_fails, ...) and the pool settings of the canonical upstream block
    are kept; only the server addresses change.
    """
    text = source.read_text()
    block = re.search(
        r"(?ms)^(?P<indent>[ \t]*)upstream\s+"
        + UPSTREAM_NAME
        + r"\s*\{(?P<body>.*?)^(?P=indent)\}",
        text,
    )
    if block is None:
        raise ValueError(f"{source}: no `upstream {UPSTREAM_NAME} {{...}}` block")
    body = block.group("body")
    servers = list(re.finditer(r"(?m)^([ \t]*)server\s+(\S+)([^;]*);", body))
    if not servers:
        raise ValueError(f"{source}: the upstream block lists no server")
    indent, _, options = servers[0].groups()
    new_servers = "".join(f"{indent}server {addr}{options};\n" for addr in upstreams)
    body = body[: servers[0].start()] + new_servers + body[servers[-1].end() + 1 :]
    text = text[: block.start("body")] + body + text[block.end("body") :]

    text, listens = re.subn(r"(?m)^([ \t]*)listen\s+[^;]+;", rf"\g<1>listen {listen};", text)
    if listens != 1:
        raise ValueError(f"{source}: expected exactly one listen line, found {listens}")

    for directive, relative in _PATH_DIRECTIVES.items():
        target = workdir / relative

        def replace(m: re.Match[str], target: Path = target) -> str:
            rest = m.group(3) or ""  # e.g. the level of error_log or the format of access_log
            return f"{m.group(1)}{m.group(2)} {target}{rest};"

        text, n = re.subn(rf"(?m)^([ \t]*)({directive})\s+\S+?([^;\S][^;]*)?;", replace, text)
        if n != 1:
            raise ValueError(f"{source}: expected one `{directive}` directive, found {n}")
    return text


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class NginxProcess:
    """nginx in the foreground on 127.0.0.1:``port``, balancing over ``upstreams``."""

    def __init__(self, upstreams: Sequence[str], port: int, workdir: Path) -> None:
        self.upstreams = list(upstreams)
        self.port = port
        self.workdir = workdir
        self.conf_path = workdir / "nginx.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.workdir / _PATH_DIRECTIVES["access_log"]

    @property
    def error_log(self) -> Path:
        return self.workdir / _PATH_DIRECTIVES["error_log"]

    def write_config(self) -> Path:
        (self.workdir / "temp").mkdir(parents=True, exist_ok=True)
        # Workers drop root privileges; they must reach the temp dirs and the logs.
        for path in (self.workdir, self.workdir / "temp"):
            path.chmod(0o755)
        self.conf_path.write_text(
            render_nginx_config(self.upstreams, f"127.0.0.1:{self.port}", self.workdir)
        )
        return self.conf_path

    def _command(self, *extra: str) -> list[str]:
        return [nginx_binary(), "-p", str(self.workdir), "-c", str(self.conf_path), *extra]

    def check_config(self) -> str:
        """``nginx -t`` on the rendered file; returns its output, raises if invalid."""
        self.write_config()
        done = subprocess.run(self._command("-t"), capture_output=True, text=True, timeout=30)
        output = done.stdout + done.stderr
        if done.returncode != 0:
            raise AssertionError(f"nginx -t failed for {self.conf_path}:\n{output}")
        return output

    def start(self, timeout: float = 15.0) -> NginxProcess:
        self.write_config()
        self.proc = subprocess.Popen(
            self._command("-g", "daemon off;"),
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "nginx.stderr", "wb"),  # noqa: SIM115 (the child owns it)
        )
        deadline = time.monotonic() + timeout
        while not _port_open(self.port):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"nginx exited at start (code {self.proc.returncode}):\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"nginx did not listen on {self.port} in {timeout}s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # SIGQUIT is nginx's graceful stop; websocket sessions still open would keep it
            # waiting, so fall back to SIGTERM (fast stop), then SIGKILL.
            for sig in (signal.SIGQUIT, signal.SIGTERM, signal.SIGKILL):
                self.proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout / 3)
                    break
        self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for path in (self.workdir / "nginx.stderr", self.error_log):
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} ---\n" + "\n".join(tail))
        return "\n".join(parts)

    def upstreams_served(self, status: int = 101) -> list[str]:
        """Upstream addresses of logged requests with ``status`` (101: websocket sessions)."""
        if not self.access_log.exists():
            return []
        found = []
        for line in self.access_log.read_text(errors="replace").splitlines():
            m = re.search(r'" (\d{3}) upstream=(\S+)', line)
            if m and int(m.group(1)) == status:
                found.append(m.group(2))
        return found

    def __enter__(self) -> NginxProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            print(self.log_tail())
        self.stop()
