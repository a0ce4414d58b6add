"""What crosses the wire at `POST /api/events`, as HTTP: the body as the client encoded it (content
type, charset, gzip, size limits), the errors that refuse a request as a whole, and the replies.

Transport decoding is done here, not by aiohttp: its own gzip handling answers 500 or resets the
connection on bad input and cannot cap the decompressed size, so the server runs with
`auto_decompress=False` and this module inflates with a hard limit (a gzip bomb is cut off after
`max_body_bytes` of output, having cost almost nothing).
"""

from __future__ import annotations

import re
import zlib

import msgspec
from aiohttp import web

from streamapp.web import ingest
from streamapp.web.ingest import EventError


class BodyError(Exception):
    """The request as a whole is refused; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class IngestReply(msgspec.Struct):
    """The answer to `POST /api/events`: 202 when any event was accepted, else 422."""

    accepted: int  # events newly stored
    duplicates: int  # events whose event_id was already stored inside the dedupe window
    rejected: int  # events refused: each is in `errors` and in events.rejected
    errors: list[EventError]


class ErrorReply(msgspec.Struct):
    """The answer when a request is refused as a whole; `error` says why."""

    error: str


class InternalErrorReply(msgspec.Struct):
    """The answer when the server failed (500): `request_id` finds its one line in the error log."""

    error: str
    request_id: str


_encode = msgspec.json.Encoder().encode


def json_response(status: int, body: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=_encode(body), content_type="application/json", headers=headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(status, ErrorReply(message), headers)


_JSON_TYPES = {"application/json", "text/plain", ""}
_NDJSON_TYPES = {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"}


def body_kind(content_type: str) -> str:
    """Which body format (`ingest.JSON`, `ingest.NDJSON`) a Content-Type selects; 415 for anything
    else or a non-UTF-8 charset."""
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    charset = re.search(r"charset\s*=\s*\"?([^\";\s]+)", params, re.I)
    if charset and charset[1].lower() not in ("utf-8", "utf8"):
        raise BodyError(415, f"charset {charset[1]!r} is not supported; send UTF-8")
    if media in _JSON_TYPES:
        return ingest.JSON
    if media in _NDJSON_TYPES:
        return ingest.NDJSON
    raise BodyError(
        415,
        f"Content-Type {media!r} is not supported; send application/json, text/plain (JSON) or application/x-ndjson",
    )


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
    try:
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
    except ConnectionResetError:  # aiohttp's "Connection lost": the client left mid-body, nobody reads this
        raise BodyError(400, "the connection closed before the whole body arrived") from None
    if inflate is not None:
        if not inflate.eof:
            raise BodyError(400, "the gzip body is truncated")
    return bytes(out)
