"""The dashboard's HTTP server: the page (`/`, which draws its charts itself, in SVG, from
`/api/dashboard` every few seconds: no library, nothing from the network) and its JSON."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from aiohttp import web

from streamapp.dashboard.data import MAX_PAGE_CHARS, Dashboard
from streamapp.settings import Settings

log = logging.getLogger(__name__)

DASHBOARD = web.AppKey("dashboard", Dashboard)
PAGE = (Path(__file__).parent / "page.html").read_bytes()


async def page_view(request: web.Request) -> web.Response:
    return web.Response(body=PAGE, content_type="text/html", charset="utf-8")


async def figures_view(request: web.Request) -> web.Response:
    page = request.query.get("page")
    if page is not None and len(page) > MAX_PAGE_CHARS:
        return web.json_response({"error": f"page is over {MAX_PAGE_CHARS} characters"}, status=400)
    try:
        figures = await request.app[DASHBOARD].figures(page)
    except Exception as e:  # noqa: BLE001 - the catalog or its storage failed: say so, keep serving
        log.warning("dashboard: cannot read the figures: %s: %s", type(e).__name__, e)
        return web.json_response({"error": f"cannot read the figures: {type(e).__name__}: {e}"}, status=503)
    return web.Response(
        text=json.dumps(figures), content_type="application/json", headers={"Cache-Control": "no-store"}
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build(dashboard: Dashboard) -> web.Application:
    app = web.Application()
    app[DASHBOARD] = dashboard
    app.router.add_get("/", page_view)
    app.router.add_get("/api/dashboard", figures_view)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(dashboard: Dashboard, settings: Settings, stopping: asyncio.Event) -> None:
    """Serve on `settings.host`:`settings.dashboard_port` until `stopping` is set."""
    runner = web.AppRunner(build(dashboard), access_log=None, handle_signals=False, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.dashboard_port)
    await site.start()
    log.info("dashboard: listening on http://%s:%d", settings.host, settings.dashboard_port)
    try:
        await stopping.wait()
    finally:
        await runner.cleanup()
    log.info("dashboard: stopped")
