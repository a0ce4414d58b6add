"""`python -m streamapp COMMAND`: redis | web | worker | create-tables | show."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

from streamapp import logs
from streamapp.settings import Settings, SettingsError


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (Linux, macOS): the same asyncio API, a faster loop."""
    try:
        import uvloop
    except ImportError:  # Windows: the standard loop
        asyncio.run(main)
        return
    uvloop.run(main)


def _web(settings: Settings) -> None:
    from streamapp import app
    from streamapp.web import serve

    app.configure(settings)

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await serve(app, settings, stopping)

    _run(main())


def _worker(settings: Settings) -> None:
    from streamapp import app
    from streamapp.worker import run_worker

    app.configure(settings)
    _run(run_worker(app))


def _create_tables(settings: Settings) -> None:
    from streamapp import app
    from streamapp.worker import create_tables

    app.configure(settings)
    for table in create_tables(app):
        print(f"table {'.'.join(table.name())} ready")


def _show(settings: Settings, table: str, limit: int) -> None:
    from streamapp.catalog import open_catalog

    t = open_catalog(settings).load_table(table)
    rows = t.scan().to_arrow()
    print(f"{table}: {rows.num_rows} rows")
    if rows.num_rows:
        order = "event_time" if "event_time" in rows.column_names else "received_at"
        rows = rows.sort_by([(order, "ascending")])
        for row in rows.slice(max(0, rows.num_rows - limit)).to_pylist():
            print({k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m streamapp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("redis", help="run the embedded Redis-compatible server (valkey, append-only)")
    sub.add_parser("web", help="run the HTTP collector (POST /api/events)")
    sub.add_parser("worker", help="run the agents: Redis streams -> Iceberg")
    sub.add_parser("create-tables", help="create the Iceberg tables (idempotent)")
    show = sub.add_parser("show", help="print a table's row count and its latest rows")
    show.add_argument("table", help='e.g. "events.clicks"')
    show.add_argument("-n", type=int, default=10, help="how many rows (default 10)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as e:
        parser.exit(2, f"streamapp: {e}\n")
    logs.setup(settings.log_level, settings.log_format)
    if args.command == "redis":
        from streamapp.redis_server import exec_server

        exec_server(settings)
    elif args.command == "web":
        _web(settings)
    elif args.command == "worker":
        _worker(settings)
    elif args.command == "create-tables":
        _create_tables(settings)
    elif args.command == "show":
        _show(settings, args.table, args.n)
