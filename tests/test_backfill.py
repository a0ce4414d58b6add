"""Backfills: events spread over many days, against a real SQLite catalog (and, for the kills, a
real worker and valkey). A window's files are the ones pyiceberg would write; a window over more
partitions than STREAMAPP_MAX_FILES_PER_COMMIT is committed in commits of at most that many files,
its rows exactly once whatever stops it between them; compaction leaves at most two files per day
partition, a bounded number of files per run, oldest first; the reader reads a spread backlog on
past its count."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import signal
import time
import uuid
from datetime import UTC, datetime, timedelta
from unittest import mock

import msgspec
import pyarrow.compute as pc
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pyiceberg.io.pyarrow import _dataframe_to_data_files

from models.click import ClickEvent
from streamapp import names
from streamapp.engine.stream import Stream
from streamapp.entries import Window
from streamapp.lake import files, split, upkeep
from streamapp.lake.catalog import committed_positions, ensure_table, open_catalog
from streamapp.lake.sink import TableSink
from streamapp.lake.upkeep import compact_run
from streamapp.redis_client import reader_client
from streamapp.settings import Settings
from tests.conftest import table_rows
from tests.helpers import assert_exactly_once, send, wait_rows

DAY0 = datetime(2024, 1, 1, 12, tzinfo=UTC)
POSITION = names.position_property("stream", "agent")
SPLIT = names.split_property("stream", "agent")


def clicks_over(n: int, days: int, prefix: str = "e") -> list[ClickEvent]:
    """n clicks spread over `days` days, in no order of time."""
    return [
        ClickEvent(
            x=i,
            y=i,
            event_id=f"{prefix}{i}",
            timestamp=DAY0 + timedelta(days=(i * 7919) % days, seconds=i),
            page_url="https://shop.example/" + "p" * (i % 40),
            user_id=None if i % 3 else f"u{i % 7}",
        )
        for i in range(n)
    ]


def window_of(events: list[ClickEvent], per_entry: int, first: int, last: int) -> Window:
    """Entries first..last-1 of `events` cut in entries of `per_entry` (entry k has id "k+1-0")."""
    ids, payloads = [], []
    for k in range(first, last):
        part = events[k * per_entry : (k + 1) * per_entry]
        payloads.append(b"\n".join(msgspec.json.encode(e) for e in part))
        ids += [f"{k + 1}-0"] * len(part)
    return Window(ClickEvent, "stream", "agent", ids, payloads, [int(DAY0.timestamp() * 1e6)] * len(ids))


def open_sink(tmp_path, *, max_files: int, keep: int = 100) -> TableSink:
    catalog = open_catalog(Settings(warehouse=tmp_path / "wh"))
    ensure_table(catalog, ClickEvent)
    return TableSink(catalog, "events.clicks", keep_snapshots=keep, max_files=max_files)


def ids_in(table) -> list[str]:
    table.refresh()
    return table.scan().to_arrow().column("event_id").to_pylist()


def files_per_partition(table) -> collections.Counter:
    table.refresh()
    return collections.Counter(t.file.partition[0] for t in table.scan().plan_files())


def test_data_files_are_those_pyiceberg_writes(tmp_path):
    """Same partitions, paths, row counts and manifest statistics (bounds truncated as pyiceberg
    truncates them, nulls counted) as `Transaction.append`'s own path, for small parts (snappy) and
    a large one (the table's zstd); and the rows read back the same."""
    events = clicks_over(600, 40)
    events += [  # one day of 2,500 clicks: a part over SMALL_PART_ROWS, written with the table's codec
        ClickEvent(x=i, y=i, event_id=f"big{i}", timestamp=DAY0 + timedelta(seconds=i), target="\U0010ffff" * 20)
        for i in range(2500)
    ]
    table = open_sink(tmp_path, max_files=1000).table
    rows = window_of(events, 100, 0, 31).to_arrow()
    values = files.partition_values(table.metadata, rows)
    ours = files.data_files(table.metadata, table.io, rows, values, uuid.uuid4())
    theirs = list(_dataframe_to_data_files(table.metadata, rows, table.io, uuid.uuid4()))
    assert len(ours) == len(theirs) == 40
    theirs_by = {f.partition[0]: f for f in theirs}
    for f in ours:
        other = theirs_by[f.partition[0]]
        assert f.file_path.rsplit("/", 1)[0] == other.file_path.rsplit("/", 1)[0]
        for field in ("record_count", "value_counts", "null_value_counts", "lower_bounds", "upper_bounds"):
            assert getattr(f, field) == getattr(other, field), (field, f.partition)
    order = pc.sort_indices(values)
    with table.transaction() as tx:
        files.append(tx, table.io, rows.take(order), values.take(order))
    assert sorted(ids_in(table)) == sorted(e.event_id for e in events)


def test_a_spread_window_is_committed_in_bounded_commits_exactly_once(tmp_path):
    sink = open_sink(tmp_path, max_files=7)
    events = clicks_over(600, 40)
    assert sink.write(window_of(events, 100, 0, 6)) == 600
    table = sink.table
    table.refresh()
    added = [int(s.summary["added-data-files"]) for s in table.snapshots()]
    assert added == [7, 7, 7, 7, 6, 6]  # ceil(40 / 7) commits, of even sizes
    assert table.properties[POSITION] == "6-0" and SPLIT not in table.properties
    assert_exactly_once([{"event_id": i} for i in ids_in(table)], {e.event_id for e in events})
    assert sink.write(window_of(events, 100, 0, 6)) == 0  # delivered again: nothing


class Stop(Exception):
    """The worker died here."""


def stopping_after(commits: int | None):
    """Make `split.next_step` raise before commit `commits + 1` of a write (None: never)."""
    real, made = split.next_step, []

    def step(*args, **kwargs):
        if commits is not None and len(made) >= commits:
            raise Stop
        made.append(1)
        return real(*args, **kwargs)

    return mock.patch.object(split, "next_step", step)


@given(data=st.data())
@hsettings(max_examples=25, deadline=None)
def test_windows_split_over_commits_are_written_exactly_once_whatever_stops_them(tmp_path_factory, data):
    """A worker stopped after any commit of a split window, then handed windows that begin anywhere
    up to its position and end anywhere after it (a restarted reader's windows have other bounds),
    never writes a row twice and in the end writes each once; positions and claims say so."""
    entries, per = data.draw(st.integers(2, 7)), 15
    events = clicks_over(entries * per, data.draw(st.integers(2, 24)))
    sink = open_sink(tmp_path_factory.mktemp("wh"), max_files=data.draw(st.integers(1, 6)))
    table = sink.table
    for _ in range(60):
        table.refresh()
        done = table.properties.get(POSITION)
        next_entry = int(done.split("-")[0]) if done else 0  # entry k (0-based) has id k+1
        if next_entry == entries:
            break
        first = data.draw(st.integers(0, next_entry))
        last = data.draw(st.integers(next_entry + 1, entries))
        with stopping_after(data.draw(st.none() | st.integers(0, 3))):
            try:
                sink.write(window_of(events, per, first, last))
            except Stop:
                pass
        written = ids_in(table)
        assert len(written) == len(set(written)), "a row was written twice"
    else:
        pytest.fail("the windows never got to the end of the stream")
    assert_exactly_once([{"event_id": i} for i in ids_in(table)], {e.event_id for e in events})
    table.refresh()
    assert SPLIT not in table.properties


def test_a_refused_entry_in_a_split_window_is_one_dead_letter_and_the_rest_lands_once(tmp_path):
    """An entry pyarrow refuses, in the middle of a window split over commits and stopped between
    them: its one dead letter, every other row once, in the end and after a redelivery."""
    sink = open_sink(tmp_path, max_files=5)
    events = clicks_over(100, 20)
    good = window_of(events, 20, 0, 5)
    bad = msgspec.json.encode({**msgspec.to_builtins(events[40]), "x": 2**40})  # out of the int32 column
    payloads = [*good.payloads[:2], bad + b"\n" + good.payloads[2].split(b"\n", 1)[1], *good.payloads[3:]]
    window = Window(ClickEvent, "stream", "agent", good.ids, payloads, good.received_us)
    first = Window(ClickEvent, "stream", "agent", good.ids[:60], payloads[:3], good.received_us[:60])
    assert sink.write(first) == 40  # up to the refused entry: the position is past it
    with stopping_after(1), pytest.raises(Stop):
        sink.write(window)  # delivered again from its start (a restarted reader): one commit, then a kill
    written = len(ids_in(sink.table))
    assert 40 < written < 80
    assert sink.write(window) == 80 - written
    assert sink.write(window) == 0
    expected = {e.event_id for i, e in enumerate(events) if not 40 <= i < 60}
    assert_exactly_once([{"event_id": i} for i in ids_in(sink.table)], expected)
    letters = sink.catalog.load_table(names.DEAD_LETTER_TABLE).scan().to_arrow().to_pylist()
    assert [(d["entry_id"], d["agent"]) for d in letters] == [("3-0", "agent")]
    assert "int32" in letters[0]["error"], letters[0]["error"]


def test_a_window_committed_halfway_raises_the_floor_of_new_entry_ids(tmp_path):
    """The check of a restarted Redis moves the stream's last id up to the highest position the
    tables hold: a window committed halfway holds rows up to its last entry, so that counts."""
    sink = open_sink(tmp_path, max_files=5)
    events = clicks_over(200, 20)
    sink.write(window_of(events, 50, 0, 1))
    with stopping_after(1), pytest.raises(Stop):
        sink.write(window_of(events, 50, 1, 4))
    table = sink.table
    table.refresh()
    assert table.properties[POSITION] == "1-0"
    assert json.loads(table.properties[SPLIT])[0][0] == "4-0"
    assert committed_positions([table]) == {"stream": "4-0"}


async def test_a_worker_killed_between_the_commits_of_a_window_loses_and_doubles_nothing(web, http, settings, spawn):
    """SIGKILL at each point of a window split into commits of 4 files, then a worker with
    windows ten times smaller (they end before the claims of the lost run): every click once."""
    now = int(time.time() * 1000)
    clicks = [
        {"type": "click", "x": i, "y": i, "event_id": f"b{i}", "timestamp": now - (i * 7919 % 30) * 86_400_000}
        for i in range(300)
    ]
    await send(http, web, clicks, chunk=30)
    for crash_at in ("after_commit:2", "during_write:3", "before_commit:4"):
        doomed = spawn(
            "worker --agent clicks", settings, STREAMAPP_CRASH_AT=crash_at, STREAMAPP_MAX_FILES_PER_COMMIT="4"
        )
        assert await asyncio.to_thread(doomed.wait, 60) == -signal.SIGKILL, doomed.output()
        rows = table_rows(settings, "events.clicks")
        assert len(rows) == len({r["event_id"] for r in rows}), crash_at
    small = dataclasses.replace(settings, window_count=30)
    spawn("worker --agent clicks", small, STREAMAPP_MAX_FILES_PER_COMMIT="4")
    await wait_rows(settings, "events.clicks", 300, timeout=60)
    await asyncio.sleep(1)  # a double write would land now
    assert_exactly_once(table_rows(settings, "events.clicks"), {c["event_id"] for c in clicks})
    table = open_catalog(settings).load_table("events.clicks")
    assert names.split_property(names.stream("click"), "clicks") not in table.properties


def test_compaction_leaves_two_files_per_day_in_bounded_runs_oldest_first(tmp_path):
    sink = open_sink(tmp_path, max_files=1000)
    events = clicks_over(1000, 40)
    for w in range(5):  # five windows over the same 40 days: five files a day
        sink.write(window_of(events, 100, 2 * w, 2 * w + 2))
    table = sink.table
    assert set(files_per_partition(table).values()) == {5}  # written back to back: compaction deferred
    oldest = min(files_per_partition(table))
    run = compact_run(table, keep_snapshots=100, max_files=30)
    assert run.replaced <= 30 and run.written == run.replaced // 5 and run.left == 40 - run.written
    assert files_per_partition(table)[oldest] == 1  # the oldest day first
    runs = 1
    while run.left:
        run = compact_run(table, keep_snapshots=100, max_files=30)
        runs += 1
    assert runs == 7 and max(files_per_partition(table).values()) <= 2
    assert_exactly_once([{"event_id": i} for i in ids_in(table)], {e.event_id for e in events})
    assert compact_run(table, keep_snapshots=100) == upkeep.Compaction()  # nothing left to do


def test_a_partition_of_two_files_stays_and_a_third_file_is_merged(tmp_path):
    sink = open_sink(tmp_path, max_files=1000)
    day = [ClickEvent(x=i, y=i, event_id=f"d{i}", timestamp=DAY0) for i in range(30)]
    for k in range(3):
        sink.write(window_of(day, 10, k, k + 1))
        if k == 1:
            assert compact_run(sink.table, keep_snapshots=100).replaced == 0  # two files: left alone
    assert compact_run(sink.table, keep_snapshots=100).replaced == 3
    assert list(files_per_partition(sink.table).values()) == [1]


def test_compacting_a_thousand_days_of_three_files_takes_bounded_runs(tmp_path):
    """The backfill of item 6 left 1,000 partitions of 3 files: no run stalls the worker."""
    sink = open_sink(tmp_path, max_files=1000)
    events = clicks_over(3000, 1000)
    for w in range(3):
        sink.write(window_of(events, 100, 10 * w, 10 * w + 10))
    table = sink.table
    assert len(files_per_partition(table)) == 1000
    took = []
    while True:
        started = time.monotonic()
        run = compact_run(table, keep_snapshots=10)
        took.append(time.monotonic() - started)
        assert run.replaced <= upkeep.COMPACT_MAX_FILES
        if not run.left:
            break
    assert len(took) == 4 and max(took) < 20, took  # ~1-2 s each on 2 shared cores
    assert set(files_per_partition(table).values()) == {1}
    assert len(ids_in(table)) == 3000


def test_upkeep_waits_while_spread_windows_come_back_to_back(tmp_path):
    """Compaction is due (the table gained 100 files) from the second window on, but the windows
    come back to back, each over 60 days (a backfill read from a backlog): it waits until a window
    comes after a pause, then runs."""
    sink = open_sink(tmp_path, max_files=1000)
    events = clicks_over(2000, 60)
    for w in range(3):
        sink.write(window_of(events, 100, 2 * w, 2 * w + 2))
    assert set(files_per_partition(sink.table).values()) == {3}
    time.sleep(upkeep.BUSY_SECONDS)  # caught up: the next window comes after a pause
    sink.write(window_of(events, 100, 6, 8))
    assert set(files_per_partition(sink.table).values()) == {1}
    assert_exactly_once([{"event_id": i} for i in ids_in(sink.table)], {e.event_id for e in events[:800]})


async def _windows(settings, redis_server, events: list[ClickEvent], n: int, hint: int | None = None):
    """The sizes of the windows `take(n, within=5)` makes of `events` (entries of 100), and when
    each was handed out; `hint`: the partitions a sink tells of each window."""
    r = redis_server.client()
    for k in range(0, len(events), 100):
        body = b"\n".join(msgspec.json.encode(e) for e in events[k : k + 100])
        r.xadd(names.stream("click"), {"e": body, "r": "0", "n": str(len(events[k : k + 100]))})
    stream, stopping = Stream(ClickEvent), asyncio.Event()
    client = reader_client(settings)
    stream.bind(client, "t", stopping, settings=settings)
    await stream.register()
    sizes, times, start = [], [], time.monotonic()
    async for window in stream.take(n, within=5):
        sizes.append(len(window))
        times.append(time.monotonic() - start)
        window.partitions = hint
        if sum(sizes) == len(events):
            break
    await client.aclose()
    return sizes, times


async def test_a_spread_backlog_is_read_in_windows_past_their_count(settings, redis_server):
    """The first window of a backlog over 100 days reads on past n (a sample says it is spread)
    and closes when the stream has no more, not `within` seconds later."""
    sizes, times = await _windows(settings, redis_server, clicks_over(3000, 100), 500)
    assert sizes == [3000] and times[0] < 2


async def test_a_backlog_of_one_day_is_read_in_windows_of_n(settings, redis_server):
    today = [ClickEvent(x=i, y=i, event_id=f"t{i}", timestamp=datetime.now(UTC)) for i in range(2000)]
    sizes, _ = await _windows(settings, redis_server, today, 500, hint=1)
    assert sizes == [500, 500, 500, 500]


async def test_a_sink_that_tells_of_many_partitions_makes_the_next_windows_read_on(settings, redis_server):
    """Events of one day at first (a sample sees one day), but the sink tells the reader that the
    windows fell into 40 partitions: the windows after the first read on (the one prefetched is
    read on before it is handed out)."""
    today = [ClickEvent(x=i, y=i, event_id=f"t{i}", timestamp=datetime.now(UTC)) for i in range(2000)]
    sizes, _ = await _windows(settings, redis_server, today, 500, hint=40)
    assert sizes == [500, 1500]
