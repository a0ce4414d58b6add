"""Entries a worker cannot turn into rows: only the bad entry goes to `events.dead_letter` (stream,
entry id, agent, payload, error, time), the rest of its window lands, and its stream moves on.
Model changes follow the written rules: a field added or removed works with entries written before;
a new required field applies to new events. Real valkey, real worker, real catalog."""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import UTC, datetime, timedelta

import pyarrow as pa
from pyiceberg.schema import Schema

from models.click import ClickEvent
from streamapp import names
from streamapp.lake.catalog import TABLE_PROPERTIES, TableSpec, day_partition, ensure_table, open_catalog
from streamapp.model import table_schema
from tests.conftest import table_rows, wait_until
from tests.helpers import assert_exactly_once, wait_rows

STREAM = names.stream("click")


def click(event_id: str, **fields) -> bytes:
    """A click as the web stores it, at the end of a minute an hour ago: its aggregate window closes
    as soon as the grace period has passed."""
    minute = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1)
    when = (minute + timedelta(seconds=59.9)).isoformat()
    event = {
        "type": "click",
        "event_id": event_id,
        "x": 1,
        "y": 2,
        "button": 0,
        "timestamp": when,
        "page_url": "/p",
        **fields,
    }
    return json.dumps(event).encode()


def add(r, *payloads: bytes, **raw_fields) -> str:
    """One entry holding these events (or, with raw_fields, whatever fields it is given)."""
    fields = raw_fields or {"e": b"\n".join(payloads), "n": str(len(payloads)), "r": str(int(time.time() * 1e6))}
    return r.xadd(STREAM, fields).decode()


async def test_only_the_bad_entries_go_to_dead_letters_and_the_stream_moves_on(settings, redis_server, spawn):
    r = redis_server.client()
    add(r, click("ok-1"), click("ok-2"))
    corrupt = add(r, garbage=b"\xff\xfe not an entry")  # no events, no receive time
    refused = add(r, click("bad-x", x="abc"))  # a value neither pyarrow nor the model takes
    overflow = add(r, click("bad-big", x=2**40))  # out of the column's int range
    add(r, click("ok-3"))
    worker = spawn("worker", dataclasses.replace(settings, grace_seconds=0.5))
    rows = await wait_rows(settings, "events.clicks", 3)
    dead = await wait_rows(settings, names.DEAD_LETTER_TABLE, 6)  # 3 entries, each for the 2 consumers
    await wait_rows(settings, "events.clicks_per_minute", 1)
    assert_exactly_once(rows, {"ok-1", "ok-2", "ok-3"})
    by_agent: dict[str, list[dict]] = {}
    for d in dead:
        by_agent.setdefault(d["agent"], []).append(d)
    assert sorted(by_agent) == ["clicks", "clicks_per_minute"]
    for agent, letters in by_agent.items():
        assert [d["entry_id"] for d in letters] == sorted([corrupt, refused, overflow]), agent
        assert all(d["stream"] == STREAM and d["failed_at"] for d in letters)
    raw = {d["entry_id"]: d for d in by_agent["clicks"]}
    assert "unreadable entry" in raw[corrupt]["error"] and "garbage" in raw[corrupt]["payload"]
    assert '"bad-x"' in raw[refused]["payload"] and raw[refused]["received_at"] is not None
    per_minute = table_rows(settings, "events.clicks_per_minute")
    assert sum(row["clicks"] for row in per_minute) == 3  # the good ones, once
    # The stream moved on: what comes after lands, and everything before is trimmed.
    add(r, click("ok-4"))
    await wait_rows(settings, "events.clicks", 4)
    wait_until(lambda: r.xlen(STREAM) <= 2, 15, what="the stream trimmed past the dead entries")
    assert "cannot become rows" in worker.output()
    # Delivered again (a restart from an older hint), nothing is kept twice.
    worker.stop()
    r.hset(names.ACKS, names.ack_field(STREAM, "clicks"), "0-0")
    spawn("worker", dataclasses.replace(settings, grace_seconds=0.5))
    add(r, click("ok-5"))
    await wait_rows(settings, "events.clicks", 5)
    time_enough = time.monotonic() + 2
    wait_until(lambda: time.monotonic() > time_enough, 5)
    assert len(table_rows(settings, names.DEAD_LETTER_TABLE)) == 6


async def test_model_changes_follow_the_rules_with_entries_written_before(settings, redis_server, spawn):
    """The clicks table and its entries in Redis come from a model without `y` and with a field the
    model since dropped (`color`). The model now requires `y`: the table gains it, optional; the
    old events land with null, the new ones must have it; `color` is ignored. No dead letter."""
    catalog = open_catalog(settings)
    catalog.create_namespace("events")
    full = ClickEvent.iceberg_schema()
    v1 = Schema(*[f for f in full.fields if f.name != "y"])
    catalog.create_table(
        "events.clicks", schema=v1, partition_spec=day_partition(v1, "event_time"), properties=TABLE_PROPERTIES
    )
    r = redis_server.client()
    old = [json.loads(click(f"old-{i}", color="red")) for i in range(3)]
    for event in old:
        del event["y"]
    add(r, *(json.dumps(e).encode() for e in old))
    add(r, click("new-1"))
    spawn("worker", dataclasses.replace(settings, grace_seconds=0.5))
    rows = await wait_rows(settings, "events.clicks", 4)
    assert {row["event_id"]: row["y"] for row in rows} == {"old-0": None, "old-1": None, "old-2": None, "new-1": 2}
    table = catalog.load_table("events.clicks")
    assert not table.schema().find_field("y").required
    per_minute = await wait_rows(settings, "events.clicks_per_minute", 1)
    assert sum(row["clicks"] for row in per_minute) == 4  # old events decode too
    assert table_rows(settings, names.DEAD_LETTER_TABLE) == []


def test_a_column_the_model_lost_becomes_optional(settings):
    """Removing a required field: new events have none, so the column may not stay required; a
    field the model gained is added optional (the rows already there have none)."""
    catalog = open_catalog(settings)
    wide = TableSpec(
        "events.wider",
        table_schema([("t", "timestamptz", True), ("must", "string", True), ("gone", "string", True)]),
        "t",
    )
    table = ensure_table(catalog, wide)
    assert table.schema().find_field("gone").required
    narrow = TableSpec(
        "events.wider",
        table_schema([("t", "timestamptz", True), ("must", "string", True), ("added", "long", True)]),
        "t",
    )
    table = ensure_table(catalog, narrow)
    schema = table.schema()
    assert schema.find_field("must").required
    assert not schema.find_field("gone").required and not schema.find_field("added").required
    table.append(
        pa.table(
            {"t": [datetime.now(UTC)], "must": ["m"]},
            schema=pa.schema([("t", pa.timestamp("us", "UTC"), False), ("must", pa.string(), False)]),
        )
    )
    assert table.scan().to_arrow().select(["gone", "added"]).to_pylist() == [{"gone": None, "added": None}]
