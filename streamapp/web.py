"""The HTTP edge: `POST /api/events` validates a body and appends its events to Redis streams.

In order, a request is checked for: its origin (CORS, 403), its write key (401), the backlog
(429), then its body is read within the request timeout (408) and the size limits (413), and
parsed (400/415/422). Nothing reaches Redis before all of that passed.

Transport decoding is done here, not by aiohttp: its own gzip handling answers 500 or resets the
connection on bad input and cannot cap the decompressed size, so the server runs with
`auto_decompress=False` and this module inflates with a hard limit (a gzip bomb is cut off after
`max_body_bytes` of output, having cost almost nothing).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import zlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone

import msgspec
import redis.exceptions
from aiohttp import web

from streamapp import keys, metrics
from streamapp.backlog import Backlog
from streamapp.cors import Cors
from streamapp.ingest import Batch, BodyError, ErrorReply, Ingest, IngestReply, body_kind, uuid7
from streamapp.static import file_handler
from streamapp.writer import Entry, StreamWriter

log = logging.getLogger(__name__)

INGEST = web.AppKey("ingest", Ingest)
WRITER = web.AppKey("writer", StreamWriter)
SETTINGS = web.AppKey("settings", object)
REDIS = web.AppKey("redis", object)
BACKLOG = web.AppKey("backlog", Backlog)
INGEST_PATH = "/api/events"

OPENAPI = web.AppKey("openapi", bytes)

# What an unreachable, restarting or full Redis raises: the client should retry later (503).
REDIS_UNAVAILABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ResponseError,  # OOM, MISCONF (disk full for the AOF), cluster moves
    OSError,
)

_encode = msgspec.json.Encoder().encode
_encode_lines = msgspec.json.Encoder().encode_lines


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=_encode(body), content_type="application/json", headers=headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json(status, ErrorReply(message), headers)


def _source(request: web.Request, write_keys: dict[str, str]) -> str | None:
    """The source name of the request's write key (header, or query for sendBeacon); 401 without
    a valid one when keys are configured. Compared in constant time: keys are secrets."""
    if not write_keys:
        return None
    given = request.headers.get("X-Write-Key") or request.query.get("writeKey")
    if not given:
        raise BodyError(401, "a write key is required: send it in the X-Write-Key header or the writeKey "
                             "query parameter")
    found = None
    for key, source in write_keys.items():
        if hmac.compare_digest(key.encode(), given.encode()):
            found = source
    if found is None:
        raise BodyError(401, "the write key is not valid")
    return found


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, decompressed, at most `limit` bytes after decompression (else 413)."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "", "gzip", "x-gzip"):
        raise BodyError(415, f"Content-Encoding {encoding!r} is not supported; send identity or gzip")
    if request.content_length is not None and request.content_length > limit and encoding in ("identity", ""):
        raise BodyError(413, f"the body is {request.content_length} bytes; the limit is {limit}")
    inflate = zlib.decompressobj(wbits=31) if encoding in ("gzip", "x-gzip") else None
    if inflate is None and request.content.is_eof():  # all here already (a small body): take it at once
        body = request.content.read_nowait()
        if len(body) > limit:  # chunked: no Content-Length was checked above
            raise BodyError(413, f"the body is over the limit of {limit} bytes")
        return body
    out = bytearray()
    received = 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
        if received > limit:  # compressed input alone is over the limit
            raise BodyError(413, f"the body is over the limit of {limit} bytes")
        if inflate is None:
            out += chunk
            continue
        try:
            data = chunk
            while data:
                # max_length bounds the memory one chunk can inflate to.
                out += inflate.decompress(data, limit + 1 - len(out))
                if len(out) > limit:
                    raise BodyError(413, f"the body inflates to over the limit of {limit} bytes")
                if inflate.eof and inflate.unused_data:  # another gzip member follows (cat a.gz b.gz)
                    data, inflate = inflate.unused_data, zlib.decompressobj(wbits=31)
                else:
                    data = inflate.unconsumed_tail
        except zlib.error as e:
            raise BodyError(400, f"the body is not valid gzip: {e}") from None
    if inflate is not None:
        if not inflate.eof:
            raise BodyError(400, "the gzip body is truncated")
    return bytes(out)


class IngestView:
    """`POST /api/events`: validate, then append. 202 once every accepted event is in Redis
    (durable), never before.

    CORS and the request count are done here rather than in middlewares (which cost every request
    a few wrapper calls), and what a request would otherwise recompute is cached: the metric
    children, the parser a Content-Type selects. The writer and backlog are set when the
    application starts (they need its event loop).
    """

    def __init__(self, settings, ingest: Ingest, cors: Cors) -> None:
        self.settings = settings
        self.ingest = ingest
        self.cors = cors
        self.writer: StreamWriter = None  # type: ignore[assignment]
        self.backlog: Backlog = None  # type: ignore[assignment]
        self._requests = metrics.Tally(metrics.HTTP_REQUESTS, INGEST_PATH)
        self._events = metrics.Tally(metrics.EVENTS)
        self._kinds: dict[str, str] = {}

    async def post(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if not self.cors.allowed(origin):
            response = self.cors.refuse(origin or "")
        else:
            response = await self._handle(request)
            if origin is not None:
                response.headers.update(self.cors.headers(origin))
        self._requests.add(response.status)
        return response

    def _body_kind(self, content_type: str) -> str:
        kind = self._kinds.get(content_type)
        if kind is None:
            kind = body_kind(content_type)  # raises BodyError: a refused type is never cached
            if len(self._kinds) < 64:  # the header is the client's: bound what it can make us keep
                self._kinds[content_type] = kind
        return kind

    async def _handle(self, request: web.Request) -> web.Response:
        settings = self.settings
        received_at = datetime.now(timezone.utc)
        try:
            source = _source(request, settings.write_keys)
            backlog = self.backlog
            if backlog.over:
                return _error(429, f"{backlog.events} events are waiting to be written to Iceberg (the limit is "
                                   f"{backlog.limit}); retry later", {"Retry-After": str(backlog.retry_after())})
            kind = self._body_kind(request.headers.get("Content-Type", ""))
            if request.content.is_eof():  # the whole body is already here: no wait to time out
                body = await read_body(request, settings.max_body_bytes)
            else:
                try:
                    async with asyncio.timeout(settings.request_timeout_seconds):
                        body = await read_body(request, settings.max_body_bytes)
                except TimeoutError:
                    raise BodyError(408, f"the body did not arrive within {settings.request_timeout_seconds:g} s") from None
            batch = self.ingest.parse(body, kind, received_at, source)
        except BodyError as e:
            return _error(e.status, e.message)
        entries = _entries(batch, received_at)
        try:
            results = await self.writer.write(entries)
        except redis.exceptions.OutOfMemoryError:
            return _error(503, "the event store is out of memory (Redis maxmemory); retry later",
                          {"Retry-After": str(max(settings.retry_after_seconds, self.backlog.retry_after()))})
        except REDIS_UNAVAILABLE:  # the writer logged it, once per failed flush
            return _error(503, "the event store is unavailable; retry later",
                          {"Retry-After": str(settings.retry_after_seconds)})
        accepted, duplicates = self._count(batch, results)
        if accepted + duplicates == 1 and not batch.errors:  # the common single event: the same bytes every time
            return web.Response(status=202, body=_ONE_REPLY[accepted], content_type="application/json")
        reply = IngestReply(accepted, duplicates, len(batch.errors), batch.errors)
        return _json(202 if batch.accepted else 422, reply)

    def _count(self, batch: Batch, results: list[tuple[int, ...]]) -> tuple[int, int]:
        """Count each event's outcome by type; returns (events newly stored, duplicates)."""
        accepted = duplicates = 0
        add = self._events.add
        # The entries of batch.accepted come first, in its order; the rejected events' entry is last.
        for a, dups in zip(batch.accepted, results):
            written = len(a.ids) - len(dups)
            accepted += written
            duplicates += len(dups)
            if written:
                add(a.event_type, "accepted", n=written)
            if dups:
                add(a.event_type, "duplicate", n=len(dups))
        known = self.ingest.models
        for r in batch.rejected:
            # A label value is never client-chosen: an unknown type is counted as "unknown".
            add(r.event_type if r.event_type in known else "unknown", "rejected")
        return accepted, duplicates


# The reply to one event, by whether it was written (1) or a duplicate (0).
_ONE_REPLY = {n: _encode(IngestReply(n, 1 - n, 0, [])) for n in (0, 1)}


def _entries(batch: Batch, received_at: datetime) -> list[Entry]:
    """One entry per event type of the request, then one for its rejected events."""
    received_us = int(received_at.timestamp() * 1_000_000)
    entries = [Entry(keys.stream(a.event_type), a.ids, a.payload, received_us) for a in batch.accepted]
    if batch.rejected:
        entries.append(Entry(keys.stream("rejected"), ["rejected:" + uuid7() for _ in batch.rejected],
                             _encode_lines(batch.rejected)[:-1], received_us))
    return entries


async def openapi_view(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return _json(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when Redis answers: a load balancer stops sending while it cannot take events."""
    try:
        await asyncio.wait_for(request.app[REDIS].ping(), timeout=1.0)
    except (*REDIS_UNAVAILABLE, asyncio.TimeoutError) as e:
        return _json(503, {"status": "unavailable", "redis": str(e) or type(e).__name__},
                     {"Retry-After": str(request.app[SETTINGS].retry_after_seconds)})
    return _json(200, {"status": "ready"})


def _counted(route: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
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


def build(app, settings) -> web.Application:
    """The aiohttp application: ingest, health, metrics, the API description and the pages the
    project registered."""
    from streamapp.openapi import document
    from streamapp.redis_client import writer_client

    models = app.discover_models()
    cors = Cors(settings.cors_origins)
    ingest = Ingest(models, max_events=settings.max_events_per_request,
                    max_event_bytes=settings.max_event_bytes, max_future_seconds=settings.max_future_seconds)
    view = IngestView(settings, ingest, cors)
    webapp = web.Application()
    webapp[SETTINGS] = settings
    webapp[OPENAPI] = _encode(document(models, settings))
    webapp[INGEST] = ingest

    async def lifecycle(webapp: web.Application):
        client = writer_client(settings)
        writer = StreamWriter(client, settings.dedupe_seconds)
        writer.start()
        backlog = Backlog(client, [keys.stream(t) for t in [*models, "rejected"]], settings.max_backlog)
        sampler = asyncio.create_task(backlog.run(), name="backlog")
        flusher = asyncio.create_task(metrics.flush_tallies_every(1.0), name="metrics")
        webapp[REDIS], webapp[WRITER], webapp[BACKLOG] = client, writer, backlog
        view.writer, view.backlog = writer, backlog
        yield
        sampler.cancel()
        flusher.cancel()
        await asyncio.gather(sampler, flusher, return_exceptions=True)
        await writer.close()  # runs after in-flight requests finished: their writes complete
        await client.aclose()

    def add(method: str, path: str, handler, head: bool = False) -> None:
        resource = webapp.router.add_resource(path)
        handler = _counted(resource.canonical, handler)
        if head:
            resource.add_route("HEAD", handler)
        resource.add_route(method, handler)

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


async def serve(app, settings, stopping: asyncio.Event, reuse_port: bool = False) -> None:
    """Serve until `stopping` is set, then stop accepting, finish in-flight requests, flush, exit.
    `reuse_port`: one of several processes on the port (streamapp.webprocs)."""
    # keepalive_timeout also closes a connection that has not sent a whole request head in that
    # long (aiohttp's timer runs from the connection's start and is not reset by partial data):
    # the slowloris bound for headers; the body has its own timeout in IngestView.
    runner = web.AppRunner(build(app, settings), auto_decompress=False, access_log=None,
                           shutdown_timeout=settings.shutdown_seconds, handle_signals=False,
                           keepalive_timeout=settings.request_timeout_seconds)
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
