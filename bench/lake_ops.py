"""Erasure and retention on a table of N clicks over 10 days, against a full scan of the same table.

    uv run python bench/lake_ops.py [--events 100000]

Builds events.clicks in a temporary warehouse (one file per day, 100 users), then times, in this
order: a full scan of the table (the baseline: what reading everything costs on this machine),
`forget` of one user (1% of the rows), and retention keeping 5 days. Prints a table with each
figure as a ratio of the scan.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.click import ClickEvent
from streamapp.lake.catalog import ensure_table, open_catalog
from streamapp.lake.erasure import forget
from streamapp.lake.retention import apply_retention
from streamapp.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    n = parser.parse_args().events
    catalog = open_catalog(Settings(warehouse=tempfile.mkdtemp(prefix="lake-ops-")))
    table = ensure_table(catalog, ClickEvent)
    now = datetime.now(UTC)
    for day in range(10):
        events = [
            json.dumps(
                {
                    "type": "click",
                    "x": i,
                    "y": i,
                    "event_id": f"d{day}-{i}",
                    "user_id": f"u{i % 100}",
                    "timestamp": (now - timedelta(days=day, seconds=i)).isoformat(),
                }
            ).encode()
            for i in range(n // 10)
        ]
        table.append(ClickEvent.to_arrow([b"\n".join(events)], [int(now.timestamp() * 1e6)] * len(events)))
    started = time.perf_counter()
    rows = catalog.load_table("events.clicks").scan().to_arrow().num_rows
    scan = time.perf_counter() - started
    started = time.perf_counter()
    report = forget(catalog, "u7", command="bench", requested_by=None, keep_snapshots=10)
    erase = time.perf_counter() - started
    started = time.perf_counter()
    dropped = apply_retention(catalog, (("events.clicks", 5),), keep_snapshots=10)
    retain = time.perf_counter() - started
    print(f"| operation on {rows:,} clicks over 10 days | seconds | x full scan | what it did |")
    print("|---|---|---|---|")
    print(f"| full scan (baseline) | {scan:.2f} | 1.00 | {rows:,} rows read |")
    print(f"| forget --user-id (1% of rows) | {erase:.2f} | {erase / scan:.2f} | {report.removed} |")
    print(f"| retention 5d | {retain:.2f} | {retain / scan:.2f} | {[(d.table, d.rows, d.files) for d in dropped]} |")


if __name__ == "__main__":
    main()
