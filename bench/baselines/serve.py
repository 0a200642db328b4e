"""Serve an ASGI app with uvicorn on 127.0.0.1:PORT until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn

from bench.common import raise_nofile


def serve(app: Any, port: int) -> None:
    raise_nofile()
    logging.basicConfig(level=logging.WARNING)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off"
    )
    asyncio.run(uvicorn.Server(config).serve())
