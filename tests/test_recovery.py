"""A Redis that comes back with older data (a power cut under `appendfsync everysec`, a restore, a
failover to a lagging replica): nothing Iceberg holds is written again, nothing Redis still holds is
skipped, new events get ids past every committed position, and what Redis lost is counted. Real
valkey with its append-only file rolled back to an older copy, real workers, a real catalog."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from streamapp.engine.recovery import lost
from streamapp.entries import Mark
from tests.conftest import table_rows, wait_until
from tests.helpers import assert_exactly_once, send, wait_rows


def minute_ago(n: int) -> str:
    """The end of the minute `n` minutes before the current one: its aggregate window closes as
    soon as the grace period has passed, and a later batch's minute is not late."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    return (now - timedelta(minutes=n) + timedelta(seconds=59.9)).isoformat()


def batch(prefix: str, minutes_ago: int) -> list[dict]:
    when = minute_ago(minutes_ago)
    return [
        {"type": "click", "x": i, "y": i, "event_id": f"{prefix}{i}", "page_url": "/p", "timestamp": when}
        for i in range(10)
    ]


async def post_until_taken(http, web: str, events: list[dict], timeout: float = 20) -> None:
    """POST until 202: after a restart of Redis the web answers 503 until a worker checked it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        async with http.post(web + "/api/events", json=events) as r:
            if r.status == 202:
                return
            assert r.status == 503, await r.text()
        assert asyncio.get_running_loop().time() < deadline, "the web never took events after the restart"
        await asyncio.sleep(0.1)


async def committed_by_both(settings, n_raw: int, minutes: int) -> None:
    await wait_rows(settings, "events.clicks", n_raw)
    await wait_rows(settings, "events.clicks_per_minute", minutes)


@pytest.mark.parametrize(
    ("agents", "crash_at"),
    [
        ("clicks", None),  # one consumer on the stream
        ("all", None),  # two: the raw sink and clicks_per_minute
        ("all", "check_after_reading_the_lake"),  # a worker killed at each step of the repair
        ("all", "check_after_raising_a_stream"),
    ],
)
async def test_redis_rolled_back_to_an_older_copy_doubles_nothing(
    web, http, settings, spawn, redis_server, agents, crash_at
):
    settings = dataclasses.replace(settings, grace_seconds=0.5)
    extra = " --agent clicks" if agents == "clicks" else ""
    two = agents == "all"
    worker = spawn("worker" + extra, settings)
    await send(http, web, batch("a", 3))
    if two:
        await committed_by_both(settings, 10, 1)
    else:
        await wait_rows(settings, "events.clicks", 10)

    # An older copy of Redis's data: after the clicks of a.
    await asyncio.to_thread(redis_server.stop)
    backup = redis_server.data_dir.with_name("backup")
    shutil.copytree(redis_server.data_dir, backup)
    await asyncio.to_thread(redis_server.start, False)
    await post_until_taken(http, web, batch("b", 2))
    if two:
        await committed_by_both(settings, 20, 2)
    else:
        await wait_rows(settings, "events.clicks", 20)
    worker.stop()

    # Redis dies and comes back from the older copy: it no longer holds b's entries, which the
    # tables hold; it still holds a's, which they hold too.
    redis_server.proc.kill()
    redis_server.proc.wait()
    shutil.rmtree(redis_server.data_dir)
    shutil.copytree(backup, redis_server.data_dir)
    await asyncio.to_thread(redis_server.start, False)
    async with http.post(web + "/api/events", json=batch("c", 1)) as r:
        assert r.status == 503  # nothing is taken before a worker checked this Redis against the lake
    if crash_at:
        doomed = spawn("worker" + extra, settings, STREAMAPP_CRASH_AT=f"{crash_at}:1")
        await asyncio.to_thread(wait_until, lambda: doomed.proc.poll() is not None, 30, 0.1, "the crash")
        async with http.post(web + "/api/events", json=batch("c", 1)) as r:
            assert r.status == 503  # killed before it set the marker: still unchecked
    worker = spawn("worker" + extra, settings)
    await post_until_taken(http, web, batch("c", 1))
    if two:
        await committed_by_both(settings, 30, 3)
    else:
        await wait_rows(settings, "events.clicks", 30)
    await asyncio.sleep(1.5)  # time to write anything twice, if it would

    rows = table_rows(settings, "events.clicks")
    assert_exactly_once(rows, {f"{p}{i}" for p in "abc" for i in range(10)})
    if two:
        per_minute = table_rows(settings, "events.clicks_per_minute")
        assert sorted(r["clicks"] for r in per_minute) == [10, 10, 10]  # one row per minute, each click once
        assert len(Counter(r["window_start"] for r in per_minute)) == 3
        assert table_rows(settings, "events.late") == []  # nothing re-delivered as if new
    # What Redis lost is reported (by the killed worker, when it got that far: before it repaired).
    log = (doomed.output() if crash_at else "") + worker.output()
    assert re.search(r"came back without the entries.*Events gone from Redis: 10\b", log), log  # b's 10 clicks
    if not crash_at:
        async with http.get(f"http://127.0.0.1:{settings.worker_metrics_port}/metrics") as r:
            metrics = await r.text()
        assert re.search(r'streamapp_redis_lost_events_total\{consumer="",stream="[^"]+:click"\} 10\.0', metrics)


def test_lost_events_are_counted_per_consumer_from_the_marks():
    top, behind = Mark("100-0", 60, 6000), Mark("50-0", 30, 3000)
    # Redis came back holding entries up to the one with 40 events: 20 are gone; the consumer that
    # had committed up to 30 events misses 20 of them too (its 31st to 40th are still in Redis).
    assert lost({"raw": top, "agg": behind}, "80-0", Mark("80-0", 40, 4000)) == (20, {"agg": 20})
    # Redis came back with an empty stream: everything after each consumer's mark is gone.
    assert lost({"raw": top, "agg": behind}, None, None) == (60, {"agg": 30})
    # Nothing gone: Redis holds the last committed entry.
    assert lost({"raw": top}, "100-0", Mark("100-0", 60, 6000)) == (0, {})
    # An entry written before entries carried totals: nothing can be counted, nothing is guessed.
    assert lost({"raw": top}, "80-0", None) == (None, {})


async def test_check_redis_lets_the_web_take_events_without_a_worker(web, http, settings, spawn, redis_server):
    """`python -m streamapp check-redis`: the worker's check, for an operator with no worker running."""
    await asyncio.to_thread(redis_server.stop)
    await asyncio.to_thread(redis_server.start, False)
    async with http.post(web + "/api/events", json=batch("x", 1)) as r:
        assert r.status == 503
    async with http.get(web + "/readyz") as r:
        assert r.status == 503 and "checked" in (await r.json())["error"]
    command = spawn("check-redis", settings)
    await asyncio.to_thread(wait_until, lambda: command.proc.poll() is not None, 30, 0.1, "check-redis")
    assert command.proc.returncode == 0 and "it takes events" in command.output()
    async with http.get(web + "/readyz") as r:
        assert r.status == 200
    async with http.post(web + "/api/events", json=batch("x", 1)) as r:
        assert r.status == 202
