"""The warehouse on S3: a real S3 API server on loopback (moto_server), a bucket per test, the real
pipeline and the real upkeep writing through pyiceberg's FileIO; no directory marker objects; a
worker killed mid-write loses and doubles nothing; a storage that cannot be used is one line."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from models.click import ClickEvent
from streamapp import names
from streamapp.lake.catalog import ensure_table, open_catalog
from streamapp.lake.query import run as run_query
from streamapp.lake.sink import TableSink
from streamapp.lake.storage import file_io_properties
from streamapp.lake.upkeep import data_files
from streamapp.names import position_property
from streamapp.settings import Settings, SettingsError
from tests.conftest import ROOT, S3Server, free_port, s3_settings, settings_env, table_rows
from tests.helpers import assert_exactly_once, clicks, send, wait_rows
from tests.test_maintenance import _ids, _window


@pytest.fixture
def s3(settings, s3_server, s3_bucket, redis_server, tmp_path) -> Settings:
    """The test's settings with the warehouse in its own bucket; Redis checked against that lake."""
    s3 = s3_settings(settings, s3_server, s3_bucket, tmp_path / "state")
    redis_server.check(s3)
    return s3


def _assert_objects_only(s3_server: S3Server, bucket: str) -> list[str]:
    """Every key is under the warehouse prefix, and none is a directory marker ("dir/")."""
    keys = s3_server.keys(bucket)
    assert keys and all(k.startswith("lake/") for k in keys), keys[:5]
    assert not [k for k in keys if k.endswith("/")], "directory markers"
    return keys


def test_settings_of_an_s3_warehouse(tmp_path):
    s = Settings.from_env(
        {
            "STREAMAPP_WAREHOUSE": "s3://bkt/some/prefix/",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
            "AWS_ACCESS_KEY_ID": "AKID",
            "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        },
        dotenv=None,
    )
    assert not s.warehouse_is_local and s.warehouse_uri == "s3://bkt/some/prefix"
    assert s.local_dir == s.state_dir == Path("state").resolve()  # ./state: the warehouse is not local
    assert s.catalog_uri == f"sqlite:///{s.state_dir}/catalog.db" and s.redis_dir == s.state_dir / "redis"
    assert "s3cr3t" not in repr(s) and "AKID" not in repr(s)
    assert file_io_properties(s) == {
        "py-io-impl": "streamapp.lake.storage.S3FileIO",
        "s3.endpoint": "http://127.0.0.1:9000",
        "s3.region": "us-east-1",  # an endpoint and no region
        "s3.access-key-id": "AKID",
        "s3.secret-access-key": "s3cr3t",
    }
    given = Settings.from_env(
        {"STREAMAPP_WAREHOUSE": "s3://bkt", "STREAMAPP_STATE_DIR": str(tmp_path / "st")}, dotenv=None
    )
    assert given.state_dir == tmp_path / "st" and given.catalog_uri == f"sqlite:///{tmp_path / 'st'}/catalog.db"
    local = Settings.from_env({"STREAMAPP_WAREHOUSE": str(tmp_path / "wh"), "AWS_REGION": "eu-west-1"}, dotenv=None)
    assert local.warehouse_is_local and local.state_dir == tmp_path / "wh" and file_io_properties(local) == {}
    assert local.warehouse_uri == f"file://{tmp_path / 'wh'}"
    for bad in ("gs://bkt/x", "s3:///x"):
        with pytest.raises(SettingsError, match="STREAMAPP_WAREHOUSE"):
            Settings(warehouse=bad)


async def test_events_land_in_iceberg_on_s3(web, http, s3, s3_server, s3_bucket, spawn, tmp_path):
    spawn("worker", s3)
    await send(http, web, clicks("s", 300), chunk=100)
    await wait_rows(s3, "events.clicks", 300)
    await asyncio.sleep(0.5)  # a double write would land now
    assert_exactly_once(table_rows(s3, "events.clicks"), {f"s{i}" for i in range(300)})
    table = open_catalog(s3).load_table("events.clicks")
    assert table.location().startswith(f"s3://{s3_bucket}/lake/")
    assert (tmp_path / "state" / "catalog.db").is_file()  # the catalog is local state
    assert not list(tmp_path.rglob("*.parquet")) and not list(tmp_path.rglob("*.metadata.json"))
    keys = _assert_objects_only(s3_server, s3_bucket)
    assert any(k.endswith(".parquet") for k in keys) and any(k.endswith(".metadata.json") for k in keys)
    show = spawn("show events.clicks -n 1", s3)
    assert await asyncio.to_thread(show.wait, 60) == 0
    assert "events.clicks: 300 rows" in show.output(), show.output()
    # SQL over the files on S3, through the table's own file IO
    query = "SELECT count(*), count(DISTINCT event_id) FROM events.clicks WHERE x >= 100"
    assert run_query(open_catalog(s3), query).rows == [(200, 200)]


def test_compaction_and_snapshot_expiry_on_s3(s3, s3_server, s3_bucket):
    """tests/test_maintenance.py's first test, shorter, on S3: rows and position kept, snapshots
    expired to 5, a compaction at 100 data files leaves a few."""
    catalog = open_catalog(dataclasses.replace(s3, keep_snapshots=5))
    ensure_table(catalog, ClickEvent)
    sink = TableSink(catalog, "events.clicks", keep_snapshots=5)
    for n in range(60):
        assert sink.write(_window(n)) == 4
    table = sink.table
    table.refresh()
    expected = {f"w{n}-{j}" for n in range(60) for j in range(4)}
    assert_exactly_once([{"event_id": i} for i in _ids(table)], expected)
    assert table.properties[position_property("stream", "agent")] == "60-3"
    assert len(table.metadata.snapshots) == 5
    # Without compaction: 120 files (one per day per window); it ran once the table held 100.
    assert data_files(table) < 30, data_files(table)
    parquet = [k for k in _assert_objects_only(s3_server, s3_bucket) if k.endswith(".parquet")]
    assert len(parquet) > data_files(table)  # the replaced files were written to S3 (orphans now)
    assert sink.write(_window(59)) == 0  # a window delivered again still writes nothing


@pytest.mark.parametrize("crash_at", ["during_write:2", "after_commit:2"])
async def test_worker_killed_mid_write_on_s3_loses_and_doubles_nothing(web, http, s3, spawn, crash_at):
    small = dataclasses.replace(s3, window_count=50)
    await send(http, web, clicks("e", 200), chunk=50)
    doomed = spawn("worker", small, STREAMAPP_CRASH_AT=crash_at)
    assert await asyncio.to_thread(doomed.wait, 60) == -signal.SIGKILL, doomed.output()
    if crash_at.startswith("after_commit"):
        assert len(table_rows(s3, "events.clicks")) == 100
    spawn("worker", small)
    await wait_rows(s3, "events.clicks", 200)
    await asyncio.sleep(1)  # a double write would land now
    assert_exactly_once(table_rows(s3, "events.clicks"), {f"e{i}" for i in range(200)})
    table = open_catalog(s3).load_table("events.clicks")
    assert table.properties[position_property(names.stream("click"), "clicks")]


def _refuse_every_request(server: S3Server, refuse: bool) -> None:
    """moto's own switch: check every request's credentials (none it knows), or none."""
    request = urllib.request.Request(
        server.endpoint + "/moto-api/reset-auth",
        data=b"0" if refuse else b"inf",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(request, timeout=10).read()


async def test_storage_failing_mid_run_loses_and_doubles_nothing(web, http, settings, redis_server, spawn, tmp_path):
    """The store refuses every request for a while (commits fail in any of their steps); the agent
    restarts from its last commit, and once the store answers every event is in the table once."""
    server = S3Server()  # its own: the switch is server-wide
    try:
        server.client().create_bucket(Bucket="flaky")
        s3 = s3_settings(settings, server, "flaky", tmp_path / "state")
        redis_server.check(s3)
        worker = spawn("worker", s3)
        await send(http, web, clicks("a", 100))
        await wait_rows(s3, "events.clicks", 100)
        _refuse_every_request(server, True)
        await send(http, web, clicks("b", 100))
        await asyncio.sleep(2.5)  # windows close and their commits fail
        _refuse_every_request(server, False)
        await wait_rows(s3, "events.clicks", 200, timeout=40)
        await asyncio.sleep(1)  # a double write would land now
        assert_exactly_once(table_rows(s3, "events.clicks"), {f"{p}{i}" for p in "ab" for i in range(100)})
        assert "agent clicks failed" in worker.output() and "ACCESS_DENIED" in worker.output()
    finally:
        server.stop()


def _start(command: str, settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamapp", *command.split()],
        cwd=ROOT,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_line_error(done: subprocess.CompletedProcess[str], *named: str) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamapp: "), done.stderr
    for name in named:
        assert name in lines[0], lines[0]
    return lines[0]


def test_storage_that_cannot_be_used_is_one_line_at_start(s3, s3_bucket, tmp_path):
    wrong_endpoint = dataclasses.replace(s3, aws_endpoint_url=f"http://127.0.0.1:{free_port()}")
    _one_line_error(_start("worker", wrong_endpoint), "AWS_ENDPOINT_URL", "Could not connect")
    no_bucket = dataclasses.replace(s3, warehouse="s3://no-such-bucket/lake", catalog_uri="")
    _one_line_error(_start("create-tables", no_bucket), "STREAMAPP_WAREHOUSE", "does not exist")
    _one_line_error(_start("show events.clicks", no_bucket), "no-such-bucket")
    bad_uri = dataclasses.replace(s3, catalog_uri="")
    env = settings_env(bad_uri, STREAMAPP_WAREHOUSE="gs://bucket/lake")
    done = subprocess.run(
        [sys.executable, "-m", "streamapp", "worker"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    _one_line_error(done, "STREAMAPP_WAREHOUSE", "s3://bucket/prefix")


def test_credentials_refused_are_one_line_at_start(s3, tmp_path):
    """On a server of its own that checks credentials (moto's auth, switched on for every request):
    the keys the settings carry are unknown there."""
    server = S3Server()
    try:
        server.client().create_bucket(Bucket="guarded")
        _refuse_every_request(server, True)
        guarded = s3_settings(s3, server, "guarded", tmp_path / "guarded-state")
        line = _one_line_error(_start("worker", guarded), "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        assert "refused the credentials" in line
    finally:
        server.stop()
