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
from collections.abc import Sequence
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
    stream: int = 0  # which of the aggregate's streams (shards) holds it: 0 the first


@dataclass
class ShardFlush:
    """Where one more stream (shard 1, 2, ...) of a sharded aggregate stands at a flush: as
    `Flush.position`, `replay_after`, `mark` and `dead` are for the first. `position` is None while
    nothing of it was ever read (its properties are then not written)."""

    position: str | None
    replay_after: str
    mark: str | None = None
    dead: list[DeadEntry] = dataclasses.field(default_factory=list)


@dataclass
class Flush:
    """What one commit of an aggregate writes: rows (`rewrite` ones replace their window's row),
    late events, and the table properties that make the commit replayable. Times are epoch
    seconds."""

    rows: list[dict[str, Any]]  # column -> value; window_start and window_end in epoch seconds
    rewrite: list[tuple[float, str | None]]  # (window_start, key) whose old row is deleted
    late: list[LateEvent]
    position: str | None  # None only in a sharded aggregate whose first stream was never read
    replay_after: str
    watermark: float
    complete_before: float  # every window starting before this (an hour boundary) is final
    max_event: float
    max_seen_at: float
    state: dict[str, Any] | None = None  # session windows: the snapshot to restore from
    mark: str | None = None  # the stream's totals at `position` (`entries.Mark`), when known
    dead: list[DeadEntry] = dataclasses.field(default_factory=list)  # for events.dead_letter
    shards: list[ShardFlush] = dataclasses.field(default_factory=list)  # the streams after the first

    def streams(self) -> list[ShardFlush]:
        """Every stream's part, the first one's included."""
        return [ShardFlush(self.position, self.replay_after, self.mark, self.dead), *self.shards]


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
class ShardRestored:
    """What the last commit recorded for one more stream (shard 1, 2, ...) of a sharded aggregate,
    as `Restored.position`, `replay_after` and `late_position` are for the first."""

    position: str | None
    replay_after: str = "0-0"
    late_position: str | None = None


@dataclass(frozen=True)
class Restored:
    position: str | None  # P of the last commit; None: never committed
    replay_after: str
    late_position: str | None
    watermark: float
    max_event: float
    max_seen_at: float
    state: dict[str, Any] | None  # session windows: the snapshot the last commit referenced
    shards: tuple[ShardRestored, ...] = ()  # a sharded aggregate's streams after the first


class AggregateSink:
    """Commits of one aggregate agent (blocking: call from a thread), made by `open`, which takes
    what it needs: the catalog, the table's spec, the stream and consumer whose position it keeps,
    the snapshots to keep (STREAMAPP_KEEP_SNAPSHOTS) and the test crash points (STREAMAPP_CRASH_AT).

    A sharded aggregate reads several streams (`stream_key` a list, shard 0 first): it keeps a
    position, replay cursor and mark per stream, all moved by the same commit, which is valid only
    while every one of its positions in the table is the one this agent last saw; the watermark
    (and a session snapshot) is one, kept under the first stream's name, as with one shard."""

    def __init__(
        self,
        table: Table,
        late: Table,
        spec: TableSpec,
        stream_key: str | Sequence[str],
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
        self.stream_keys = [stream_key] if isinstance(stream_key, str) else list(stream_key)
        self.stream_key, self.dead_letters = self.stream_keys[0], dead_letters
        self.keep_snapshots, self.crash_at = keep_snapshots, crash_at
        self.pos_keys = [names.position_property(k, consumer) for k in self.stream_keys]
        self.replay_keys = [names.replay_property(k, consumer) for k in self.stream_keys]
        self.mark_keys = [names.mark_property(k, consumer) for k in self.stream_keys]
        self.state_key = names.state_property(self.stream_key, consumer)
        self.snapshot_key = names.snapshot_property(self.stream_key, consumer)
        # our positions in the aggregate table, as last seen there, and in the late table
        self.bases = [table.properties.get(k) for k in self.pos_keys]
        self.late_bases = [late.properties.get(k) for k in self.pos_keys]

    @classmethod
    def open(
        cls,
        catalog: Catalog,
        spec: TableSpec,
        stream_key: str | Sequence[str],
        consumer: str,
        *,
        keep_snapshots: int,
        crash_at: tuple[str, ...] = (),
        target_file_bytes: int = SMALL_FILE_BYTES,
    ) -> tuple[AggregateSink, Restored]:
        """Create the tables if missing; the sink, and what its last commit recorded (a stream of
        a sharded aggregate with nothing recorded yet starts at its beginning)."""
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
            position=sink.bases[0],
            replay_after=props.get(sink.replay_keys[0], "0-0"),
            late_position=sink.late_bases[0],
            watermark=state.get("watermark", -math.inf),
            max_event=state.get("max_event", -math.inf),
            max_seen_at=state.get("max_seen_at", -math.inf),
            state=snapshot,
            shards=tuple(
                ShardRestored(base, props.get(replay, "0-0"), late)
                for base, replay, late in zip(sink.bases[1:], sink.replay_keys[1:], sink.late_bases[1:], strict=True)
            ),
        )

    def commit(self, flush: Flush) -> None:
        """The commits of a flush, in order: its dead letters, its late events, then its rows."""
        for stream_key, part in zip(self.stream_keys, flush.streams(), strict=True):
            if part.dead and part.position is not None:  # an entry refused moved its position
                self.dead_letters.write(part.dead, stream_key, self.consumer, part.position)
        if flush.late:
            self.commit_late(flush)
        self.commit_rows(flush)

    def commit_late(self, flush: Flush) -> None:
        """Commit 1: the flush's late events not yet in `events.late`, with its position."""

        positions = self._positions(flush)

        def attempt(table: Table) -> int:
            committed = self._check(table, self.late_bases)
            after = [entry_id(c) if c else BEFORE_ALL for c in committed]
            erasures = erased.parse(table.properties)  # events of users erased since they were received: dropped
            late = [
                e
                for e in flush.late
                if entry_id(e.stream_id) > after[e.stream]
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
                tx.set_properties(positions)
                expire_old_snapshots(tx, self.keep_snapshots)
            return len(late)

        began = time.monotonic()
        written = commit_with_retry(self.late, attempt)
        if written:
            self.late_upkeep.after_write(self.late, snapshot_figure(self.late, "added-data-files"), began)
            self.late_bases = [
                p if p is not None else b for p, b in zip(self._ids(flush), self.late_bases, strict=True)
            ]
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
            **self._positions(flush),
            **{
                k: part.replay_after for k, part in zip(self.replay_keys, flush.streams(), strict=True) if part.position
            },
            **{k: part.mark for k, part in zip(self.mark_keys, flush.streams(), strict=True) if part.mark is not None},
            self.state_key: json.dumps(
                {"watermark": flush.watermark, "max_event": flush.max_event, "max_seen_at": flush.max_seen_at}
            ),
            names.WATERMARK: iso(flush.watermark),
            names.COMPLETE_BEFORE: iso(flush.complete_before),
        }
        if flush.state is not None:
            props[self.snapshot_key] = path = f"{table.location()}/streamapp-state/{uuid.uuid4().hex}.json"
            with table.io.new_output(path).create() as f:
                f.write(json.dumps(flush.state).encode())

        def attempt(table: Table) -> str | None:
            self._check(table, self.bases)
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
        self.bases = [p if p is not None else b for p, b in zip(self._ids(flush), self.bases, strict=True)]
        if previous and flush.state is not None:
            table.io.delete(previous)  # no longer referenced; a kill before this leaves an orphan
        crashpoint(self.crash_at, "aggregate_after_commit")
        self.upkeep.after_write(table, snapshot_figure(table, "added-data-files"), began)
        log.info(
            "committed %d rows (%d rewritten) to %s up to %s, watermark %s",
            rows.num_rows,
            len(flush.rewrite),
            self.spec.table,
            flush.position if len(self.stream_keys) == 1 else [part.position for part in flush.streams()],
            iso(flush.watermark),
        )

    def _ids(self, flush: Flush) -> list[str | None]:
        """The flush's position in each stream (None: not read yet), shard 0 first."""
        ids = [part.position for part in flush.streams()]
        if len(ids) != len(self.stream_keys):
            raise ValueError(f"a flush over {len(ids)} streams, but {self.consumer} reads {len(self.stream_keys)}")
        return ids

    def _positions(self, flush: Flush) -> dict[str, str]:
        """The position properties a flush moves: one per stream read so far."""
        return {k: p for k, p in zip(self.pos_keys, self._ids(flush), strict=True) if p is not None}

    def _check(self, table: Table, expected: list[str | None]) -> list[str | None]:
        """Compare-and-set on every stream's position: each must be where this agent last saw it."""
        found = [table.properties.get(k) for k in self.pos_keys]
        for key, e, f in zip(self.stream_keys, expected, found, strict=True):
            if f != e:
                shard = "" if len(self.stream_keys) == 1 else f" in {key}"
                raise StaleState(
                    f"{table_name(table)}: {self.consumer} expected its position{shard} at {e}, "
                    f"found {f}: another worker committed"
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
