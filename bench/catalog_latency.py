"""Commit latency of the raw sink on the SQLite catalog and on a PostgreSQL catalog, in one run.

    uv run python bench/catalog_latency.py [--commits 200] [--rows 100] [--pg-uri URI]

Each catalog gets a fresh warehouse and the table `events.clicks`; then the two are committed to
in turn, commit by commit (so the load of a shared machine hits both alike), through the sink every
raw agent uses (`TableSink.write`: position check, append, snapshot expiry), each commit a window
of ROWS clicks. Without --pg-uri it starts its own PostgreSQL (Debian's, as the tests do: see
tests/postgres.py) in a temporary directory on loopback, fsync on as a server would run.
The first 5 commits of each are warm-up and not counted. Prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tests.isolation  # noqa: E402, F401 - no developer's pyiceberg configuration
from tests.postgres import Postgres, bin_dir  # noqa: E402

WARMUP = 5


@contextlib.contextmanager
def own_postgres() -> Iterator[str]:
    programs = bin_dir()
    if programs is None:
        sys.exit("catalog_latency: no PostgreSQL here: run scripts/install-postgresql, or give --pg-uri")
    root = Path(tempfile.mkdtemp(prefix="streamapp-bench-pg-"))
    from tests.conftest import free_port

    server = Postgres(programs, root, free_port(), fsync=True)
    try:
        server.init()
        server.start()
        yield server.new_database()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def window(i: int, rows: int, base_ms: int):  # -> Window: streamapp is imported late
    import msgspec

    from models.click import ClickEvent
    from streamapp import Window, names

    now = datetime.now(UTC)
    events = [
        ClickEvent(event_id=f"c-{i}-{j}", timestamp=now, page_url="https://example.test/", x=j, y=i)
        for j in range(rows)
    ]
    return Window(
        ClickEvent,
        names.stream(ClickEvent.type_name()),
        "bench-catalog",
        [f"{base_ms + i}-{j}" for j in range(rows)],
        [msgspec.json.encode(e) for e in events],
        [int(now.timestamp() * 1e6)] * rows,
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commits", type=int, default=200)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--pg-uri", help="an empty PostgreSQL database (default: start one)")
    args = parser.parse_args()

    from models.click import ClickEvent
    from streamapp.lake.catalog import ensure_table, open_catalog
    from streamapp.lake.sink import TableSink
    from streamapp.settings import Settings

    with contextlib.ExitStack() as stack:
        pg_uri = args.pg_uri or stack.enter_context(own_postgres())
        work = Path(tempfile.mkdtemp(prefix="streamapp-bench-catalog-"))
        stack.callback(shutil.rmtree, work, True)
        sinks = {}
        for label, uri in (("sqlite", ""), ("postgresql", pg_uri)):
            settings = Settings(warehouse=work / label, catalog_uri=uri)
            catalog = open_catalog(settings)
            ensure_table(catalog, ClickEvent)
            sinks[label] = TableSink(catalog, ClickEvent.table, keep_snapshots=settings.keep_snapshots)
        took: dict[str, list[float]] = {label: [] for label in sinks}
        base_ms = int(time.time() * 1000)
        for i in range(args.commits + WARMUP):
            w = window(i, args.rows, base_ms)
            for label, sink in sinks.items():
                t = time.perf_counter()
                assert sink.write(w) == args.rows
                if i >= WARMUP:
                    took[label].append(time.perf_counter() - t)
            if (i + 1) % 50 == 0:
                print(f"  {i + 1}/{args.commits + WARMUP} commits each", file=sys.stderr, flush=True)

    print(f"{args.commits} commits of {args.rows} rows each, alternating, after {WARMUP} warm-up commits each")
    print(f"{'catalog':<12}{'median ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}{'commits/s':>11}")
    for label, values in took.items():
        ms = [v * 1000 for v in values]
        print(
            f"{label:<12}{statistics.median(ms):>10.1f}{percentile(ms, 0.9):>10.1f}{percentile(ms, 0.99):>10.1f}"
            f"{max(ms):>10.1f}{len(ms) / sum(values):>11.1f}"
        )
    print(f"machine: {os.uname().machine}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
