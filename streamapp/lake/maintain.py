"""Storage upkeep over every table of the catalog: orphan files and old metadata removed
(`streamapp.lake.orphans`), by `python -m streamapp maintain` and periodically by the worker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.table import Table, TableProperties

from streamapp.lake.catalog import all_tables
from streamapp.lake.commit import committing, table_name
from streamapp.lake.orphans import Cleanup, clean
from streamapp.settings import Settings

log = logging.getLogger(__name__)


class UnknownTable(LookupError):
    """`maintain TABLE` named no table of the catalog; the message lists those there are."""


def align_metadata_max(table: Table, keep_metadata: int) -> None:
    """Have pyiceberg itself keep `keep_metadata` previous metadata files after each commit."""
    key = TableProperties.METADATA_PREVIOUS_VERSIONS_MAX
    if table.properties.get(key) == str(keep_metadata):
        return
    with committing(table_name(table)), table.transaction() as tx:  # sets one property, over the latest
        tx.set_properties({key: str(keep_metadata)})


def maintain(
    catalog: Catalog,
    settings: Settings,
    only: str | None = None,
    *,
    dry_run: bool = False,
    stop: Callable[[], bool] = lambda: False,
) -> list[Cleanup]:
    """Clean every table (or the table named `only`), until `stop()` says to stop. A table that
    fails is logged and reported as skipped; the others are still cleaned. Blocking: call from a
    thread."""
    tables = all_tables(catalog)
    if only is not None:
        chosen = [t for t in tables if table_name(t) == only]
        if not chosen:
            known = ", ".join(sorted(table_name(t) for t in tables)) or "none"
            raise UnknownTable(f"no table named {only!r}; the tables are: {known}")
    else:
        chosen = tables
    done = []
    for table in chosen:
        if stop():
            break
        name = table_name(table)
        # A table whose location lies under this one's (none in streamapp's layout) keeps its files.
        nested = [t.location() for t in tables if t is not table and t.location().startswith(table.location() + "/")]
        try:
            if not dry_run:
                align_metadata_max(table, settings.keep_metadata)
            done.append(
                clean(
                    table,
                    keep_metadata=settings.keep_metadata,
                    min_age=settings.orphan_min_age_seconds,
                    dry_run=dry_run,
                    exclude=nested,
                )
            )
        except (OSError, NoSuchTableError, ValueError) as e:
            log.warning("cleaning %s failed: %s", name, e)
            done.append(Cleanup(name, skipped=f"failed: {e}"))
    return done


async def keep_clean(catalog: Catalog, settings: Settings, stopping: asyncio.Event) -> None:
    """The worker's task: `maintain` at start and every STREAMAPP_ORPHAN_INTERVAL_SECONDS, in a
    thread, until `stopping` is set. Never fails the worker: a failed run is logged and retried at
    the next interval."""
    interval = settings.orphan_interval_seconds
    if not interval:
        return
    while not stopping.is_set():
        try:
            await asyncio.to_thread(maintain, catalog, settings, stop=stopping.is_set)
        except Exception as e:  # noqa: BLE001 - upkeep must never stop the worker
            log.warning("storage upkeep failed (%s); will try again in %gs", e, interval)
        try:
            await asyncio.wait_for(stopping.wait(), timeout=interval)
        except TimeoutError:
            pass
