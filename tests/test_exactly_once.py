"""A worker killed with SIGKILL at any instant, then restarted, loses nothing and writes nothing
twice: the stream position moves in the same Iceberg commit as the rows."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import signal

import pytest

from streamapp import names
from streamapp.lake.catalog import open_catalog
from streamapp.names import position_property
from tests.conftest import table_rows
from tests.helpers import assert_exactly_once, clicks, run_without_lease, send, wait_rows

N = 300


@pytest.mark.parametrize(
    "crash_at",
    [
        "before_commit",  # rows not written yet
        "during_write",  # Parquet files written, commit not made: orphans, not rows
        "after_commit",  # committed, Redis never told: the window is read again and skipped
        "before_commit:3",
        "during_write:2",
        "after_commit:4",
    ],
)
async def test_sigkill_at_each_point_of_a_window_then_restart(web, http, settings, spawn, crash_at):
    small = dataclasses.replace(settings, window_count=50)
    await send(http, web, clicks("e", N), chunk=50)  # a request is one entry, and a window never splits one
    doomed = spawn("worker", small, STREAMAPP_CRASH_AT=crash_at)
    assert await asyncio.to_thread(doomed.wait, 60) == -signal.SIGKILL, doomed.output()
    before = len(table_rows(settings, "events.clicks"))
    if crash_at.startswith("after_commit"):
        assert before == 50 * int(crash_at.partition(":")[2] or 1)
    spawn("worker", small)
    await wait_rows(settings, "events.clicks", N)
    await asyncio.sleep(1)  # a double write would land now
    assert_exactly_once(table_rows(settings, "events.clicks"), {f"e{i}" for i in range(N)})


async def test_random_sigkills_while_events_keep_arriving(web, http, settings, spawn):
    small = dataclasses.replace(settings, window_count=40, window_seconds=0.2)
    rng = random.Random(7)
    sent: set[str] = set()

    async def producer():
        for batch in range(40):
            events = clicks(f"r{batch}-", 25)
            await send(http, web, events)
            sent.update(e["event_id"] for e in events)
            await asyncio.sleep(0.05)

    feeding = asyncio.create_task(producer())
    kills = 0
    while not feeding.done() or kills < 4:
        worker = spawn("worker", small)
        await asyncio.sleep(rng.uniform(1.2, 3.0))  # start-up takes ~1 s: kill at varied points after it
        worker.signal(signal.SIGKILL)
        await asyncio.to_thread(worker.wait, 10)
        kills += 1
    await feeding
    spawn("worker", small)
    await wait_rows(settings, "events.clicks", len(sent), timeout=60)
    await asyncio.sleep(1)
    assert_exactly_once(table_rows(settings, "events.clicks"), sent)


async def test_two_runs_of_one_shard_racing_still_write_each_event_once(web, http, settings, redis_server, caplog):
    """Exactly-once does not rest on the lease: a worker paused or cut off past its lease keeps
    running its window while the new owner runs the same (agent, shard). Two such runs, each with
    its own reader and sink, race to commit each window; the loser refreshes, sees the new
    position and writes only what is not in the table yet."""
    from streamapp import app as default_app
    from streamapp.engine.worker import create_tables

    racing = dataclasses.replace(settings, window_count=30, window_seconds=0.1)
    await asyncio.to_thread(create_tables, default_app, open_catalog(racing))
    stopping = asyncio.Event()

    caplog.set_level("INFO", logger="streamapp")
    runs = [asyncio.create_task(run_without_lease(racing, "clicks", "events.clicks", stopping)) for _ in range(2)]
    sent = set()
    for batch in range(20):
        events = clicks(f"p{batch}-", 30)
        await send(http, web, events)
        sent.update(e["event_id"] for e in events)
        await asyncio.sleep(0.05)
    try:
        await wait_rows(settings, "events.clicks", len(sent), timeout=60)
        await asyncio.sleep(1.5)
    finally:
        stopping.set()
        await asyncio.gather(*runs)
    assert_exactly_once(table_rows(settings, "events.clicks"), sent)
    # The race was real: a run lost a commit race or found its window already committed.
    assert "conflicted" in caplog.text or "already in events.clicks; skipped" in caplog.text
    table = open_catalog(settings).load_table("events.clicks")
    position = table.properties[position_property(names.stream("click"), "clicks")]
    [(last_id, _)] = redis_server.client().xrevrange(names.stream("click"), count=1)
    assert position == last_id.decode()
