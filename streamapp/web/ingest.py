"""Validation: a request body into accepted events, rejections and per-event errors. Pure: no I/O,
no HTTP.

The web layer decodes transport (content type, gzip, size limits, see `streamapp.web.wire`) and
hands the bytes here; this module knows the body formats (one JSON object, a JSON array, NDJSON)
and the event models. Valid events are normalised (server-assigned `event_id` when absent,
`timestamp` made an aware UTC datetime) and encoded once, ready for the Redis stream.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Union

import msgspec

from streamapp.model import ENVELOPE_FIELDS, Event
from streamapp.rejected import Rejected


class InvalidBody(ValueError):
    """The body as a whole cannot be read as events: not JSON or NDJSON, or empty (HTTP 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TooManyEvents(InvalidBody):
    """More events in one body than the limit (HTTP 413)."""


# The body formats `Ingest.parse` reads.
JSON = "json"  # one event, or an array of events
NDJSON = "ndjson"  # one event per line


@dataclasses.dataclass(slots=True)
class Accepted:
    """The accepted events of one type, in request order: they become one stream entry."""

    event_type: str
    indexes: Sequence[int]  # their positions in the request
    ids: list[str]  # their event_ids, server-assigned where the client sent none
    payload: bytes  # their normalised JSON, one event per line (msgspec never writes a raw newline)


class _Examine(Exception):
    """A fast-path event needs the slow path, which keeps the event as sent for events.rejected."""


class EventError(msgspec.Struct):
    """Why one event of a request was not accepted (its position in the request and the field)."""

    index: int
    event_id: str | None
    field: str | None
    message: str


@dataclasses.dataclass(slots=True)
class Batch:
    """One request's events after validation, in request order within each list."""

    received_at: datetime
    source: str | None  # from the write key; stamped on every event of the request
    accepted: list[Accepted] = dataclasses.field(default_factory=list)  # one per event type
    rejected: list[Rejected] = dataclasses.field(
        default_factory=list
    )  # parseable but invalid: stored in events.rejected
    errors: list[EventError] = dataclasses.field(default_factory=list)  # one per event not accepted
    # The slow path's accepted events by type: (indexes, ids, payloads), joined into `accepted` at the end.
    _by_type: dict[str, tuple[list[int], list[str], list[bytes]]] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def accepted_events(self) -> int:
        return sum(len(a.ids) for a in self.accepted)

    def _finish(self) -> Batch:
        self.accepted = [
            Accepted(kind, indexes, ids, b"\n".join(payloads))
            for kind, (indexes, ids, payloads) in self._by_type.items()
        ]
        return self


def uuid7() -> str:
    """A time-ordered UUID (RFC 9562 version 7): sortable, so server-assigned ids cluster by time."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 68) & 0xFFF) << 64 | (0b10 << 62) | (rand & ((1 << 62) - 1))
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")


def _describe(error: msgspec.ValidationError) -> tuple[str | None, str]:
    """Split msgspec's message into (field path, message) for the client."""
    text = str(error)
    if m := _AT.match(text):
        path = m["path"].lstrip(".")
        return (path or None), m["msg"]
    if m := _MISSING.match(text):
        return m["field"], "required field is missing"
    return None, text


# What msgspec raises on bytes that are not JSON it can read: invalid UTF-8 inside a string
# comes out as UnicodeDecodeError, not DecodeError (it escaped as a 500 before this was caught).
_UNREADABLE = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _not_json(error: Exception, what: str = "the body", data: bytes = b"") -> InvalidBody:
    if isinstance(error, RecursionError):
        return InvalidBody(f"{what} is not valid JSON: it is nested too deeply")
    if isinstance(error, UnicodeDecodeError):
        return InvalidBody(f"{what} is not valid UTF-8: {error.reason} (byte 0x{error.object[error.start]:02x})")
    if "truncated" in str(error) and _SURROGATE.search(data):
        # msgspec reports an unpaired surrogate escape as truncated input, which misleads.
        return InvalidBody(f"{what} is not valid JSON: a string holds an unpaired UTF-16 surrogate (\\uD800-\\uDFFF)")
    return InvalidBody(f"{what} is not valid JSON: {error}")


EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
EARLIEST_MS = int(EARLIEST.timestamp() * 1000)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# An escaped NUL in encoded JSON: `\u0000` after an even number of backslashes.
_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
# Checked here rather than as the model's pattern, which msgspec runs per event in Python's `re`:
# that made decoding an array 2-4 times slower (longer ids, slower).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_MESSAGE = "contains a control character (U+0000 to U+001F or U+007F)"


class Ingest:
    """Validates bodies against the declared event types.

    Clock skew policy: `timestamp` is the sender's clock, so it is checked against the server's.
    Events more than `max_future_seconds` ahead, or before 2000-01-01 (typically epoch seconds sent
    where milliseconds are expected), are rejected with the reason, into events.rejected; anything
    in between is kept as sent, since backfills of old events are legitimate. `received_at` is
    always the server's clock, so skew can be measured and corrected downstream.
    """

    def __init__(
        self, models: dict[str, type[Event]], *, max_events: int, max_event_bytes: int, max_future_seconds: int = 86_400
    ) -> None:
        if not models:
            raise ValueError("no event types are declared")
        self.models = models
        self.max_events = max_events
        self.max_event_bytes = max_event_bytes
        self.max_future = timedelta(seconds=max_future_seconds)
        union = Union[tuple(models.values())]  # type: ignore[valid-type] # noqa: UP007 - a runtime union
        self._one = msgspec.json.Decoder(union)
        self._many = msgspec.json.Decoder(list[union])  # type: ignore[valid-type]
        self._any = msgspec.json.Decoder()
        self._encode = msgspec.json.Encoder().encode
        self._encode_lines = msgspec.json.Encoder().encode_lines
        self._types = ", ".join(sorted(models))
        self._allowed = {name: ENVELOPE_FIELDS | set(m.__struct_fields__) for name, m in models.items()}

    def parse(self, body: bytes, kind: str, received_at: datetime, source: str | None = None) -> Batch:
        """Validate every event in `body`, of format `kind` (JSON or NDJSON). Raises InvalidBody for a
        body that is not JSON/NDJSON or holds no event, TooManyEvents over the limit."""
        if not body.strip():
            raise InvalidBody("the body is empty; send one event, an array of events or NDJSON")
        if body.startswith(b"\xef\xbb\xbf"):
            body = body[3:]  # a UTF-8 byte order mark, which RFC 8259 lets a parser ignore
        batch = Batch(received_at, source)
        if kind == NDJSON:
            return self._parse_ndjson(body, batch)
        first = body.lstrip()[:1]
        # Fast path: a fully valid body decodes straight into the models.
        try:
            events = self._many.decode(body) if first == b"[" else [self._one.decode(body)]
        except msgspec.ValidationError:
            pass  # at least one bad event: examine each one to say which and why
        except _UNREADABLE as e:
            raise _not_json(e, data=body) from None
        else:
            self._check_count(len(events))
            try:
                self._accept_all(batch, events)
                return batch
            except _Examine:
                batch = Batch(received_at, source)
        try:
            doc = self._any.decode(body)
        except (*_UNREADABLE, msgspec.ValidationError) as e:
            raise _not_json(e, data=body) from None
        items = doc if isinstance(doc, list) else [doc]
        self._check_count(len(items))
        for i, obj in enumerate(items):
            self._examine(batch, i, obj)
        return batch._finish()

    def _parse_ndjson(self, body: bytes, batch: Batch) -> Batch:
        lines = [line for line in body.split(b"\n") if line.strip()]
        self._check_count(len(lines))
        try:
            self._accept_all(batch, [self._one.decode(line) for line in lines])
            return batch
        except (*_UNREADABLE, msgspec.ValidationError, _Examine):
            batch = Batch(batch.received_at, batch.source)  # line by line, to say which and why
        for i, line in enumerate(lines):
            try:
                try:
                    self._accept(batch, i, self._one.decode(line), None)
                except (msgspec.ValidationError, _Examine):
                    self._examine(batch, i, self._any.decode(line))
            except (*_UNREADABLE, msgspec.ValidationError) as e:
                # Not JSON we can read, so nothing can be stored of it; the error still names the line.
                message = _not_json(e, "the line", line).message
                batch.errors.append(EventError(i, None, None, message))
        return batch._finish()

    def _check_count(self, n: int) -> None:
        if n > self.max_events:
            raise TooManyEvents(f"{n} events in one request; the limit is {self.max_events}")
        if n == 0:
            raise InvalidBody("the body contains no events")

    def _examine(self, batch: Batch, index: int, obj: Any) -> None:
        """The slow path for one event: find the first thing wrong with it, or accept it."""
        if not isinstance(obj, dict):
            self._reject(batch, index, obj, None, f"an event must be a JSON object, got {type(obj).__name__}")
            return
        kind = obj.get("type")
        if kind is None:
            self._reject(batch, index, obj, "type", f"required field is missing; expected one of: {self._types}")
            return
        if not isinstance(kind, str) or kind not in self.models:
            shown = repr(kind) if isinstance(kind, (str, int, float, bool)) else f"of JSON type {type(kind).__name__}"
            self._reject(batch, index, obj, "type", f"unknown event type {shown}; expected one of: {self._types}")
            return
        unknown = sorted(set(obj) - self._allowed[kind])
        if unknown:
            names = ", ".join(unknown)
            self._reject(batch, index, obj, unknown[0], f"unknown field(s) for {kind!r}: {names}")
            return
        try:
            event = msgspec.convert(obj, self.models[kind], strict=True)
        except msgspec.ValidationError as e:
            field, message = _describe(e)
            self._reject(batch, index, obj, field, message)
            return
        self._accept(batch, index, event, obj)

    def _accept_all(self, batch: Batch, events: list[Event]) -> None:
        """The fast path: normalise the decoded events in place and encode them, one NDJSON payload
        per type. Raises `_Examine` if any is refused: the slow path, which has the events as sent
        (events.rejected keeps the raw JSON), then says which and why."""
        received, source, refusal, utc = batch.received_at, batch.source, self._refusal, UTC
        kind = events[0].__class__
        mixed = False
        times = []  # UTC datetimes as sent: checked against the bounds at once, below
        for event in events:
            if event.__class__ is not kind:
                mixed = True
            ts = event.timestamp
            if ts.__class__ is datetime and ts.tzinfo is utc and event.source is None:
                times.append(ts)  # the common cases inline: same outcome as _refusal, cheaper
                if event.event_id is None:
                    event.event_id = uuid7()
            elif ts is None and event.source is None:
                event.timestamp = received
                if event.event_id is None:
                    event.event_id = uuid7()
            elif refusal(event, received) is not None:
                raise _Examine
            event.source = source
        if times and (min(times) < EARLIEST or max(times) - received > self.max_future):
            raise _Examine
        if not mixed:
            self._accept_group(batch, kind.type_name(), range(len(events)), events)
            return
        by_type: dict[type[Event], tuple[list[int], list[Event]]] = {}
        for i, event in enumerate(events):
            indexes, group = by_type.setdefault(event.__class__, ([], []))
            indexes.append(i)
            group.append(event)
        for cls, (indexes, group) in by_type.items():
            self._accept_group(batch, cls.type_name(), indexes, group)

    def _accept_group(self, batch: Batch, kind: str, indexes: Sequence[int], events: list[Event]) -> None:
        ids = [e.event_id for e in events]
        if _CONTROL.search("".join(ids)):  # type: ignore[arg-type]
            raise _Examine
        payload = self._encode_lines(events)[:-1]
        limit = self.max_event_bytes
        if len(payload) > limit and max(map(len, payload.split(b"\n"))) > limit:
            raise _Examine
        if b"\\u0000" in payload and _NUL.search(payload):
            raise _Examine
        batch.accepted.append(Accepted(kind, indexes, ids, payload))  # type: ignore[arg-type]

    def _refusal(self, event: Event, received: datetime) -> tuple[str, str] | None:
        """Normalise `event` in place (timestamp in UTC, event_id assigned), or say what the model
        could not check: (field, message)."""
        if event.source is not None:
            return "source", "is set by the server from the write key; do not send it"
        ts = event.timestamp
        if ts is None:
            event.timestamp = received
        else:
            # Checked before the conversion to UTC, which overflows past 9999-12-31 (an offset
            # behind UTC on the last day): comparing and subtracting aware datetimes cannot.
            if isinstance(ts, int):
                if ts < EARLIEST_MS:
                    return "timestamp", (
                        f"{ts} ms is before 2000-01-01; epoch timestamps are milliseconds (was it sent in seconds?)"
                    )
                ahead = timedelta(milliseconds=ts) - (received - _EPOCH)
            else:
                if ts < EARLIEST:
                    return "timestamp", "is before 2000-01-01"
                ahead = ts - received
            if ahead > self.max_future:
                return "timestamp", (
                    f"is {ahead.total_seconds():.0f} s ahead of the server's clock; the limit is "
                    f"{self.max_future.total_seconds():.0f} s (STREAMAPP_MAX_FUTURE_SECONDS)"
                )
            try:  # exact for milliseconds, which a float of seconds is not
                event.timestamp = _EPOCH + timedelta(milliseconds=ts) if isinstance(ts, int) else ts.astimezone(UTC)
            except OverflowError:  # only with STREAMAPP_MAX_FUTURE_SECONDS beyond year 9999
                return "timestamp", "is after 9999-12-31T23:59:59.999999Z, the latest time streamapp can store"
        if event.event_id is None:
            event.event_id = uuid7()
        return None

    def _accept(self, batch: Batch, index: int, event: Event, obj: Any) -> None:
        """The slow path for one event the model decoded: accept it, or refuse it for what the
        model cannot check. Without `obj` (the event as sent), a refusal raises `_Examine`: the
        caller examines the event as sent, so that events.rejected keeps the raw JSON."""
        refused: tuple[str | None, str] | None
        if event.event_id is not None and _CONTROL.search(event.event_id):
            refused = "event_id", _CONTROL_MESSAGE
        else:
            refused = self._refusal(event, batch.received_at)
        if refused is None:
            event.source = batch.source
            payload = self._encode(event)
            if len(payload) > self.max_event_bytes:
                refused = None, f"event is {len(payload)} bytes; the limit is {self.max_event_bytes}"
            elif b"\\u0000" in payload and _NUL.search(payload):
                field = next((f for f in event.__struct_fields__ if _NUL.search(self._encode(getattr(event, f)))), None)
                refused = field, "contains a NUL character (\\u0000), which many readers of the table cannot handle"
        if refused is not None:
            if obj is None:
                raise _Examine
            self._reject(batch, index, obj, *refused)
            return
        indexes, ids, payloads = batch._by_type.setdefault(event.type_name(), ([], [], []))
        indexes.append(index)
        ids.append(event.event_id)  # type: ignore[arg-type]
        payloads.append(payload)

    def _reject(self, batch: Batch, index: int, obj: Any, field: str | None, message: str) -> None:
        event_id = obj.get("event_id") if isinstance(obj, dict) else None
        event_id = event_id if isinstance(event_id, str) else None
        batch.errors.append(EventError(index, event_id, field, message))
        batch.rejected.append(Rejected.from_raw(obj, self._encode(obj).decode(), message, field, batch.source))
