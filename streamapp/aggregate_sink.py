"""The durable side of a windowed aggregate: its tables, restoring its state, its commits.

One flush is at most two Iceberg commits, in this order:

1. late events to `events.late`, with the position `P` the flush reached (entries at or before
   the table's position are dropped first, as in `streamapp.sink`);
2. the aggregate rows to the aggregate table (rewritten windows deleted in the same
   transaction) with `P`, the replay cursor, the watermark and the completeness marker.

Session windows add a snapshot of their open sessions: a JSON file written next to the table's
data before commit 2 and named in its properties, so it takes effect with that commit or not at
all (a file left by a killed attempt is unreferenced, like an orphan data file).

Both commits are compare-and-sets on this agent's position in that table: each goes in only while
the table still holds the position this agent last saw there; otherwise another worker moved it,
and the agent starts over from what is committed. A crash between 1 and 2 replays the same
entries against the same committed watermark, so the same events are late again and are dropped
by commit 1's position check (`Aggregator` holds its first flush until it has read up to that
position).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import random
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import pyarrow as pa
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.expressions import And, BooleanExpression, EqualTo, IsNull, NotNull, Or
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.types import LongType, NestedField, StringType, TimestamptzType

from streamapp.aggregate import Aggregation, Aggregator, Flush, SessionAggregator, utc
from streamapp.catalog import ensure_table
from streamapp.faults import crashpoint
from streamapp.maintenance import expire_old_snapshots
from streamapp.sink import position_property
from streamapp.stream import entry_id
from streamapp.windows import Sessions, Watermark

if TYPE_CHECKING:
    from streamapp.aggregate import Windowed

log = logging.getLogger(__name__)

LATE_TABLE = "events.late"
WATERMARK = "streamapp.watermark"
COMPLETE_BEFORE = "streamapp.complete_before"
TICK_SECONDS = 1.0  # flush period: how soon after the watermark passes a window's end it is written
MAX_ATTEMPTS = 20


class StaleState(RuntimeError):
    """The aggregate table moved past the state this agent holds (another worker committed)."""


@dataclass(frozen=True)
class TableSpec:
    """What `catalog.ensure_table` needs to create a table that no event model declares."""

    table: str
    schema: Schema
    partition_column: str

    def iceberg_schema(self) -> Schema:
        return self.schema


LATE_SPEC = TableSpec(LATE_TABLE, Schema(
    NestedField(1, "agent", StringType(), required=True),
    NestedField(2, "stream_id", StringType(), required=True),
    NestedField(3, "event_id", StringType(), required=False),
    NestedField(4, "event_time", TimestamptzType(), required=True),
    NestedField(5, "window_start", TimestamptzType(), required=True),
    NestedField(6, "window_end", TimestamptzType(), required=True),
    NestedField(7, "key", StringType(), required=False),
    NestedField(8, "event", StringType(), required=True),
), "event_time")


def aggregate_spec(table: str, column: str, aggs: list[str]) -> TableSpec:
    fields = [NestedField(1, "window_start", TimestamptzType(), required=True),
              NestedField(2, "window_end", TimestamptzType(), required=True),
              NestedField(3, column, StringType(), required=False)]
    fields += [NestedField(4 + i, name, LongType(), required=True) for i, name in enumerate(aggs)]
    return TableSpec(table, Schema(*fields), "window_start")


def replay_property(stream_key: str, consumer: str) -> str:
    return f"streamapp.replay.{stream_key}|{consumer}"


def state_property(stream_key: str, consumer: str) -> str:
    return f"streamapp.state.{stream_key}|{consumer}"


def snapshot_property(stream_key: str, consumer: str) -> str:
    return f"streamapp.snapshot.{stream_key}|{consumer}"


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
    state: dict | None  # session windows: the snapshot the last commit referenced


class AggregateSink:
    """Commits of one aggregate agent (blocking: call from a thread)."""

    def __init__(self, catalog: Catalog, spec: TableSpec, stream_key: str, consumer: str,
                 crash_at: tuple[str, ...] = (), keep_snapshots: int = 10) -> None:
        self.catalog = catalog
        self.keep_snapshots = keep_snapshots
        self.spec = spec
        self.consumer = consumer
        self.crash_at = crash_at
        self.pos_key = position_property(stream_key, consumer)
        self.replay_key = replay_property(stream_key, consumer)
        self.state_key = state_property(stream_key, consumer)
        self.snapshot_key = snapshot_property(stream_key, consumer)
        self.table: Table | None = None
        self.late: Table | None = None
        self.base: str | None = None  # our position in the aggregate table, as last seen there
        self.late_base: str | None = None  # and in the late table

    def open(self) -> Restored:
        """Create the tables if missing and read back the last commit."""
        self.table = ensure_table(self.catalog, self.spec)
        self.late = ensure_table(self.catalog, LATE_SPEC)
        props = self.table.properties
        self.base = props.get(self.pos_key)
        self.late_base = self.late.properties.get(self.pos_key)
        state = json.loads(props.get(self.state_key, "{}"))
        snapshot = None
        if path := props.get(self.snapshot_key):
            with self.table.io.new_input(path).open() as f:
                snapshot = json.loads(f.read())
        return Restored(position=self.base, replay_after=props.get(self.replay_key, "0-0"),
                        late_position=self.late_base,
                        watermark=state.get("watermark", -math.inf), max_event=state.get("max_event", -math.inf),
                        max_seen_at=state.get("max_seen_at", -math.inf), state=snapshot)

    def commit(self, flush: Flush) -> None:
        if flush.late:
            self._commit_late(flush)
        self._commit_rows(flush)

    def _commit_late(self, flush: Flush) -> None:
        assert self.late is not None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            self.late.refresh()
            committed = self._check(self.late, self.late_base)
            after = entry_id(committed) if committed else (-1, -1)
            late = [r for r in flush.late if entry_id(r["stream_id"]) > after]
            if not late:
                return
            rows = pa.Table.from_pylist([{
                "agent": self.consumer, "stream_id": r["stream_id"], "event_id": r["event"].event_id,
                "event_time": utc(r["event_time"]), "window_start": utc(r["window"].start),
                "window_end": utc(r["window"].end), "key": r["key"], "event": msgspec.json.encode(r["event"]).decode(),
            } for r in late], schema=LATE_SPEC.schema.as_arrow())
            try:
                with self.late.transaction() as tx:
                    tx.append(rows)
                    tx.set_properties({self.pos_key: flush.position})
                    expire_old_snapshots(tx, self.keep_snapshots)
            except CommitFailedException:
                _backoff(LATE_TABLE, attempt)
                continue
            self.late_base = flush.position
            log.info("routed %d late events to %s up to %s", len(late), LATE_TABLE, flush.position)
            crashpoint(self.crash_at, "after_late_commit")
            return
        raise CommitFailedException(f"{LATE_TABLE}: {MAX_ATTEMPTS} commit attempts conflicted")

    def _commit_rows(self, flush: Flush) -> None:
        assert self.table is not None
        name = self.spec.table
        rows = pa.Table.from_pylist(flush.rows, schema=self.spec.schema.as_arrow())
        props = {
            self.pos_key: flush.position,
            self.replay_key: flush.replay_after,
            self.state_key: json.dumps({"watermark": flush.watermark, "max_event": flush.max_event,
                                        "max_seen_at": flush.max_seen_at}),
            WATERMARK: iso(flush.watermark),
            COMPLETE_BEFORE: iso(flush.complete_before),
        }
        if flush.state is not None:
            props[self.snapshot_key] = path = f"{self.table.location()}/streamapp-state/{uuid.uuid4().hex}.json"
            with self.table.io.new_output(path).create() as f:
                f.write(json.dumps(flush.state).encode())
        for attempt in range(1, MAX_ATTEMPTS + 1):
            self.table.refresh()
            self._check(self.table, self.base)
            previous = self.table.properties.get(self.snapshot_key)  # ours: the position is
            crashpoint(self.crash_at, "aggregate_before_commit")
            try:
                with self.table.transaction() as tx:
                    if flush.rewrite:
                        tx.delete(self._rows_of(flush.rewrite))
                    if rows.num_rows:
                        tx.append(rows)
                    tx.set_properties(props)
                    expire_old_snapshots(tx, self.keep_snapshots)
                    crashpoint(self.crash_at, "aggregate_during_write")
            except CommitFailedException:
                _backoff(name, attempt)
                continue
            self.base = flush.position
            if previous and flush.state is not None:
                self.table.io.delete(previous)  # no longer referenced; a kill before this leaves an orphan
            crashpoint(self.crash_at, "aggregate_after_commit")
            log.info("committed %d rows (%d rewritten) to %s up to %s, watermark %s", rows.num_rows,
                     len(flush.rewrite), name, flush.position, iso(flush.watermark))
            return
        raise CommitFailedException(f"{name}: {MAX_ATTEMPTS} commit attempts conflicted")

    def _check(self, table: Table, expected: str | None) -> str | None:
        found = table.properties.get(self.pos_key)
        if found != expected:
            raise StaleState(f"{'.'.join(table.name())}: {self.consumer} expected its position at {expected}, "
                             f"found {found}: another worker committed")
        return found

    def _rows_of(self, windows: list) -> BooleanExpression:
        """The rows of these (window_start, key) pairs. `key = v` is guarded by `key IS NOT NULL`:
        pyiceberg 0.12 keeps the rows for which the negated filter is true, and under a compound
        filter a null key makes `key = v` null, so rows of the null key in the same window were
        deleted too (cf. apache/iceberg-python#954; found by the property test)."""
        column = self.spec.schema.fields[2].name  # the key's
        return functools.reduce(Or, [
            And(EqualTo("window_start", start.isoformat()),
                IsNull(column) if key is None else And(NotNull(column), EqualTo(column, key)))
            for start, key in windows])


def _backoff(table: str, attempt: int) -> None:
    delay = min(2.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.0)
    log.warning("commit to %s conflicted, attempt %d; retrying in %.2fs", table, attempt, delay)
    time.sleep(delay)


async def run_aggregate(windowed: Windowed, table: str, keep: float, aggs: dict[str, Aggregation]) -> None:
    """Restore from the last commit, then read, aggregate and commit until the worker stops;
    start over from the tables when another worker committed under us."""
    group = windowed.group
    stream = group.stream
    settings = stream.app.settings
    sink = AggregateSink(stream.app.catalog, aggregate_spec(table, group.column, list(aggs)), stream.key,
                         stream.consumer, settings.crash_at, settings.keep_snapshots)
    while True:
        try:
            return await _run(windowed, sink, keep, aggs)
        except StaleState as e:
            log.warning("%s; starting over from the committed state", e)


async def _run(windowed: Windowed, sink: AggregateSink, keep: float, aggs: dict[str, Aggregation]) -> None:
    group = windowed.group
    stream = group.stream
    settings = stream.app.settings
    restored = await asyncio.to_thread(sink.open)
    log.info("%s: resuming from its last commit (position %s, watermark %s): re-reading after %s", stream.consumer,
             restored.position, iso(restored.watermark) or "none", restored.replay_after)
    watermark = Watermark(settings.grace_seconds if windowed.grace is None else windowed.grace,
                          value=restored.watermark, max_event=restored.max_event, max_seen_at=restored.max_seen_at)
    agg: Aggregator
    if isinstance(windowed.windows, Sessions):
        agg = SessionAggregator(group.key, group.column, windowed.windows, aggs, watermark, closed=restored.watermark,
                                position=restored.position, hold_until=restored.late_position, state=restored.state)
    else:
        agg = Aggregator(group.key, group.column, windowed.windows, aggs, watermark, keep=keep,
                         closed=restored.watermark, replay_through=restored.position,
                         hold_until=restored.late_position)
    n = settings.window_count
    async for batch in stream.read(restored.replay_after, n, TICK_SECONDS, idle=True):
        for stream_id, event in zip(batch.ids, batch.events):
            agg.add(stream_id, event, event.timestamp.timestamp())
        flush = agg.flush(time.time() if len(batch) < n else None)  # a full batch: a backlog, not idle
        if flush is not None:
            await asyncio.to_thread(sink.commit, flush)
            await stream.ack(flush.replay_after)
