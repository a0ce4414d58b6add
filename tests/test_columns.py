"""Tables built from the stream's JSON (`streamapp.lake.columns`) are the tables the event objects
give: same schema, values, nulls and column order, for every model and the awkward values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pyarrow as pa
import pytest

from models.click import ClickEvent
from models.keydown import KeydownEvent
from streamapp.entries import Window
from streamapp.lake.columns import payloads_to_arrow
from streamapp.model import INT32_MAX, INT32_MIN, arrow_schema
from streamapp.rejected import Rejected

encode = msgspec.json.Encoder().encode
T = datetime(2026, 11, 27, 17, 54, 19, 123456, tzinfo=UTC)
STRINGS = [
    "plain",
    "",
    "é ü ß 中文 😀 \u2028\u2029 e\u0301",
    'quote " backslash \\ slash /',
    "\n\t\r\b\f \x01\x1f\x7f",
    '"properties":{"x":1}',
    "\\u0041 not an escape",
]
PROPERTIES: list[Any] = [
    None,
    {},
    {"a": 1},
    {"nested": {"deep": [1, 2.5, None, True, "s"]}, "properties": {"x": {}}},
    {"float": 1e300, "neg": -0.0, "tenth": 0.1, "big": 2**63 - 1, "text": '😀"\\\n'},
    {"": None},
]
TIMES = [
    T,
    T.replace(microsecond=0),
    T.replace(microsecond=120000),
    T.replace(microsecond=1),
    datetime(2000, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
]


def reference(model: Any, events: list, received_us: list[int]) -> pa.Table:
    """How the table was built before, from the decoded objects: the behaviour to keep."""
    schema = arrow_schema(model) if model is not Rejected else Rejected.iceberg_schema().as_arrow()
    columns: dict[str, Any] = {"received_at": pa.array(received_us, type=schema.field("received_at").type)}
    for name in schema.names:
        if name != "received_at":
            values = [getattr(e, "timestamp" if name == "event_time" else name) for e in events]
            if name == "properties":
                values = [None if v is None else encode(v).decode() for v in values]
            columns[name] = values
    return pa.Table.from_pydict(columns, schema=schema)


def clicks() -> list[ClickEvent]:
    out = []
    for i in range(60):
        s = STRINGS[i % len(STRINGS)]
        out.append(
            ClickEvent(
                x=[INT32_MIN, INT32_MAX, 0, -1][i % 4],
                y=[INT32_MAX, INT32_MIN, 7][i % 3],
                button=i % 5,
                event_id=f"id-{i}-{STRINGS[i % 4]}",
                timestamp=TIMES[i % len(TIMES)],
                user_id=None if i % 2 else s,
                session_id=s if i % 3 else None,
                page_url=None if i % 5 else f"https://example.test/{s}",
                target=s if i % 7 else None,
                properties=PROPERTIES[i % len(PROPERTIES)],
                source=None if i % 4 else f"team-{s}",
            )
        )
    return out


def keydowns() -> list[KeydownEvent]:
    return [
        KeydownEvent(
            key=STRINGS[i % len(STRINGS)] or "a",
            code=None if i % 3 else "KeyA",
            alt=bool(i & 1),
            ctrl=bool(i & 2),
            meta=bool(i & 4),
            shift=bool(i & 8),
            repeat=bool(i & 16),
            event_id=f"k{i}",
            timestamp=TIMES[i % len(TIMES)],
            properties=PROPERTIES[i % len(PROPERTIES)],
        )
        for i in range(40)
    ]


def rejected() -> list[Rejected]:
    return [
        Rejected(
            reason=f"x: is {s}",
            field=None if i % 2 else s,
            raw=encode({"type": s, "x": [s, None]}).decode(),
            event_id=None if i % 3 else s,
            event_type=s,
            user_id=None,
            page_url=s or None,
            source=s or None,
        )
        for i, s in enumerate(STRINGS * 3)
    ]


def as_entries(events: list) -> list[bytes]:
    """One event per entry, then several per entry (NDJSON), as the writer may store them."""
    payloads = [encode(e) for e in events]
    half = len(payloads) // 2
    return payloads[:half] + [b"\n".join(payloads[i : i + 3]) for i in range(half, len(payloads), 3)]


@pytest.mark.parametrize("model, make", [(ClickEvent, clicks), (KeydownEvent, keydowns), (Rejected, rejected)])
def test_tables_from_json_equal_tables_from_objects(model, make):
    events = make()
    received = [1_795_000_000_000_000 + i for i in range(len(events))]
    entries = as_entries(events)
    ids = [f"1-{i}" for i in range(len(events))]
    assert Window(model, "s", "c", ids, entries, received).events == events  # valid events, read back whole
    built = model.to_arrow(entries, received)
    expected = reference(model, events, received)
    assert built.schema.equals(expected.schema, check_metadata=True)
    assert built.schema.names[-1] == "source"
    for name in expected.schema.names:  # column by column: a failure names the column
        assert built.column(name).equals(expected.column(name)), name
    assert built.equals(expected)


def test_properties_absent_from_every_event_give_a_null_column():
    events = [ClickEvent(x=1, y=2, event_id=f"e{i}", timestamp=T) for i in range(5)]
    built = ClickEvent.to_arrow(as_entries(events), [0] * 5)
    assert built.column("properties").null_count == 5
    assert built.equals(reference(ClickEvent, events, [0] * 5))


def test_an_event_longer_than_the_readers_block():
    events = [
        ClickEvent(x=1, y=2, timestamp=T, properties={"long": "é" * (1 << 20)}, target="t" * (1 << 20)),
        ClickEvent(x=3, y=4, timestamp=T),
    ]
    assert ClickEvent.to_arrow([b"\n".join(encode(e) for e in events)], [0, 1]).equals(
        reference(ClickEvent, events, [0, 1])
    )


def test_a_field_absent_from_an_older_payload_gets_its_default():
    """Entries written before the model had `button` (and `source`) still decode to button 0."""
    old = b'{"type":"click","x":1,"y":2,"event_id":"old","timestamp":"2026-11-27T17:54:19Z","properties":null}'
    events = msgspec.json.decode(b"[" + old + b"]", type=list[ClickEvent])
    built = ClickEvent.to_arrow([old, encode(ClickEvent(x=3, y=4, button=2, timestamp=T))], [5, 6])
    assert built.column("button").to_pylist() == [0, 2]
    assert built.slice(0, 1).equals(reference(ClickEvent, events, [5]))


class Wide(msgspec.Struct, kw_only=True, tag_field="type", tag="wide"):
    """Column kinds the shipped models do not use: int64, float, a nullable field whose default
    is not null (absent and null differ, so it goes through msgspec)."""

    big: int
    ratio: float
    flag: bool = True
    label: str | None = "default"
    when: datetime | None = None

    @classmethod
    def stored_type(cls) -> type:  # what the columns module asks of a model (TableModel)
        return cls


WIDE = pa.schema(
    [
        pa.field("received_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("big", pa.int64(), nullable=False),
        pa.field("ratio", pa.float64(), nullable=False),
        pa.field("flag", pa.bool_(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("when", pa.timestamp("us", tz="UTC")),
    ]
)


def test_other_column_kinds_and_an_ambiguous_default():
    payloads = [
        b'{"type":"wide","big":9223372036854775807,"ratio":0.1,"when":"2026-11-27T17:54:19.5Z"}',
        b'{"type":"wide","big":-9223372036854775808,"ratio":-1.5e-300,"flag":false,"label":null,"when":null}',
        b'{"type":"wide","big":0,"ratio":2.0,"label":"x"}',
    ]
    built = payloads_to_arrow(Wide, WIDE, payloads, [1, 2, 3])
    assert built.to_pydict() == {
        "received_at": [datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=i) for i in (1, 2, 3)],
        "big": [2**63 - 1, -(2**63), 0],
        "ratio": [0.1, -1.5e-300, 2.0],
        "flag": [True, False, True],
        "label": ["default", None, "x"],
        "when": [datetime(2026, 11, 27, 17, 54, 19, 500000, tzinfo=UTC), None, None],
    }


def test_entries_whose_counts_disagree_with_their_events_are_an_error():
    payload = b"\n".join(encode(ClickEvent(x=i, y=i, timestamp=T)) for i in range(2))
    with pytest.raises(ValueError, match="1 stream entries hold 2 events, but their counts \\(n\\) say 3"):
        ClickEvent.to_arrow([payload], [0, 0, 0])
    window = Window(ClickEvent, "s", "c", ["1-0"] * 3, [payload], [0, 0, 0])
    with pytest.raises(ValueError, match="hold 2 events, but their counts \\(n\\) say 3"):
        window.events  # noqa: B018


def test_a_window_decodes_its_events_only_when_asked_and_slices_its_rows():
    events = clicks()[:7]
    ids = [f"1-{i}" for i in range(7)]
    window = Window(ClickEvent, "s", "c", ids, [encode(e) for e in events], list(range(7)))
    assert len(window) == 7 and "events" not in vars(window)  # a raw sink never pays for objects
    assert window.to_arrow(5).equals(reference(ClickEvent, events[5:], [5, 6]))
    assert list(window) == events and window[3] == events[3]
