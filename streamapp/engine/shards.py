"""Reading every shard's stream of one event type as one, for an aggregate: the events of one
group-by key arrive on every shard (`STREAMAPP_SHARDS`), so one consumer must see them all.

One XREAD per shard stream, concurrently: the shards' keys are in different cluster slots, where a
multi-key XREAD is refused (CROSSSLOT). Each read's entries are merged into one batch for the
aggregator, cut at a common receipt time: when a shard returned as many entries as it was asked
for (it has more), no shard's entries received after that shard's last one are taken this round,
so the batch holds the shards' entries up to about one point in processing time, as one stream
would, and the one watermark (`streamapp.engine.windows`) does not run ahead of a shard that is
read more slowly. Blocking and idle batches are as `StreamReader.windows(idle=True)`'s.

Each shard keeps its own hints in its own slot: progress (`names.progress` of its stream, for
backpressure) and ack (`names.acks` of its shard: the replay cursor of that stream, below which
the trimmer may drop its entries).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from streamapp import metrics
from streamapp.engine.reader import READ_BLOCK_MS, READ_COUNT, StreamReader
from streamapp.entries import Collected, Mark, Window


@dataclass
class Batch:
    """What the aggregator takes in one go: a window per shard (shard 0 first, empty for a shard
    with nothing new), and whether the reader caught up with every shard (time may advance the
    watermark then)."""

    windows: list[Window[Any]]
    idle: bool

    def __len__(self) -> int:
        return sum(len(w) for w in self.windows)


class ShardReaders:
    """The streams of every shard of `first`'s model, as `first`'s consumer reads them: `first`
    (bound to shard 0, registered by the worker) and one reader per further shard."""

    def __init__(self, first: StreamReader, shards: int) -> None:
        if first.shard != 0:
            raise ValueError("a sharded aggregate reads from shard 0's reader")
        self.readers = [first] + [
            StreamReader(
                first.redis,
                first.model,
                first.consumer,
                first.stopping,
                window_bytes=first.window_bytes,
                wait_replicas=first.wait_replicas,
                wait_ms=first.wait_ms,
                shard=shard,
            )
            for shard in range(1, shards)
        ]
        self.first, self.stopping, self.consumer = first, first.stopping, first.consumer

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.readers]

    async def register(self) -> None:
        """Record this consumer on every shard (the first is registered by the worker)."""
        for reader in self.readers[1:]:
            await reader.register()

    async def batches(self, afters: Sequence[str], n: int, within: float) -> AsyncIterator[Batch]:
        """Batches of up to `n` events over all shards, from the entries after `afters` (one per
        shard), each closed at most `within` seconds after it began; an empty one every `within`
        seconds while nothing arrives. Acknowledges nothing."""
        if len(self.readers) == 1:  # one stream: read exactly as before shards
            async for window in self.first.windows(afters[0], n, within, idle=True):
                yield Batch([window], len(window) < n)
            return
        cursors = list(afters)
        while True:
            got, idle = await self._collect(cursors, n, within)
            if any(g.end is not None for g in got) or not self.stopping.is_set():
                windows: list[Window[Any]] = []
                for reader, g in zip(self.readers, got, strict=True):
                    if g.ids:
                        metrics.WINDOW_EVENTS.labels(self.consumer).observe(len(g.ids))
                        if reader.wait_replicas:
                            await reader.replicated()
                    windows.append(
                        Window(
                            reader.model,
                            reader.key,
                            self.consumer,
                            g.ids,
                            g.payloads,
                            g.received,
                            g.last,
                            dead=g.dead,
                            end=g.end,
                        )
                    )
                yield Batch(windows, idle)
            if self.stopping.is_set():
                return

    async def _collect(self, cursors: list[str], n: int, within: float) -> tuple[list[Collected], bool]:
        """Read up to `n` events (or `window_bytes` of payloads) over all shards after `cursors`
        (moved on as entries are taken), until `within` seconds after the start or the stop.
        Also: whether every shard was read to its end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        got = [Collected([], [], []) for _ in self.readers]
        window_bytes = self.first.window_bytes
        per_entry = 1  # events per entry in the last read: sizes each XREAD's COUNT
        caught_up = False
        while not self.stopping.is_set():
            total, size = sum(len(g.ids) for g in got), sum(g.bytes for g in got)
            if total >= n or size >= window_bytes:
                return got, False
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            count = max(1, min(READ_COUNT, (n - total) // per_entry // len(self.readers)))
            replies = await asyncio.gather(
                *(r._read(c, count, None) for r, c in zip(self.readers, cursors, strict=True))
            )
            if not any(replies):
                caught_up = True
                replies = await self._first_of(cursors, count, max(1, min(READ_BLOCK_MS, int(remaining * 1000))))
                if not any(replies):
                    continue
            full = [reply for reply in replies if len(reply) >= count]  # those shards have more
            caught_up = not full
            cut = min((_received_ms(reply[-1][0]) for reply in full), default=None)
            entries = added = 0
            for i, reply in enumerate(replies):
                if cut is not None:
                    reply = [e for e in reply if _received_ms(e[0]) <= cut]
                g = got[i]
                events, payload = len(g.ids), g.bytes
                g.add(reply, sys.maxsize, payload + window_bytes - size)
                size += g.bytes - payload
                added += len(g.ids) - events
                entries += len(reply)
                if g.end is not None:
                    cursors[i] = g.end
            if entries:
                per_entry = max(1, added // entries)
        return got, caught_up

    async def _first_of(self, cursors: list[str], count: int, block_ms: int) -> list[list[Any]]:
        """Wait up to `block_ms` for an entry on any shard: a blocking XREAD on each (one key
        each: a cluster refuses keys of several slots in one), the first to answer taken, the
        others cancelled (an XREAD has no effect to undo; the client drops their connections)."""
        tasks = [asyncio.create_task(r._read(c, count, block_ms)) for r, c in zip(self.readers, cursors, strict=True)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return [t.result() if t in done else [] for t in tasks]

    async def report(self, marks: Sequence[Mark | None]) -> None:
        """The progress hints of the shards read into the windows (None: nothing new there)."""
        await asyncio.gather(*(r.report(m) for r, m in zip(self.readers, marks, strict=True) if m is not None))

    async def ack(self, cursors: Sequence[str | None]) -> None:
        """Each shard's replay cursor as its ack (None: that shard was never read)."""
        await asyncio.gather(*(r.ack(c) for r, c in zip(self.readers, cursors, strict=True) if c is not None))


def _received_ms(raw_id: bytes) -> int:
    """The ms part of an entry id as hiredis gives it: when Redis received it."""
    return int(raw_id.split(b"-", 1)[0])
