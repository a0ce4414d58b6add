"""The catalog on a real PostgreSQL: the pipeline end to end, workers racing on one table, a restart
of PostgreSQL under a running worker; which catalog is chosen (STREAMAPP_CATALOG_URI, then
pyiceberg's own configuration, then the SQLite file); and the one-line errors of a catalog that
cannot be opened."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from streamapp import names
from streamapp.lake.catalog import open_catalog
from streamapp.names import position_property
from streamapp.settings import Settings
from tests.conftest import ROOT, clean_env, free_port, table_rows, wait_until
from tests.helpers import assert_exactly_once, clicks, run_without_lease, send, wait_rows


@pytest.fixture
def pg(settings, pg_uri) -> Settings:
    """The test's settings with the catalog in a fresh PostgreSQL database."""
    return dataclasses.replace(settings, catalog_uri=pg_uri)


def catalog_tables(uri: str) -> set[str]:
    """The tables a PostgreSQL catalog database lists, read with SQL: the catalog really is there."""
    dsn = uri.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT table_namespace || '.' || table_name FROM iceberg_tables").fetchall()
    return {r[0] for r in rows}


async def test_the_pipeline_end_to_end_on_postgresql(web, http, pg, spawn):
    spawn("worker", pg)
    events = clicks("e", 200)
    await send(http, web, events)
    await wait_rows(pg, "events.clicks", 200)
    await asyncio.sleep(0.5)  # a double write would land now
    assert_exactly_once(table_rows(pg, "events.clicks"), {e["event_id"] for e in events})
    assert {"events.clicks", "events.keydowns", "events.rejected"} <= catalog_tables(pg.catalog_uri)


async def test_two_runs_racing_on_postgresql_write_each_event_once(web, http, pg, spawn, redis_server, caplog):
    """The worker and a run without the lease (a worker paused past it) run the same agent on the
    same shard, read the whole stream and race to commit each window; PostgreSQL's compare-and-set
    on the metadata location fails the loser, which refreshes, finds the position moved and writes
    only what is not in the table yet."""
    racing = dataclasses.replace(pg, window_count=30, window_seconds=0.1)
    a = spawn("worker --agent clicks", racing)
    await asyncio.to_thread(wait_until, lambda: "leases: acquired clicks/0" in a.output(), 20, 0.1, "the lease")
    caplog.set_level("INFO", logger="streamapp")
    stopping = asyncio.Event()
    other = asyncio.create_task(run_without_lease(racing, "clicks", "events.clicks", stopping))
    sent: set[str] = set()
    try:
        for batch in range(20):
            events = clicks(f"p{batch}-", 30)
            await send(http, web, events)
            sent.update(e["event_id"] for e in events)
            await asyncio.sleep(0.05)
        await wait_rows(pg, "events.clicks", len(sent), timeout=60)
        await asyncio.sleep(1.5)
    finally:
        stopping.set()
        await other
    assert_exactly_once(table_rows(pg, "events.clicks"), sent)
    logs = a.output() + caplog.text
    assert "Traceback" not in logs
    assert "conflicted" in logs or "already in events.clicks; skipped" in logs  # the race was real
    table = open_catalog(pg).load_table("events.clicks")
    [(last_id, _)] = redis_server.client().xrevrange(names.stream("click"), count=1)
    assert table.properties[position_property(names.stream("click"), "clicks")] == last_id.decode()


async def test_a_restart_of_postgresql_under_a_running_worker_loses_and_doubles_nothing(web, http, pg, spawn, postgres):
    worker = spawn("worker --agent clicks", dataclasses.replace(pg, window_seconds=0.2))
    sent: set[str] = set()

    async def batch(n: int) -> None:
        events = clicks(f"r{n}-", 20)
        await send(http, web, events)
        sent.update(e["event_id"] for e in events)

    for n in range(5):
        await batch(n)
        await asyncio.sleep(0.1)
    await wait_rows(pg, "events.clicks", len(sent))
    await asyncio.to_thread(postgres.stop)
    for n in range(5, 10):  # windows the worker cannot commit while it is down
        await batch(n)
        await asyncio.sleep(0.3)
    await asyncio.to_thread(postgres.start)
    for n in range(10, 15):
        await batch(n)
        await asyncio.sleep(0.1)
    await wait_rows(pg, "events.clicks", len(sent), timeout=60)
    await asyncio.sleep(1)
    assert_exactly_once(table_rows(pg, "events.clicks"), sent)
    assert worker.proc.poll() is None, worker.output()  # it rode the restart out
    assert "agent clicks failed" in worker.output()  # it did meet the restart


def test_a_catalog_opened_before_a_restart_of_postgresql_works_after_it(tmp_path, pg_uri, postgres):
    """Its pooled connection died with the server: tested before use and replaced (pool_pre_ping),
    it fails no commit."""
    catalog = open_catalog(Settings(warehouse=tmp_path, catalog_uri=pg_uri))
    catalog.create_namespace("events")
    postgres.stop()
    postgres.start()
    assert catalog.list_namespaces() == [("events",)]


def run_cli(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamapp", *command.split()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def cli_env(warehouse: Path, **extra: str) -> dict[str, str]:
    """No Redis is reached: the catalog is opened first, and fails first."""
    return {**clean_env(), "STREAMAPP_WAREHOUSE": str(warehouse), "REDIS_URL": "redis://127.0.0.1:1/0", **extra}


def test_a_catalog_that_cannot_be_opened_is_one_line_naming_the_setting(tmp_path, postgres):
    nobody = f"postgresql+psycopg://streamapp:s3cret@127.0.0.1:{free_port()}/x"
    no_database = postgres.uri("no_such_database")
    cases = [
        ("worker", {"STREAMAPP_CATALOG_URI": nobody}, "STREAMAPP_CATALOG_URI=postgresql+psycopg://streamapp:***@"),
        ("show events.clicks", {"STREAMAPP_CATALOG_URI": no_database}, '"no_such_database" does not exist'),
        ("create-tables", {"STREAMAPP_CATALOG_URI": "postgres://x"}, "STREAMAPP_CATALOG_URI=postgres://x"),
        ("worker", {"PYICEBERG_CATALOG__STREAMAPP__TYPE": "rest"}, "PYICEBERG_CATALOG__STREAMAPP__URI"),
    ]
    for command, extra, said in cases:
        done = run_cli(command, cli_env(tmp_path / "wh", **extra))
        out = done.stdout + done.stderr
        assert done.returncode == 2, (command, extra, out)
        assert out.startswith("streamapp: ") and out.count("\n") == 1, out  # one line, no traceback
        assert said in out and "s3cret" not in out, out


def test_the_catalog_uri_wins_over_pyiceberg_configuration_which_wins_over_the_sqlite_file(tmp_path, pg_uri):
    # pyiceberg's .pyiceberg.yaml names a PostgreSQL catalog "streamapp": it is used.
    home = tmp_path / "pyiceberg"
    home.mkdir()
    (home / ".pyiceberg.yaml").write_text(
        f"catalog:\n  streamapp:\n    uri: {pg_uri}\n    warehouse: file://{tmp_path / 'pg-wh'}\n"
    )
    done = run_cli("create-tables", cli_env(tmp_path / "wh", PYICEBERG_HOME=str(home)))
    assert done.returncode == 0, done.stderr
    assert {"events.clicks", "events.keydowns", "events.rejected"} <= catalog_tables(pg_uri)
    assert not (tmp_path / "wh" / "catalog.db").exists()
    # STREAMAPP_CATALOG_URI wins over it (here given as PYICEBERG_CATALOG__STREAMAPP__* variables).
    sqlite = f"sqlite:///{tmp_path / 'chosen.db'}"
    env = cli_env(tmp_path / "wh", STREAMAPP_CATALOG_URI=sqlite, PYICEBERG_CATALOG__STREAMAPP__URI="http://127.0.0.1:1")
    done = run_cli("create-tables", env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "chosen.db").exists() and not (tmp_path / "wh" / "catalog.db").exists()
    # Neither: the SQLite file in the warehouse (tests.isolation's stand-in configuration names none).
    done = run_cli("create-tables", cli_env(tmp_path / "wh"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "wh" / "catalog.db").exists()
