"""`python -m streamapp status` against a real valkey, a real worker and a real catalog: each
agent's lag is what Redis holds past the position its table committed, and each table's figures
are its snapshot's."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

from streamapp.engine.status import gather
from streamapp.lake.catalog import open_catalog
from streamapp.names import stream
from streamapp.redis_client import reader_client
from tests.conftest import ROOT, settings_env, table_rows
from tests.helpers import clicks, send, wait_rows


def _status(settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamapp", "status", *args],
        cwd=ROOT,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_lag_is_what_redis_holds_past_the_committed_position(settings, web, http, spawn, redis_server):
    worker = spawn("worker", settings)
    await send(http, web, clicks("a", 120))
    await wait_rows(settings, "events.clicks", 120)
    worker.stop()  # what comes now waits in Redis
    await send(http, web, clicks("b", 30))
    sent = time.time()
    await asyncio.sleep(0.5)

    client = reader_client(settings)
    try:
        status = await gather(open_catalog(settings), client, [stream("click"), stream("keydown")])
    finally:
        await client.aclose()
    assert status.redis_error is None
    agents = {a.agent: a for a in status.agents}
    raw = agents["clicks"]
    assert (raw.table, raw.stream, raw.lag_events) == ("events.clicks", "click", 30)
    assert raw.lag_bytes is not None and 30 * 40 < raw.lag_bytes < 30 * 200  # each click's JSON
    assert raw.lag_seconds is not None and 0.4 < raw.lag_seconds < time.time() - sent + 1
    keydowns = agents["keydowns"]
    assert (keydowns.lag_events, keydowns.lag_seconds) == (0, 0.0)  # nothing sent: nothing behind
    tables = {t.table: t for t in status.tables}
    clicks_table = tables["events.clicks"]
    assert clicks_table.rows == len(table_rows(settings, "events.clicks")) == 120
    assert clicks_table.files >= 1 and clicks_table.bytes > 0 and clicks_table.snapshots >= 1
    assert clicks_table.last_commit is not None and raw.last_commit == clicks_table.last_commit
    streams = {s.stream: s for s in status.streams}
    assert streams[stream("click")].events == 150

    # the command prints the same, as JSON too; then the worker catches up and the lag is gone
    done = _status(settings, "--json")
    assert done.returncode == 0, done.stderr
    printed = {a["agent"]: a for a in json.loads(done.stdout)["agents"]}
    assert printed["clicks"]["lag_events"] == 30
    spawn("worker", settings)
    await wait_rows(settings, "events.clicks", 150)
    text = _status(settings).stdout
    line = next(row for row in text.splitlines() if row.startswith("clicks "))
    assert [cell.strip() for cell in line.split("|")][1:4] == ["click", "events.clicks", "0"], text
    assert "events.clicks" in text.split("Tables")[1] and "150" in text.split("Tables")[1]


async def test_redis_down_still_prints_the_tables_and_exits_1(settings, web, http, spawn, redis_server):
    worker = spawn("worker", settings)
    await send(http, web, clicks("a", 10))
    await wait_rows(settings, "events.clicks", 10)
    worker.stop()
    redis_server.stop()
    done = _status(settings)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Redis unreachable" in done.stdout and "Traceback" not in done.stdout + done.stderr
    tables = done.stdout.split("Tables")[1]
    assert any(row.startswith("events.clicks") and " 10 " in row for row in tables.splitlines()), done.stdout
