"""Files the web server serves as they are: the browser tracker and its demo page."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

HERE = Path(__file__).parent


def file_handler(name: str, content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A GET handler answering with the file `name` of this folder, read once, at start."""
    body = (HERE / name).read_bytes()

    async def handler(request: web.Request) -> web.Response:
        # Short caching: pages pick up a new tracker within minutes of a deploy.
        return web.Response(
            body=body, content_type=content_type, charset="utf-8", headers={"Cache-Control": "public, max-age=300"}
        )

    return handler
