"""`python -m streamapp query`: DuckDB over the lake's tables on a real SQLite catalog and real
Parquet files; every figure checked against pyiceberg's own scan of the same table."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta

import msgspec
import pyarrow as pa
import pytest
from pyiceberg.expressions import EqualTo
from pyiceberg.types import StringType

from models.click import ClickEvent
from streamapp.entries import Window
from streamapp.lake.catalog import ensure_table, open_catalog
from streamapp.lake.query import QueryError, render, run
from streamapp.lake.sink import TableSink
from streamapp.settings import Settings
from tests.conftest import ROOT, clean_env

DAY = datetime(2026, 11, 20, 12, tzinfo=UTC)


def _window(n: int, days: int = 5) -> Window:
    """Window n: 20 clicks on `days` days and two pages, stream ids n-0.. (positions grow with n)."""
    events = [
        ClickEvent(
            x=n,
            y=j,
            event_id=f"w{n}-{j}",
            timestamp=DAY + timedelta(days=j % days),
            page_url=f"https://example.test/{j % 2}",
        )
        for j in range(20)
    ]
    return Window(
        ClickEvent,
        "stream",
        "agent",
        [f"{n + 1}-{j}" for j in range(20)],
        [msgspec.json.encode(e) for e in events],
        [int(DAY.timestamp() * 1e6)] * 20,
    )


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(warehouse=tmp_path / "wh")


@pytest.fixture
def catalog(settings):
    catalog = open_catalog(settings)
    ensure_table(catalog, ClickEvent)
    sink = TableSink(catalog, "events.clicks", keep_snapshots=settings.keep_snapshots)
    for n in range(6):  # several commits: several files per day
        sink.write(_window(n))
    return catalog


def _scan(catalog) -> list[dict]:
    return catalog.load_table("events.clicks").scan().to_arrow().to_pylist()


def test_counts_and_groups_equal_pyiceberg_scan(catalog):
    rows = _scan(catalog)
    result = run(catalog, "SELECT count(*), count(DISTINCT event_id) FROM events.clicks")
    assert result.rows == [(len(rows), len({r["event_id"] for r in rows}))] and len(rows) == 120
    per_page = run(catalog, "SELECT page_url, count(*) AS n FROM clicks GROUP BY 1 ORDER BY 1")  # unqualified
    assert per_page.columns == ["page_url", "n"]
    assert dict(per_page.rows) == dict(Counter(r["page_url"] for r in rows))


def test_a_time_filter_gives_the_rows_of_that_day_only(catalog):
    day = DAY + timedelta(days=2)
    start, end = day.replace(hour=0), day.replace(hour=0) + timedelta(days=1)
    result = run(
        catalog,
        f"SELECT event_id FROM events.clicks WHERE event_time >= TIMESTAMPTZ '{start.isoformat()}' "
        f"AND event_time < TIMESTAMPTZ '{end.isoformat()}' ORDER BY 1",
    )
    expected = sorted(r["event_id"] for r in _scan(catalog) if start <= r["event_time"] < end)
    assert [r[0] for r in result.rows] == expected and len(expected) == 24


def test_a_column_added_later_is_null_in_older_files(catalog):
    table = catalog.load_table("events.clicks")
    with table.update_schema() as update:
        update.add_column("campaign", StringType())
    table = catalog.load_table("events.clicks")
    newer = table.scan(limit=1).to_arrow()
    for name, value in (("campaign", "spring"), ("event_id", "late-1")):
        i = newer.schema.get_field_index(name)
        newer = newer.set_column(i, newer.schema.field(i), pa.array([value], newer.schema.field(i).type))
    table.append(newer)
    result = run(catalog, "SELECT campaign, count(*) FROM events.clicks GROUP BY 1 ORDER BY 1 NULLS FIRST")
    assert result.rows == [(None, 120), ("spring", 1)]


def test_deleted_rows_are_gone(catalog):
    table = catalog.load_table("events.clicks")
    table.delete(EqualTo("event_id", "w3-7"))
    assert run(catalog, "SELECT count(*) FROM events.clicks WHERE event_id = 'w3-7'").rows == [(0,)]
    assert run(catalog, "SELECT count(*) FROM events.clicks").rows == [(len(_scan(catalog)),)] == [(119,)]


def test_unknown_table_and_bad_sql_are_one_clear_error(catalog):
    with pytest.raises(QueryError, match=r"no table nope in the lake \(its tables: events\.clicks\)"):
        run(catalog, "SELECT * FROM events.nope")
    with pytest.raises(QueryError, match="does not parse"):
        run(catalog, "SELEC 1")


def test_formats(catalog):
    result = run(catalog, "SELECT event_id, event_time, NULL AS nothing FROM events.clicks ORDER BY 1 LIMIT 2")
    table = render(result, "table").splitlines()
    assert table[0].split(" | ")[0].strip() == "event_id" and table[-1] == "(2 rows)" and "NULL" in table[2]
    rows = list(csv.DictReader(io.StringIO(render(result, "csv"))))
    assert [r["event_id"] for r in rows] == ["w0-0", "w0-1"] and rows[0]["nothing"] == ""
    assert datetime.fromisoformat(rows[0]["event_time"]) == DAY
    parsed = json.loads(render(result, "json"))
    assert parsed[1]["event_id"] == "w0-1" and parsed[1]["nothing"] is None
    assert datetime.fromisoformat(parsed[1]["event_time"]) == DAY + timedelta(days=1)


def test_the_command(catalog, settings):
    env = {**clean_env(), "STREAMAPP_WAREHOUSE": str(settings.warehouse)}

    def query(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "streamapp", "query", *args]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    done = query("SELECT page_url, count(*) AS n FROM events.clicks GROUP BY 1 ORDER BY 1", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"page_url": f"https://example.test/{i}", "n": 60} for i in (0, 1)]
    failed = query("SELECT * FROM events.nope")
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("streamapp: ")
    assert "events.clicks" in failed.stderr
