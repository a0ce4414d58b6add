"""A window's Arrow table straight from the stream's JSON, column by column in C.

The raw sinks never need event objects: pyarrow's JSON reader parses the payloads (each one the
web's msgspec encoding of a valid event, so every field is present and already validated) against
the table's own column types, e.g. "2026-11-27T17:54:19.123456Z" into timestamp[us, UTC]. That
costs a fraction of decoding them into structs and building the columns from Python lists.

Two things the reader cannot do are done here: a free-form JSON object kept as its JSON text
(`properties`: msgspec cuts it out as `msgspec.Raw`, byte for byte as the web encoded it), and a
field's default for payloads written before the model gained that field (for a field that may
also be null that default cannot be told from null, so those models go through msgspec first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
import msgspec.inspect as mi
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from streamapp.entries import ndjson_array
from streamapp.table_model import TableModel

NULL = b"null"


@dataclass(frozen=True)
class _Plan:
    parse: pj.ParseOptions  # the reader's: every column that comes from a JSON scalar, by JSON key
    keys: dict[str, str]  # column -> JSON key
    raw: str | None  # the column kept as JSON text, by its JSON key
    raw_decode: Any  # msgspec decoder of that one field, every other one skipped
    fill: dict[str, pa.Scalar[Any]]  # column -> its field's default, for a key absent from old payloads
    renormalise: Any  # None, or a msgspec (decode, encode) pair that writes every field


Renames = tuple[tuple[str, str], ...]
_plans: dict[tuple[TableModel, pa.Schema, Renames, str | None], _Plan] = {}


def _plan(model: TableModel, schema: pa.Schema, renames: Renames, raw: str | None) -> _Plan:
    """How to read `model`'s payloads into `schema`, worked out once per model."""
    key = (model, schema, renames, raw)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _make_plan(model, schema, renames, raw)
    return plan


def _make_plan(model: TableModel, schema: pa.Schema, renames: Renames, raw: str | None) -> _Plan:
    info = mi.type_info(model)
    assert isinstance(info, mi.StructType)
    by_column = {dict(renames).get(f.name, f.name): f for f in info.fields}
    keys, fill, read, ambiguous = {}, {}, [], False
    for field in schema:
        if field.name == "received_at" and field.name not in by_column:
            continue  # from the entry, not the event
        f = by_column[field.name]
        keys[field.name] = f.encode_name
        if f.encode_name != raw:
            read.append(pa.field(f.encode_name, field.type))
        if f.default not in (msgspec.NODEFAULT, None):
            if field.nullable:
                ambiguous = True
            else:
                fill[field.name] = pa.scalar(f.default, field.type)
    parse = pj.ParseOptions(explicit_schema=pa.schema(read), unexpected_field_behavior="ignore")
    raw_decode = None
    if raw is not None:
        only = msgspec.defstruct("Only", [(raw, msgspec.Raw, msgspec.Raw(NULL))])
        raw_decode = msgspec.json.Decoder(list[only]).decode  # type: ignore[valid-type]
    renormalise = None
    if ambiguous:
        renormalise = (msgspec.json.Decoder(list[model.stored_type()]).decode, msgspec.json.Encoder().encode_lines)  # type: ignore[misc]
    return _Plan(parse, keys, raw, raw_decode, fill, renormalise)


def _json_text(raws: list[msgspec.Raw]) -> pa.Array[Any]:
    """Raw JSON values as a string column, null for JSON null (the cast checks UTF-8)."""
    texts = [None if (text := bytes(r)) == NULL else text for r in raws]
    return pa.array(texts, type=pa.binary()).cast(pa.string())


def payloads_to_arrow(
    model: TableModel,
    schema: pa.Schema,
    payloads: list[bytes],
    received_us: list[int],
    *,
    renames: Renames = (),
    raw: str | None = None,
) -> pa.Table:
    """The table of `payloads` (the stream's `e` values: one event's JSON, or several as NDJSON)
    and `received_us` (one per event), with `schema`'s columns in its order. `renames` maps a
    model field to its column; `raw` names a field whose JSON object is kept as JSON text."""
    plan = _plan(model, schema, renames, raw)
    if not payloads:
        return schema.empty_table()
    blob = b"\n".join(payloads)
    if plan.renormalise is not None:
        decode, encode_lines = plan.renormalise
        blob = encode_lines(decode(ndjson_array(blob))).rstrip(b"\n")
    # The reader fails on a line longer than its block (1 MiB by default); no line is longer than
    # the longest entry.
    block = pj.ReadOptions(block_size=max(1 << 20, max(map(len, payloads)) + 1))
    # a BufferReader reads `blob` in place (the stubs know only paths and Python files)
    parsed = pj.read_json(pa.BufferReader(blob), read_options=block, parse_options=plan.parse)  # type: ignore[arg-type]
    if parsed.num_rows != len(received_us):
        raise ValueError(
            f"{len(payloads)} stream entries hold {parsed.num_rows} events, but their counts (n) say {len(received_us)}"
        )
    columns = []
    for field in schema:
        key = plan.keys.get(field.name)
        if key is None:
            column = pa.array(received_us, type=field.type)
        elif key == plan.raw:
            # An object anywhere shows as "key":{ (inside a string its quotes would be escaped); without one
            # the field is null in every event, the common case, and the second parse is skipped.
            if b'"' + key.encode() + b'":{' in blob:
                column = _json_text([getattr(o, key) for o in plan.raw_decode(ndjson_array(blob))])
            else:
                column = pa.nulls(len(received_us), field.type)
        else:
            column = parsed.column(key)
            if field.name in plan.fill and column.null_count:
                column = pc.fill_null(column, plan.fill[field.name])
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)
