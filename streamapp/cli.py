"""`python -m streamapp COMMAND`: redis | web | worker | dashboard | create-tables | show | query | status |
complete | check-redis | maintain | forget | retention.

Each command imports what it runs when it runs: the supervisor of several web processes loads
neither aiohttp nor pyiceberg (31 MB of RSS against 48 MB for a web process and 86 MB for a
worker), and `redis` execs valkey at once.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import getpass
import json
import signal
import socket
import sys
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

from streamapp import logs, names
from streamapp.redis_server import RedisPasswordError, embedded_password, exec_server
from streamapp.settings import Settings, SettingsError
from streamapp.web.processes import CHILD_FLAG, supervise


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (Linux, macOS): the same asyncio API, a faster loop."""
    try:
        import uvloop
    except ImportError:  # Windows: the standard loop
        asyncio.run(main)
        return
    uvloop.run(main)


def _web(settings: Settings, child: bool) -> None:
    if not child and settings.web_process_count > 1:
        sys.exit(supervise(settings.web_process_count))
    # aiohttp: not in the supervisor, which returned above (RSS, see the module docstring)
    from streamapp import app, metrics
    from streamapp.web.server import serve

    app.configure(settings)
    if child:
        metrics.count_across_processes()
    # What is loaded by now (modules, models) lives as long as the process: frozen, it is out of
    # the collector's walks; and a collection per 5,000 allocations rather than 700 lets most of
    # a request's objects die before one (measured: GC from ~3% of the web process to ~1%).
    gc.freeze()
    gc.set_threshold(5000, 10, 10)

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await serve(app, settings, stopping, reuse_port=child)

    _run(main())


def _worker(settings: Settings, only: list[str] | None) -> None:
    # pyiceberg: only the commands that use it load it (RSS and start-up, see the module docstring)
    from streamapp import app
    from streamapp.engine.worker import run_worker

    app.configure(settings)
    # As in the web process: what is loaded by now lives as long as the worker, so it is kept out
    # of the collector's walks, and a collection per 5,000 allocations rather than 700 lets a
    # window's decoded events die between them (measured: a drain of 1M clicks with the default
    # agents 8.1-8.5 s -> 6.8 s with the change to `Window.decoded`; bench/worker_memory.py).
    gc.freeze()
    gc.set_threshold(5000, 10, 10)
    _run(run_worker(app, only))


def _create_tables(settings: Settings) -> None:
    # pyiceberg: only the commands that use it load it (RSS and start-up, see the module docstring)
    from streamapp import app
    from streamapp.engine.worker import create_tables
    from streamapp.lake.catalog import open_catalog

    app.configure(settings)
    for table in create_tables(app, open_catalog(settings)):
        print(f"table {'.'.join(table.name())} ready")


def _show(settings: Settings, table: str, limit: int) -> None:
    from streamapp.lake.catalog import open_catalog  # pyiceberg: only where used (RSS and start-up)

    t = open_catalog(settings).load_table(table)
    rows = t.scan().to_arrow()
    print(f"{table}: {rows.num_rows} rows")
    if rows.num_rows:
        order = next(c for c in ("event_time", "received_at", "window_start") if c in rows.column_names)
        rows = rows.sort_by([(order, "ascending")])
        for row in rows.slice(max(0, rows.num_rows - limit)).to_pylist():
            print({k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items() if v is not None})


def _query(settings: Settings, sql: str, fmt: str) -> int:
    # duckdb and pyiceberg: only the commands that use them load them (RSS and start-up, see above)
    from streamapp.lake.catalog import open_catalog
    from streamapp.lake.query import QueryError, render, run

    try:
        result = run(open_catalog(settings), sql)
    except QueryError as e:
        print(f"streamapp: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(render(result, fmt))
    return 0


def _status(settings: Settings, as_json: bool) -> int:
    """Exit 0 with every figure, 1 when Redis could not be read (the tables' figures still print)."""
    # pyiceberg: only the commands that use it load it (RSS and start-up, see the module docstring)
    from streamapp import app
    from streamapp.engine.status import gather, render
    from streamapp.lake.catalog import open_catalog

    # the models and the Redis client: loaded by the commands that read them (RSS, start-up)
    from streamapp.redis_client import reader_client
    from streamapp.rejected import Rejected
    from streamapp.table_model import TableModel

    app.configure(settings)
    models: list[TableModel] = [*app.discover_models().values(), Rejected]
    streams = [stream for m in models for stream in names.streams(m.type_name(), settings.shards)]

    async def run() -> int:
        client = reader_client(settings)
        try:
            status = await gather(open_catalog(settings), client, streams)
        finally:
            await client.aclose()
        print(json.dumps(status.as_dict(), indent=2) if as_json else render(status))
        return 1 if status.redis_error else 0

    return asyncio.run(run())


def _dashboard(settings: Settings) -> None:
    # pyiceberg and aiohttp: only the commands that use them load them (RSS and start-up, see above)
    from streamapp import app
    from streamapp.dashboard.data import Dashboard
    from streamapp.dashboard.server import serve
    from streamapp.lake.catalog import open_catalog  # the catalog, Redis and the models: RSS, as above
    from streamapp.redis_client import reader_client  # RSS, as above
    from streamapp.rejected import Rejected  # RSS, as above
    from streamapp.table_model import TableModel  # RSS, as above

    app.configure(settings)
    models: list[TableModel] = [*app.discover_models().values(), Rejected]
    streams = [stream for m in models for stream in names.streams(m.type_name(), settings.shards)]

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        client = reader_client(settings)
        try:
            await serve(Dashboard(open_catalog(settings), client, streams), settings, stopping)
        finally:
            await client.aclose()

    try:
        _run(main())
    except OSError as e:  # the port is taken, or the host is not this machine's
        sys.exit(f"streamapp: dashboard cannot listen on {settings.host}:{settings.dashboard_port}: {e.strerror or e}")


def _period_end(period: str) -> datetime:
    """The end of a UTC day (2026-11-27) or hour (2026-11-27T13)."""
    try:
        end = datetime.strptime(period, "%Y-%m-%dT%H") + timedelta(hours=1)
    except ValueError:
        end = datetime.strptime(period, "%Y-%m-%d") + timedelta(days=1)
    return end.replace(tzinfo=UTC)


def _check_redis(settings: Settings) -> int:
    """Check Redis against the tables now, as a worker does after each start of Redis."""
    # pyiceberg: only the commands that use it load it (RSS and start-up, see the module docstring)
    from streamapp.engine.recovery import check
    from streamapp.lake.catalog import open_catalog
    from streamapp.redis_client import reader_client

    async def run() -> int:
        client = reader_client(settings)
        try:
            repairs = await check(client, open_catalog(settings), settings.shards, force=True)
        finally:
            await client.aclose()
        for r in repairs:
            print(
                f"{r.stream}: behind the tables ({r.tail or 'empty'} < {r.committed}): {r.action}; "
                f"events gone from Redis: {'unknown' if r.gone is None else r.gone}"
            )
        print(f"Redis checked against the tables: {len(repairs)} streams were behind; it takes events")
        return 0

    return asyncio.run(run())


def _complete(settings: Settings, table: str, period: str, end: datetime) -> int:
    """Is every window of `period` final in `table`? One metadata read: the marker the aggregate
    agent commits with its rows."""
    from streamapp.lake.catalog import open_catalog  # pyiceberg: only where used (RSS and start-up)

    marker = open_catalog(settings).load_table(table).properties.get(names.COMPLETE_BEFORE, "")
    final_before = datetime.fromisoformat(marker) if marker else None
    if final_before is not None and final_before >= end:
        print(f"{period} is complete in {table}: every window starting before {final_before.isoformat()} is final")
        return 0
    print(f"{period} is not complete in {table}: windows are final only before {marker or 'nothing yet'}")
    return 1


def _forget(settings: Settings, user_id: str) -> int:
    """Erase a user's rows everywhere; print rows removed per table (see streamapp.lake.erasure)."""
    from streamapp.lake.catalog import open_catalog  # pyiceberg: only where used (RSS and start-up)
    from streamapp.lake.erasure import forget

    try:
        who: str | None = f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):  # no user name for this uid (a container)
        who = None
    report = forget(
        open_catalog(settings),
        user_id,
        command="python -m streamapp forget --user-id",  # the id itself is not kept
        requested_by=who,
        keep_snapshots=settings.keep_snapshots,
    )
    print(f"erased user {report.user_hash} (sha256) at {report.erased_at.isoformat()}")
    for table, rows in sorted(report.removed.items()):
        cut = report.rewritten.get(table)
        print(f"  {table}: {rows} rows removed" + (f", {cut} rows rewritten without its events" if cut else ""))
    for table in report.untouched:
        print(f"  {table}: no user ids (counts only), untouched")
    print(f"{report.total} rows removed; audit row in {names.ERASURES_TABLE}")
    return 0


def _retention(settings: Settings, dry_run: bool) -> int:
    """Drop the day partitions STREAMAPP_RETENTION says are too old (see streamapp.lake.retention)."""
    from streamapp.lake.catalog import open_catalog  # pyiceberg: only where used (RSS and start-up)
    from streamapp.lake.retention import apply_retention

    if not settings.retention:
        print("STREAMAPP_RETENTION is empty: every table is kept forever")
        return 0
    for drop in apply_retention(
        open_catalog(settings), settings.retention, keep_snapshots=settings.keep_snapshots, dry_run=dry_run
    ):
        verb = "would drop" if dry_run else "dropped"
        print(
            f"{drop.table}: keep {drop.days}d: {verb} {drop.rows} rows in {drop.files} files "
            f"of {drop.partitions} days before {drop.cutoff.date().isoformat()}"
        )
    return 0


def _maintain(settings: Settings, table: str | None, dry_run: bool) -> int:
    """Remove orphan files and old metadata now, as the worker does every
    STREAMAPP_ORPHAN_INTERVAL_SECONDS; one line per table."""
    # pyiceberg: only the commands that use it load it (RSS and start-up, see the module docstring)
    from streamapp.lake.catalog import open_catalog
    from streamapp.lake.maintain import UnknownTable, maintain

    try:
        done = maintain(open_catalog(settings), settings, table, dry_run=dry_run)
    except UnknownTable as e:
        print(f"streamapp: {e}", file=sys.stderr)
        return 2
    for cleanup in done:
        print(cleanup.line())
    if dry_run:
        print(f"dry run: nothing deleted (orphans: unreferenced files older than {settings.orphan_min_age_seconds:g}s)")
    return 1 if any(c.skipped for c in done) else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m streamapp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("redis", help="run the embedded Redis-compatible server (valkey, append-only)")
    web = sub.add_parser("web", help="run the HTTP collector (POST /api/events)")
    web.add_argument(CHILD_FLAG, action="store_true", help=argparse.SUPPRESS)  # one of STREAMAPP_WEB_PROCESSES
    worker = sub.add_parser("worker", help="run the agents: Redis streams -> Iceberg")
    worker.add_argument(
        "--agent",
        action="append",
        metavar="NAME",
        help="run only this agent (repeatable; default: every agent in agents/)",
    )
    sub.add_parser(
        "dashboard",
        help="serve the live dashboard (lag, events/s, commits, clicks per page, a click heatmap) "
        "on STREAMAPP_DASHBOARD_PORT",
    )
    sub.add_parser("create-tables", help="create the Iceberg tables (idempotent)")
    show = sub.add_parser("show", help="print a table's row count and its latest rows")
    show.add_argument("table", help='e.g. "events.clicks"')
    show.add_argument("-n", type=int, default=10, help="how many rows (default 10)")
    query = sub.add_parser("query", help="run SQL (DuckDB) over the lake's tables, e.g. events.clicks")
    query.add_argument("sql", help='e.g. "SELECT page_url, count(*) FROM events.clicks GROUP BY 1"')
    query.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="output (default: an aligned table)"
    )
    status = sub.add_parser("status", help="each agent's lag and each table's rows, files, bytes and last commit")
    status.add_argument("--json", action="store_true", help="print the figures as JSON")
    complete = sub.add_parser("complete", help="is a day or an hour complete in an aggregate table? (exit 0: yes)")
    complete.add_argument("table", help='e.g. "events.clicks_per_minute"')
    complete.add_argument("period", help="a UTC day, 2026-11-27, or hour, 2026-11-27T13")
    sub.add_parser(
        "check-redis", help="check Redis against the tables now (a worker does it after each start of Redis)"
    )
    forget = sub.add_parser("forget", help="erase a user's rows from every table (GDPR/CCPA), with an audit row")
    forget.add_argument("--user-id", required=True, help="the user_id to erase (matched exactly)")
    retention = sub.add_parser("retention", help="drop day partitions older than STREAMAPP_RETENTION says, now")
    retention.add_argument("--dry-run", action="store_true", help="say what would be dropped, drop nothing")
    maintain = sub.add_parser(
        "maintain", help="remove files no snapshot references and old metadata (the worker does it hourly)"
    )
    maintain.add_argument("table", nargs="?", help='e.g. "events.clicks" (default: every table)')
    maintain.add_argument("--dry-run", action="store_true", help="report what would be removed, delete nothing")
    args = parser.parse_args(argv)
    if args.command == "forget" and not args.user_id.strip():
        parser.exit(2, "streamapp: --user-id is empty\n")
    try:
        settings = Settings.from_env()
    except SettingsError as e:
        parser.exit(2, f"streamapp: {e}\n")
    logs.setup(settings.log_level, settings.log_format)
    if args.command in ("redis", "web", "worker") and settings.embedded_redis:
        try:
            embedded_password(settings)  # made, or checked, before anything starts: a clear error
        except RedisPasswordError as e:
            parser.exit(2, f"streamapp: {e}\n")
    if (
        args.command
        in (
            "worker",
            "dashboard",
            "create-tables",
            "show",
            "query",
            "status",
            "check-redis",
            "complete",
            "forget",
            "retention",
        )
        and not settings.warehouse_is_local
    ):
        from streamapp.lake.storage import StorageError, check_storage  # pyiceberg: only where used (RSS)

        try:
            check_storage(settings)  # a clear line now, not a traceback from the first commit
        except StorageError as e:
            parser.exit(2, f"streamapp: {e}\n")
    try:
        _command(args, settings)
    except SettingsError as e:  # the catalog's (CatalogError): opened only now
        parser.exit(2, f"streamapp: {e}\n")


def _command(args: argparse.Namespace, settings: Settings) -> None:
    if args.command == "redis":
        exec_server(settings)
    elif args.command == "web":
        _web(settings, args.child)
    elif args.command == "worker":
        _worker(settings, args.agent)
    elif args.command == "dashboard":
        _dashboard(settings)
    elif args.command == "create-tables":
        _create_tables(settings)
    elif args.command == "show":
        _show(settings, args.table, args.n)
    elif args.command == "query":
        sys.exit(_query(settings, args.sql, args.format))
    elif args.command == "status":
        sys.exit(_status(settings, args.json))
    elif args.command == "maintain":
        sys.exit(_maintain(settings, args.table, args.dry_run))
    elif args.command == "check-redis":
        sys.exit(_check_redis(settings))
    elif args.command == "forget":
        sys.exit(_forget(settings, args.user_id))
    elif args.command == "retention":
        sys.exit(_retention(settings, args.dry_run))
    elif args.command == "complete":
        try:
            end = _period_end(args.period)
        except ValueError:
            raise SettingsError(f"{args.period!r} is neither a day (2026-11-27) nor an hour (2026-11-27T13)") from None
        sys.exit(_complete(settings, args.table, args.period, end))
