"""The browser pages every node serves, and the two endpoints made for them.

``/ui/`` is plain HTML and JavaScript shipped in the package (``coordinator/static``,
with socket.io's browser client vendored from npm), read into memory once: no build step
and no file system access per request, so no path from a request ever reaches a file.
The pages take the token from the URL fragment (``#token=...``, never sent to a server)
or ask for it, and call the REST API with ``Authorization: Bearer``.

- ``GET /api/nodes``: this node's id and the live nodes' public URLs (``--public-url``,
  advertised in Redis), so a page can move to another node when its own goes away.
- ``GET /api/dashboard``: nodes and conversations as the caller may see them
  (``dashboard.py``); the whole cluster for an admin token.
"""

from __future__ import annotations

from importlib import resources

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from .answers import json_response
from .auth import TokenVerifier
from .dashboard import dashboard
from .http import Cors, Origins, Resource, rated_identity
from .manager import ConversationManager
from .quotas import Quotas

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# The pages load nothing from elsewhere; they talk to any node (REST and websocket).
PAGE_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; connect-src 'self' http: https: ws: wss:; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def load_static() -> dict[str, tuple[bytes, str]]:
    """name -> (content, content type) of every file in ``coordinator/static``."""
    files: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("coordinator").joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            files[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    return files


class Pages:
    """The routes of the pages and their endpoints, for ``RestApp(extra_routes=...)``."""

    def __init__(
        self,
        manager: ConversationManager,
        tokens: TokenVerifier,
        quotas: Quotas,
        origins: Origins | None = None,
    ) -> None:
        self.manager = manager
        self.tokens = tokens
        self.quotas = quotas
        self.files = load_static()
        # A page moves between nodes: their endpoints answer the other nodes' pages too.
        self.cors = Cors(origins or Origins())

    def routes(self) -> list[BaseRoute]:
        index = Resource({"GET": self.index})
        return [
            Route("/", Resource({"GET": self.home})),
            Route("/ui", index),
            Route("/ui/", index),
            Route("/ui/{name}", Resource({"GET": self.static})),
            Route("/api/nodes", Resource({"GET": self.nodes}, self.cors)),
            Route("/api/dashboard", Resource({"GET": self.dashboard}, self.cors)),
        ]

    def _file(self, name: str) -> Response:
        found = self.files.get(name)
        if found is None:
            raise HTTPException(404, f"no such page: /ui/{name}")
        content, media_type = found
        return Response(content, 200, PAGE_HEADERS, media_type)

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/ui/", 302, PAGE_HEADERS)

    async def index(self, request: Request) -> Response:
        return self._file("index.html")

    async def static(self, request: Request) -> Response:
        return self._file(request.path_params["name"])

    async def nodes(self, request: Request) -> Response:
        await rated_identity(self.tokens, self.quotas, request)
        urls = await self.manager.directory.node_urls()
        return json_response(
            200,
            {
                "node_id": self.manager.node_id,
                "nodes": [{"node_id": node, "url": url} for node, url in urls.items()],
            },
        )

    async def dashboard(self, request: Request) -> Response:
        identity = await rated_identity(self.tokens, self.quotas, request)
        view = await dashboard(self.manager.directory, identity, self.manager.node_id)
        return json_response(200, view)
