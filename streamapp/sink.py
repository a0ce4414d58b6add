"""The Iceberg sink: a window's rows and the stream position it ends at, in one commit.

Exactly once, by construction: the table property `streamapp.position.<stream>|<consumer>` moves
in the same snapshot commit as the rows. Before every attempt the sink refreshes the table and
drops the entries at or before that position, so a window delivered again (after a crash, a
failed ack, a second worker) writes only what is not in the table yet. Commit conflicts are
retried here, never by pyiceberg (whose retry would re-apply the append without this check).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
import time
from typing import TYPE_CHECKING

from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.table import Table

from streamapp import metrics
from streamapp.faults import crashpoint
from streamapp.maintenance import COMPACT_EVERY_FILES, compact, data_files, expire_old_snapshots, snapshot_figure
from streamapp.stream import Window, entry_id

if TYPE_CHECKING:
    from streamapp.app import App

log = logging.getLogger(__name__)

POSITION_PREFIX = "streamapp.position."
MAX_ATTEMPTS = 20


def position_property(stream_key: str, consumer: str) -> str:
    return f"{POSITION_PREFIX}{stream_key}|{consumer}"


def committed_positions(tables: list[Table]) -> dict[str, str]:
    """The highest position committed per stream key, over every consumer of these tables."""
    highest: dict[str, str] = {}
    for table in tables:
        for prop, value in table.properties.items():
            if prop.startswith(POSITION_PREFIX):
                stream = prop[len(POSITION_PREFIX):].rpartition("|")[0]
                if stream not in highest or entry_id(value) > entry_id(highest[stream]):
                    highest[stream] = value
    return highest


class IcebergTable:
    """`app.table("events.clicks")`: where an agent sinks its windows."""

    def __init__(self, app: App, name: str) -> None:
        self.app = app
        self.name = name
        self._table: Table | None = None
        self._compact_at = COMPACT_EVERY_FILES  # the data-file count at which to compact next

    async def append(self, window: Window) -> int:
        """Write the window's rows not yet in the table; returns how many were written.

        Runs in a thread: Parquet encoding and catalog commits would block the event loop.
        """
        return await asyncio.to_thread(self._append, window)

    def _record(self, table: Table, window: Window, start: int, seconds: float) -> None:
        """Metrics and the one log line per commit: rows, Parquet bytes, lag, duration."""
        rows = len(window) - start
        lag = time.time() - min(window.received_us[start:]) / 1e6
        written = snapshot_figure(table, "added-files-size")
        metrics.COMMIT_SECONDS.labels(self.name).observe(seconds)
        metrics.ROWS_COMMITTED.labels(self.name).inc(rows)
        metrics.FRESHNESS_SECONDS.labels(self.name).observe(lag)
        log.info("committed %d rows to %s up to %s in %.3fs", rows, self.name, window.last_id, seconds,
                 extra={"table": self.name, "rows": rows, "bytes": written, "lag_seconds": round(lag, 3),
                        "duration_seconds": round(seconds, 3), "position": window.last_id})

    def _upkeep(self, table: Table) -> None:
        """Compact small files once the table holds COMPACT_EVERY_FILES more than after the last
        compaction. The window is committed already: a failure here is logged and retried later."""
        if data_files(table) < self._compact_at:
            return
        try:
            compact(table, self.app.settings.keep_snapshots)
        except Exception as e:  # noqa: BLE001 - upkeep must never fail a committed window
            log.warning("compacting %s failed (%s); will try again", self.name, e)
        table.refresh()
        self._compact_at = data_files(table) + COMPACT_EVERY_FILES

    def _load(self, catalog: Catalog) -> Table:
        if self._table is None:
            self._table = catalog.load_table(self.name)
        return self._table

    def _append(self, window: Window) -> int:
        crash_at = self.app.settings.crash_at
        table = self._load(self.app.catalog)
        key = position_property(window.stream_key, window.consumer)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            started = time.perf_counter()
            table.refresh()  # also the cure for a table object left stale by a failed commit
            committed = table.properties.get(key)
            after = entry_id(committed) if committed else (-1, -1)
            start = bisect.bisect_right(window.ids, after, key=entry_id)  # ids are in stream order
            if start == len(window):
                log.info("window %s..%s already in %s; skipped", window.ids[0], window.last_id, self.name)
                return 0
            rows = window.to_arrow(start)
            crashpoint(crash_at, "before_commit")
            try:
                with table.transaction() as tx:
                    tx.append(rows)
                    tx.set_properties({key: window.last_id})
                    expire_old_snapshots(tx, self.app.settings.keep_snapshots)
                    crashpoint(crash_at, "during_write")  # data files written, commit not made
            except CommitFailedException as e:
                metrics.COMMIT_CONFLICTS.labels(self.name).inc()
                delay = min(2.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.0)
                log.warning("commit to %s conflicted (%s), attempt %d; retrying in %.2fs", self.name, e, attempt, delay)
                time.sleep(delay)
                continue
            crashpoint(crash_at, "after_commit")
            self._record(table, window, start, time.perf_counter() - started)
            self._upkeep(table)
            return len(window) - start
        raise CommitFailedException(f"{self.name}: {MAX_ATTEMPTS} commit attempts conflicted")
