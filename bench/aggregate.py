"""Windowed-aggregation throughput vs the raw sink's drain, one consumer each, same backlog.

    uv run python bench/aggregate.py [--events 200000] [--pages 50] [--users 5000] [--shards 1]

A valkey-server is pre-filled with clicks whose event times cover an hour (in stream order, with
a few seconds of disorder), spread over `--pages` pages and `--users` users. Then, in this
process, one agent at a time drains the whole backlog from a cold start: the raw sink
(`take(10000)` -> `events.clicks`) and the clicks-per-minute aggregate (tumbling 60 s, count and
distinct users -> an aggregate table, a commit per batch that closes windows). Each figure is
events/s from the agent's start to the commit of the stream's last entry. A third figure is the
aggregator's pure per-event cost (no Redis, no Iceberg), the ceiling of the aggregate path.
With `--shards N` the clicks are spread over N shard streams (by event_id) and the aggregate reads
them all (`streamapp.engine.shards`); the raw sink, one run per shard, is not measured then.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import redis  # noqa: E402

from models.click import ClickEvent  # noqa: E402
from streamapp import count, distinct, names  # noqa: E402
from streamapp.engine.aggregator import Aggregator  # noqa: E402
from streamapp.engine.app import App  # noqa: E402
from streamapp.engine.windows import Tumbling, Watermark  # noqa: E402
from streamapp.lake.catalog import ensure_table, open_catalog  # noqa: E402
from streamapp.names import position_property  # noqa: E402
from streamapp.redis_client import reader_client  # noqa: E402
from streamapp.redis_server import server_command  # noqa: E402
from streamapp.settings import Settings  # noqa: E402
from tests.conftest import free_port  # noqa: E402

START = 1_795_000_000.0


def make_events(n: int, pages: int, users: int) -> list[ClickEvent]:
    rng = random.Random(1)
    return [
        ClickEvent(
            x=1,
            y=2,
            event_id=f"b{i}",
            page_url=f"https://shop.example/p{rng.randrange(pages)}",
            user_id=f"u{rng.randrange(users)}",
            timestamp=datetime.fromtimestamp(START + i * 3600 / n + rng.uniform(-3, 0), UTC),
        )
        for i in range(n)
    ]


def prefill(port: int, events: list[ClickEvent], shards: int = 1) -> list[str]:
    """The events into their shards' streams; the last entry id of each stream."""
    r = redis.Redis(port=port)
    pipe = r.pipeline(transaction=False)
    received = str(int(time.time() * 1_000_000))
    for i, e in enumerate(events):
        pipe.xadd(
            names.stream("click", names.shard_of(e.event_id, shards)), {"e": msgspec.json.encode(e), "r": received}
        )
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    return [r.xrevrange(key, count=1)[0][0].decode() for key in names.streams("click", shards)]


async def drain(settings: Settings, name: str, agent_fn, table: str, last_ids: list[str]) -> float:
    """Run one agent from a cold start until `table` holds its position at `last_ids` (one per
    shard); seconds."""
    app = App()
    app.configure(settings)
    app.catalog = open_catalog(settings)
    stream = app.stream(ClickEvent)
    app.agent(stream, name=name)(agent_fn(app))
    client = reader_client(settings)
    stopping = asyncio.Event()
    stream.bind(client, name, stopping, settings=settings, catalog=app.catalog)
    started = time.perf_counter()
    task = asyncio.create_task(app.agents[name].run(stopping))
    props = [position_property(key, name) for key in names.streams("click", len(last_ids))]
    while True:
        await asyncio.sleep(0.2)
        try:
            t = await asyncio.to_thread(app.catalog.load_table, table)
        except Exception:  # noqa: BLE001 - not created yet
            continue
        if [t.properties.get(prop) for prop in props] == last_ids:
            break
    elapsed = time.perf_counter() - started
    stopping.set()
    await task
    await client.aclose()
    return elapsed


def raw_agent(app: App):
    async def raw(stream):
        async for window in stream.take(10_000, within=1.0):
            await app.table(ClickEvent.table).append(window)

    return raw


def aggregate_agent(app: App):
    async def per_minute(stream):
        await (
            stream.group_by(lambda e: e.page_url, column="page_url")
            .tumbling(60)
            .aggregate("bench.clicks_per_minute", clicks=count(), unique_users=distinct(lambda e: e.user_id))
        )

    return per_minute


def pure(events: list[ClickEvent]) -> float:
    agg = Aggregator(
        lambda e: e.page_url,
        "page_url",
        Tumbling(60),
        {"clicks": count(), "unique_users": distinct(lambda e: e.user_id)},
        Watermark(10),
    )
    ids = [f"{int(START * 1000) + i}-0" for i in range(len(events))]
    started = time.perf_counter()
    for i, (stream_id, e) in enumerate(zip(ids, events, strict=True)):
        agg.add(stream_id, e, e.timestamp.timestamp())
        if i % 10_000 == 9_999:
            agg.flush()
    agg.flush()
    return len(events) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--pages", type=int, default=50)
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="streamapp-bench-agg-"))
    port = free_port()
    server = subprocess.Popen(server_command(port, work / "redis"), stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        events = make_events(args.events, args.pages, args.users)
        last_ids = prefill(port, events, args.shards)
        # This valkey is started without a password: a REDIS_URL, used as it is.
        settings = Settings(
            redis_port=port,
            redis_url=f"redis://127.0.0.1:{port}/0",
            warehouse=work / "wh",
            log_level="WARNING",
            shards=args.shards,
        )
        catalog = open_catalog(settings)
        ensure_table(catalog, ClickEvent)
        raw_s = (
            None
            if args.shards > 1
            else asyncio.run(drain(settings, "bench_raw", raw_agent, ClickEvent.table, last_ids))
        )
        agg_s = asyncio.run(drain(settings, "bench_agg", aggregate_agent, "bench.clicks_per_minute", last_ids))
        rows = catalog.load_table("bench.clicks_per_minute").scan().to_arrow().num_rows
        pure_rate = pure(events)
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    n = args.events
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"backlog: {n} clicks over 1 h of event time, {args.pages} pages, {args.users} users, {args.shards} shards")
    if raw_s is not None:
        print(f"{'raw sink drain -> events.clicks (events/s)':<58} {n / raw_s:10.0f}  {raw_s:.1f}s")
    print(f"{'aggregate drain -> clicks_per_minute (events/s)':<58} {n / agg_s:10.0f}  {agg_s:.1f}s, {rows} rows")
    print(f"{'aggregator alone, no Redis/Iceberg (events/s)':<58} {pure_rate:10.0f}")


if __name__ == "__main__":
    main()
