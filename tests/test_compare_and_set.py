"""Two writers on one catalog (SQLite, PostgreSQL): every commit that moves a stream position goes in only on the
table state the position was read from.

Each writer has its own catalog, as two worker processes do. The stale writer's attempt is
interleaved with the other writer's commit where a real race puts it: right after the refresh that
starts every attempt (`commit_with_retry`), before the position check and the commit. pyiceberg
applies a transaction's updates onto the catalog's latest metadata and checks only the
transaction's requirements, so a commit that asserts nothing would land and move the position back.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
import pytest

from models.click import ClickEvent
from streamapp.entries import Window
from streamapp.lake.aggregate_sink import AggregateSink, Flush, LateEvent, StaleState, aggregate_spec
from streamapp.lake.catalog import ensure_table, open_catalog
from streamapp.lake.sink import TableSink
from streamapp.names import LATE_TABLE, position_property
from streamapp.settings import Settings
from tests.helpers import assert_exactly_once

STREAM = "streamapp:{streamapp}:events:click"
T0 = 1_795_000_020.0  # on a minute
SPEC = aggregate_spec("events.agg", "page_url", {"clicks": (int, False)})


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, tmp_path) -> Settings:
    uri = request.getfixturevalue("pg_uri") if request.param == "postgresql" else ""
    return Settings(warehouse=tmp_path / "wh", keep_snapshots=5, catalog_uri=uri)


def after_next_refresh(monkeypatch, table, other_writer_commits: Callable[[], object]) -> None:
    """The other writer commits once, just after `table`'s next refresh: the stale writer has read
    the table (and will check its position against what it read), the other has moved it since."""
    real = table.refresh
    pending = [other_writer_commits]

    def refresh():
        refreshed = real()
        while pending:
            pending.pop()()
        return refreshed

    monkeypatch.setattr(table, "refresh", refresh)


def window(first: int, last: int) -> Window:
    """Entries `first-0` .. `last-0`, one click each."""
    events = [
        ClickEvent(x=n, y=0, event_id=f"e{n}", timestamp=datetime.fromtimestamp(T0, UTC))
        for n in range(first, last + 1)
    ]
    return Window(
        ClickEvent,
        STREAM,
        "clicks",
        [f"{n}-0" for n in range(first, last + 1)],
        [msgspec.json.encode(e) for e in events],
        [int(T0 * 1e6)] * len(events),
    )


def test_raw_sink_a_stale_append_fails_and_its_retry_writes_only_what_is_new(settings, monkeypatch):
    ensure_table(open_catalog(settings), ClickEvent)
    one = TableSink(open_catalog(settings), "events.clicks", keep_snapshots=5)
    two = TableSink(open_catalog(settings), "events.clicks", keep_snapshots=5)
    assert one.write(window(1, 3)) == 3
    after_next_refresh(monkeypatch, two.table, lambda: one.write(window(4, 5)))
    assert two.write(window(4, 4)) == 0  # read at 3; 5 committed meanwhile: its retry finds 4 in
    table = open_catalog(settings).load_table("events.clicks")
    assert table.properties[position_property(STREAM, "clicks")] == "5-0"
    assert_exactly_once(table.scan().to_arrow().to_pylist(), {f"e{n}" for n in range(1, 6)})


def flush(position: int, *rows: tuple[float, int], late: list[LateEvent] | None = None) -> Flush:
    """A flush up to entry `position`-0 with rows of (window_start, clicks) for page "a"."""
    return Flush(
        rows=[{"window_start": s, "window_end": s + 60, "page_url": "a", "clicks": c} for s, c in rows],
        rewrite=[],
        late=late or [],
        position=f"{position}-0",
        replay_after=f"{position}-0",
        watermark=T0 + position,
        complete_before=T0 - 20 + 3600 * position,  # each flush moves the completeness marker
        max_event=T0 + position,
        max_seen_at=T0 + position,
    )


def late(n: int) -> list[LateEvent]:
    """One event of entry `n`-0 that missed the window ten minutes back."""
    return [LateEvent(f"{n}-0", ClickEvent(x=0, y=0, event_id=f"late{n}"), T0 - 600, T0 - 600, T0 - 540, "a")]


def two_aggregate_writers(settings) -> tuple[AggregateSink, AggregateSink]:
    """Two writers of one aggregate agent, both holding position 3 in both tables, as committed by
    the first."""
    one, _ = AggregateSink.open(open_catalog(settings), SPEC, STREAM, "agg", keep_snapshots=5)
    one.commit(flush(3, (T0, 3), late=late(3)))
    two, restored = AggregateSink.open(open_catalog(settings), SPEC, STREAM, "agg", keep_snapshots=5)
    assert restored.position == restored.late_position == "3-0"
    return one, two


def agg_table(settings):
    return open_catalog(settings).load_table("events.agg")


@pytest.mark.parametrize("stale_rows", [[(T0 + 60, 1)], []], ids=["with-rows", "properties-only"])
def test_aggregate_a_stale_commit_fails_and_the_table_keeps_the_newer_position(settings, monkeypatch, stale_rows):
    """The issue's reproduction is the properties-only case: the hourly completeness commit carries
    no rows; it set the position back from 5 to 3 (here: 4, the stale writer's next position)."""
    one, two = two_aggregate_writers(settings)
    after_next_refresh(monkeypatch, two.table, lambda: one.commit(flush(5, (T0 + 60, 2))))
    with pytest.raises(StaleState, match="expected its position at 3-0, found 5-0"):
        two.commit(flush(4, *stale_rows))
    table = agg_table(settings)
    assert table.properties[position_property(STREAM, "agg")] == "5-0"
    assert table.properties["streamapp.complete_before"] == datetime.fromtimestamp(T0 - 20 + 3600 * 5, UTC).isoformat()
    rows = sorted((r["window_start"].timestamp(), r["clicks"]) for r in table.scan().to_arrow().to_pylist())
    assert rows == [(T0, 3), (T0 + 60, 2)]  # the stale writer's row is not in


def test_aggregate_a_stale_late_commit_fails_and_events_late_keeps_the_newer_position(settings, monkeypatch):
    one, two = two_aggregate_writers(settings)
    after_next_refresh(monkeypatch, two.late, lambda: one.commit(flush(5, late=late(5))))
    with pytest.raises(StaleState, match="expected its position at 3-0, found 5-0"):
        two.commit(flush(4, late=late(4)))
    table = open_catalog(settings).load_table(LATE_TABLE)
    assert table.properties[position_property(STREAM, "agg")] == "5-0"
    assert sorted(r["event_id"] for r in table.scan().to_arrow().to_pylist()) == ["late3", "late5"]
    assert agg_table(settings).properties[position_property(STREAM, "agg")] == "5-0"


def test_raw_sink_a_conflict_with_another_shard_commits_the_same_files_again(settings, monkeypatch):
    """Two workers own two shards of one stream: their positions differ, so a conflict between
    their commits leaves the retry the same rows, and it commits the files it wrote, encoding
    nothing twice (no second set of Parquet files left behind for the orphan cleanup)."""
    from pathlib import Path

    from streamapp.lake import files

    ensure_table(open_catalog(settings), ClickEvent)
    other_shard = "streamapp:{streamapp-1}:events:click"
    one = TableSink(open_catalog(settings), "events.clicks", keep_snapshots=5)
    two = TableSink(open_catalog(settings), "events.clicks", keep_snapshots=5)
    theirs = window(100, 102)
    theirs.stream_key = other_shard
    encoded: list[int] = []
    real = files.data_files

    def counting(*args, **kwargs):
        made = real(*args, **kwargs)
        encoded.append(len(made))
        return made

    monkeypatch.setattr(files, "data_files", counting)
    after_next_refresh(monkeypatch, two.table, lambda: one.write(theirs))
    assert two.write(window(1, 4)) == 4
    assert encoded == [1, 1], "the other shard's window, then this one's once: its retry re-encoded it"
    table = open_catalog(settings).load_table("events.clicks")
    assert table.properties[position_property(STREAM, "clicks")] == "4-0"
    assert table.properties[position_property(other_shard, "clicks")] == "102-0"
    assert_exactly_once(table.scan().to_arrow().to_pylist(), {*(f"e{n}" for n in range(1, 5)), "e100", "e101", "e102"})
    on_disk = {str(p) for p in Path(settings.warehouse).rglob("*.parquet")}
    referenced = {t.file.file_path.removeprefix("file://") for t in table.scan().plan_files()}
    assert on_disk == referenced, "a Parquet file written for nothing"
