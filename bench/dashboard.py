"""What the dashboard costs: its process's memory, a refresh's time, and the catalog and file reads
of one refresh.

    uv run python bench/dashboard.py [--events N] [--pages P] [--polls R]

Starts the embedded Redis, a web process, a worker and `python -m streamapp dashboard` in a
temporary directory; sends N clicks spread over the last hour on P pages (in time order, 100 per
request); waits until the worker has committed them and the per-minute aggregate has them; polls
`/api/dashboard` R times, 2.1 s apart (each poll a refresh: the cache lasts 2 s) and reports the
dashboard process's RSS and its answer times. Then one refresh in this process with the reads
counted: SQL statements to the catalog, and files opened through pyiceberg's FileIO by kind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent


def rss_mb(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def post(port: int, events: list[dict]) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/events",
        data=json.dumps(events).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 202


def figures(port: int) -> tuple[dict, float]:
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/dashboard", timeout=60) as r:
        body = json.loads(r.read())
    return body, time.perf_counter() - started


def counted_refresh(env: dict[str, str]) -> tuple[int, Counter[str], float]:
    """One refresh in this process: (SQL statements, files opened by kind, seconds)."""
    from pyiceberg.io import pyarrow as pyarrow_io
    from sqlalchemy import event

    from streamapp import names
    from streamapp.dashboard.data import Dashboard
    from streamapp.lake.catalog import open_catalog
    from streamapp.redis_client import reader_client
    from streamapp.settings import Settings

    settings = Settings.from_env(env, dotenv=None)
    catalog = open_catalog(settings)
    statements = 0
    opened: Counter[str] = Counter()

    def on_sql(*_: object) -> None:
        nonlocal statements
        statements += 1

    event.listen(catalog.engine, "before_cursor_execute", on_sql)  # type: ignore[attr-defined]
    new_input = pyarrow_io.PyArrowFileIO.new_input

    def counting(self: pyarrow_io.PyArrowFileIO, location: str) -> object:
        name = location.rsplit("/", 1)[-1]
        kind = (
            "table metadata (.metadata.json)"
            if name.endswith(".metadata.json")
            else "manifest lists (snap-*.avro)"
            if name.startswith("snap-")
            else "manifests (.avro)"
            if name.endswith(".avro")
            else "data files (.parquet)"
        )
        opened[kind] += 1
        return new_input(self, location)

    pyarrow_io.PyArrowFileIO.new_input = counting  # type: ignore[method-assign]

    async def run() -> float:
        client = reader_client(settings)
        try:
            dashboard = Dashboard(catalog, client, [names.stream(t) for t in ("click", "keydown", "rejected")])
            started = time.perf_counter()
            await dashboard.figures()
            return time.perf_counter() - started
        finally:
            await client.aclose()

    seconds = asyncio.run(run())
    pyarrow_io.PyArrowFileIO.new_input = new_input  # type: ignore[method-assign]
    return statements, opened, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--pages", type=int, default=10)
    parser.add_argument("--polls", type=int, default=15)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dashboard-bench-"))
    web_port, dash_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMAPP_", "REDIS_URL", "PORT", "AWS_"))}
    env.update(
        STREAMAPP_WAREHOUSE=str(tmp / "warehouse"),
        STREAMAPP_REDIS_PORT=str(free_port()),
        PORT=str(web_port),
        STREAMAPP_DASHBOARD_PORT=str(dash_port),
        STREAMAPP_WORKER_METRICS_PORT="0",
        STREAMAPP_WEB_PROCESSES="1",
        STREAMAPP_GRACE_SECONDS="1",
        STREAMAPP_LOG_LEVEL="WARNING",
    )
    procs: list[subprocess.Popen[bytes]] = []

    def start(command: str) -> subprocess.Popen[bytes]:
        log = open(tmp / f"{command}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "streamapp", command], cwd=tmp, env=env, stdout=log, stderr=log)
        procs.append(proc)
        return proc

    try:
        start("redis")
        wait_port(int(env["STREAMAPP_REDIS_PORT"]))
        start("web")
        wait_port(web_port)
        start("worker")
        dashboard = start("dashboard")
        wait_port(dash_port)
        end = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(milliseconds=1)
        n = args.events
        events = [
            {
                "type": "click",
                "x": (i * 37) % 1200,
                "y": (i * 53) % 2400,
                "page_url": f"https://shop.example/p{i % args.pages}",
                "user_id": f"u{i % 50}",
                "timestamp": (end - timedelta(seconds=3540 * (n - 1 - i) / n)).isoformat(),
            }
            for i in range(n)
        ]
        for i in range(0, n, 100):
            post(web_port, events[i : i + 100])
        deadline = time.monotonic() + 300
        while True:
            body, _ = figures(dash_port)
            rows = {t["table"]: t["rows"] for t in body["tables"]}
            per_minute = sum(sum(c) for c in body["clicks_per_minute"]["pages"].values())
            if rows.get("events.clicks") == n and per_minute == n:
                break
            assert time.monotonic() < deadline, (rows, per_minute)
            time.sleep(2)
        times = []
        for _ in range(args.polls):
            time.sleep(2.1)
            _, seconds = figures(dash_port)
            times.append(seconds)
        rss, hwm = rss_mb(dashboard.pid)
        files = {t["table"]: t["files"] for t in body["tables"]}
        print(f"{n:,} clicks on {args.pages} pages over the last hour; data files per table: {files}")
        print(f"dashboard process: RSS {rss:.0f} MB, peak {hwm:.0f} MB after {args.polls} refreshes")
        print(
            f"a refresh (GET /api/dashboard past the cache): median {statistics.median(times) * 1000:.0f} ms, "
            f"max {max(times) * 1000:.0f} ms"
        )
        statements, opened, seconds = counted_refresh(env)
        print(f"one refresh, counted in-process ({seconds * 1000:.0f} ms): {statements} SQL statements to the catalog;")
        for kind, count in sorted(opened.items()):
            print(f"  {count} {kind}")
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
