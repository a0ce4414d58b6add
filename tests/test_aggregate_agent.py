"""The shipped aggregate agent, `agents/clicks_per_minute.py`, in a real worker: rows equal a
batch recount of the raw table, exactly once across SIGKILLs, late events kept, completeness."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import signal
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from streamapp.entries import entry_id
from streamapp.lake.catalog import open_catalog
from tests.conftest import table_rows, wait_until
from tests.helpers import assert_exactly_once, send, wait_rows

AGG = "events.clicks_per_minute"
START = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
PAGES = ["https://shop.example/", "https://shop.example/cart", None]


def history(prefix: str, n: int, minutes: int, seed: int = 1) -> list[dict]:
    """Old clicks (a backfill) over `minutes` minutes, several pages and users, shuffled."""
    rng = random.Random(seed)
    events = [
        {
            "type": "click",
            "x": 1,
            "y": 1,
            "event_id": f"{prefix}{i}",
            "user_id": f"u{rng.randrange(7)}",
            "timestamp": (START + timedelta(seconds=rng.uniform(0, 60 * minutes))).isoformat(),
            **({"page_url": p} if (p := rng.choice(PAGES)) else {}),
        }
        for i in range(n)
    ]
    rng.shuffle(events)
    return events


def recount(raw: list[dict]) -> dict[tuple, tuple[int, int]]:
    """The batch recomputation: (window_start, page_url) -> (clicks, unique users)."""
    clicks: Counter = Counter()
    users: dict[tuple, set] = defaultdict(set)
    for r in raw:
        key = (r["event_time"].replace(second=0, microsecond=0), r["page_url"])
        clicks[key] += 1
        if r["user_id"] is not None:
            users[key].add(r["user_id"])
    return {k: (c, len(users[k])) for k, c in clicks.items()}


def aggregated(settings) -> dict[tuple, tuple[int, int]]:
    rows = table_rows(settings, AGG)
    keys = Counter((r["window_start"], r["page_url"]) for r in rows)
    assert not [k for k, c in keys.items() if c > 1], "a window was written twice"
    for r in rows:
        assert r["window_end"] - r["window_start"] == timedelta(minutes=1)
    return {(r["window_start"], r["page_url"]): (r["clicks"], r["unique_users"]) for r in rows}


async def wait_aggregated(settings, windows: int, timeout: float = 40) -> dict:
    def enough():
        return len(table_rows(settings, AGG)) >= windows and aggregated(settings)

    return await asyncio.to_thread(wait_until, enough, timeout, 0.3, f"{windows} windows in {AGG}")


@pytest.fixture
def fast(settings):
    return dataclasses.replace(settings, grace_seconds=1.0)


async def test_a_backfill_is_aggregated_like_a_batch_recount_and_closes_when_idle(web, http, fast, spawn):
    events = history("h", 400, minutes=3)
    worker = spawn("worker", fast)
    await send(http, web, events, chunk=400)
    raw = await wait_rows(fast, "events.clicks", 400)
    assert_exactly_once(raw, {e["event_id"] for e in events})
    expected = recount(raw)
    # the last minute closes only when the watermark moves on with the wall clock: no event follows
    got = await wait_aggregated(fast, len(expected))
    assert got == expected
    assert sum(c for c, _ in got.values()) == 400
    table = open_catalog(fast).load_table(AGG)
    assert str(table.spec().fields[0].transform) == "day"
    show = spawn(f"show {AGG} -n 2", fast)
    assert show.wait(30) == 0, show.output()
    assert f"{AGG}: {len(expected)} rows" in show.output()
    assert "'window_start': '2026-11-27T10:02:00+00:00'" in show.output()  # the latest window last
    assert table_rows(fast, "events.late") == []  # history arriving at once is not late
    assert "Traceback" not in worker.output()


@pytest.mark.parametrize(
    "crash_at",
    [
        "aggregate_before_commit",
        "aggregate_during_write",  # Parquet written, commit not made
        "aggregate_after_commit",  # committed, Redis ack not moved: the replay must not count twice
        "aggregate_after_commit:2",
    ],
)
async def test_sigkill_then_restart_writes_each_window_once_with_every_event(web, http, fast, spawn, crash_at):
    """Windows still open at the kill are rebuilt from the stream: the state survives."""
    small = dataclasses.replace(fast, window_count=60)  # several commits while windows are open
    events = history("k", 300, minutes=4, seed=len(crash_at))
    events.sort(key=lambda e: e["timestamp"])  # in order: each commit closes some, leaves others open
    await send(http, web, events, chunk=20)  # a request is one entry: 3 per window of 60
    doomed = spawn("worker", small, STREAMAPP_CRASH_AT=crash_at)
    assert await asyncio.to_thread(doomed.wait, 60) == -signal.SIGKILL, doomed.output()
    worker = spawn("worker", small)
    raw = await wait_rows(fast, "events.clicks", 300)
    assert_exactly_once(raw, {e["event_id"] for e in events})
    expected = recount(raw)
    assert await wait_aggregated(fast, len(expected)) == expected
    if crash_at.startswith("aggregate_after_commit"):  # windows were open: entries before the position are re-read
        [(position, after)] = re.findall(r'position ([^\s"]+), watermark .*re-reading after ([^\s"]+)', worker.output())
        assert entry_id(after) < entry_id(position)
    await asyncio.sleep(2)  # a double write would land now
    assert aggregated(fast) == expected
    assert "Traceback" not in worker.output()


async def test_late_events_go_to_events_late_and_completeness_is_recorded(web, http, fast, spawn):
    worker = spawn("worker", fast)
    events = history("o", 100, minutes=2)
    await send(http, web, events)
    raw = await wait_rows(fast, "events.clicks", 100)
    expected = recount(raw)
    await wait_aggregated(fast, len(expected))
    late = [
        {
            "type": "click",
            "x": 1,
            "y": 1,
            "event_id": "late-1",
            "user_id": "new",
            "page_url": "https://shop.example/",
            "timestamp": (START + timedelta(seconds=30)).isoformat(),
        }
    ]
    await send(http, web, late)
    [row] = await wait_rows(fast, "events.late", 1)
    assert (row["agent"], row["event_id"], row["window_start"], row["key"]) == (
        "clicks_per_minute",
        "late-1",
        START,
        "https://shop.example/",
    )
    assert aggregated(fast) == expected  # the closed window keeps its row (the default policy)
    assert {r["event_id"] for r in await wait_rows(fast, "events.clicks", 101)} >= {"late-1"}  # raw keeps it

    table = open_catalog(fast).load_table(AGG)
    assert table.properties["streamapp.complete_before"] == "2026-11-27T10:00:00+00:00"
    cli = spawn(f"complete {AGG} 2026-11-27", fast)
    assert cli.wait(30) == 1
    assert "2026-11-27 is not complete" in cli.output()
    cli = spawn(f"complete {AGG} 2026-11-27T09", fast)
    assert cli.wait(30) == 0, cli.output()
    assert "2026-11-27T09 is complete" in cli.output()
    cli = spawn(f"complete {AGG} 27/11/2026", fast)
    assert cli.wait(30) == 2 and "is neither a day" in cli.output()
    assert "Traceback" not in worker.output()


async def test_sigkill_between_the_late_commit_and_the_aggregate_commit(web, http, fast, spawn, redis_server):
    """The two tables are two commits: a kill between them replays the same entries against the
    same committed watermark, so the late events are late again and written once."""
    doomed = spawn("worker", fast, STREAMAPP_CRASH_AT="after_late_commit")
    await send(http, web, history("p", 60, minutes=2))
    raw = await wait_rows(fast, "events.clicks", 60)
    expected = recount(raw)
    await wait_aggregated(fast, len(expected))
    # on time for a new minute, late for the first two, in one request so one flush sees them all
    batch = [
        {
            "type": "click",
            "x": 1,
            "y": 1,
            "event_id": f"q{i}",
            "user_id": "z",
            "page_url": "https://shop.example/",
            "timestamp": (START + timedelta(seconds=20 + 40 * i)).isoformat(),
        }
        for i in range(3)
    ]
    await send(http, web, batch)
    assert await asyncio.to_thread(doomed.wait, 30) == -signal.SIGKILL, doomed.output()
    assert {r["event_id"] for r in table_rows(fast, "events.late")} == {"q0", "q1", "q2"}
    worker = spawn("worker", fast)
    raw = await wait_rows(fast, "events.clicks", 63)
    await asyncio.to_thread(wait_until, lambda: "committed" in worker.output(), 30, 0.3, "a commit after the restart")
    await asyncio.sleep(2)
    late = table_rows(fast, "events.late")
    assert sorted(r["event_id"] for r in late) == ["q0", "q1", "q2"]  # once each
    assert aggregated(fast) == expected  # and counted in no window
    assert "Traceback" not in worker.output()


async def test_two_runs_of_the_aggregate_write_each_window_once(web, http, fast, spawn, caplog):
    """A worker past its lease runs the aggregate next to the unit's new owner: both read the whole
    stream and race to commit the same windows. The commit is a compare-and-set on the agent's
    position, so the loser starts over from what the winner wrote."""
    from streamapp import app as default_app
    from streamapp.redis_client import reader_client

    racing = dataclasses.replace(fast, window_count=50)
    a = spawn("worker", racing)  # holds every lease: the raw sink and one run of the aggregate
    await asyncio.to_thread(wait_until, lambda: "clicks_per_minute: resuming" in a.output(), 20, 0.1, "start")
    # the other run, on the same shard, in this process: no lease, as after a pause
    caplog.set_level("INFO", logger="streamapp")
    agent = default_app.discover_agents()["clicks_per_minute"]
    stream, client, stopping = agent.stream.fresh(), reader_client(racing), asyncio.Event()
    stream.bind(client, agent.name, stopping, settings=racing, catalog=open_catalog(racing))
    run = asyncio.create_task(agent.run(stopping, stream))
    try:
        await asyncio.to_thread(wait_until, lambda: "clicks_per_minute: resuming" in caplog.text, 20, 0.1, "start")
        events = sorted(history("w", 400, minutes=5, seed=3), key=lambda e: e["timestamp"])
        for i in range(0, 400, 50):
            await send(http, web, events[i : i + 50])
            await asyncio.sleep(0.2)
        raw = await wait_rows(fast, "events.clicks", 400)
        expected = recount(raw)
        assert await wait_aggregated(fast, len(expected), timeout=60) == expected
        await asyncio.sleep(2)
        assert aggregated(fast) == expected
    finally:
        stopping.set()
        await run
        await client.aclose()
    logs = a.output() + caplog.text
    assert "Traceback" not in logs
    assert "another worker committed" in logs  # the race was real


async def test_an_idle_stream_closes_its_window_grace_seconds_after_its_end(web, http, settings, spawn):
    """One event, nothing after it: its window is written `grace` seconds (of the wall clock)
    after the window's end is reached, extrapolated from when the event was received, not never."""
    graced = dataclasses.replace(settings, grace_seconds=2.0)
    worker = spawn("worker", graced)
    await asyncio.to_thread(wait_until, lambda: "clicks_per_minute: resuming" in worker.output(), 20, 0.1, "start")
    end = datetime.now(UTC).replace(second=0, microsecond=0)  # a minute that has just ended
    event = {
        "type": "click",
        "x": 1,
        "y": 1,
        "event_id": "i1",
        "page_url": "https://shop.example/",
        "timestamp": (end - timedelta(seconds=2)).isoformat(),
    }  # 2 s before its window's end
    sent = time.monotonic()
    await send(http, web, [event])
    await asyncio.to_thread(wait_until, lambda: table_rows(graced, AGG), 20, 0.1, "the window's row")
    elapsed = time.monotonic() - sent
    # due when W = t - grace + idle reaches the end: 2 s to the end + 2 s of grace after receipt
    assert 3.5 <= elapsed <= 4 + 3.5, elapsed  # + the 1 s flush period, a commit, a loaded machine
    [row] = table_rows(graced, AGG)
    assert (row["window_end"], row["clicks"]) == (end, 1)
