"""``coordinator serve`` with the proposed TCP_NODELAY fix applied, for comparison.

``coordinator.server.bind`` creates its listening socket with protocol 0, so the sockets
it accepts have ``proto == 0`` and asyncio's transport skips ``TCP_NODELAY`` (it sets it
only when ``sock.proto == IPPROTO_TCP``). With Nagle on, a small frame written right
after another one (the ``oh_event`` after the ack) waits for the client's delayed ACK:
about 40 ms. This launcher replaces ``bind`` with one that keeps getaddrinfo's protocol
(the change proposed in BENCHMARKS.md) and then runs the unchanged CLI.

Run: ``python -m bench.nodelay_node serve ...`` (same arguments as ``coordinator``).
"""

from __future__ import annotations

import socket
import sys

from coordinator import server
from coordinator.errors import CoordinatorError


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise CoordinatorError(f"cannot resolve host {host!r}: {exc}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise CoordinatorError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def main() -> int:
    server.bind = bind
    from coordinator.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
