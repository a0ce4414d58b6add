"""The Iceberg catalog and the tables the models declare: created idempotently, evolved by name."""

from __future__ import annotations

import logging

from pyiceberg.catalog import Catalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.table import Table, TableProperties

from streamapp.model import day_partition
from streamapp.settings import Settings

log = logging.getLogger(__name__)

CATALOG_NAME = "streamapp"

TABLE_PROPERTIES = {
    # pyiceberg's own retry re-applies an append without re-checking our stream position and
    # double-commits under contention: the sink refreshes, re-checks and retries itself.
    TableProperties.COMMIT_NUM_RETRIES: "0",
    # Keep the metadata folder from growing by one file per window forever.
    TableProperties.METADATA_DELETE_AFTER_COMMIT_ENABLED: "true",
    TableProperties.METADATA_PREVIOUS_VERSIONS_MAX: "20",
}


def open_catalog(settings: Settings) -> Catalog:
    settings.warehouse.mkdir(parents=True, exist_ok=True)
    return SqlCatalog(CATALOG_NAME, uri=settings.catalog_uri, warehouse=f"file://{settings.warehouse}")


def ensure_table(catalog: Catalog, model: type) -> Table:
    """Create `model.table` if missing; add columns the model gained since. Safe to run concurrently."""
    name = model.table
    schema = model.iceberg_schema()
    catalog.create_namespace_if_not_exists(name.rsplit(".", 1)[0])
    try:
        table = catalog.load_table(name)
    except NoSuchTableError:
        table = catalog.create_table_if_not_exists(
            name, schema=schema, partition_spec=day_partition(schema, model.partition_column),
            properties=TABLE_PROPERTIES,
        )
        log.info("created table %s", name)
        return table
    missing = [f.name for f in schema.fields if f.name not in table.schema().column_names]
    if missing:
        with table.update_schema() as update:
            update.union_by_name(schema)
        log.info("added columns %s to %s", ", ".join(missing), name)
    if any(table.properties.get(k) != v for k, v in TABLE_PROPERTIES.items()):
        with table.transaction() as tx:
            tx.set_properties(TABLE_PROPERTIES)
    return table
