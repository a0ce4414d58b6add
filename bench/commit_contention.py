"""Many writers committing to one table on the PostgreSQL catalog: commits/s, conflicts and rows/s
with 1, 2, 4 and 8 writer processes (issue 12 item 4: per-writer commits against one committer).

    uv run python bench/commit_contention.py [--writers 1,2,4,8] [--seconds 20] [--rows 1000]

Each writer is a process committing windows of ROWS clicks to `events.clicks` through the sink
every raw agent uses (`TableSink.write`: position compare-and-set, append, snapshot expiry,
compaction every 100 files), each under its own consumer name, as the workers owning different
shards of a stream would: their positions are different table properties, so a conflict is only
the catalog's optimistic concurrency (another writer's snapshot got in first) and the sink retries
it. Each writer count gets a fresh table; the writers start together and commit back to back for
SECONDS. Starts its own PostgreSQL (fsync on) as bench/catalog_latency.py does, unless --pg-uri.
The 1-writer line is the baseline of the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from catalog_latency import own_postgres  # noqa: E402

import tests.isolation  # noqa: E402, F401 - no developer's pyiceberg configuration


def writer(k: int, uri: str, warehouse: str, rows: int, start_at: float, seconds: float, out) -> None:
    import msgspec

    from models.click import ClickEvent
    from streamapp import Window, metrics, names
    from streamapp.lake.catalog import open_catalog
    from streamapp.lake.sink import TableSink
    from streamapp.settings import Settings

    settings = Settings(warehouse=warehouse, catalog_uri=uri)
    sink = TableSink(open_catalog(settings), ClickEvent.table, keep_snapshots=settings.keep_snapshots)
    stamp = datetime.now(UTC)  # ingest sets event_time; a window read from Redis has it
    payloads = [msgspec.json.encode(ClickEvent(event_id=f"w{k}-{j}", x=j, y=k, timestamp=stamp)) for j in range(rows)]
    now_us = int(time.time() * 1e6)
    took: list[float] = []
    i = 0
    time.sleep(max(0.0, start_at - time.time()))
    end = start_at + seconds
    while time.time() < end:
        i += 1
        window = Window(
            ClickEvent,
            names.stream(ClickEvent.type_name()),
            f"writer-{k}",
            [f"{i}-{j}" for j in range(rows)],
            payloads,
            [now_us] * rows,
        )
        t = time.perf_counter()
        assert sink.write(window) == rows
        took.append(time.perf_counter() - t)
    conflicts = metrics.COMMIT_CONFLICTS.labels(ClickEvent.table)._value.get()
    out.put((k, took, conflicts))


def run(writers: int, uri: str, work: Path, rows: int, seconds: float) -> dict[str, float]:
    from models.click import ClickEvent
    from streamapp.lake.catalog import ensure_table, open_catalog
    from streamapp.settings import Settings

    warehouse = work / f"w{writers}"
    catalog = open_catalog(Settings(warehouse=str(warehouse), catalog_uri=uri))
    with contextlib.suppress(Exception):
        catalog.drop_table(ClickEvent.table)
    ensure_table(catalog, ClickEvent)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 8  # every process imported and connected by then
    procs = [
        ctx.Process(target=writer, args=(k, uri, str(warehouse), rows, start_at, seconds, out)) for k in range(writers)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 600) for _ in procs]
    for p in procs:
        p.join()
    took = [t for _, ts, _ in results for t in ts]
    commits = len(took)
    conflicts = sum(c for _, _, c in results)
    table = catalog.load_table(ClickEvent.table)
    stored = table.scan().to_arrow().num_rows
    assert stored == commits * rows, f"{stored} rows stored for {commits} commits of {rows}"
    return {
        "writers": writers,
        "commits_s": commits / seconds,
        "rows_s": commits * rows / seconds,
        "conflicts_per_commit": conflicts / max(1, commits),
        "p50_ms": statistics.median(took) * 1000,
        "p99_ms": sorted(took)[min(len(took) - 1, round(0.99 * (len(took) - 1)))] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--pg-uri", help="an empty PostgreSQL database (default: start one)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        uri = args.pg_uri or stack.enter_context(own_postgres())
        work = Path(tempfile.mkdtemp(prefix="streamapp-bench-contention-"))
        stack.callback(shutil.rmtree, work, True)
        lines = []
        for n in (int(x) for x in args.writers.split(",")):
            lines.append(run(n, uri, work, args.rows, args.seconds))
            print(f"  {n} writers done", file=sys.stderr, flush=True)
    base = lines[0]
    print(f"PostgreSQL catalog, {args.rows}-row commits, {args.seconds:.0f} s per line; rows verified in the table")
    print("| writers | commits/s | x 1 writer | rows/s | conflicts per commit | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in lines:
        print(
            f"| {r['writers']} | {r['commits_s']:.1f} | {r['commits_s'] / base['commits_s']:.2f} | {r['rows_s']:,.0f} "
            f"| {r['conflicts_per_commit']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |"
        )
    print(f"machine: {os.uname().machine}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
