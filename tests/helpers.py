"""Shared steps of the pipeline tests: send events through the real web view, wait for rows."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

from streamapp import names
from tests.conftest import table_rows, wait_until


async def send(http, base: str, events: list[dict], chunk: int = 100) -> None:
    """POST events in arrays of `chunk`; every one must be accepted (202, no errors)."""
    for i in range(0, len(events), chunk):
        part = events[i : i + chunk]
        async with http.post(
            base + "/api/events", data=json.dumps(part), headers={"Content-Type": "application/json"}
        ) as r:
            body = await r.json()
            assert r.status == 202 and body["accepted"] + body["duplicates"] == len(part), body


def clicks(prefix: str, n: int) -> list[dict]:
    return [{"type": "click", "x": i, "y": i * 2, "event_id": f"{prefix}{i}", "user_id": "u1"} for i in range(n)]


async def wait_rows(settings, table: str, n: int, timeout: float = 30) -> list[dict]:
    """Wait until `table` has at least n rows; returns them."""

    def enough():
        rows = table_rows(settings, table)
        return rows if len(rows) >= n else None

    return await asyncio.to_thread(wait_until, enough, timeout, 0.2, f"{n} rows in {table}")


def assert_exactly_once(rows: list[dict], expected_ids: set[str]) -> None:
    counts = Counter(r["event_id"] for r in rows)
    doubled = {k: v for k, v in counts.items() if v > 1}
    missing = expected_ids - set(counts)
    extra = set(counts) - expected_ids
    assert not doubled and not missing and not extra, (
        f"doubled={sorted(doubled)[:10]} missing={sorted(missing)[:10]} extra={sorted(extra)[:10]}"
    )


async def wait_committed_to_end(catalog, redis_client, stream: str, consumer: str, table: str, timeout: float = 30):
    """Wait until `table` holds `consumer`'s position at the newest entry of `stream` (read now
    with the sync `redis_client`); returns that entry's id."""
    [(last, _)] = redis_client.xrevrange(stream, count=1)
    position = names.position_property(stream, consumer)
    await asyncio.to_thread(
        wait_until,
        lambda: catalog.load_table(table).properties.get(position) == last.decode(),
        timeout,
        0.2,
        f"{consumer} committed past the last entry of {stream}",
    )
    return last.decode()


async def run_without_lease(settings, agent: str, table: str, stopping: asyncio.Event) -> None:
    """Run raw sink `agent` on shard 0 in this process, with its own reader and sink and no lease,
    until `stopping`: what a worker paused past its lease does next to the unit's new owner."""
    from streamapp import app as default_app
    from streamapp.lake.catalog import open_catalog
    from streamapp.lake.sink import TableSink
    from streamapp.redis_client import reader_client

    catalog = open_catalog(settings)
    sink = TableSink(catalog, table, keep_snapshots=settings.keep_snapshots)
    client = reader_client(settings)
    try:
        stream = default_app.discover_agents()[agent].stream.fresh()
        stream.bind(client, agent, stopping, settings=settings, catalog=catalog)
        await stream.register()
        async for window in stream.take(settings.window_count, within=settings.window_seconds):
            await sink.append(window)
    finally:
        await client.aclose()
