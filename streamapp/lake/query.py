"""SQL over the lake without a cluster: `python -m streamapp query "SELECT ..."`.

DuckDB runs the query in-process over the tables as the catalog names them (`events.clicks`,
or `clicks` where the name is unique). Each table a query mentions is handed to DuckDB as a
pyarrow dataset over the data files of its current snapshot, read through the table's own file
IO (local disk or S3): DuckDB pushes its column choice and filters into that scan, so Parquet
row groups whose statistics exclude a filter (a day's file, for an `event_time` range) are not read.
A table whose snapshot holds delete files is read whole through pyiceberg instead, which applies
them. DuckDB's own iceberg extension would be downloaded at run time, which an offline machine
cannot do.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
from pyiceberg.catalog import Catalog
from pyiceberg.io.pyarrow import PyArrowFileIO, schema_to_pyarrow
from pyiceberg.table import Table

from streamapp.tabular import text_table


class QueryError(ValueError):
    """The query cannot run: its SQL, or a table it names; the message says which and why."""


@dataclass(frozen=True)
class Result:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def catalog_tables(catalog: Catalog) -> list[tuple[str, str]]:
    """Every (namespace, table) the catalog holds."""
    found = []
    for namespace in catalog.list_namespaces():
        for identifier in catalog.list_tables(namespace):
            found.append((".".join(identifier[:-1]), identifier[-1]))
    return sorted(found)


def _dataset(table: Table) -> ds.Dataset | pa.Table:
    """The current snapshot's rows, as a dataset DuckDB can push filters into where it can."""
    tasks = list(table.scan().plan_files())
    schema = schema_to_pyarrow(table.schema(), include_field_ids=False)
    if any(task.delete_files for task in tasks) or not isinstance(table.io, PyArrowFileIO):
        return table.scan().to_arrow()  # pyiceberg applies the deletes (or reads a file IO pyarrow cannot)
    if not tasks:
        return schema.empty_table()
    scheme, netloc, _ = table.io.parse_location(tasks[0].file.file_path)
    filesystem = table.io.fs_by_scheme(scheme, netloc)
    paths = [table.io.parse_location(task.file.file_path)[2] for task in tasks]
    # by column name: the product never renames a column, and a column added later is null in
    # the files written before it
    return ds.dataset(paths, schema=schema, format="parquet", filesystem=filesystem)


def run(catalog: Catalog, sql: str) -> Result:
    """Run `sql` in DuckDB over the catalog's tables it mentions."""
    try:
        mentioned = duckdb.get_table_names(sql)
    except duckdb.Error as e:
        raise QueryError(f"the SQL does not parse: {_first_line(e)}") from e
    tables = catalog_tables(catalog)
    by_name: dict[str, list[tuple[str, str]]] = {}
    for namespace, name in tables:
        by_name.setdefault(name, []).append((namespace, name))
    con = duckdb.connect()
    try:
        con.execute(
            "SET TimeZone = 'UTC'"
        )  # timestamps print in UTC, as the lake stores them, whatever the machine's zone
        for i, (namespace, name) in enumerate(t for n in sorted(mentioned) for t in by_name.get(n, [])):
            con.register(f"__lake_{i}", _dataset(catalog.load_table((namespace, name))))
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(namespace)}")
            con.execute(f"CREATE VIEW {_quote(namespace)}.{_quote(name)} AS SELECT * FROM __lake_{i}")
            if len(by_name[name]) == 1:  # unqualified, where the name is unique
                con.execute(f"CREATE VIEW main.{_quote(name)} AS SELECT * FROM __lake_{i}")
        try:
            cursor = con.execute(sql)
        except duckdb.CatalogException as e:
            known = ", ".join(f"{ns}.{n}" for ns, n in tables) or "none yet"
            missing = ", ".join(sorted(n for n in mentioned if n not in by_name))
            what = f"no table {missing} in the lake" if missing else _first_line(e)
            raise QueryError(f"{what} (its tables: {known})") from e
        except duckdb.Error as e:
            raise QueryError(f"the query failed: {_first_line(e)}") from e
        columns = [d[0] for d in cursor.description or []]
        return Result(columns, cursor.fetchall())
    finally:
        con.close()


def render(result: Result, fmt: str) -> str:
    """The result as an aligned text table, CSV (with a header) or JSON (an array of objects)."""
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(result.columns)
        writer.writerows([[_text(v, csv_null="") for v in row] for row in result.rows])
        return out.getvalue()
    if fmt == "json":
        return json.dumps([dict(zip(result.columns, row, strict=True)) for row in result.rows], default=_json) + "\n"
    return text_table(result.columns, [[_text(v) for v in row] for row in result.rows])


def _text(value: Any, csv_null: str = "NULL") -> str:
    if value is None:
        return csv_null
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    return str(value)


def _json(value: Any) -> Any:
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)  # decimals, UUIDs, intervals


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
