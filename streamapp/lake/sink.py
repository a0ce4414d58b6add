"""The raw sink: a window's rows and the stream position it ends at, in one Iceberg commit.

Exactly once, by construction: the table property `streamapp.position.<stream>|<consumer>` (see
`streamapp.names`) moves in the same snapshot commit as the rows. Before every attempt the sink
refreshes the table and drops the entries at or before that position, so a window delivered again
(after a crash, a failed ack, a second worker) writes only what is not in the table yet; the
append asserts the snapshot that position was read from, so a commit that got in meanwhile fails
this attempt and the next one reads again.

A window whose rows touch more than `max_files` partitions (a backfill spread over many days) is
committed in several commits of at most that many files each, and only the last one moves the
position: see `streamapp.lake.split`, and `streamapp.lake.files` for how the files are written.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Any

from pyiceberg.catalog import Catalog
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table

from streamapp import metrics, names
from streamapp.entries import BEFORE_ALL, Window, entry_id
from streamapp.faults import crashpoint
from streamapp.lake import erased, files, split
from streamapp.lake.commit import assert_snapshot_read, commit_with_retry
from streamapp.lake.dead_letter import DeadLetters
from streamapp.lake.upkeep import Upkeep, expire_old_snapshots, snapshot_figure
from streamapp.settings import Settings

log = logging.getLogger(__name__)


class TableSink:
    """`app.table("events.clicks")`: where a raw agent sinks its windows.

    `keep_snapshots`: snapshots the table keeps (STREAMAPP_KEEP_SNAPSHOTS); `max_files`: data files
    per commit at most (STREAMAPP_MAX_FILES_PER_COMMIT); `crash_at`: the test crash points
    (STREAMAPP_CRASH_AT)."""

    def __init__(
        self,
        catalog: Catalog,
        name: str,
        *,
        keep_snapshots: int,
        max_files: int = Settings.max_files_per_commit,
        crash_at: tuple[str, ...] = (),
        target_file_bytes: int = Settings.target_file_bytes,
    ) -> None:
        self.catalog = catalog
        self.name = name
        self.keep_snapshots = keep_snapshots
        self.max_files = max_files
        self.crash_at = crash_at
        self._table: Table | None = None
        # The runs of one agent on several shards share this sink in a worker: their commits take
        # turns, as one pyiceberg Table must not be committed through from two threads at once
        # (and they would only conflict with each other).
        self._lock = threading.Lock()
        self.upkeep = Upkeep(keep_snapshots, target_file_bytes)
        self.dead_letters = DeadLetters(catalog, keep_snapshots=keep_snapshots, target_file_bytes=target_file_bytes)

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
        with self._lock:
            return self._write(window)

    def _write(self, window: Window[Any]) -> int:
        key = names.position_property(window.stream_key, window.consumer)
        moved = {key: window.last_id}
        if window.last is not None:  # what a Redis that comes back with older data lost is counted from it
            moved[names.mark_property(window.stream_key, window.consumer)] = str(window.last)

        batch = split.Batch(window)
        lettered = False  # the window's dead letters are in (they keep a position of their own)
        # The files of the last attempt, by what they hold: a commit that conflicted with another
        # writer's (another shard's worker) commits them again instead of encoding the rows anew.
        encoded: tuple[tuple[Any, ...], list[DataFile]] | None = None

        def attempt(table: Table) -> split.Step | None:
            nonlocal lettered, encoded
            started = time.perf_counter()
            batch.load(table.metadata)
            step = split.next_step(table.properties, batch, moved, self.max_files)
            if step is None:
                log.info("window ..%s already in %s; skipped", window.last_id, self.name)
                return None
            if len(step.rows) and (erasures := erased.parse(table.properties)):
                rows, values, dropped = erased.drop_rows(step.rows, step.values, erasures)
                if dropped:  # events of erased users, received before their erasure
                    log.info("dropped %d rows of erased users bound for %s", dropped, self.name)
                    step = dataclasses.replace(step, rows=rows, values=values)
            committed = table.properties.get(key)
            after = entry_id(committed) if committed else BEFORE_ALL
            letters = [] if lettered else [d for d in window.dead + batch.refused if entry_id(d.entry_id) > after]
            if letters:  # first, with their own position: written once, whatever dies when
                self.dead_letters.write(
                    sorted(letters, key=lambda d: entry_id(d.entry_id)),
                    window.stream_key,
                    window.consumer,
                    window.last_id,
                )
            lettered = True
            crashpoint(self.crash_at, "before_commit")
            with table.transaction() as tx:
                if len(step.rows):
                    meta = table.metadata
                    same = (meta.current_schema_id, meta.default_spec_id, step.start, len(step.rows), step.properties)
                    again = encoded[1] if encoded is not None and encoded[0] == same else None
                    made = files.append(tx, table.io, step.rows, step.values, again)
                    encoded = (same, made) if made is not None else None
                else:  # the claims cover the rest: this commit only moves the position
                    assert_snapshot_read(tx)
                tx.set_properties(step.properties)
                if step.removed:
                    tx.remove_properties(*step.removed)
                expire_old_snapshots(tx, self.keep_snapshots)
                crashpoint(self.crash_at, "during_write")  # data files written, commit not made
            crashpoint(self.crash_at, "after_commit")
            self._record(table, window, step, time.perf_counter() - started)
            return step

        began, written, new_files = time.monotonic(), 0, 0
        while (step := commit_with_retry(self.table, attempt)) is not None:
            written, new_files = written + len(step.rows), new_files + (step.partitions if len(step.rows) else 0)
            if step.final:
                break
        self.upkeep.after_write(self.table, new_files, began)
        return written

    def _record(self, table: Table, window: Window[Any], step: split.Step, seconds: float) -> None:
        """Metrics and the one log line per commit: rows, files, Parquet bytes, lag, duration."""
        rows = len(step.rows)
        lag = time.time() - min(window.received_us[step.start :]) / 1e6 if step.start < len(window) else 0.0
        written = snapshot_figure(table, "added-files-size")
        data_files = snapshot_figure(table, "added-data-files")
        metrics.COMMIT_SECONDS.labels(self.name).observe(seconds)
        metrics.ROWS_COMMITTED.labels(self.name).inc(rows)
        metrics.FRESHNESS_SECONDS.labels(self.name).observe(lag)
        log.info(
            "committed %d rows in %d files to %s %s %s in %.3fs",
            rows,
            data_files,
            self.name,
            "up to" if step.final else "(part of a window split by partition) toward",
            window.last_id,
            seconds,
            extra={
                "table": self.name,
                "rows": rows,
                "files": data_files,
                "bytes": written,
                "lag_seconds": round(lag, 3),
                "duration_seconds": round(seconds, 3),
                "position": window.last_id if step.final else None,
            },
        )
