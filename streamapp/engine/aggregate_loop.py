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
from streamapp.engine.shards import ShardReaders
from streamapp.engine.windows import Hopping, Sessions, Tumbling
from streamapp.entries import DeadEntry, Mark, entry_id
from streamapp.lake.aggregate_sink import AggregateSink, Flush, ShardFlush, StaleState, aggregate_spec, iso
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
    shards: int = 1,
) -> None:
    """Aggregate `reader`'s stream (and, with `shards` > 1, every other shard's stream of its
    model: `reader` is shard 0's) into `table` until the worker stops; start over from the tables
    when another worker committed under this one."""
    spec = aggregate_spec(table, column, {name: (a.column_type, a.nullable) for name, a in aggs.items()})
    readers = ShardReaders(reader, shards)
    while True:
        sink, restored = await asyncio.to_thread(
            AggregateSink.open,
            catalog,
            spec,
            reader.key if shards == 1 else readers.keys,
            reader.consumer,
            keep_snapshots=settings.keep_snapshots,
            crash_at=settings.crash_at,
            target_file_bytes=settings.target_file_bytes,
        )
        afters = [restored.replay_after, *(s.replay_after for s in restored.shards)]
        log.info(
            "%s: resuming from its last commit (position %s, watermark %s): re-reading after %s",
            reader.consumer,
            restored.position if shards == 1 else [restored.position, *(s.position for s in restored.shards)],
            iso(restored.watermark) or "none",
            restored.replay_after if shards == 1 else afters,
        )
        agg = restore(restored, key=key, column=column, windows=windows, aggs=aggs, grace=grace, keep=keep)
        await readers.register()
        try:
            return await _run(readers, sink, agg, settings.window_count, afters)
        except StaleState as e:
            log.warning("%s; starting over from the committed state", e)


async def _run(readers: ShardReaders, sink: AggregateSink, agg: Aggregator[Any], n: int, afters: list[str]) -> None:
    """Each batch read into the windows is progress (for backpressure: the replay cursor keeps
    its entries in the stream until the windows are committed); each flush is committed, then acked.
    With several shards, each part of a batch is its shard's: its entry ids are that stream's."""
    last: list[Mark | None] = [None] * len(readers.readers)  # per shard: the totals at its last entry read
    async for batch in readers.batches(afters, n, TICK_SECONDS):
        read: list[Mark | None] = [None] * len(last)
        for shard, window in enumerate(batch.windows):
            if window.ids or window.dead:
                last[shard] = read[shard] = window.last
        await readers.report(read)
        for shard, window in enumerate(batch.windows):
            ids, events, dead = window.decoded()
            for stream_id, event in zip(ids, events, strict=True):
                try:  # stamped after its receipt: windowed at the receipt
                    agg.add(stream_id, event, event.timestamp.timestamp(), shard)
                except Exception as e:  # noqa: BLE001 - the key or an aggregation refused it (a user's function)
                    agg.refuse(DeadEntry(stream_id, _encode(event).decode(), f"{type(e).__name__}: {e}"), shard)
            for entry in sorted(window.dead + dead, key=lambda d: entry_id(d.entry_id)):
                agg.refuse(entry, shard)
        flush = agg.flush(time.time() if batch.idle else None)  # a full batch: a backlog, not idle
        if flush is not None:
            parts: list[Flush | ShardFlush] = [flush, *flush.shards]
            for mark, part in zip(last, parts, strict=True):
                if mark is not None and mark.id == part.position:
                    part.mark = str(mark)
            await asyncio.to_thread(sink.commit, flush)
            await readers.ack([part.replay_after if part.position else None for part in flush.streams()])
