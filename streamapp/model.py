"""The event model base: one msgspec declaration per event type is the single source of truth.

A model module in `models/` declares a subclass of `Event` with a `tag` (its `type` on the wire).
From that one declaration streamapp derives:

- validation of incoming JSON (strict types, unknown fields rejected, bounds from `Meta`),
- the Iceberg schema of its table (`iceberg_schema`), and
- the Arrow schema its windows are written with (`arrow_schema`).

msgspec was chosen over pydantic because it validates a click in ~0.3 us against ~1.2 us, and its
type introspection (`msgspec.inspect`) is enough to derive both schemas.
"""

from __future__ import annotations

import datetime as dt
import functools
import typing
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import msgspec
import msgspec.inspect as mi

if TYPE_CHECKING:  # imported where used: the web process validates events and never loads them
    import pyarrow as pa
    from pyiceberg.schema import Schema


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

Int32 = Annotated[int, msgspec.Meta(ge=INT32_MIN, le=INT32_MAX)]
"""A JSON integer in int32 range; stored as an Iceberg `int`."""

# No control characters either: checked by streamapp.web.ingest, since a `pattern` here runs Python's
# `re` per event inside msgspec (2-4 times the cost of decoding an array); the schema still says so.
EventId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=128, extra_json_schema={"pattern": r"^[^\x00-\x1f\x7f]+$"})
]
EpochMillis = Annotated[int, msgspec.Meta(ge=0, le=253_402_300_799_999)]  # up to year 9999
AwareDatetime = Annotated[dt.datetime, msgspec.Meta(tz=True)]


class Event(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    """The envelope every event type shares. Subclass it with `tag="..."` to declare a type.

    `timestamp` is when the event happened (RFC 3339 with an offset, or epoch milliseconds);
    absent means the time the server received it. `event_id` is the idempotency key: the same
    id sent again inside the dedupe window is stored once. `properties` is free-form JSON.
    """

    table: ClassVar[str]  # the Iceberg table its raw sink writes, e.g. "events.clicks"
    partition_column: ClassVar[str] = "event_time"

    event_id: EventId | None = None
    timestamp: AwareDatetime | EpochMillis | None = None
    user_id: str | None = None
    session_id: str | None = None
    page_url: str | None = None
    target: str | None = None
    properties: dict[str, Any] | None = None
    # Set by the server from the request's write key (see STREAMAPP_WRITE_KEYS); a client that
    # sends it is told so, since a sender must not be able to claim another's source.
    source: str | None = None

    @classmethod
    def type_name(cls) -> str:
        tag = cls.__struct_config__.tag
        if not isinstance(tag, str):
            raise TypeError(f'{cls.__name__} declares no event type: subclass Event with tag="..."')
        return tag

    @classmethod
    def iceberg_schema(cls) -> Schema:
        return iceberg_schema(cls)

    @classmethod
    def stored_type(cls) -> type:
        """The type this model's stream entries decode into: an event written before the model
        changed still decodes (a field the model lost is ignored, one it gained without a default
        is None). Validation of new events stays the model's own, strict."""
        return _stored_type(cls)

    @classmethod
    def to_arrow(cls, payloads: list[bytes], received_us: list[int]) -> pa.Table:
        """The window's table from the stream's payloads (see `streamapp.lake.columns`): no event objects."""
        from streamapp.lake.columns import payloads_to_arrow  # pyarrow: never in the web process (35 MB of RSS)

        return payloads_to_arrow(
            cls, arrow_schema(cls), payloads, received_us, renames=(("timestamp", "event_time"),), raw="properties"
        )


ENVELOPE_FIELDS = frozenset(("type", *Event.__struct_fields__))


# Columns every event table starts with, in this order: (name, Iceberg type, required). The model's
# own columns follow, then `source`, last because it was added after v1: tables from then gain it
# at the end by schema evolution, so a new table and an evolved one have the same column order.
_COMMON_COLUMNS: list[Column] = [
    ("event_id", "string", True),
    ("event_time", "timestamptz", True),
    ("received_at", "timestamptz", True),
    ("user_id", "string", False),
    ("session_id", "string", False),
    ("page_url", "string", False),
    ("target", "string", False),
    ("properties", "string", False),
]


def _column_type(t: mi.Type) -> tuple[str, bool]:
    """Map a msgspec field type to (Iceberg type name, nullable)."""
    nullable = False
    if isinstance(t, mi.UnionType):
        rest = [x for x in t.types if not isinstance(x, mi.NoneType)]
        nullable = len(rest) != len(t.types)
        if len(rest) != 1:
            raise TypeError(f"unions other than Optional[X] have no column type: {t}")
        t = rest[0]
    if isinstance(t, mi.BoolType):
        return "boolean", nullable
    if isinstance(t, mi.IntType):
        int32 = t.ge is not None and t.le is not None and t.ge >= INT32_MIN and t.le <= INT32_MAX
        return ("int" if int32 else "long"), nullable
    if isinstance(t, mi.FloatType):
        return "double", nullable
    if isinstance(t, mi.StrType):
        return "string", nullable
    raise TypeError(f"no Iceberg column type for {t}; use bool, int, float or str")


Column = tuple[str, str, bool]  # (name, Iceberg type name, required)


def table_schema(columns: list[Column]) -> Schema:
    """An Iceberg schema of these columns, numbered from 1 in order. Type names: boolean, int, long,
    double, string, timestamptz. Every table streamapp creates is declared this way."""
    # pyiceberg: the web process validates with the models and never loads it (35 MB of its RSS)
    from pyiceberg.schema import Schema
    from pyiceberg.types import (
        BooleanType,
        DoubleType,
        IcebergType,
        IntegerType,
        LongType,
        NestedField,
        StringType,
        TimestamptzType,
    )

    kinds: dict[str, IcebergType] = {
        "boolean": BooleanType(),
        "int": IntegerType(),
        "long": LongType(),
        "double": DoubleType(),
        "string": StringType(),
        "timestamptz": TimestamptzType(),
    }
    return Schema(
        *(NestedField(i, name, kinds[kind], required=req) for i, (name, kind, req) in enumerate(columns, start=1))
    )


@functools.cache
def iceberg_schema(model: type[Event]) -> Schema:
    """The Iceberg schema of `model`'s table: the common columns, then the model's own fields."""
    columns = list(_COMMON_COLUMNS)
    info = mi.type_info(model)
    assert isinstance(info, mi.StructType)
    for f in info.fields:
        if f.name in ENVELOPE_FIELDS:
            continue
        kind, nullable = _column_type(f.type)
        columns.append((f.name, kind, not nullable))
    columns.append(("source", "string", False))
    return table_schema(columns)


_STORED_TYPES: set[type] = set()  # subclasses of the models, not event types of their own


@functools.cache
def _stored_type(model: type[Event]) -> type:
    hints = typing.get_type_hints(model, include_extras=True)
    required = [f.name for f in mi.type_info(model).fields if f.required]  # type: ignore[attr-defined]
    stored: type = msgspec.defstruct(
        f"Stored{model.__name__}",
        [(name, hints[name], None) for name in required],
        bases=(model,),
        forbid_unknown_fields=False,
        tag=model.type_name(),
        kw_only=True,
    )
    _STORED_TYPES.add(stored)
    return stored


@functools.cache
def arrow_schema(model: type[Event]) -> pa.Schema:
    return iceberg_schema(model).as_arrow()


def event_types() -> dict[str, type[Event]]:
    """Every declared event type by its wire `type`, from the `Event` subclasses imported so far."""
    found: dict[str, type[Event]] = {}
    todo = list(Event.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        tag = cls.__struct_config__.tag
        if isinstance(tag, str) and cls not in _STORED_TYPES:
            if tag in found and found[tag] is not cls:
                raise TypeError(f"event type {tag!r} is declared twice: {found[tag]} and {cls}")
            found[tag] = cls
    return found
