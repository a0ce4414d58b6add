"""Table upkeep the sink does as it goes, so a table committed to every few seconds stays fast.

- Snapshot expiry, in every commit (`expire_old_snapshots`): pyiceberg deep-copies the whole
  table metadata ~20 times per commit, so commit latency grows with the number of snapshots kept
  (measured over 400 commits: flat keeping 10, 2-3x the first commit's keeping 100; 56 ms at the
  first commit and 1.2 s at the 1000th keeping all).
- Compaction of small files (`compact_run`): a commit writes one small Parquet file per partition
  its rows touch, and every file is an entry that each commit's manifests and each reader's plan
  must carry. Every partition holding more than MAX_FILES_PER_PARTITION files, two or more of them
  small, has its small files rewritten as one, in an overwrite commit that removes exactly those
  files: a partition is left with its files over the target size (STREAMAPP_TARGET_FILE_BYTES,
  64 MiB) and at most one under, so at most 2 files for any day under 64 MiB of Parquet. The rows
  of a rewritten file are sorted by the partition's source column (the event time, an aggregate's
  window start), so a reader's time filter skips row groups and files by their statistics. Every
  table the product writes is compacted so: the raw event tables, `events.rejected`, aggregates,
  `events.late` and `events.dead_letter`. A run takes the oldest partitions first, up to
  COMPACT_MAX_FILES files and COMPACT_MAX_BYTES of them, and says how many it left for the next
  run: a backfill that left 1,100 partitions of 3 files each is compacted over several runs of
  bounded cost, not in one that stalls the worker. The rows are the same rows, so exactly-once is
  untouched; a commit that raced it (another worker's append) makes it fail with a conflict and it
  is tried again later, never applied over data it did not read.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any

from pyiceberg.expressions import AlwaysTrue
from pyiceberg.io.pyarrow import ArrowScan
from pyiceberg.table import FileScanTask, Table, TableProperties, Transaction
from pyiceberg.table.update.snapshot import ExpireSnapshots
from pyiceberg.typedef import Record

from streamapp.lake import files
from streamapp.lake.commit import committing

log = logging.getLogger(__name__)

COMPACT_EVERY_FILES = 100  # run compaction when the table gained this many data files
MAX_FILES_PER_PARTITION = 2  # a partition holding more, two or more of them small, is compacted
SMALL_FILE_BYTES = 64 * 1024 * 1024  # the default target file size (STREAMAPP_TARGET_FILE_BYTES)
# One run reads at most this many small files, or bytes of them (at least one partition's two
# smallest): measured ~1 s for 1,000 files of ~270 rows on 2 shared cores.
COMPACT_MAX_FILES = 1000
COMPACT_MAX_BYTES = 128 * 1024 * 1024


# A sink that commits spread windows back to back (a backfill read from a backlog) defers
# compaction until it catches up, or until it has deferred DEFER_FILES files: a run would take
# the time of a commit from the backlog to rewrite files that the next windows add to anyway.
BUSY_SECONDS = 1.0  # a write that began this soon after the last one ended is reading a backlog
SPREAD_FILES = 32  # a write of this many files or more is spread over many partitions
DEFER_FILES = 20_000


@dataclass(frozen=True)
class Compaction:
    """What one compaction run did: files it replaced, files it wrote, and the partitions still
    holding too many files that it left for the next run."""

    replaced: int = 0
    written: int = 0
    left: int = 0


def expire_old_snapshots(tx: Transaction, keep: int) -> None:
    """Stage, in `tx`, the removal of all but the newest `keep` snapshots. The current snapshot
    is the newest and stays, and so does any tagged one (a user keeps a version that way); data
    files stay too, as the current snapshot references them."""
    snapshots = sorted(tx.table_metadata.snapshots, key=lambda s: s.timestamp_ms)
    referenced = {ref.snapshot_id for ref in tx.table_metadata.refs.values()}  # branch heads, tags: kept
    old = [s.snapshot_id for s in snapshots[:-keep] if s.snapshot_id not in referenced]
    if old:
        ExpireSnapshots(tx).by_ids(old).commit()


def snapshot_figure(table: Table, name: str) -> int:
    """A count from the current snapshot's summary ("total-data-files", "added-files-size"...)."""
    snapshot = table.current_snapshot()
    return int(snapshot.summary.get(name) or 0) if snapshot and snapshot.summary else 0


def data_files(table: Table) -> int:
    return snapshot_figure(table, "total-data-files")


def compact(table: Table, keep_snapshots: int) -> int:
    """One compaction run (`compact_run`); returns how many files it replaced."""
    return compact_run(table, keep_snapshots).replaced


def compact_run(
    table: Table,
    keep_snapshots: int,
    *,
    max_files: int = COMPACT_MAX_FILES,
    max_bytes: int = COMPACT_MAX_BYTES,
    target_bytes: int = SMALL_FILE_BYTES,
) -> Compaction:
    """Rewrite the small (under `target_bytes`) data files of the oldest partitions holding more
    than MAX_FILES_PER_PARTITION files as one file each, its rows sorted by the partition's source
    column, reading at most `max_files` files and `max_bytes` bytes. Raises CommitFailedException
    when another commit got in first (try again later)."""
    started = time.perf_counter()
    spec_id = table.metadata.default_spec_id
    held: dict[Record, list[FileScanTask]] = collections.defaultdict(list)
    small: dict[Record, list[FileScanTask]] = collections.defaultdict(list)
    for task in table.scan().plan_files():
        held[task.file.partition].append(task)
        if not task.delete_files and task.file.spec_id == spec_id and task.file.file_size_in_bytes < target_bytes:
            small[task.file.partition].append(task)
    due = sorted(
        (p for p, tasks in small.items() if len(tasks) >= 2 and len(held[p]) > MAX_FILES_PER_PARTITION),
        key=_oldest_first,
    )
    chosen: list[FileScanTask] = []
    size, done_partitions = 0, 0
    for partition in due:
        tasks = sorted(small[partition], key=lambda t: t.file.file_size_in_bytes)
        if chosen and (len(chosen) + len(tasks) > max_files or size + _bytes(tasks) > max_bytes):
            break
        whole = len(tasks)
        if not chosen:  # the oldest partition: as many of its smallest files as the budget takes, two at least
            tasks = tasks[: max(2, max_files)]
            while len(tasks) > 2 and _bytes(tasks) > max_bytes:
                tasks.pop()
        chosen += tasks
        size += _bytes(tasks)
        done_partitions += len(tasks) == whole
    if not chosen:
        return Compaction()
    written = 0
    with table.transaction() as tx:
        if table.properties.get(TableProperties.WRITE_TARGET_FILE_SIZE_BYTES) != str(target_bytes):
            # what a partition over the target is split by (pyiceberg's bin-packing)
            tx.set_properties({TableProperties.WRITE_TARGET_FILE_SIZE_BYTES: str(target_bytes)})
        with tx.update_snapshot().overwrite() as rewrite:
            rows = ArrowScan(tx.table_metadata, table.io, tx.table_metadata.schema(), AlwaysTrue()).to_table(chosen)
            rows = _sorted_by_time(tx, rows)
            for task in chosen:
                rewrite.delete_data_file(task.file)
            values = files.partition_values(tx.table_metadata, rows)
            for new_file in files.data_files(
                tx.table_metadata, table.io, rows, values, rewrite.commit_uuid, final=True
            ):
                rewrite.append_data_file(new_file)
                written += 1
        expire_old_snapshots(tx, keep_snapshots)
    done = Compaction(len(chosen), written, len(due) - done_partitions)
    log.info(
        "compacted %d small files of %s into %d in %.3fs; %d partitions left for the next run",
        done.replaced,
        ".".join(table.name()),
        done.written,
        time.perf_counter() - started,
        done.left,
        extra={"table": ".".join(table.name()), "files": done.replaced, "left": done.left},
    )
    return done


def _sorted_by_time(tx: Transaction, rows: Any) -> Any:
    """`rows` sorted by the column the table is partitioned by (stably), when it has one."""
    metadata = tx.table_metadata
    if len(metadata.spec().fields) != 1:
        return rows
    column = metadata.schema().find_field(metadata.spec().fields[0].source_id).name
    return rows.sort_by([(column, "ascending")]) if column in rows.column_names else rows


def _bytes(tasks: list[FileScanTask]) -> int:
    return sum(t.file.file_size_in_bytes for t in tasks)


def _oldest_first(partition: Record) -> tuple[tuple[bool, Any], ...]:
    """A partition's sort key: its values in order, a null one after any other."""
    return tuple((partition[i] is None, partition[i]) for i in range(len(partition)))


class Upkeep:
    """When one sink's table is compacted: once it gained COMPACT_EVERY_FILES data files since the
    last run, and after every write while the last run left partitions to do, except while the
    sink writes spread windows back to back (see DEFER_FILES). Runs after a commit, in the sink's
    thread: the window is committed already, so a failure is logged and tried again later."""

    def __init__(self, keep_snapshots: int, target_bytes: int = SMALL_FILE_BYTES) -> None:
        self.keep_snapshots = keep_snapshots
        self.target_bytes = target_bytes
        self.compact_at = COMPACT_EVERY_FILES  # the data-file count at which to compact next
        self.pending = False  # the last run left partitions with too many files
        self.deferred = 0  # files written while compaction was due but deferred
        self.last_write = float("-inf")  # time.monotonic() when the last write ended

    def after_write(self, table: Table, files: int, began: float) -> None:
        """Called by the sink after each write (`began`: its time.monotonic() at the start) that
        wrote `files` data files."""
        try:
            if files:
                self._after(table, files, busy=began - self.last_write < BUSY_SECONDS)
        finally:
            self.last_write = time.monotonic()

    def _after(self, table: Table, files: int, busy: bool) -> None:
        if not self.pending and data_files(table) < self.compact_at:
            return
        if busy and files >= SPREAD_FILES and self.deferred + files < DEFER_FILES:
            self.deferred += files
            return
        name = ".".join(table.name())
        try:
            with committing(name):
                self.pending = compact_run(table, self.keep_snapshots, target_bytes=self.target_bytes).left > 0
        except Exception as e:  # noqa: BLE001 - upkeep must never fail a committed window
            log.warning("compacting %s failed (%s); will try again", name, e)
            self.pending = False
        table.refresh()
        self.compact_at = data_files(table) + COMPACT_EVERY_FILES
        self.deferred = 0
