"""Files on storage against files referenced, before and after the orphan cleanup.

    uv run python bench/lake_files.py [--commits 10000] [--rows 10] [--budget 300]

Commits windows of ROWS clicks to events.clicks through the raw sink (streamapp/lake/sink.py as it
is: snapshot expiry, compaction every 100 files, pyiceberg's own metadata deletion) in a fresh
warehouse, COMMITS times or until BUDGET seconds have passed, then counts the files under the
table's location by kind and runs the cleanup (streamapp/lake/orphans.py) twice: now, with the
default min age of an hour (the files are all younger: nothing goes), and as an hour later (every
file older than the min age), which is what the worker's hourly run finds once the commits are
that old. Prints one table.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import sys
import tempfile
import time
from datetime import UTC, datetime

sys.path.insert(0, os.getcwd())

import msgspec

from models.click import ClickEvent
from streamapp import Window, app, names
from streamapp.engine.worker import create_tables
from streamapp.lake.catalog import open_catalog
from streamapp.lake.orphans import clean, referenced, stored_files
from streamapp.settings import Settings

KINDS = ("data", "manifest", "list", "metadata", "other")
HEADS = ("data", "manifests", "lists", "metadata", "other")


def kind(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    if name.endswith(".parquet"):
        return "data"
    if name.endswith(".metadata.json"):
        return "metadata"
    if name.endswith(".avro"):
        return "list" if name.startswith("snap-") else "manifest"
    return "other"


def census(table, keep: set[str] | None = None) -> tuple[collections.Counter[str], int]:
    """Files by kind (only those whose key is in `keep`, when given) and their bytes."""
    counts: collections.Counter[str] = collections.Counter()
    size = 0
    for f in stored_files(table):
        if keep is None or f.key in keep:
            counts[kind(f.key)] += 1
            size += f.size
    return counts, size


def row(label: str, counts: collections.Counter[str], size: int) -> str:
    cells = "".join(f"{counts[k]:>10,}" for k in KINDS)
    return f"{label:<40}{sum(counts.values()):>10,}{cells}{size / 1e6:>10.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=10)
    parser.add_argument("--budget", type=float, default=300.0, help="stop committing after this many seconds")
    args = parser.parse_args()

    logging.getLogger("streamapp").setLevel(logging.WARNING)  # a line per commit otherwise
    warehouse = tempfile.mkdtemp(prefix="lake-files-")
    settings = Settings(warehouse=warehouse)
    app.configure(settings)
    app.catalog = open_catalog(settings)
    create_tables(app, app.catalog)
    sink = app.table(ClickEvent.table)
    stream_key = names.stream(ClickEvent.type_name())
    base_ms = int(time.time() * 1000)

    async def commit_all() -> int:
        started = time.monotonic()
        for i in range(args.commits):
            now = datetime.now(UTC)
            events = [ClickEvent(event_id=f"c-{i}-{j}", timestamp=now, x=j, y=i) for j in range(args.rows)]
            window = Window(
                ClickEvent,
                stream_key,
                "bench-files",
                [f"{base_ms + i}-{j}" for j in range(args.rows)],
                [msgspec.json.encode(e) for e in events],
                [int(now.timestamp() * 1e6)] * args.rows,
            )
            await sink.append(window)
            if (i + 1) % 500 == 0:
                print(f"  {i + 1} commits, {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
            if time.monotonic() - started > args.budget:
                return i + 1
        return args.commits

    started = time.monotonic()
    done = asyncio.run(commit_all())
    commit_seconds = time.monotonic() - started
    table = app.catalog.load_table(ClickEvent.table)
    rows = table.scan().to_arrow().num_rows
    before = census(table)
    t = time.perf_counter()
    refs = referenced(table, settings.keep_metadata)
    refs_seconds = time.perf_counter() - t
    kept = census(table, refs)
    now_run = clean(table, keep_metadata=settings.keep_metadata, min_age=settings.orphan_min_age_seconds)
    later = time.time() + settings.orphan_min_age_seconds
    late_run = clean(table, keep_metadata=settings.keep_metadata, min_age=settings.orphan_min_age_seconds, now=later)
    after = census(table)
    assert app.catalog.load_table(ClickEvent.table).scan().to_arrow().num_rows == rows == done * args.rows

    cut = "" if done == args.commits else f" (stopped at the {args.budget:.0f}s budget; asked {args.commits:,})"
    print(
        f"\n{done:,} commits of {args.rows} rows to events.clicks in {commit_seconds:.0f}s{cut}; "
        f"keep_snapshots={settings.keep_snapshots}, keep_metadata={settings.keep_metadata}, "
        f"min age {settings.orphan_min_age_seconds:g}s; {rows:,} rows read back after the cleanup"
    )
    print(f"{'':<40}{'files':>10}" + "".join(f"{k:>10}" for k in HEADS) + f"{'MB':>10}")
    print(row("on storage after the commits", *before))
    print(row("referenced by the table", *kept))
    print(row("on storage after cleanup, 1 h later", *after))
    ratio = sum(after[0].values()) / max(1, sum(kept[0].values()))
    print(
        f"cleanup right after the commits: {now_run.removed:,} removed ({now_run.young:,} younger than the min age), "
        f"{now_run.seconds:.2f}s"
    )
    print(
        f"cleanup an hour later: {late_run.removed:,} removed, {late_run.freed / 1e6:.1f} MB freed, "
        f"{late_run.seconds:.2f}s (reading what the table references: {refs_seconds:.2f}s); "
        f"on storage / referenced = {ratio:.2f}x (target <= 2x)"
    )


if __name__ == "__main__":
    main()
