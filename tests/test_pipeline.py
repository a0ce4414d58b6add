"""POST -> Redis -> worker (a real subprocess) -> Iceberg (a real catalog on disk)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import signal
import time
from datetime import UTC, datetime

import msgspec
import pyarrow as pa

from models.click import ClickEvent
from streamapp import names
from streamapp.engine.app import Agent
from streamapp.engine.stream import Stream
from streamapp.engine.worker import trim_streams
from streamapp.lake.catalog import open_catalog
from streamapp.redis_client import reader_client
from tests.conftest import running_web, stream_events, table_rows, wait_until
from tests.helpers import assert_exactly_once, clicks, send, wait_rows


async def test_events_reach_iceberg_with_every_column(web, http, settings, spawn):
    worker = spawn("worker", settings)
    click = {
        "type": "click",
        "event_id": "c-1",
        "x": 5,
        "y": 6,
        "button": 2,
        "timestamp": "2026-11-27T10:00:00Z",
        "user_id": "u",
        "session_id": "s",
        "page_url": "https://example.test/p",
        "target": "button#buy",
        "properties": {"plan": "pro", "n": [1, 2]},
    }
    key = {"type": "keydown", "event_id": "k-1", "key": "Enter", "code": "Enter", "ctrl": True}
    bad = {"type": "click", "event_id": "bad-1", "x": 1}
    started = time.monotonic()
    async with http.post(
        web + "/api/events", data=json.dumps([click, key, bad]), headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 202
    [c] = await wait_rows(settings, "events.clicks", 1)
    [k] = await wait_rows(settings, "events.keydowns", 1)
    [rej] = await wait_rows(settings, "events.rejected", 1)
    assert time.monotonic() - started < settings.window_seconds + 2 + 3  # + worker start-up
    assert c["event_id"] == "c-1" and (c["x"], c["y"], c["button"]) == (5, 6, 2)
    assert c["event_time"] == datetime(2026, 11, 27, 10, tzinfo=UTC)
    assert abs((c["received_at"] - datetime.now(UTC)).total_seconds()) < 30
    assert (c["user_id"], c["session_id"], c["page_url"], c["target"]) == (
        "u",
        "s",
        "https://example.test/p",
        "button#buy",
    )
    assert json.loads(c["properties"]) == {"plan": "pro", "n": [1, 2]}
    assert (k["key"], k["code"], k["ctrl"], k["alt"], k["shift"], k["meta"], k["repeat"]) == (
        "Enter",
        "Enter",
        True,
        False,
        False,
        False,
        False,
    )
    assert k["event_time"] == k["received_at"]  # no timestamp sent: the receive time
    assert rej["event_id"] == "bad-1" and rej["field"] == "y" and json.loads(rej["raw"]) == bad
    assert "Traceback" not in worker.output()


async def test_one_event_id_from_two_sources_and_a_retried_rejected_event_reach_iceberg_once_each(
    settings, redis_server, http, spawn
):
    """With write keys each source's events are deduplicated on their own: the same event_id from
    two sources is two rows, each with its own event_id and source; a request retried whole (its
    reply lost) adds nothing, its rejected event included."""
    keyed = dataclasses.replace(settings, write_keys={"k-web": "website", "k-ios": "ios"})
    spawn("worker", settings)
    events = [{"type": "click", "x": 1, "y": 2, "event_id": "c-1"}, {"type": "click", "x": 1, "event_id": "bad-1"}]
    async with running_web(keyed) as base:
        for key in ("k-web", "k-web", "k-ios", "k-ios"):
            async with http.post(base + "/api/events", data=json.dumps(events), headers={"X-Write-Key": key}) as r:
                assert r.status == 202
    await wait_rows(settings, "events.clicks", 2)
    await wait_rows(settings, "events.rejected", 2)
    await asyncio.sleep(settings.window_seconds * 3)  # anything written twice would be committed by now
    clicks = table_rows(settings, "events.clicks")
    assert sorted((r["event_id"], r["source"]) for r in clicks) == [("c-1", "ios"), ("c-1", "website")]
    rejected = table_rows(settings, "events.rejected")
    assert sorted((r["event_id"], r["source"], r["field"]) for r in rejected) == [
        ("bad-1", "ios", "y"),
        ("bad-1", "website", "y"),
    ]


async def test_tables_are_partitioned_by_day(web, http, settings, spawn):
    spawn("worker", settings)
    events = [{"type": "click", "x": 1, "y": 1, "timestamp": f"2026-11-{d:02d}T12:00:00Z"} for d in (1, 2, 2, 3)]
    async with http.post(web + "/api/events", data=json.dumps(events)) as r:
        assert r.status == 202
    await wait_rows(settings, "events.clicks", 4)
    table = open_catalog(settings).load_table("events.clicks")
    assert str(table.spec().fields[0].transform) == "day"
    files = table.inspect.files().to_pylist()
    assert len(files) == 3  # one data file per day touched
    assert table.properties["commit.retry.num-retries"] == "0"


async def test_windows_close_by_count_and_by_time(settings, redis_server):
    r = redis_server.client()
    for i in range(7):
        ev = ClickEvent(x=i, y=i, event_id=f"w{i}", timestamp=datetime.now(UTC))
        r.xadd(names.stream("click"), {"e": msgspec.json.encode(ev), "r": "0"})
    stream, stopping = Stream(ClickEvent), asyncio.Event()
    client = reader_client(settings)
    stream.bind(client, "t", stopping, settings=settings)
    await stream.register()
    windows, closed_at = [], []
    start = time.monotonic()
    async for window in stream.take(3, within=0.5):
        windows.append([e.event_id for e in window])
        closed_at.append(time.monotonic() - start)
        if len(windows) == 3:
            break
    await client.aclose()
    assert windows == [["w0", "w1", "w2"], ["w3", "w4", "w5"], ["w6"]]
    assert closed_at[1] < 0.3  # full windows close at once
    assert 0.45 < closed_at[2] < 1.5  # the partial one `within` seconds after its first event


async def test_windows_close_by_bytes_too(settings, redis_server):
    """50,000 events of 32 KiB would be 1.6 GB in one window: a window also closes once its
    payloads hold STREAMAPP_WINDOW_BYTES (an entry is never split: the one that crosses it is in)."""
    r = redis_server.client()
    pad = "x" * 1000
    for i in range(10):
        ev = ClickEvent(x=i, y=i, event_id=f"big{i}", properties={"pad": pad}, timestamp=datetime.now(UTC))
        r.xadd(names.stream("click"), {"e": msgspec.json.encode(ev), "r": "0"})
    size = len(r.xrange(names.stream("click"))[0][1][b"e"])
    stream, stopping = Stream(ClickEvent), asyncio.Event()
    client = reader_client(settings)
    stream.bind(client, "t", stopping, settings=dataclasses.replace(settings, window_bytes=3 * size))
    await stream.register()
    windows = []
    async for window in stream.take(1000, within=0.3):
        windows.append(len(window))
        if sum(windows) == 10:
            break
    await client.aclose()
    assert windows == [3, 3, 3, 1]


async def test_entries_holding_several_events_are_read_whole(settings, redis_server):
    """An entry may hold one request's events as NDJSON with their count `n`: a window counts
    events, never splits an entry (its id is one position), and takes the rest next time."""
    r = redis_server.client()
    now = datetime.now(UTC)

    def entry(*ids: str) -> None:
        body = b"\n".join(msgspec.json.encode(ClickEvent(x=1, y=1, event_id=i, timestamp=now)) for i in ids)
        fields = {"e": body, "r": "7"} if len(ids) == 1 else {"e": body, "r": "7", "n": str(len(ids))}
        r.xadd(names.stream("click"), fields)

    entry("a0", "a1", "a2")
    entry("b0")
    entry("c0", "c1")
    entry("d0", "d1", "d2", "d3")
    stream, stopping = Stream(ClickEvent), asyncio.Event()
    client = reader_client(settings)
    stream.bind(client, "t", stopping, settings=settings)
    await stream.register()
    windows = []
    async for window in stream.take(3, within=0.3):
        windows.append(([e.event_id for e in window], len(set(window.ids)), window.received_us))
        if sum(len(w[0]) for w in windows) == 10:
            break
    await client.aclose()
    assert [w[0] for w in windows] == [["a0", "a1", "a2"], ["b0", "c0", "c1"], ["d0", "d1", "d2", "d3"]]
    assert [w[1] for w in windows] == [1, 2, 1]  # events of one entry share its id
    assert all(set(w[2]) == {7} for w in windows)


async def test_a_failing_agent_gets_the_same_window_again(settings, redis_server):
    """faust-streaming acks a window whose agent raised, losing it; here it is delivered again."""
    r = redis_server.client()
    for i in range(4):
        ev = ClickEvent(x=i, y=i, event_id=f"f{i}", timestamp=datetime.now(UTC))
        r.xadd(names.stream("click"), {"e": msgspec.json.encode(ev), "r": "0"})
    seen: list[list[str]] = []
    stopping = asyncio.Event()

    async def flaky(stream):
        async for window in stream.take(2, within=0.2):
            seen.append([e.event_id for e in window])
            if len(seen) == 1:
                raise RuntimeError("sink down")
            if len(seen) == 3:
                stopping.set()

    stream = Stream(ClickEvent)
    client = reader_client(settings)
    stream.bind(client, "flaky", stopping, settings=settings)
    await asyncio.wait_for(Agent("flaky", flaky, stream).run(stopping), 20)
    await client.aclose()
    assert seen == [["f0", "f1"], ["f0", "f1"], ["f2", "f3"]]


async def test_sigterm_commits_the_open_window_before_exit(web, http, settings, spawn):
    slow = dataclasses.replace(settings, window_seconds=300)
    worker = spawn("worker", slow)
    await asyncio.to_thread(wait_until, lambda: "agents" in worker.output(), 20, 0.1, "worker start")
    await send(http, web, clicks("t", 25))
    await asyncio.sleep(1.5)  # read into the open window, which would close only in 300 s
    assert table_rows(settings, "events.clicks") == []
    worker.signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 30) == 0
    assert_exactly_once(table_rows(settings, "events.clicks"), {f"t{i}" for i in range(25)})


async def test_worker_rides_out_a_redis_restart(web, http, settings, spawn, redis_server):
    worker = spawn("worker", settings)
    await send(http, web, clicks("a", 10))
    await wait_rows(settings, "events.clicks", 10)
    await asyncio.to_thread(redis_server.stop)
    await asyncio.sleep(2.5)
    await asyncio.to_thread(redis_server.start)
    await send(http, web, clicks("b", 10))
    rows = await wait_rows(settings, "events.clicks", 20)
    assert_exactly_once(rows, {f"a{i}" for i in range(10)} | {f"b{i}" for i in range(10)})
    assert worker.proc.poll() is None


async def test_a_restart_after_everything_was_committed_writes_nothing_again(web, http, settings, spawn):
    """The committed position equals the stream's last id: that is a drained stream, not a Redis
    that lost its data; its last entry must not be re-appended (and written twice)."""
    worker = spawn("worker", settings)
    await send(http, web, clicks("d", 10))
    await wait_rows(settings, "events.clicks", 10)
    worker.stop()
    worker = spawn("worker", settings)
    await asyncio.to_thread(wait_until, lambda: "agents" in worker.output(), 20, 0.1, "worker start")
    await asyncio.sleep(1.5)
    assert_exactly_once(table_rows(settings, "events.clicks"), {f"d{i}" for i in range(10)})
    assert "came back without the entries" not in worker.output()


async def test_streams_are_trimmed_only_past_what_every_consumer_committed(web, http, settings, spawn, redis_server):
    r = redis_server.client()
    r.hset(names.ACKS, names.ack_field(names.stream("click"), "laggard"), "0-0")  # a consumer that never commits
    quick = dataclasses.replace(settings, grace_seconds=0.5)
    spawn("worker", quick)
    # Clicks from a minute long past, so that clicks_per_minute, the stream's other consumer,
    # closes their window within a second or two and holds nothing back either.
    events = [{**c, "timestamp": "2026-11-27T10:00:59Z"} for c in clicks("x", 30)]
    await send(http, web, events, chunk=10)  # three entries
    await wait_rows(settings, "events.clicks", 30)
    await wait_rows(settings, "events.clicks_per_minute", 1)
    await asyncio.sleep(0.5)
    client = reader_client(settings)
    await trim_streams(client)
    assert len(stream_events(redis_server, "click")) == 30  # the laggard still needs them all
    r.hdel(names.ACKS, names.ack_field(names.stream("click"), "laggard"))
    await trim_streams(client)
    await client.aclose()
    # Everything below the committed position is gone: the last entry, 10 events, is at it.
    assert len(stream_events(redis_server, "click")) == 10


async def test_workers_can_split_the_agents_between_them(web, http, settings, spawn, redis_server):
    """`worker --agent NAME` runs only the agents named; one that no worker runs yet keeps its
    place in the trim, so it loses nothing, and gets its events once a worker runs it."""
    wrong = spawn("worker --agent clicks --agent nope", settings)
    assert wrong.wait() != 0
    assert "no agent named nope; the agents are clicks, clicks_per_minute, keydowns, rejected" in wrong.output()
    spawn("worker --agent clicks --agent rejected", settings)
    keydowns = [{"type": "keydown", "key": "a", "event_id": f"k{i}"} for i in range(5)]
    await send(http, web, clicks("s", 10), chunk=1)  # ten entries, whatever an entry holds
    await send(http, web, keydowns)
    await wait_rows(settings, "events.clicks", 10)
    r = redis_server.client()
    assert r.hget(names.ACKS, names.ack_field(names.stream("keydown"), "keydowns")) == b"0-0"
    assert r.hget(names.ACKS, names.ack_field(names.stream("click"), "clicks_per_minute")) == b"0-0"
    client = reader_client(settings)
    await trim_streams(client)
    await client.aclose()
    assert r.xlen(names.stream("click")) == 10  # clicks_per_minute has read none of them yet
    assert table_rows(settings, "events.keydowns") == []
    spawn("worker --agent keydowns", settings)
    assert_exactly_once(await wait_rows(settings, "events.keydowns", 5), {f"k{i}" for i in range(5)})
    assert_exactly_once(table_rows(settings, "events.clicks"), {f"s{i}" for i in range(10)})


def test_create_tables_is_idempotent(settings, spawn):
    for _ in range(2):
        proc = spawn("create-tables", settings)
        assert proc.wait(60) == 0
        assert "table events.clicks ready" in proc.output()
    assert {t for _, t in open_catalog(settings).list_tables("events")} == {"clicks", "keydowns", "rejected"}


def test_workers_starting_together_create_the_tables_once(settings):
    """Found by the two-worker test: the SQL catalog reports a lost namespace race as a unique
    constraint error. Eight starts at the same instant must all succeed."""
    import threading

    from streamapp.engine.app import App
    from streamapp.engine.worker import create_tables
    from streamapp.lake.catalog import open_catalog

    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def start() -> None:
        app = App()
        app.configure(settings)
        barrier.wait()
        try:
            create_tables(app, open_catalog(settings))
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(t for _, t in open_catalog(settings).list_tables("events")) == ["clicks", "keydowns", "rejected"]


async def _refused_until_checked(http, web: str, events: list[dict]) -> None:
    """POST `events` until they are taken; the first answers must be the 503 of an unchecked Redis."""
    async with http.post(web + "/api/events", json=events) as r:
        assert r.status == 503 and "checked" in (await r.json())["error"]
    for _ in range(200):
        async with http.post(web + "/api/events", json=events) as r:
            if r.status == 202:
                return
            assert r.status == 503
        await asyncio.sleep(0.1)
    raise AssertionError("the web never took events after the Redis restart")


async def test_a_replaced_redis_with_a_clock_behind_loses_nothing(web, http, settings, spawn, redis_server):
    """The lake holds positions ahead of the clock of the Redis that answers now (the old server's
    clock was ahead, or this one's is behind), and this Redis has none of their entries: a new event
    would get an id a sink takes as committed, and be skipped. The web takes no event on a Redis a
    worker has not checked against the lake since it started, and the check moves the stream's last
    id past every committed position."""
    r = redis_server.client()
    ahead = int(time.time() * 1000) + 3_600_000
    for i in range(3):  # what a server whose clock is an hour ahead wrote
        ev = ClickEvent(x=i, y=i, event_id=f"ahead{i}", timestamp=datetime.now(UTC))
        r.xadd(names.stream("click"), {"e": msgspec.json.encode(ev), "r": "0"}, id=f"{ahead}-{i}")
    worker = spawn("worker", settings)
    await wait_rows(settings, "events.clicks", 3)
    worker.stop()

    def wipe() -> None:  # a new, empty server in its place
        redis_server.stop()
        shutil.rmtree(redis_server.data_dir)
        redis_server.start(check=False)

    await asyncio.to_thread(wipe)
    worker = spawn("worker", settings)
    await _refused_until_checked(http, web, clicks("new", 5))
    rows = await wait_rows(settings, "events.clicks", 8)
    assert_exactly_once(rows, {f"ahead{i}" for i in range(3)} | {f"new{i}" for i in range(5)})
    assert "came back without the entries" in worker.output()
    assert redis_server.client().xinfo_stream(names.stream("click"))["last-generated-id"] > f"{ahead}-2".encode()

    # The same while the worker runs, paused while Redis is replaced: whatever it had read ahead
    # of its commits, it starts over from its position, and the web waits for its check.
    worker.signal(signal.SIGSTOP)
    await asyncio.to_thread(wipe)
    async with http.post(web + "/api/events", json=clicks("later", 2)) as resp:
        assert resp.status == 503
    worker.signal(signal.SIGCONT)
    await _refused_until_checked(http, web, clicks("later", 2))
    rows = await wait_rows(settings, "events.clicks", 10)
    expected = {f"ahead{i}" for i in range(3)} | {f"new{i}" for i in range(5)} | {f"later{i}" for i in range(2)}
    assert_exactly_once(rows, expected)


async def test_source_column_is_added_to_a_v1_table_by_schema_evolution(settings, redis_server, http, spawn):
    """A table created before write keys existed gains `source` at the end; old rows read null."""
    from pyiceberg.schema import Schema

    from streamapp.lake.catalog import TABLE_PROPERTIES, day_partition
    from tests.conftest import running_web

    catalog = open_catalog(settings)
    catalog.create_namespace("events")
    full = ClickEvent.iceberg_schema()
    v1 = Schema(*[f for f in full.fields if f.name != "source"])
    old = catalog.create_table(
        "events.clicks", schema=v1, partition_spec=day_partition(v1, "event_time"), properties=TABLE_PROPERTIES
    )
    row = {f.name: None for f in v1.fields} | {
        "event_id": "v1-row",
        "x": 1,
        "y": 2,
        "button": 0,
        "event_time": datetime(2026, 1, 1, tzinfo=UTC),
        "received_at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    old.append(pa.Table.from_pylist([row], schema=v1.as_arrow()))

    keyed = dataclasses.replace(settings, write_keys={"k1": "website"})
    spawn("worker", keyed)
    async with running_web(keyed) as base:
        async with http.post(
            base + "/api/events",
            data=json.dumps({"type": "click", "x": 3, "y": 4, "event_id": "new"}),
            headers={"X-Write-Key": "k1"},
        ) as r:
            assert r.status == 202
        rows = await wait_rows(settings, "events.clicks", 2)
    assert {r["event_id"]: r["source"] for r in rows} == {"v1-row": None, "new": "website"}
    table = open_catalog(settings).load_table("events.clicks")
    assert table.schema().column_names[-1] == "source"
    assert table.schema().column_names == full.column_names  # same order as a table created today
