"""Table upkeep on a real SQLite catalog: snapshot expiry and small-file compaction keep every row
exactly once and the stream position, bound snapshots and files, and lose a race safely."""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.io import pyarrow as iceberg_arrow

from models.click import ClickEvent
from streamapp.entries import DeadEntry, Window
from streamapp.lake import upkeep
from streamapp.lake.aggregate_sink import AggregateSink, Flush, LateEvent, aggregate_spec
from streamapp.lake.catalog import ensure_table, open_catalog
from streamapp.lake.dead_letter import DeadLetters
from streamapp.lake.sink import TableSink
from streamapp.lake.upkeep import compact, data_files
from streamapp.names import COMPLETE_BEFORE, position_property
from streamapp.settings import Settings
from tests.helpers import assert_exactly_once

DAY1 = datetime(2026, 11, 26, 12, tzinfo=UTC)


def _window(n: int, size: int = 4) -> Window:
    """Window n: `size` clicks on two days, stream ids n-0.. (positions grow with n)."""
    events = [ClickEvent(x=n, y=j, event_id=f"w{n}-{j}", timestamp=DAY1 + timedelta(days=j % 2)) for j in range(size)]
    return Window(
        ClickEvent,
        "stream",
        "agent",
        [f"{n + 1}-{j}" for j in range(size)],
        [msgspec.json.encode(e) for e in events],
        [int(DAY1.timestamp() * 1e6)] * size,
    )


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(warehouse=tmp_path / "wh", keep_snapshots=5)


@pytest.fixture
def sink(settings):
    catalog = open_catalog(settings)
    ensure_table(catalog, ClickEvent)
    return TableSink(catalog, "events.clicks", keep_snapshots=settings.keep_snapshots)


def _ids(table) -> list[str]:
    return table.scan().to_arrow().column("event_id").to_pylist()


def test_commits_keep_rows_position_and_few_snapshots_and_files(sink):
    for n in range(250):
        assert sink.write(_window(n)) == 4
    table = sink.table
    table.refresh()
    assert_exactly_once([{"event_id": i} for i in _ids(table)], {f"w{n}-{j}" for n in range(250) for j in range(4)})
    assert table.properties[position_property("stream", "agent")] == "250-3"
    assert len(table.metadata.snapshots) == 5
    # Without compaction: 500 files (a window writes one per day); compaction ran at 100 and 200.
    assert data_files(table) < 60, data_files(table)
    assert len({t.file.partition for t in table.scan().plan_files()}) == 2
    assert sink.write(_window(249)) == 0  # a window delivered again still writes nothing


def test_commits_without_rows_each_make_a_snapshot_and_expiry_keeps_the_metadata_flat(settings):
    """An aggregate commit with no rows (the hourly completeness marker) adds an empty snapshot, so
    that it asserts the one it read (tests/test_compare_and_set.py): expiry keeps them to
    `keep_snapshots`, and the metadata file stays the same size however many there were."""
    spec = aggregate_spec("events.agg", "page_url", {"clicks": (int, False)})
    sink, _ = AggregateSink.open(open_catalog(settings), spec, "stream", "agent", keep_snapshots=5)
    table = sink.table
    sizes, seen = {}, set()
    for n in range(1, 121):
        pos = f"{n}-0"
        sink.commit(Flush([], [], [], pos, pos, 3600.0 * n, 3600.0 * n, 0.0, 0.0))
        table.refresh()
        seen.add(table.current_snapshot().snapshot_id)
        if n in (20, 120):
            sizes[n] = os.path.getsize(table.metadata_location.removeprefix("file://"))
    assert len(seen) == 120  # every commit made its own snapshot
    assert table.properties[position_property("stream", "agent")] == "120-0"
    assert table.properties[COMPLETE_BEFORE].startswith("1970-01-06T00:00:00")  # 120 h
    assert len(table.metadata.snapshots) == len(table.metadata.snapshot_log) == 5
    assert len(table.metadata.metadata_log) <= 20  # METADATA_PREVIOUS_VERSIONS_MAX
    assert abs(sizes[120] - sizes[20]) < 100, sizes  # the same snapshots, properties and log lengths
    assert table.scan().to_arrow().num_rows == 0


def test_compaction_that_loses_a_race_changes_nothing(sink, settings, monkeypatch):
    for n in range(30):
        sink.write(_window(n))
    table = sink.table
    table.refresh()
    before = data_files(table)
    other = open_catalog(settings).load_table("events.clicks")
    real_scan = iceberg_arrow.ArrowScan.to_table

    def scan_then_someone_commits(self, tasks):
        rows = real_scan(self, tasks)
        if not getattr(scan_then_someone_commits, "done", False):
            scan_then_someone_commits.done = True
            with other.transaction() as tx:  # another worker's window lands meanwhile
                tx.append(_window(1000).to_arrow())
        return rows

    monkeypatch.setattr(upkeep.ArrowScan, "to_table", scan_then_someone_commits)
    with pytest.raises(CommitFailedException):
        compact(table, keep_snapshots=5)
    table.refresh()
    assert data_files(table) == before + 2  # nothing replaced; the other window's two files are in
    expected = {f"w{n}-{j}" for n in [*range(30), 1000] for j in range(4)}
    assert_exactly_once([{"event_id": i} for i in _ids(table)], expected)
    monkeypatch.undo()
    assert compact(table, keep_snapshots=5) == before + 2  # and the next attempt compacts all
    table.refresh()
    assert data_files(table) == 2
    assert_exactly_once([{"event_id": i} for i in _ids(table)], expected)


def test_keep_snapshots_setting_is_checked():
    from streamapp.settings import SettingsError

    with pytest.raises(SettingsError, match="STREAMAPP_KEEP_SNAPSHOTS"):
        dataclasses.replace(Settings(), keep_snapshots=0)


def test_a_tagged_snapshot_outlives_expiry(sink):
    sink.write(_window(0))
    table = sink.table
    table.refresh()
    tagged = table.current_snapshot().snapshot_id
    table.manage_snapshots().create_tag(tagged, "release-1").commit()
    for n in range(1, 20):
        sink.write(_window(n))
    table.refresh()
    ids = {s.snapshot_id for s in table.metadata.snapshots}
    assert tagged in ids and len(ids) == 6  # the newest 5 and the tagged one
    assert sorted(table.scan(snapshot_id=tagged).to_arrow().column("event_id").to_pylist()) == [
        f"w0-{j}" for j in range(4)
    ]


def _file_rows(table, column: str) -> list[list]:
    """Each data file's values of `column`, in the file's order (read straight from its Parquet)."""
    import pyarrow.parquet as pq

    return [
        pq.read_table(t.file.file_path.removeprefix("file://"), columns=[column]).column(column).to_pylist()
        for t in table.scan().plan_files()
    ]


def test_aggregates_and_late_events_are_compacted_and_their_files_sorted_by_time(settings):
    """An aggregate flush writes a file per day its windows touch, in its table and in events.late:
    both are compacted as the raw tables are, rows and position kept, each file sorted by time."""
    spec = aggregate_spec("events.agg", "page_url", {"clicks": (int, False)})
    sink, _ = AggregateSink.open(open_catalog(settings), spec, "stream", "agent", keep_snapshots=5)
    expected, late_ids = [], []
    for n in range(1, 61):  # 60 flushes, each with windows on 2 days in reverse time order
        starts = [DAY1.timestamp() + 86_400 * (n % 2) + 60 * (60 - n), DAY1.timestamp() + 86_400 * 2 + 60 * (60 - n)]
        rows = [{"window_start": s, "window_end": s + 60, "page_url": f"p{n}", "clicks": n} for s in starts]
        late = [
            LateEvent(f"{n}-{j}", ClickEvent(x=n, y=j, event_id=f"late-{n}-{j}"), s - 30, s - 60, s, None)
            for j, s in enumerate(starts)
        ]
        expected += [(r["page_url"], r["window_start"]) for r in rows]
        late_ids += [e.event.event_id for e in late]
        pos = f"{n}-9"
        sink.commit(Flush(rows, [], late, pos, pos, starts[0], 0.0, starts[0], 0.0))
    table, late_table = sink.table, sink.late
    table.refresh()
    late_table.refresh()
    # Without compaction: 120 files in each (a flush writes one per day); it ran at 100.
    assert data_files(table) < 30 and data_files(late_table) < 30, (data_files(table), data_files(late_table))
    got = table.scan().to_arrow().to_pylist()
    assert sorted((r["page_url"], r["window_start"].timestamp()) for r in got) == sorted(expected)
    assert_exactly_once([{"event_id": r["event_id"]} for r in late_table.scan().to_arrow().to_pylist()], set(late_ids))
    assert table.properties[position_property("stream", "agent")] == "60-9"
    assert late_table.properties[position_property("stream", "agent")] == "60-9"
    compacted = [v for v in _file_rows(table, "window_start") if len(v) > 2]
    assert compacted and all(v == sorted(v) for v in compacted)  # flushes wrote them newest first
    assert table.properties["write.target-file-size-bytes"] == str(64 * 1024 * 1024)


def test_dead_letters_are_compacted(settings):
    letters = DeadLetters(open_catalog(settings), keep_snapshots=5)
    for n in range(1, 111):
        assert letters.write([DeadEntry(f"{n}-0", '{"x":', "unreadable")], "stream", "agent", f"{n}-0") == 1
    table = letters.table
    table.refresh()
    assert data_files(table) <= 11, data_files(table)  # one file per commit until the compaction at 100
    assert sorted(r["entry_id"] for r in table.scan().to_arrow().to_pylist()) == sorted(f"{n}-0" for n in range(1, 111))
    assert table.properties[position_property("stream", "agent")] == "110-0"


def test_raw_files_are_sorted_by_event_time_after_compaction_with_the_target_size_set(settings):
    """Every file compaction wrote is sorted by event time, though the windows arrived newest
    first; the target size (which pyiceberg's bin-packing splits a partition by) is the table's."""
    catalog = open_catalog(settings)
    ensure_table(catalog, ClickEvent)
    sink = TableSink(catalog, "events.clicks", keep_snapshots=5, target_file_bytes=1024 * 1024)
    for n in range(120):
        window = _window(n, size=40)
        window.payloads = [
            msgspec.json.encode(
                ClickEvent(x=n, y=j, event_id=f"w{n}-{j}", timestamp=DAY1 + timedelta(days=j % 2, seconds=-n * 60 - j))
            )
            for j in range(40)
        ]
        sink.write(window)
    table = sink.table
    table.refresh()
    assert data_files(table) < 60  # 240 without compaction (one file per day per window)
    assert len(table.scan().to_arrow()) == 120 * 40
    compacted = [v for v in _file_rows(table, "event_time") if len(v) > 40]
    assert compacted and all(v == sorted(v) for v in compacted)
    assert table.properties["write.target-file-size-bytes"] == str(1024 * 1024)
