"""The web server: the routes of the web process, and serving them until SIGTERM.

`POST /api/events` is `streamapp.web.view`'s; here are the others (health, readiness, metrics, the
API description, the tracker, the project's own `app.page`s), the process's start-up and shutdown
(the Redis client, the writer, the backlog sampler), and the catch-all that answers 404/405.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import msgspec
from aiohttp import web

from streamapp import metrics, names
from streamapp.engine.app import App, Handler
from streamapp.redis_client import FAILURES, UNAVAILABLE, Client, is_checked, writer_client
from streamapp.settings import Settings
from streamapp.web.backlog import NO_MAXMEMORY_BACKLOG_BYTES, Backlog
from streamapp.web.cors import Cors
from streamapp.web.ingest import Ingest
from streamapp.web.openapi import document
from streamapp.web.static import file_handler
from streamapp.web.view import INGEST_PATH, IngestView
from streamapp.web.wire import json_response
from streamapp.web.writer import Limits, StreamWriter

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
REDIS: web.AppKey[Client] = web.AppKey("redis")
OPENAPI = web.AppKey("openapi", bytes)


class Readiness:
    """Whether Redis answered the last probe. The cause of a failure (an address, an error text) is
    logged, not answered: /readyz is public. Once per change, not per probe: a load balancer
    probes every few seconds."""

    def __init__(self) -> None:
        self.ready: bool | None = None

    def answered(self) -> None:
        if self.ready is False:
            log.info("readyz: Redis answers again")
        self.ready = True

    def failed(self, error: BaseException) -> None:
        if self.ready is not False:
            log.warning("readyz: Redis is unavailable: %s", str(error) or type(error).__name__)
        self.ready = False


READINESS = web.AppKey("readiness", Readiness)


async def openapi_view(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return json_response(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when Redis answers and a worker has checked it (every shard's server) against the lake
    since it started: a load balancer stops sending while events cannot be taken."""
    settings = request.app[SETTINGS]
    retry = {"Retry-After": str(settings.retry_after_seconds)}
    redis = request.app[REDIS]
    try:
        checked = await asyncio.wait_for(
            asyncio.gather(*(is_checked(redis, shard) for shard in range(settings.shards))), timeout=1.0
        )
    except (TimeoutError, *UNAVAILABLE) as e:
        request.app[READINESS].failed(e)
        return json_response(
            503,
            {"status": "unavailable", "error": "the event store is unavailable"},
            retry,
        )
    request.app[READINESS].answered()
    unchecked = checked.count(False)
    if unchecked:
        # Not ready while any shard is unchecked: its events would get 503. A check takes a worker
        # about a second after the restart (or failover) of the server holding the shard.
        error = "the event store restarted and is being checked against the tables (a worker does it)"
        if settings.shards > 1:
            error += f": {unchecked} of {settings.shards} shards"
        return json_response(503, {"status": "unavailable", "error": error}, retry)
    return json_response(200, {"status": "ready"})


def _counted(route: str, handler: Handler) -> Handler:
    """`handler`, counting streamapp_http_requests by route (the registered pattern, never the raw
    path) and status. Per route rather than a middleware, which the ingest route would pay for."""
    requests = metrics.Children(metrics.HTTP_REQUESTS, route)

    async def counted(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as e:
            requests(e.status).inc()
            raise
        requests(response.status).inc()
        return response

    return counted


async def unmatched(request: web.Request) -> web.StreamResponse:
    """Whatever no route takes: aiohttp's own 404, or 405 with Allow when the path exists. A
    catch-all route (registered last, so it never shadows one) rather than a middleware."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def build(app: App, settings: Settings) -> web.Application:
    """The aiohttp application: ingest, health, metrics, the API description and the pages the
    project registered."""
    models = app.discover_models()
    cors = Cors(settings.cors_origins)
    ingest = Ingest(
        models,
        max_events=settings.max_events_per_request,
        max_event_bytes=settings.max_event_bytes,
        max_future_seconds=settings.max_future_seconds,
    )
    view = IngestView(settings, ingest, cors)
    webapp = web.Application()
    webapp[SETTINGS] = settings
    webapp[READINESS] = Readiness()
    webapp[OPENAPI] = msgspec.json.encode(document(models, settings))

    async def lifecycle(webapp: web.Application) -> AsyncIterator[None]:
        client = await asyncio.to_thread(writer_client, settings)  # may read the password file
        limits = Limits(settings.max_backlog, settings.max_backlog_bytes or NO_MAXMEMORY_BACKLOG_BYTES)
        backlog = Backlog(
            client,
            [stream for t in [*models, "rejected"] for stream in names.streams(t, settings.shards)],
            limits,
            bytes_from_maxmemory=not settings.max_backlog_bytes,
        )
        try:
            await backlog.sample()  # the limits in force before the first request
        except FAILURES as e:
            log.warning("web: Redis does not answer yet (%s); it is sampled again every second", e)
        writer = StreamWriter(
            client,
            settings.dedupe_seconds,
            limits,
            wait_replicas=settings.redis_wait_replicas,
            wait_ms=settings.redis_wait_ms,
        )
        writer.start()
        sampler = asyncio.create_task(backlog.run(), name="backlog")
        flusher = asyncio.create_task(metrics.flush_tallies_every(1.0), name="metrics")
        webapp[REDIS] = client
        view.writer, view.backlog = writer, backlog
        yield
        sampler.cancel()
        flusher.cancel()
        await asyncio.gather(sampler, flusher, return_exceptions=True)
        await writer.close()  # runs after in-flight requests finished: their writes complete
        await client.aclose()

    def add(method: str, path: str, handler: Handler, head: bool = False) -> None:
        resource = webapp.router.add_resource(path)
        counted = _counted(resource.canonical, handler)
        if head:
            resource.add_route("HEAD", counted)
        resource.add_route(method, counted)

    webapp.cleanup_ctx.append(lifecycle)
    webapp.router.add_post(INGEST_PATH, view.post)  # counts its own requests
    add("OPTIONS", INGEST_PATH, cors.preflight)
    add("GET", "/api/openapi.json", openapi_view, head=True)
    add("GET", "/metrics", metrics.metrics_view, head=True)
    add("GET", "/healthz", healthz, head=True)
    add("GET", "/readyz", readyz, head=True)
    add("GET", "/tracker.js", file_handler("tracker.js", "text/javascript"), head=True)
    add("GET", "/demo", file_handler("demo.html", "text/html"), head=True)
    for method, path, handler in app.pages:
        add(method, path, handler)
    webapp.router.add_route("*", "/{path:.*}", _counted("unmatched", unmatched))
    return webapp


async def serve(app: App, settings: Settings, stopping: asyncio.Event, reuse_port: bool = False) -> None:
    """Serve until `stopping` is set, then stop accepting, finish in-flight requests, flush, exit.
    `reuse_port`: one of several processes on the port (`streamapp.web.processes`)."""
    # keepalive_timeout also closes a connection that has not sent a whole request head in that
    # long (aiohttp's timer runs from the connection's start and is not reset by partial data):
    # the slowloris bound for headers; the body has its own timeout in IngestView.
    runner = web.AppRunner(
        build(app, settings),
        auto_decompress=False,
        access_log=None,
        shutdown_timeout=settings.shutdown_seconds,
        handle_signals=False,
        keepalive_timeout=settings.request_timeout_seconds,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=1024, reuse_port=reuse_port or None)
    await site.start()
    log.info("web: listening on http://%s:%d", settings.host, settings.port)
    try:
        await stopping.wait()
        log.info("web: stopping")
    finally:
        await runner.cleanup()
    log.info("web: stopped")
