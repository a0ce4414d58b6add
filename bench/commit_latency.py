"""Child process of bench/run.py: time N successive small commits to one Iceberg table.

    python bench/commit_latency.py streamapp N ROWS   (streamapp's venv, cwd = the repo root)
    python bench/commit_latency.py seed N ROWS        (the seed's venv, cwd = the seed's directory)

With --stepped it commits only when a line arrives on stdin and prints each duration as it goes:
bench/run.py runs both series at once that way, alternating commit by commit, so that the load of
a shared machine hits both alike.

`streamapp` drives `app.table("events.clicks").append(window)` (streamapp/lake/sink.py, whatever it does
today: snapshot expiry, manifest merging...) with windows of ROWS clicks at increasing stream
positions. `seed` repeats the seed loader's pattern: one `table.append(pyarrow table)` per batch on a
table object loaded once. Both write to $STREAMAPP_WAREHOUSE. Progress goes to stderr; the last
line of stdout is a JSON list of the commit durations in seconds.

Imports nothing from streamapp at module level: the seed's venv runs this file too.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime

STEPPED = "--stepped" in sys.argv  # wait for a line on stdin before each commit; print each duration


def step() -> None:
    if STEPPED and not sys.stdin.readline():
        sys.exit(0)  # the parent went away


def progress(name: str, i: int, n: int, seconds: float, started: float) -> None:
    if STEPPED:
        print(seconds, flush=True)
    if i == 1 or i == n or i % max(1, n // 20) == 0:
        print(
            f"  {name} commit {i}/{n}: {seconds * 1000:.0f} ms (elapsed {time.monotonic() - started:.0f}s)",
            file=sys.stderr,
            flush=True,
        )


def run_streamapp(n: int, rows: int) -> list[float]:
    import asyncio

    sys.path.insert(0, os.getcwd())
    import msgspec

    from models.click import ClickEvent
    from streamapp import Window, app, names
    from streamapp.engine.worker import create_tables
    from streamapp.lake.catalog import open_catalog
    from streamapp.settings import Settings

    app.configure(Settings.from_env(dotenv=None))
    app.catalog = open_catalog(app.settings)
    create_tables(app, app.catalog)
    table = app.table(ClickEvent.table)
    stream_key = names.stream(ClickEvent.type_name())
    base_ms = int(time.time() * 1000)

    async def loop() -> list[float]:
        out, started = [], time.monotonic()
        for i in range(n):
            now = datetime.now(UTC)
            events = [
                ClickEvent(event_id=f"c-{i}-{j}", timestamp=now, page_url="https://example.test/", x=j, y=i)
                for j in range(rows)
            ]
            ids = [f"{base_ms + i}-{j}" for j in range(rows)]
            payloads = [msgspec.json.encode(e) for e in events]  # a window holds the stream's JSON
            window = Window(ClickEvent, stream_key, "bench-commits", ids, payloads, [int(now.timestamp() * 1e6)] * rows)
            step()
            t = time.perf_counter()
            await table.append(window)
            out.append(time.perf_counter() - t)
            progress("streamapp", i + 1, n, out[-1], started)
        return out

    return asyncio.run(loop())


def run_seed(n: int, rows: int) -> list[float]:
    import pyarrow as pa

    sys.path.insert(0, os.getcwd())
    from services.iceberg_catalog import BY_DAY, TABLES, get_catalog

    catalog = get_catalog()
    catalog.create_namespace_if_not_exists("events")
    name, schema = TABLES["click"]
    table = catalog.create_table_if_not_exists(name, schema=schema, partition_spec=BY_DAY)
    arrow_schema = table.schema().as_arrow()
    out, started = [], time.monotonic()
    for i in range(n):
        now = datetime.now(UTC)
        batch = [
            {
                "event_id": f"c-{i}-{j}",
                "event_time": now,
                "received_at": now,
                "user_id": None,
                "session_id": None,
                "page_url": "https://example.test/",
                "target": None,
                "properties": None,
                "x": j,
                "y": i,
                "button": 0,
            }
            for j in range(rows)
        ]
        step()
        t = time.perf_counter()
        table.append(pa.Table.from_pylist(batch, schema=arrow_schema))
        out.append(time.perf_counter() - t)
        progress("seed", i + 1, n, out[-1], started)
    return out


if __name__ == "__main__":
    system, count, window_rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    durations = (run_streamapp if system == "streamapp" else run_seed)(count, window_rows)
    print(json.dumps(durations))
