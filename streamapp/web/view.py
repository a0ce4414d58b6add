"""`POST /api/events`, the door of the data path: an event's way from a request to a Redis stream.

In order, a request is checked for: its origin (CORS, 403), its write key (401), Redis's memory
(429), then its body is read within the request timeout (408) and the size limits (413, see
`streamapp.web.wire`), and validated against the models (400/415/422, `streamapp.web.ingest`).
Nothing reaches Redis before all of that passed; then `streamapp.web.writer` appends the events,
one stream entry per event type, unless a stream is over its backlog limits (429) or Redis has
not been checked against the lake since it started (503), and the client gets 202 once they are
in Redis.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from datetime import UTC, datetime

import msgspec
import redis.exceptions
from aiohttp import web

from streamapp import metrics, names
from streamapp.redis_client import UNAVAILABLE, NotReplicated
from streamapp.settings import Settings
from streamapp.web.backlog import Backlog
from streamapp.web.cors import Cors
from streamapp.web.ingest import Batch, Ingest, InvalidBody, TooManyEvents, uuid7
from streamapp.web.wire import (
    BodyError,
    IngestReply,
    InternalErrorReply,
    body_kind,
    error_response,
    json_response,
    read_body,
)
from streamapp.web.writer import (
    BacklogFull,
    Entry,
    StreamWriter,
    Unchecked,
    dedupe_ids,
    rejected_dedupe_id,
    shard_entries,
)

log = logging.getLogger(__name__)

INGEST_PATH = "/api/events"

_encode = msgspec.json.Encoder().encode
_encode_lines = msgspec.json.Encoder().encode_lines


def _source(request: web.Request, write_keys: dict[str, str]) -> str | None:
    """The source name of the request's write key (header, or query for sendBeacon); 401 without
    a valid one when keys are configured. Compared in constant time: keys are secrets."""
    if not write_keys:
        return None
    given = request.headers.get("X-Write-Key") or request.query.get("writeKey")
    if not given:
        raise BodyError(
            401, "a write key is required: send it in the X-Write-Key header or the writeKey query parameter"
        )
    # Bytes, whatever the text holds: aiohttp hands a header's non-UTF-8 bytes over as lone
    # surrogates (surrogateescape), which a plain encode() refuses; surrogatepass encodes any
    # str, and such a key matches only a configured key decoded the same way (from os.environ).
    given_bytes = given.encode("utf-8", "surrogatepass")
    found = None
    for key, source in write_keys.items():
        if hmac.compare_digest(key.encode("utf-8", "surrogatepass"), given_bytes):
            found = source
    if found is None:
        raise BodyError(401, "the write key is not valid")
    return found


class IngestView:
    """`POST /api/events`: validate, then append. 202 once every accepted event is in Redis
    (durable), never before.

    CORS and the request count are done here rather than in middlewares (which cost every request
    a few wrapper calls), and what a request would otherwise recompute is cached: the metric
    children, the parser a Content-Type selects. The writer and backlog are set when the
    application starts (they need its event loop).
    """

    def __init__(self, settings: Settings, ingest: Ingest, cors: Cors) -> None:
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
            try:
                response = await self._handle(request)
            except Exception:  # noqa: BLE001 - a bug or an unforeseen failure: still a reply the client can read
                response = _internal_error()
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
        received_at = datetime.now(UTC)
        try:
            source = _source(request, settings.write_keys)
            backlog = self.backlog
            if backlog.memory_full:
                return error_response(
                    429,
                    f"the event store is nearly full ({backlog.used_memory} of its {backlog.maxmemory} bytes of "
                    "memory): events are written to Iceberg more slowly than they arrive; retry later",
                    {"Retry-After": str(backlog.retry_after())},
                )
            kind = self._body_kind(request.headers.get("Content-Type", ""))
            if request.content.is_eof():  # the whole body is already here: no wait to time out
                body = await read_body(request, settings.max_body_bytes)
            else:
                try:
                    async with asyncio.timeout(settings.request_timeout_seconds):
                        body = await read_body(request, settings.max_body_bytes)
                except TimeoutError:
                    raise BodyError(
                        408, f"the body did not arrive within {settings.request_timeout_seconds:g} s"
                    ) from None
            batch = self.ingest.parse(body, kind, received_at, source)
        except BodyError as e:
            return error_response(e.status, e.message)
        except TooManyEvents as e:
            return error_response(413, e.message)
        except InvalidBody as e:
            return error_response(400, e.message)
        shards = settings.shards
        if shards == 1:
            entries = _entries(batch, received_at)
        else:
            entries, positions = _sharded_entries(batch, received_at, shards)
        try:
            results = await self.writer.write(entries)
            if shards != 1:
                results = _regroup(results, positions)
        except BacklogFull as e:
            limits = self.backlog.limits
            return error_response(
                429,
                f"{e.events} events ({e.bytes} bytes) wait to be written to Iceberg from the "
                f"{_stream_name(e.stream, settings.shards)!r} stream (the limits are {limits.max_events} events and "
                f"{limits.max_bytes} bytes); retry later",
                {"Retry-After": str(self.backlog.retry_after(e.events))},
            )
        except Unchecked:
            return error_response(
                503,
                "the event store restarted and is being checked against the tables (a worker does it); retry later",
                {"Retry-After": str(settings.retry_after_seconds)},
            )
        except NotReplicated as e:
            return error_response(
                503,
                f"the events are not on enough replicas yet ({e}); retry later (a retry is deduplicated)",
                {"Retry-After": str(settings.retry_after_seconds)},
            )
        except redis.exceptions.OutOfMemoryError:
            return error_response(
                503,
                "the event store is out of memory (Redis maxmemory); retry later",
                {"Retry-After": str(max(settings.retry_after_seconds, self.backlog.retry_after()))},
            )
        except UNAVAILABLE:  # the writer logged it, once per failed flush
            return error_response(
                503, "the event store is unavailable; retry later", {"Retry-After": str(settings.retry_after_seconds)}
            )
        accepted, duplicates = self._count(batch, results)
        if accepted + duplicates == 1 and not batch.errors:  # the common single event: the same bytes every time
            return web.Response(status=202, body=_ONE_REPLY[accepted], content_type="application/json")
        reply = IngestReply(accepted, duplicates, len(batch.errors), batch.errors)
        return json_response(202 if batch.accepted else 422, reply)

    def _count(self, batch: Batch, results: list[tuple[int, ...]]) -> tuple[int, int]:
        """Count each event's outcome by type; returns (events newly stored, duplicates)."""
        accepted = duplicates = 0
        add = self._events.add
        # The entries of batch.accepted come first, in its order; the rejected events' entry is last.
        for a, dups in zip(batch.accepted, results, strict=False):
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


def _stream_name(stream: str, shards: int) -> str:
    """A stream as a client reads it: its event type, and its shard when there are several."""
    name = names.type_of_stream(stream)
    return name if shards == 1 else f"{name}, shard {names.shard_of_key(stream)},"


def _internal_error() -> web.Response:
    """500 for what `_handle` raised: one ERROR line with the traceback and a request id, which the
    reply carries too, so that an operator finds the line a client reports."""
    request_id = uuid7()
    log.error(
        "POST %s failed: answered 500, request_id %s",
        INGEST_PATH,
        request_id,
        exc_info=True,
        extra={"request_id": request_id},
    )
    return json_response(500, InternalErrorReply("internal error", request_id), {"X-Request-Id": request_id})


# The reply to one event, by whether it was written (1) or a duplicate (0).
_ONE_REPLY = {n: _encode(IngestReply(n, 1 - n, 0, [])) for n in (0, 1)}


def _entries(batch: Batch, received_at: datetime) -> list[Entry]:
    """One entry per event type of the request, then one for its rejected events. Their dedupe ids
    are scoped by the request's source (see `streamapp.web.writer`); the events are stored as sent."""
    received_us = int(received_at.timestamp() * 1_000_000)
    source = batch.source
    entries = [
        Entry(names.stream(a.event_type), dedupe_ids(a.ids, source), a.payload, received_us) for a in batch.accepted
    ]
    if batch.rejected:
        entries.append(
            Entry(
                names.stream("rejected"),
                [rejected_dedupe_id(r.raw, source) for r in batch.rejected],
                _encode_lines(batch.rejected)[:-1],
                received_us,
            )
        )
    return entries


def _sharded_entries(
    batch: Batch, received_at: datetime, shards: int
) -> tuple[list[Entry], list[list[tuple[int, list[int]]]]]:
    """`_entries` over the shards: each type's events split by the shard of their dedupe ids, the
    accepted types' entries first, then the rejected events'. And per accepted type, its entries
    (their indexes) with the positions of their events in the type's, for `_regroup`."""
    received_us = int(received_at.timestamp() * 1_000_000)
    source = batch.source
    entries: list[Entry] = []
    positions: list[list[tuple[int, list[int]]]] = []
    for a in batch.accepted:
        mine = []
        for e, where in shard_entries(a.event_type, dedupe_ids(a.ids, source), a.payload, received_us, shards):
            mine.append((len(entries), where))
            entries.append(e)
        positions.append(mine)
    if batch.rejected:
        ids = [rejected_dedupe_id(r.raw, source) for r in batch.rejected]
        payload = _encode_lines(batch.rejected)[:-1]
        entries += [e for e, _ in shard_entries("rejected", ids, payload, received_us, shards)]
    return entries, positions


def _regroup(results: list[tuple[int, ...]], positions: list[list[tuple[int, list[int]]]]) -> list[tuple[int, ...]]:
    """Per accepted type, the positions of its duplicates, from its entries' (`_sharded_entries`)."""
    out = []
    for parts in positions:
        if len(parts) == 1 and not results[parts[0][0]]:
            out.append(results[parts[0][0]])
        else:
            out.append(tuple(sorted(where[d] for index, where in parts for d in results[index])))
    return out
