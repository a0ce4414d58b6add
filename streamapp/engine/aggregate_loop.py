"""The driver of one aggregate agent: restore from the last commit, then read, aggregate and commit
until the worker stops.

    reader (Redis) -> Aggregator.add (window state) -> Aggregator.flush -> AggregateSink.commit (Iceberg)

The state rules are `streamapp.engine.aggregator`'s, the commits `streamapp.lake.aggregate_sink`'s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from pyiceberg.catalog import Catalog

from streamapp.engine.aggregations import Aggregation
from streamapp.engine.aggregator import Aggregator, restore
from streamapp.engine.reader import StreamReader
from streamapp.engine.windows import Hopping, Sessions, Tumbling
from streamapp.entries import DeadEntry, Mark, entry_id
from streamapp.lake.aggregate_sink import AggregateSink, StaleState, aggregate_spec, iso
from streamapp.settings import Settings

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode

TICK_SECONDS = 1.0  # flush period: how soon after the watermark passes a window's end it is written


async def run_aggregate(
    reader: StreamReader,
    catalog: Catalog,
    settings: Settings,
    *,
    key: Callable[[Any], str | None],
    column: str,
    windows: Tumbling | Hopping | Sessions,
    grace: float,
    table: str,
    keep: float,
    aggs: dict[str, Aggregation[Any]],
) -> None:
    """Aggregate `reader`'s stream into `table` until the worker stops; start over from the tables
    when another worker committed under this one."""
    spec = aggregate_spec(table, column, {name: (a.column_type, a.nullable) for name, a in aggs.items()})
    while True:
        sink, restored = await asyncio.to_thread(
            AggregateSink.open,
            catalog,
            spec,
            reader.key,
            reader.consumer,
            keep_snapshots=settings.keep_snapshots,
            crash_at=settings.crash_at,
            target_file_bytes=settings.target_file_bytes,
        )
        log.info(
            "%s: resuming from its last commit (position %s, watermark %s): re-reading after %s",
            reader.consumer,
            restored.position,
            iso(restored.watermark) or "none",
            restored.replay_after,
        )
        agg = restore(restored, key=key, column=column, windows=windows, aggs=aggs, grace=grace, keep=keep)
        try:
            return await _run(reader, sink, agg, settings.window_count, restored.replay_after)
        except StaleState as e:
            log.warning("%s; starting over from the committed state", e)


async def _run(reader: StreamReader, sink: AggregateSink, agg: Aggregator[Any], n: int, after: str) -> None:
    """Each batch read into the windows is progress (for backpressure: the replay cursor keeps
    its entries in the stream until the windows are committed); each flush is committed, then acked."""
    last: Mark | None = None  # the totals at the last entry read, which is the aggregator's position
    async for batch in reader.windows(after, n, TICK_SECONDS, idle=True):
        if batch.ids or batch.dead:
            last = batch.last
            if last is not None:
                await reader.report(last)
        ids, events, dead = batch.decoded()
        for stream_id, event in zip(ids, events, strict=True):
            try:  # stamped after its receipt: windowed at the receipt
                agg.add(stream_id, event, event.timestamp.timestamp())
            except Exception as e:  # noqa: BLE001 - the key or an aggregation refused it (a user's function)
                agg.refuse(DeadEntry(stream_id, _encode(event).decode(), f"{type(e).__name__}: {e}"))
        for entry in sorted(batch.dead + dead, key=lambda d: entry_id(d.entry_id)):
            agg.refuse(entry)
        flush = agg.flush(time.time() if len(batch) < n else None)  # a full batch: a backlog, not idle
        if flush is not None:
            if last is not None and last.id == flush.position:
                flush.mark = str(last)
            await asyncio.to_thread(sink.commit, flush)
            await reader.ack(flush.replay_after)
