"""The durable side of a windowed aggregate: its tables, restoring its state, its commits.

One flush is at most two Iceberg commits, in this order:

1. late events to `events.late`, with the position `P` the flush reached (entries at or before
   the table's position are dropped first, as in `streamapp.lake.sink`);
2. the aggregate rows to the aggregate table (rewritten windows deleted in the same
   transaction) with `P`, the replay cursor, the watermark and the completeness marker.

Session windows add a snapshot of their open sessions: a JSON file written next to the table's
data before commit 2 and named in its properties, so it takes effect with that commit or not at
all (a file left by a killed attempt is unreferenced, like an orphan data file).

Both commits are compare-and-sets on this agent's position in that table: each goes in only while
the table still holds the position this agent last saw there; otherwise another worker moved it,
and the agent starts over from what is committed. The check reads a refreshed table, and the
commit asserts the snapshot it read (a commit with no rows adds an empty snapshot for that,
`streamapp.lake.commit.assert_snapshot_read`), so a commit landing in between fails this one.

A crash between 1 and 2 replays the same entries against the same committed watermark, so the
same events are late again and are dropped by commit 1's position check (`Aggregator` holds its
first flush until it has read up to that position).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import pyarrow as pa
from pyiceberg.catalog import Catalog
from pyiceberg.expressions import And, BooleanExpression, EqualTo, IsNull, NotNull, Or, Reference
from pyiceberg.expressions.literals import literal
from pyiceberg.table import Table

from streamapp import names
from streamapp.entries import BEFORE_ALL, DeadEntry, entry_id
from streamapp.faults import crashpoint
from streamapp.lake import erased
from streamapp.lake.catalog import TableSpec, ensure_table
from streamapp.lake.commit import assert_snapshot_read, commit_with_retry, table_name
from streamapp.lake.dead_letter import DeadLetters
from streamapp.lake.upkeep import SMALL_FILE_BYTES, Upkeep, expire_old_snapshots, snapshot_figure
from streamapp.model import table_schema

log = logging.getLogger(__name__)


class StaleState(RuntimeError):
    """The aggregate table moved past the state this agent holds (another worker committed)."""


@dataclass(frozen=True)
class LateEvent:
    """An event that missed its window, bound for `events.late`."""

    stream_id: str
    event: Any  # the event (a msgspec Struct), stored as its JSON
    event_time: float
    window_start: float
    window_end: float
    key: str | None


@dataclass
class Flush:
    """What one commit of an aggregate writes: rows (`rewrite` ones replace their window's row),
    late events, and the table properties that make the commit replayable. Times are epoch
    seconds."""

    rows: list[dict[str, Any]]  # column -> value; window_start and window_end in epoch seconds
    rewrite: list[tuple[float, str | None]]  # (window_start, key) whose old row is deleted
    late: list[LateEvent]
    position: str
    replay_after: str
    watermark: float
    complete_before: float  # every window starting before this (an hour boundary) is final
    max_event: float
    max_seen_at: float
    state: dict[str, Any] | None = None  # session windows: the snapshot to restore from
    mark: str | None = None  # the stream's totals at `position` (`entries.Mark`), when known
    dead: list[DeadEntry] = dataclasses.field(default_factory=list)  # for events.dead_letter


LATE_SPEC = TableSpec(
    names.LATE_TABLE,
    table_schema(
        [
            ("agent", "string", True),
            ("stream_id", "string", True),
            ("event_id", "string", False),
            ("event_time", "timestamptz", True),
            ("window_start", "timestamptz", True),
            ("window_end", "timestamptz", True),
            ("key", "string", False),
            ("event", "string", True),
        ]
    ),
    "event_time",
)


def aggregate_spec(table: str, column: str, columns: dict[str, tuple[type, bool]]) -> TableSpec:
    """An aggregate table: the window, the key `column`, then one column per aggregation, by name:
    (int -> long or float -> double, nullable)."""
    schema = table_schema(
        [
            ("window_start", "timestamptz", True),
            ("window_end", "timestamptz", True),
            (column, "string", False),
            *((name, "long" if kind is int else "double", not nullable) for name, (kind, nullable) in columns.items()),
        ]
    )
    return TableSpec(table, schema, "window_start")


def utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def iso(t: float) -> str:
    return utc(t).isoformat() if t > -math.inf else ""


@dataclass(frozen=True)
class Restored:
    position: str | None  # P of the last commit; None: never committed
    replay_after: str
    late_position: str | None
    watermark: float
    max_event: float
    max_seen_at: float
    state: dict[str, Any] | None  # session windows: the snapshot the last commit referenced


class AggregateSink:
    """Commits of one aggregate agent (blocking: call from a thread), made by `open`, which takes
    what it needs: the catalog, the table's spec, the stream and consumer whose position it keeps,
    the snapshots to keep (STREAMAPP_KEEP_SNAPSHOTS) and the test crash points (STREAMAPP_CRASH_AT)."""

    def __init__(
        self,
        table: Table,
        late: Table,
        spec: TableSpec,
        stream_key: str,
        consumer: str,
        keep_snapshots: int,
        crash_at: tuple[str, ...],
        dead_letters: DeadLetters,
        target_file_bytes: int = SMALL_FILE_BYTES,
    ) -> None:
        self.table, self.late, self.spec, self.consumer = table, late, spec, consumer
        # a flush writes a file per day its rows touch, in each table: compacted as the raw tables are
        self.upkeep, self.late_upkeep = (
            Upkeep(keep_snapshots, target_file_bytes),
            Upkeep(keep_snapshots, target_file_bytes),
        )
        self.stream_key, self.dead_letters = stream_key, dead_letters
        self.keep_snapshots, self.crash_at = keep_snapshots, crash_at
        self.pos_key = names.position_property(stream_key, consumer)
        self.replay_key = names.replay_property(stream_key, consumer)
        self.state_key = names.state_property(stream_key, consumer)
        self.snapshot_key = names.snapshot_property(stream_key, consumer)
        self.mark_key = names.mark_property(stream_key, consumer)
        self.base = table.properties.get(self.pos_key)  # our position in the aggregate table, as last seen there
        self.late_base = late.properties.get(self.pos_key)  # and in the late table

    @classmethod
    def open(
        cls,
        catalog: Catalog,
        spec: TableSpec,
        stream_key: str,
        consumer: str,
        *,
        keep_snapshots: int,
        crash_at: tuple[str, ...] = (),
        target_file_bytes: int = SMALL_FILE_BYTES,
    ) -> tuple[AggregateSink, Restored]:
        """Create the tables if missing; the sink, and what its last commit recorded."""
        sink = cls(
            ensure_table(catalog, spec),
            ensure_table(catalog, LATE_SPEC),
            spec,
            stream_key,
            consumer,
            keep_snapshots,
            crash_at,
            DeadLetters(catalog, keep_snapshots=keep_snapshots, target_file_bytes=target_file_bytes),
            target_file_bytes,
        )
        props = sink.table.properties
        state = json.loads(props.get(sink.state_key, "{}"))
        snapshot = None
        if path := props.get(sink.snapshot_key):
            with sink.table.io.new_input(path).open() as f:
                snapshot = json.loads(f.read())
        return sink, Restored(
            position=sink.base,
            replay_after=props.get(sink.replay_key, "0-0"),
            late_position=sink.late_base,
            watermark=state.get("watermark", -math.inf),
            max_event=state.get("max_event", -math.inf),
            max_seen_at=state.get("max_seen_at", -math.inf),
            state=snapshot,
        )

    def commit(self, flush: Flush) -> None:
        """The commits of a flush, in order: its dead letters, its late events, then its rows."""
        if flush.dead:
            self.dead_letters.write(flush.dead, self.stream_key, self.consumer, flush.position)
        if flush.late:
            self.commit_late(flush)
        self.commit_rows(flush)

    def commit_late(self, flush: Flush) -> None:
        """Commit 1: the flush's late events not yet in `events.late`, with its position."""

        def attempt(table: Table) -> int:
            committed = self._check(table, self.late_base)
            after = entry_id(committed) if committed else BEFORE_ALL
            erasures = erased.parse(table.properties)  # events of users erased since they were received: dropped
            late = [
                e
                for e in flush.late
                if entry_id(e.stream_id) > after
                and not erased.erased_before(
                    erasures, getattr(e.event, "user_id", None), entry_id(e.stream_id)[0] * 1000
                )
            ]
            if not late:
                return 0
            rows = pa.Table.from_pylist(
                [
                    {
                        "agent": self.consumer,
                        "stream_id": e.stream_id,
                        "event_id": e.event.event_id,
                        "event_time": utc(e.event_time),
                        "window_start": utc(e.window_start),
                        "window_end": utc(e.window_end),
                        "key": e.key,
                        "event": msgspec.json.encode(e.event).decode(),
                    }
                    for e in late
                ],
                schema=LATE_SPEC.schema.as_arrow(),
            )
            with table.transaction() as tx:
                tx.append(rows)
                tx.set_properties({self.pos_key: flush.position})
                expire_old_snapshots(tx, self.keep_snapshots)
            return len(late)

        began = time.monotonic()
        written = commit_with_retry(self.late, attempt)
        if written:
            self.late_upkeep.after_write(self.late, snapshot_figure(self.late, "added-data-files"), began)
            self.late_base = flush.position
            log.info("routed %d late events to %s up to %s", written, names.LATE_TABLE, flush.position)
            crashpoint(self.crash_at, "after_late_commit")

    def commit_rows(self, flush: Flush) -> None:
        """Commit 2: the flush's rows (rewritten windows deleted first, in the same transaction),
        its position, replay cursor, watermark and completeness marker."""
        table = self.table
        rows = pa.Table.from_pylist(
            [
                {**row, "window_start": utc(row["window_start"]), "window_end": utc(row["window_end"])}
                for row in flush.rows
            ],
            schema=self.spec.schema.as_arrow(),
        )
        props = {
            self.pos_key: flush.position,
            self.replay_key: flush.replay_after,
            self.state_key: json.dumps(
                {"watermark": flush.watermark, "max_event": flush.max_event, "max_seen_at": flush.max_seen_at}
            ),
            names.WATERMARK: iso(flush.watermark),
            names.COMPLETE_BEFORE: iso(flush.complete_before),
        }
        if flush.mark is not None:
            props[self.mark_key] = flush.mark
        if flush.state is not None:
            props[self.snapshot_key] = path = f"{table.location()}/streamapp-state/{uuid.uuid4().hex}.json"
            with table.io.new_output(path).create() as f:
                f.write(json.dumps(flush.state).encode())

        def attempt(table: Table) -> str | None:
            self._check(table, self.base)
            previous = table.properties.get(self.snapshot_key)  # ours: the position is
            crashpoint(self.crash_at, "aggregate_before_commit")
            with table.transaction() as tx:
                if flush.rewrite:
                    tx.delete(self._rows_of(flush.rewrite))
                if rows.num_rows:
                    tx.append(rows)
                else:  # the completeness marker or a late-only flush: still a compare-and-set
                    assert_snapshot_read(tx)
                tx.set_properties(props)
                expire_old_snapshots(tx, self.keep_snapshots)
                crashpoint(self.crash_at, "aggregate_during_write")
            return previous

        began = time.monotonic()
        previous = commit_with_retry(table, attempt)
        self.base = flush.position
        if previous and flush.state is not None:
            table.io.delete(previous)  # no longer referenced; a kill before this leaves an orphan
        crashpoint(self.crash_at, "aggregate_after_commit")
        self.upkeep.after_write(table, snapshot_figure(table, "added-data-files"), began)
        log.info(
            "committed %d rows (%d rewritten) to %s up to %s, watermark %s",
            rows.num_rows,
            len(flush.rewrite),
            self.spec.table,
            flush.position,
            iso(flush.watermark),
        )

    def _check(self, table: Table, expected: str | None) -> str | None:
        found = table.properties.get(self.pos_key)
        if found != expected:
            raise StaleState(
                f"{table_name(table)}: {self.consumer} expected its position at {expected}, "
                f"found {found}: another worker committed"
            )
        return found

    def _rows_of(self, windows: list[tuple[float, str | None]]) -> BooleanExpression:
        """The rows of these (window_start, key) pairs. `key = v` is guarded by `key IS NOT NULL`:
        pyiceberg 0.12 keeps the rows for which the negated filter is true, and under a compound
        filter a null key makes `key = v` null, so rows of the null key in the same window were
        deleted too (cf. apache/iceberg-python#954; found by the property test)."""
        column = Reference(self.spec.schema.fields[2].name)  # the key's
        start = Reference("window_start")
        rows = [
            And(
                EqualTo(term=start, value=literal(utc(t).isoformat())),
                IsNull(term=column)
                if key is None
                else And(NotNull(term=column), EqualTo(term=column, value=literal(key))),
            )
            for t, key in windows
        ]
        return rows[0] if len(rows) == 1 else Or(*rows)
