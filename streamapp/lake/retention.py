"""Retention: drop the day partitions of a table older than STREAMAPP_RETENTION says
(`events.*=400d,events.rejected=30d`), in the worker's upkeep (`keep_retention`, hourly) and with
`python -m streamapp retention`.

A table is kept per the rule naming it exactly, else the longest pattern (fnmatch) matching it;
`forever` keeps it (e.g. `events.erasures=forever` beside `events.*=400d`); no rule: forever.
Tables are partitioned by day, so the delete filter is `column < midnight UTC N days ago`, a day
boundary: every file lies wholly before or after it, and pyiceberg drops whole files from the
manifests without reading or rewriting one (a metadata-only delete). The commit goes through
`commit_with_retry` and asserts the snapshot it read, so a worker's append that lands first makes
it conflict and run again on the new table; the stream positions in the table's properties are
not touched. The dropped files stay on disk until snapshot expiry forgets them and the orphan
cleanup removes them.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pyiceberg.catalog import Catalog
from pyiceberg.expressions import LessThan, Reference
from pyiceberg.expressions.literals import literal
from pyiceberg.table import Table
from pyiceberg.transforms import DayTransform

from streamapp.lake.catalog import all_tables
from streamapp.lake.commit import commit_with_retry, table_name
from streamapp.lake.upkeep import expire_old_snapshots

log = logging.getLogger(__name__)

Rules = tuple[tuple[str, int | None], ...]

RETENTION_EVERY_SECONDS = 3600.0  # partitions are days: hourly is soon enough


@dataclass(frozen=True)
class Drop:
    """What retention dropped (or would) from one table."""

    table: str
    days: int
    cutoff: datetime  # rows before this went
    rows: int
    files: int
    partitions: int


def days_for(table: str, rules: Rules) -> int | None:
    """Days `table` keeps: the exact rule, else the longest matching pattern; None: forever."""
    exact = [days for pattern, days in rules if pattern == table]
    if exact:
        return exact[0]
    matching = sorted(((len(p), days) for p, days in rules if fnmatch.fnmatchcase(table, p)), key=lambda m: -m[0])
    return matching[0][1] if matching else None


def cutoff_for(days: int, now: datetime) -> datetime:
    """Midnight UTC `days` days before `now`: every day wholly before it is older than that."""
    return (now.astimezone(UTC) - timedelta(days=days)).replace(hour=0, minute=0, second=0, microsecond=0)


def drop_old(table: Table, days: int, now: datetime, *, keep_snapshots: int, dry_run: bool = False) -> Drop | None:
    """Drop the day partitions of `table` before `cutoff_for(days, now)`; None when the table is
    not partitioned by day of a column (nothing is dropped then)."""
    spec, schema = table.spec(), table.schema()
    if len(spec.fields) != 1 or not isinstance(spec.fields[0].transform, DayTransform):
        log.warning("retention: %s is not partitioned by day; kept whole", table_name(table))
        return None
    column = schema.find_field(spec.fields[0].source_id).name
    cutoff = cutoff_for(days, now)
    old = LessThan(term=Reference(column), value=literal(cutoff.isoformat()))

    def attempt(table: Table) -> Drop:
        tasks = list(table.scan(row_filter=old).plan_files())  # pruned by partition: whole days only
        drop = Drop(
            table_name(table),
            days,
            cutoff,
            sum(t.file.record_count for t in tasks),
            len(tasks),
            len({repr(t.file.partition) for t in tasks}),
        )
        if tasks and not dry_run:
            with table.transaction() as tx:
                tx.delete(old)
                expire_old_snapshots(tx, keep_snapshots)
        return drop

    return commit_with_retry(table, attempt)


def apply_retention(
    catalog: Catalog, rules: Rules, *, keep_snapshots: int, dry_run: bool = False, now: datetime | None = None
) -> list[Drop]:
    """Apply `rules` to every table of the catalog (blocking: call from a thread); what was
    dropped, per table a rule covers."""
    now = now or datetime.now(UTC)
    drops = []
    for table in sorted(all_tables(catalog), key=table_name):
        days = days_for(table_name(table), rules)
        if days is None:
            continue
        drop = drop_old(table, days, now, keep_snapshots=keep_snapshots, dry_run=dry_run)
        if drop is not None:
            drops.append(drop)
            if drop.rows and not dry_run:
                log.info(
                    "retention: dropped %d rows in %d files of %d days before %s from %s",
                    drop.rows,
                    drop.files,
                    drop.partitions,
                    drop.cutoff.date().isoformat(),
                    drop.table,
                    extra={"table": drop.table, "rows": drop.rows, "files": drop.files},
                )
    return drops


async def keep_retention(catalog: Catalog, rules: Rules, keep_snapshots: int, stopping: asyncio.Event) -> None:
    """The worker's retention: at start, then every RETENTION_EVERY_SECONDS, in a thread."""
    if not rules:
        return
    while not stopping.is_set():
        try:
            await asyncio.to_thread(apply_retention, catalog, rules, keep_snapshots=keep_snapshots)
        except Exception as e:  # noqa: BLE001 - upkeep: logged and tried again next time
            log.warning("retention failed (%s); will try again", e)
        try:
            await asyncio.wait_for(stopping.wait(), timeout=RETENTION_EVERY_SECONDS)
        except TimeoutError:
            pass
