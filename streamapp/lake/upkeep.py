"""Table upkeep the sink does as it goes, so a table committed to every few seconds stays fast.

- Snapshot expiry, in every commit (`expire_old_snapshots`): pyiceberg deep-copies the whole
  table metadata ~20 times per commit, so commit latency grows with the number of snapshots kept
  (measured over 400 commits: flat keeping 10, 2-3x the first commit's keeping 100; 56 ms at the
  first commit and 1.2 s at the 1000th keeping all).
- Compaction of small files (`compact`): a window is one small Parquet file per partition, and
  every file is an entry that each commit's manifests and each reader's plan must carry. When a
  table has gained `COMPACT_EVERY_FILES` files, the small files of each partition are rewritten
  as one, in an overwrite commit that removes exactly those files. The rows are the same rows,
  so exactly-once is untouched; a commit that raced it (another worker's append) makes it fail
  with a conflict and it is tried again later, never applied over data it did not read.
"""

from __future__ import annotations

import collections
import logging
import time

from pyiceberg.expressions import AlwaysTrue
from pyiceberg.io.pyarrow import ArrowScan, _dataframe_to_data_files
from pyiceberg.table import FileScanTask, Table, Transaction
from pyiceberg.table.update.snapshot import ExpireSnapshots

log = logging.getLogger(__name__)

COMPACT_EVERY_FILES = 100  # run compaction when the table gained this many data files
COMPACT_MIN_FILES = 10  # a partition with fewer small files is left alone
SMALL_FILE_BYTES = 64 * 1024 * 1024


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
    """Rewrite each partition's small data files as one; returns how many files were replaced.
    Raises CommitFailedException when another commit got in first (try again later)."""
    started = time.perf_counter()
    groups: dict[object, list[FileScanTask]] = collections.defaultdict(list)
    for task in table.scan().plan_files():
        if not task.delete_files and task.file.file_size_in_bytes < SMALL_FILE_BYTES:
            groups[task.file.partition].append(task)
    groups = {p: tasks for p, tasks in groups.items() if len(tasks) >= COMPACT_MIN_FILES}
    if not groups:
        return 0
    replaced = 0
    with table.transaction() as tx:
        with tx.update_snapshot().overwrite() as rewrite:
            for tasks in groups.values():
                rows = ArrowScan(tx.table_metadata, table.io, tx.table_metadata.schema(), AlwaysTrue()).to_table(tasks)
                for task in tasks:
                    rewrite.delete_data_file(task.file)
                for new_file in _dataframe_to_data_files(tx.table_metadata, rows, table.io, rewrite.commit_uuid):
                    rewrite.append_data_file(new_file)
                replaced += len(tasks)
        expire_old_snapshots(tx, keep_snapshots)
    log.info(
        "compacted %d small files of %s into %d in %.3fs",
        replaced,
        ".".join(table.name()),
        len(groups),
        time.perf_counter() - started,
        extra={"table": ".".join(table.name()), "files": replaced},
    )
    return replaced
