"""The Iceberg catalog and its tables: opened and created idempotently, evolved by name, and the
stream positions they hold."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pyiceberg.catalog import Catalog, list_catalogs, load_catalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import CommitFailedException, NoSuchTableError
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import Table, TableProperties
from pyiceberg.transforms import DayTransform
from sqlalchemy.exc import DBAPIError

from streamapp import names
from streamapp.entries import entry_id
from streamapp.lake import storage
from streamapp.settings import CatalogError, Settings
from streamapp.table_model import TableSchema

log = logging.getLogger(__name__)

T = TypeVar("T")

CATALOG_NAME = "streamapp"
# A PostgreSQL catalog that does not answer fails the start (or the commit) after this long.
CONNECT_TIMEOUT_SECONDS = 10

TABLE_PROPERTIES = {
    # pyiceberg's own retry re-applies an append without re-checking our stream position and
    # double-commits under contention: the sink refreshes, re-checks and retries itself.
    TableProperties.COMMIT_NUM_RETRIES: "0",
    # Keep the metadata folder from growing by one file per window forever: pyiceberg deletes the
    # metadata files that fall off the log after each commit (the orphan cleanup those of failed
    # commits, and sets previous-versions-max to STREAMAPP_KEEP_METADATA: not checked here, so a
    # table does not flip between the two).
    TableProperties.METADATA_DELETE_AFTER_COMMIT_ENABLED: "true",
}
CREATE_PROPERTIES = {**TABLE_PROPERTIES, TableProperties.METADATA_PREVIOUS_VERSIONS_MAX: str(Settings.keep_metadata)}


def _retry_lost_race(
    step: Callable[[], T], lost: type[Exception] | tuple[type[Exception], ...], attempts: int = 5
) -> T:
    """Run `step`; when it loses a race to another process (`lost`), run it again against what
    that process created, a few times with a short backoff."""
    for attempt in range(1, attempts):
        try:
            return step()
        except lost:
            time.sleep(0.05 * attempt)
    return step()


def open_catalog(settings: Settings) -> Catalog:
    """The catalog, the first of: STREAMAPP_CATALOG_URI (a SQL catalog: SQLite or PostgreSQL); a
    catalog named "streamapp" in pyiceberg's own configuration (`.pyiceberg.yaml`,
    `PYICEBERG_CATALOG__STREAMAPP__*`), e.g. a REST catalog; the SQLite file in the warehouse.

    It connects, so it blocks: the worker calls it in a thread. Raises CatalogError, naming the
    setting, when the catalog cannot be opened."""
    if settings.catalog_from_pyiceberg and CATALOG_NAME in list_catalogs():
        try:
            return load_catalog(CATALOG_NAME)
        except Exception as e:  # any catalog implementation, any failure: one line
            raise CatalogError(
                f"pyiceberg's catalog {CATALOG_NAME!r} (.pyiceberg.yaml, PYICEBERG_CATALOG__STREAMAPP__*) "
                f"cannot be opened: {_one_line(e)}"
            ) from e
    uri = settings.catalog_uri
    setting = "STREAMAPP_WAREHOUSE" if uri == settings.default_catalog_uri else f"STREAMAPP_CATALOG_URI={_redact(uri)}"
    # the tables' files go to the warehouse (a local directory or S3, see `streamapp.lake.storage`)
    properties = {"uri": uri, "warehouse": settings.warehouse_uri, **storage.file_io_properties(settings)}
    if uri.startswith("postgresql"):
        # A connection the pool kept across a restart of PostgreSQL is dead: test it on checkout
        # rather than fail the commit that gets it; and give up on a server that never answers.
        properties["pool_pre_ping"] = "true"
        if "connect_timeout=" not in uri:
            properties["uri"] = f"{uri}{'&' if '?' in uri else '?'}connect_timeout={CONNECT_TIMEOUT_SECONDS}"
    try:
        if isinstance(settings.warehouse, Path):
            settings.warehouse.mkdir(parents=True, exist_ok=True)
        if uri.startswith("sqlite:///"):  # SQLite makes the file, not its directory
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # Opening a new one creates its tables, which processes starting together race to do: the
        # losers see "already exists" errors and open it again.
        return _retry_lost_race(lambda: SqlCatalog(CATALOG_NAME, **properties), DBAPIError)
    except Exception as e:  # a bad URI, a missing driver, no server: one line
        raise CatalogError(f"{setting}: cannot open the catalog: {_one_line(e)}") from e


def _redact(uri: str) -> str:
    """The URI without its password."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", uri)


def _one_line(e: BaseException) -> str:
    """The first line of what the driver said (SQLAlchemy adds its own lines and a link)."""
    cause = getattr(e, "orig", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}".rstrip(": ")


def _ensure_namespace(catalog: Catalog, namespace: str) -> None:
    """Create the namespace unless it exists. Two workers starting together race here, and the SQL
    catalog reports the loser as a unique-constraint error, not NamespaceAlreadyExistsError."""
    try:
        catalog.create_namespace_if_not_exists(namespace)
    except Exception:
        if not catalog.namespace_exists(namespace):
            raise


@dataclass(frozen=True)
class TableSpec:
    """A table no event model declares (an aggregate's, `events.late`, `events.dead_letter`), as
    `ensure_table` takes it."""

    table: str
    schema: Schema
    partition_column: str

    def iceberg_schema(self) -> Schema:
        return self.schema


def day_partition(schema: Schema, column: str) -> PartitionSpec:
    """Partition by day(column): readers prune by date, files stay a day's worth at most."""
    source = schema.find_field(column)
    return PartitionSpec(
        PartitionField(source_id=source.field_id, field_id=1000, transform=DayTransform(), name=f"{column}_day")
    )


def ensure_table(catalog: Catalog, model: TableSchema) -> Table:
    """Create `model.table` if missing; add columns the model gained since (optional), make columns it
    lost optional. Safe to run concurrently:
    a step that lost a race to another process is retried against what that process committed."""
    return _retry_lost_race(lambda: _ensure_table(catalog, model), CommitFailedException)


def _ensure_table(catalog: Catalog, model: TableSchema) -> Table:
    name = model.table
    schema = model.iceberg_schema()
    _ensure_namespace(catalog, name.rsplit(".", 1)[0])
    try:
        table = catalog.load_table(name)
    except NoSuchTableError:
        table = catalog.create_table_if_not_exists(
            name,
            schema=schema,
            partition_spec=day_partition(schema, model.partition_column),
            properties=CREATE_PROPERTIES,
        )
        log.info("created table %s", name)
        return table
    # The model changed: a column it gained is added optional (the rows already there, and the
    # entries still in Redis from before, have none: new events must have it, old ones keep
    # null); a required column it lost becomes optional (new events have none).
    current = table.schema()
    missing = [f for f in schema.fields if f.name not in current.column_names]
    dropped = [f.name for f in current.fields if f.required and f.name not in schema.column_names]
    if missing or dropped:
        with table.update_schema() as update:
            for f in missing:
                update.add_column(f.name, f.field_type, doc=f.doc, required=False)
            for column in dropped:
                update.make_column_optional(column)
        if missing:
            log.info("added columns %s to %s", ", ".join(f.name for f in missing), name)
        if dropped:
            log.info("made columns %s of %s optional: the model no longer has them", ", ".join(dropped), name)
    if any(table.properties.get(k) != v for k, v in TABLE_PROPERTIES.items()):
        with table.transaction() as tx:
            tx.set_properties(TABLE_PROPERTIES)
    return table


def all_tables(catalog: Catalog) -> list[Table]:
    """Every table of the catalog, those aggregate agents created included."""
    return [catalog.load_table(t) for ns in catalog.list_namespaces() for t in catalog.list_tables(ns)]


def committed_positions(tables: list[Table]) -> dict[str, str]:
    """The highest position committed per stream key, over every consumer of these tables: a
    position, or the last entry of a window committed halfway (whose claims hold rows up to it,
    see `streamapp.lake.split`), so that no new entry can take an id a sink takes as written."""
    highest: dict[str, str] = {}
    for table in tables:
        for prop, value in table.properties.items():
            found: list[str] = []
            if (stream := names.position_stream(prop)) is not None:
                found = [value]
            elif (stream := names.split_stream(prop)) is not None:
                found = [x for x, _ in json.loads(value)]
            for position in found:
                assert stream is not None  # found is empty otherwise
                if stream not in highest or entry_id(position) > entry_id(highest[stream]):
                    highest[stream] = position
    return highest
