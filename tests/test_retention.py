"""Retention (STREAMAPP_RETENTION): whole day partitions older than a table's rule are dropped,
metadata only, while a worker commits to the same table; exactly once holds for the days kept, and
the stream positions survive. Real valkey, real worker, real SQLite catalog on disk."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from streamapp import names
from streamapp.lake.catalog import open_catalog
from streamapp.lake.retention import apply_retention, cutoff_for, days_for
from streamapp.settings import Settings, SettingsError, parse_retention
from tests.conftest import table_rows, wait_until
from tests.helpers import assert_exactly_once, wait_committed_to_end
from tests.test_dead_letter import STREAM, add, click

KEEP = 5
DAYS = 10


def test_retention_setting_parses_with_one_line_errors():
    rules = parse_retention("events.*=400d, events.rejected=30d,events.erasures=forever")
    assert rules == (("events.*", 400), ("events.rejected", 30), ("events.erasures", None))
    assert days_for("events.rejected", rules) == 30  # the exact rule wins
    assert days_for("events.clicks", rules) == 400
    assert days_for("events.erasures", rules) is None  # forever
    assert days_for("other.table", rules) is None  # no rule: forever
    assert Settings.from_env({}, dotenv=None).retention == ()
    for raw, message in (
        ("events.*=400", "item 1 ('events.*=400'): keep whole days, e.g. 30d (>= 1), or forever"),
        ("events.*=0d", "item 1 ('events.*=0d'): keep whole days"),
        ("events.*=12h", "keep whole days"),
        ("events.*", "item 1 ('events.*') is not TABLE=DAYSd"),
        ("a=1d,a=2d", "item 2 repeats 'a'"),
    ):
        with pytest.raises(SettingsError) as e:
            Settings.from_env({"STREAMAPP_RETENTION": raw}, dotenv=None)
        text = str(e.value)
        assert text.startswith("STREAMAPP_RETENTION: ") and message in text and "\n" not in text, text


async def test_retention_drops_old_days_while_a_worker_commits_exactly_once(settings, redis_server, spawn):
    r = redis_server.client()
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    rules = (("events.clicks", KEEP),)
    # The worker applies the rule at its start too (its upkeep): nothing to drop yet then.
    worker = spawn(
        "worker",
        dataclasses.replace(settings, window_count=20, window_seconds=0.2),
        STREAMAPP_RETENTION="events.clicks=5d",
    )
    catalog = open_catalog(settings)
    wait_until(lambda: "retention" in worker.output() or "agents" in worker.output(), 20, what="the worker's tables")
    sent: dict[str, int] = {}  # event id -> its age in days
    runs, dropped = 0, 0
    done = threading.Event()

    def retention_loop() -> None:
        nonlocal runs, dropped
        while not done.is_set():
            for drop in apply_retention(open_catalog(settings), rules, keep_snapshots=10):
                dropped += drop.rows
            runs += 1

    loop = threading.Thread(target=retention_loop)
    loop.start()
    try:
        for batch in range(30):
            events = []
            for i in range(20):
                age = (batch + i) % DAYS
                event_id = f"b{batch}-{i}"
                sent[event_id] = age
                events.append(click(event_id, timestamp=(today - timedelta(days=age)).isoformat()))
            add(r, *events)
            await asyncio.sleep(0.1)
        last = await wait_committed_to_end(catalog, r, STREAM, "clicks", "events.clicks")
        position = names.position_property(STREAM, "clicks")
    finally:
        done.set()
        loop.join()
    assert runs >= 3 and dropped > 0, (runs, dropped)  # it ran while the worker committed, and dropped rows
    [drop] = apply_retention(catalog, rules, keep_snapshots=10)  # what the worker committed since the last run
    table = catalog.load_table("events.clicks")
    rows = table_rows(settings, "events.clicks")
    cutoff = cutoff_for(KEEP, datetime.now(UTC))
    assert all(row["event_time"] >= cutoff for row in rows)
    assert_exactly_once(rows, {e for e, age in sent.items() if age <= KEEP})  # no row of a kept day lost
    assert table.properties[position] == last  # the position survived every delete
    assert "Traceback" not in worker.output()
    # Metadata only: an old day's file goes whole, and no file is written.
    old = table.scan().to_arrow().slice(0, 1)
    old = old.set_column(
        old.schema.get_field_index("event_time"),
        old.schema.field("event_time"),
        pa.array([today - timedelta(days=DAYS)], old.schema.field("event_time").type),
    )
    table.append(old)
    [drop] = apply_retention(catalog, rules, keep_snapshots=10)
    assert (drop.rows, drop.files, drop.partitions) == (1, 1, 1)
    table.refresh()
    summary = table.current_snapshot().summary
    assert summary.operation.value == "delete" and summary["deleted-data-files"] == "1", summary
    assert "added-data-files" not in summary.additional_properties
    assert table.properties[position] == last


async def test_the_worker_upkeep_applies_retention_at_start_in_a_thread(settings):
    """keep_retention, as the worker runs it: a pass at once (catalog I/O in a thread: the loop
    stays free), then it waits for the next hour or the stop."""
    from models.click import ClickEvent
    from streamapp.lake.catalog import ensure_table
    from streamapp.lake.retention import keep_retention

    catalog = open_catalog(settings)
    table = ensure_table(catalog, ClickEvent)
    now = datetime.now(UTC)
    events = [click(f"k{d}", timestamp=(now - timedelta(days=d)).isoformat()) for d in (0, 3, 30, 31)]
    table.append(ClickEvent.to_arrow([b"\n".join(events)], [int(now.timestamp() * 1e6)] * 4))
    stopping = asyncio.Event()
    task = asyncio.create_task(keep_retention(catalog, (("events.*", 7),), 10, stopping))
    ticks = 0
    while len(table_rows(settings, "events.clicks")) > 2:
        await asyncio.sleep(0.01)  # the loop runs meanwhile: the pass is in a thread
        ticks += 1
        assert ticks < 2000, "retention did not run"
    assert ticks > 1
    assert sorted(row["event_id"] for row in table_rows(settings, "events.clicks")) == ["k0", "k3"]
    assert not task.done()  # waiting for the next pass
    stopping.set()
    await asyncio.wait_for(task, 5)
