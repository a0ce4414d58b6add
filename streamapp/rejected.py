"""Rejected events: parseable JSON the collector refused, kept with the reason in `events.rejected`.

A bad event is never silently dropped: the client gets an error naming it, and its raw JSON lands
here so the team that sent it can see what their tracker produced.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from streamapp.model import table_schema
from streamapp.names import REJECTED_TABLE

if TYPE_CHECKING:  # the web process never writes tables: it does not load pyarrow or pyiceberg
    import pyarrow as pa
    from pyiceberg.schema import Schema


class Rejected(msgspec.Struct, kw_only=True):
    """What is known of a rejected event, as stored in the Redis stream and the table."""

    table: ClassVar[str] = REJECTED_TABLE
    partition_column: ClassVar[str] = "received_at"

    reason: str
    field: str | None = None
    raw: str
    event_id: str | None = None
    event_type: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    page_url: str | None = None
    source: str | None = None  # from the request's write key

    @classmethod
    def type_name(cls) -> str:
        return "rejected"

    @classmethod
    def iceberg_schema(cls) -> Schema:
        return _schema()

    @classmethod
    def stored_type(cls) -> type:
        """Entries decode into the model itself: it ignores fields it does not know."""
        return cls

    @classmethod
    def to_arrow(cls, payloads: list[bytes], received_us: list[int]) -> pa.Table:
        from streamapp.lake.columns import payloads_to_arrow  # pyarrow: never in the web process (35 MB of RSS)

        return payloads_to_arrow(cls, _arrow_schema(), payloads, received_us)

    @classmethod
    def from_raw(cls, obj: Any, raw: str, reason: str, field: str | None, source: str | None = None) -> Rejected:
        """Keep the envelope fields that are strings; anything else is only in `raw`."""
        known: dict[str, str] = {}
        if isinstance(obj, dict):
            for src, dst in (
                ("event_id", "event_id"),
                ("type", "event_type"),
                ("user_id", "user_id"),
                ("session_id", "session_id"),
                ("page_url", "page_url"),
            ):
                value = obj.get(src)
                if isinstance(value, str):
                    known[dst] = value[:1024]
        return cls(reason=reason, field=field, raw=raw, source=source, **known)


@functools.cache
def _arrow_schema() -> pa.Schema:
    return _schema().as_arrow()


@functools.cache
def _schema() -> Schema:
    return table_schema(
        [
            ("received_at", "timestamptz", True),
            ("reason", "string", True),
            ("field", "string", False),
            ("raw", "string", True),
            ("event_id", "string", False),
            ("event_type", "string", False),
            ("user_id", "string", False),
            ("session_id", "string", False),
            ("page_url", "string", False),
            ("source", "string", False),
        ]
    )
