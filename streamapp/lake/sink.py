"""The raw sink: a window's rows and the stream position it ends at, in one Iceberg commit.

Exactly once, by construction: the table property `streamapp.position.<stream>|<consumer>` (see
`streamapp.names`) moves in the same snapshot commit as the rows. Before every attempt the sink
refreshes the table and drops the entries at or before that position, so a window delivered again
(after a crash, a failed ack, a second worker) writes only what is not in the table yet; the
append asserts the snapshot that position was read from, so a commit that got in meanwhile fails
this attempt and the next one reads again.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from typing import Any

import pyarrow as pa
from pyiceberg.catalog import Catalog
from pyiceberg.schema import Schema
from pyiceberg.table import Table

from streamapp import metrics, names
from streamapp.entries import BEFORE_ALL, Window, entry_id
from streamapp.faults import crashpoint
from streamapp.lake.commit import assert_snapshot_read, commit_with_retry
from streamapp.lake.dead_letter import DeadLetters
from streamapp.lake.upkeep import COMPACT_EVERY_FILES, compact, data_files, expire_old_snapshots, snapshot_figure

log = logging.getLogger(__name__)


def as_table_columns(rows: pa.Table, schema: Schema) -> pa.Table:
    """`rows` (in the model's columns) as the table's columns: in its order and with its field ids
    (an evolved table has a column the model gained last, with the next free id), zero-copy."""
    fields = [
        rows.schema.field(f.name).with_metadata({b"PARQUET:field_id": str(f.field_id).encode()})
        for f in schema.fields
        if f.name in rows.column_names
    ]
    return pa.Table.from_arrays([rows.column(f.name) for f in fields], schema=pa.schema(fields))


class TableSink:
    """`app.table("events.clicks")`: where a raw agent sinks its windows.

    `keep_snapshots`: snapshots the table keeps (STREAMAPP_KEEP_SNAPSHOTS); `crash_at`: the test
    crash points (STREAMAPP_CRASH_AT)."""

    def __init__(self, catalog: Catalog, name: str, *, keep_snapshots: int, crash_at: tuple[str, ...] = ()) -> None:
        self.catalog = catalog
        self.name = name
        self.keep_snapshots = keep_snapshots
        self.crash_at = crash_at
        self._table: Table | None = None
        self.dead_letters = DeadLetters(catalog, keep_snapshots=keep_snapshots)
        self._compact_at = COMPACT_EVERY_FILES  # the data-file count at which to compact next

    @property
    def table(self) -> Table:
        """The Iceberg table, loaded on first use."""
        if self._table is None:
            self._table = self.catalog.load_table(self.name)
        return self._table

    async def append(self, window: Window[Any]) -> int:
        """Write the window's rows not yet in the table; returns how many were written.

        Runs `write` in a thread: Parquet encoding and catalog commits would block the event loop.
        """
        return await asyncio.to_thread(self.write, window)

    def write(self, window: Window[Any]) -> int:
        """`append`, blocking: commit the rows of `window` after the table's position for its
        stream and consumer, with the position it ends at; returns how many rows were written."""
        key = names.position_property(window.stream_key, window.consumer)
        moved = {key: window.last_id}
        if window.last is not None:  # what a Redis that comes back with older data lost is counted from it
            moved[names.mark_property(window.stream_key, window.consumer)] = str(window.last)

        def attempt(table: Table) -> int:
            started = time.perf_counter()
            committed = table.properties.get(key)
            after = entry_id(committed) if committed else BEFORE_ALL
            start = bisect.bisect_right(window.ids, after, key=entry_id)  # ids are in stream order
            dead = [d for d in window.dead if entry_id(d.entry_id) > after]
            if start == len(window) and not dead:
                log.info("window ..%s already in %s; skipped", window.last_id, self.name)
                return 0
            schema = table.schema()
            required = frozenset(f.name for f in schema.fields if f.required)
            rows, refused = window.rows(start, required)
            rows = as_table_columns(rows, schema)
            if dead or refused:  # first, with their own position: written once, whatever dies when
                self.dead_letters.write(
                    sorted(dead + refused, key=lambda d: entry_id(d.entry_id)),
                    window.stream_key,
                    window.consumer,
                    window.last_id,
                )
            crashpoint(self.crash_at, "before_commit")
            with table.transaction() as tx:
                if rows.num_rows:
                    tx.append(rows)
                else:
                    assert_snapshot_read(tx)  # every position move is a snapshot: compare-and-set
                tx.set_properties(moved)
                expire_old_snapshots(tx, self.keep_snapshots)
                crashpoint(self.crash_at, "during_write")  # data files written, commit not made
            crashpoint(self.crash_at, "after_commit")
            self._record(table, window, start, rows.num_rows, time.perf_counter() - started)
            return rows.num_rows

        written = commit_with_retry(self.table, attempt)
        if written:  # upkeep after a window of rows
            self._upkeep(self.table)
        return written

    def _record(self, table: Table, window: Window[Any], start: int, rows: int, seconds: float) -> None:
        """Metrics and the one log line per commit: rows, Parquet bytes, lag, duration."""
        lag = time.time() - min(window.received_us[start:]) / 1e6 if start < len(window) else 0.0
        written = snapshot_figure(table, "added-files-size")
        metrics.COMMIT_SECONDS.labels(self.name).observe(seconds)
        metrics.ROWS_COMMITTED.labels(self.name).inc(rows)
        metrics.FRESHNESS_SECONDS.labels(self.name).observe(lag)
        log.info(
            "committed %d rows to %s up to %s in %.3fs",
            rows,
            self.name,
            window.last_id,
            seconds,
            extra={
                "table": self.name,
                "rows": rows,
                "bytes": written,
                "lag_seconds": round(lag, 3),
                "duration_seconds": round(seconds, 3),
                "position": window.last_id,
            },
        )

    def _upkeep(self, table: Table) -> None:
        """Compact small files once the table holds COMPACT_EVERY_FILES more than after the last
        compaction. The window is committed already: a failure here is logged and retried later."""
        if data_files(table) < self._compact_at:
            return
        try:
            compact(table, self.keep_snapshots)
        except Exception as e:  # noqa: BLE001 - upkeep must never fail a committed window
            log.warning("compacting %s failed (%s); will try again", self.name, e)
        table.refresh()
        self._compact_at = data_files(table) + COMPACT_EVERY_FILES
