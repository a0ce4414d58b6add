"""The HTTP edge: `POST /api/events` validates a body and appends its events to Redis streams.

Transport decoding is done here, not by aiohttp: its own gzip handling answers 500 or resets the
connection on bad input and cannot cap the decompressed size, so the server runs with
`auto_decompress=False` and this module inflates with a hard limit (a gzip bomb is cut off after
`max_body_bytes` of output, having cost almost nothing).
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from datetime import datetime, timezone

import msgspec
import redis.exceptions
from aiohttp import web

from streamapp import keys
from streamapp.ingest import Batch, BodyError, Ingest, body_kind, uuid7
from streamapp.writer import Entry, StreamWriter

log = logging.getLogger(__name__)

INGEST = web.AppKey("ingest", Ingest)
WRITER = web.AppKey("writer", StreamWriter)
SETTINGS = web.AppKey("settings", object)
REDIS = web.AppKey("redis", object)

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


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=_encode(body), content_type="application/json", headers=headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json(status, {"error": message}, headers)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, decompressed, at most `limit` bytes after decompression (else 413)."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "", "gzip", "x-gzip"):
        raise BodyError(415, f"Content-Encoding {encoding!r} is not supported; send identity or gzip")
    if request.content_length is not None and request.content_length > limit and encoding in ("identity", ""):
        raise BodyError(413, f"the body is {request.content_length} bytes; the limit is {limit}")
    inflate = zlib.decompressobj(wbits=31) if encoding in ("gzip", "x-gzip") else None
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


async def post_events(request: web.Request) -> web.Response:
    """Validate, then append. 202 once every accepted event is in Redis (durable), never before."""
    settings = request.app[SETTINGS]
    received_at = datetime.now(timezone.utc)
    try:
        kind = body_kind(request.headers.get("Content-Type", ""))
        body = await read_body(request, settings.max_body_bytes)
        batch = request.app[INGEST].parse(body, kind, received_at)
    except BodyError as e:
        return _error(e.status, e.message)
    entries = _entries(batch, received_at)
    try:
        results = await request.app[WRITER].write(entries)
    except REDIS_UNAVAILABLE:  # the writer logged it, once per failed flush
        return _error(503, "the event store is unavailable; retry later",
                      {"Retry-After": str(settings.retry_after_seconds)})
    accepted = sum(results[:len(batch.accepted)])
    duplicates = len(batch.accepted) - accepted
    body = {"accepted": accepted, "duplicates": duplicates, "rejected": len(batch.errors), "errors": batch.errors}
    return _json(202 if batch.accepted else 422, body)


def _entries(batch: Batch, received_at: datetime) -> list[Entry]:
    received_us = int(received_at.timestamp() * 1_000_000)
    entries = [Entry(keys.stream(a.event_type), a.event_id, a.payload, received_us) for a in batch.accepted]
    rejected_stream = keys.stream("rejected")
    entries += [Entry(rejected_stream, "rejected:" + uuid7(), _encode(r), received_us) for r in batch.rejected]
    return entries


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


def build(app, settings) -> web.Application:
    """The aiohttp application: ingest, health, and the pages the project registered."""
    from streamapp.redis_client import writer_client

    webapp = web.Application()
    webapp[SETTINGS] = settings
    webapp[INGEST] = Ingest(app.discover_models(), max_events=settings.max_events_per_request,
                            max_event_bytes=settings.max_event_bytes)

    async def lifecycle(webapp: web.Application):
        client = writer_client(settings)
        writer = StreamWriter(client, settings.dedupe_seconds)
        writer.start()
        webapp[REDIS], webapp[WRITER] = client, writer
        yield
        await writer.close()  # runs after in-flight requests finished: their writes complete
        await client.aclose()

    webapp.cleanup_ctx.append(lifecycle)
    webapp.router.add_post("/api/events", post_events)
    webapp.router.add_get("/healthz", healthz)
    webapp.router.add_get("/readyz", readyz)
    for method, path, handler in app.pages:
        webapp.router.add_route(method, path, handler)
    return webapp


async def serve(app, settings, stopping: asyncio.Event) -> None:
    """Serve until `stopping` is set, then stop accepting, finish in-flight requests, flush, exit."""
    runner = web.AppRunner(build(app, settings), auto_decompress=False, access_log=None,
                           shutdown_timeout=settings.shutdown_seconds, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
    await site.start()
    log.info("web: listening on http://%s:%d", settings.host, settings.port)
    try:
        await stopping.wait()
        log.info("web: stopping")
    finally:
        await runner.cleanup()
    log.info("web: stopped")
