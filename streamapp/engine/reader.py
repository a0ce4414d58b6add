"""Reading one Redis stream for one agent: in entry-id order, from a position, cut into windows.

Positions, not consumer groups: each agent reads the whole stream in entry-id order from the last
position it committed, so a sink can make a window idempotent by comparing entry ids with the
position stored in the Iceberg table (see `streamapp.lake.sink`). Redis keeps only a hint of that
position (`names.acks` of the stream's shard), written after the commit; it decides where reading
resumes and how far the stream may be trimmed, never what is written. (An aggregate agent acks its
replay cursor instead, the oldest entry its open windows still need, and resumes from the cursor its
table records.)

When reading fails the agent starts over from its last committed position (`StreamInterrupted`):
the Redis that answers next may hold older data (see `streamapp.engine.recovery`), and a window
read ahead of the commit must be read again rather than skipped.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

from streamapp import metrics, names
from streamapp.entries import Collected, Mark, Told, Window, entry_id
from streamapp.redis_client import FAILURES, RUN_ID_LUA, Client, server_run_id, text, write_and_wait
from streamapp.table_model import TableModel

log = logging.getLogger(__name__)

READ_BLOCK_MS = 1000  # longest wait inside one XREAD: bounds how late a stop or a deadline is seen
# Most entries one XREAD asks for. A reply is parsed into Python objects in one go, and a big one
# falls out of the CPU caches: 2.9 us of CPU per entry at COUNT 50,000, 1.1 us at 500 (redis-py
# with hiredis, 300-byte entries, same valkey).
READ_COUNT = 500
# A window closes at its count `n`, unless the newest window a raw sink has split into its table's
# partitions (`Window.partitions`) fell into this many or more: then it reads on to its byte and
# time limits. A backfill spread over years touches a partition per day whatever the window's
# size, and a commit costs ~0.7 ms per file, so more rows per window are more rows per file.
SPREAD_PARTITIONS = 32
SAMPLE_ENTRIES = 8  # before any sink has told, the days of this many of a window's entries are counted


class StreamInterrupted(RuntimeError):
    """Reading the stream failed (Redis went away, maybe to come back with older data): the agent
    starts again from its last committed position, so nothing it had read ahead is skipped."""


class StreamReader:
    """The stream of `model` as agent `consumer` reads it, through `redis` (a client whose XREAD
    replies are left as hiredis parsed them, see `streamapp.redis_client.reader_client`), until
    `stopping` is set. `shard`: which of the model's sub-streams (`names.stream`) it reads."""

    def __init__(
        self,
        redis: Client,
        model: TableModel,
        consumer: str,
        stopping: asyncio.Event,
        *,
        window_bytes: int,
        wait_replicas: int = 0,
        wait_ms: int = 1000,
        shard: int = 0,
    ) -> None:
        self.redis = redis
        self.model = model
        self.shard = shard
        self.key = names.stream(model.type_name(), shard)
        self.acks = names.acks(shard)  # the hints of this shard's streams, in its slot
        self.consumer = consumer
        self.stopping = stopping
        self.window_bytes = window_bytes  # a window closes once its payloads hold this many bytes
        self.wait_replicas, self.wait_ms = wait_replicas, wait_ms  # see `replicated`
        self.server = ""  # with wait_replicas: the run_id of the server it reads from, see `replicated`
        self.acked = "0-0"  # the last position this agent acknowledged: reading resumes after it
        self.handed: collections.deque[Told] = collections.deque(maxlen=2)  # of the newest windows handed out
        self.guessed: bool | None = None  # whether the first window's sample was spread over many days

    async def register(self) -> None:
        """Record this consumer, so the stream is never trimmed past what it has not committed and
        its progress counts for backpressure, and resume after the position it acknowledged."""
        field = names.ack_field(self.key, self.consumer)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hsetnx(self.acks, field, "0-0")
                pipe.hsetnx(names.progress(self.key), self.consumer, str(Mark("0-0", 0, 0)))
                pipe.hget(self.acks, field)
                *_, hint = await pipe.execute()
            if self.wait_replicas:
                self.server = await server_run_id(self.redis, self.shard)
        except FAILURES as e:
            raise StreamInterrupted(f"registering {self.consumer} on {self.key} failed: {e}") from e
        if hint and entry_id(text(hint)) > entry_id(self.acked):
            self.acked = text(hint)

    async def windows(
        self, after: str, n: int, within: float, *, idle: bool = False, prefetch: bool = False
    ) -> AsyncIterator[Window[Any]]:
        """Windows of up to `n` events from the entry after `after`, each closed at most `within`
        seconds after its first event, acknowledging nothing (the caller `ack`s what it committed).
        `idle=True`: an empty window every `within` seconds while nothing arrives, so the caller
        sees time pass. `prefetch=True`: the next window is read while the caller handles this one
        (its commit runs in a thread, so reading overlaps it); only for callers whose handling does
        not depend on when a window was read. On shutdown the open window is handed out early."""
        if n < 1 or within <= 0:
            raise ValueError("take() needs n >= 1 and within > 0")
        cursor = after
        pending: asyncio.Task[Collected] | None = None
        try:
            while True:
                if pending is not None:
                    got = await pending
                    pending = None
                    if got.ids and len(got.ids) >= n and self.spread():
                        # prefetched and closed at `n` before the sink told how spread the last
                        # window was (it knows now, it has committed it): read on
                        got = await self._collect(got.end or cursor, n, within, idle, got)
                else:
                    got = await self._collect(cursor, n, within, idle)
                if got.end is not None:
                    cursor = got.end
                if got.end is not None or (idle and not self.stopping.is_set()):
                    if got.ids:
                        metrics.WINDOW_EVENTS.labels(self.consumer).observe(len(got.ids))
                    if prefetch and got.end is not None and not self.stopping.is_set():
                        pending = asyncio.create_task(self._collect(cursor, n, within, idle))
                    window: Window[Any] = Window(
                        self.model,
                        self.key,
                        self.consumer,
                        got.ids,
                        got.payloads,
                        got.received,
                        got.last,
                        dead=got.dead,
                        end=got.end,
                    )
                    if got.ids and self.wait_replicas:
                        await self.replicated()
                    self.handed.append(window.told)
                    yield window
                if self.stopping.is_set() and pending is None:
                    return  # a window prefetched when the stop came is handed out first
        finally:
            if pending is not None:
                pending.cancel()  # read, never handed out, never acked: read again after a restart

    async def _collect(self, cursor: str, n: int, within: float, idle: bool, got: Collected | None = None) -> Collected:
        """Read up to `n` events (or `window_bytes` of payloads) after `cursor`, until `within`
        seconds after the first (or, idle, after the start), or the stop; past `n` while the last
        windows were spread (`spread`), until the stream has no more. `got`: a window to read on."""
        loop = asyncio.get_running_loop()
        deadline: float | None = loop.time() + within if idle or got is not None else None
        got = got or Collected([], [], [])
        per_entry = 1  # events per entry in the last read: sizes XREAD's COUNT so a window stays near n
        while got.bytes < self.window_bytes and not self.stopping.is_set():
            limit = sys.maxsize if self.spread() else n  # looked at again each read: the sink may tell it meanwhile
            if len(got.ids) >= limit and not self.handed and self.guessed is None:
                # the first window of a backlog, before any sink has told: a sample decides
                self.guessed = await asyncio.to_thread(sampled_days, self.model, got) >= SPREAD_PARTITIONS
                limit = sys.maxsize if self.spread() else n
            if len(got.ids) >= limit:
                break
            reading_on = len(got.ids) >= n  # past the count: only what is in the stream already, no wait
            block: int | None = None if reading_on else READ_BLOCK_MS
            if deadline is not None and block is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                block = max(1, min(READ_BLOCK_MS, int(remaining * 1000)))
            entries = await self._read(cursor, max(1, min(READ_COUNT, (limit - len(got.ids)) // per_entry)), block)
            read_before, end_before = len(got.ids), got.end
            got.add(entries, limit, self.window_bytes)
            if reading_on and not entries:
                break  # the backlog is read: the window closes now, not at its deadline
            if got.end != end_before:
                cursor = got.end or cursor
                per_entry = max(1, (len(got.ids) - read_before) // max(1, len(entries)))
                if deadline is None:
                    deadline = loop.time() + within
        return got

    async def replicated(self) -> None:
        """Hand out a window only once `wait_replicas` replicas have its entries (WAIT), so that no
        commit holds an entry a failover may lose: that entry's ingest was answered 503, and its
        retry, which the promoted replica would not know as a duplicate, would be stored twice.
        Not confirmed in time: StreamInterrupted, the agent reads it again from its position.

        The server's run_id is read on the same connection as the WAIT: were it not the one the
        agent started reading from (`register`), the entries may come from a primary that failed
        over since, and the promoted one's replicas say nothing about them: read again too."""
        try:
            (server,), acked = await write_and_wait(
                self.redis,
                [("EVAL", RUN_ID_LUA, 1, names.checked(self.shard))],
                self.wait_replicas,
                self.wait_ms,
                shard=self.shard,
            )
            if isinstance(server, Exception):
                raise server
        except FAILURES as e:
            raise StreamInterrupted(f"waiting for the replicas of {self.key} failed: {e}") from e
        if text(server) != self.server:
            raise StreamInterrupted(f"{self.key}: Redis changed (a failover) while the window was read; read again")
        if acked < self.wait_replicas:
            raise StreamInterrupted(
                f"{self.key}: {acked} of {self.wait_replicas} replicas have the window's entries; read again"
            )

    def spread(self) -> bool:
        """Whether the newest window a sink has split into partitions fell into many of them (or,
        before any has, whether the sample of the first window did)."""
        for told in reversed(self.handed):
            if told.partitions is not None:
                return bool(told.partitions >= SPREAD_PARTITIONS)
        return bool(self.guessed)

    async def _read(self, cursor: str, count: int, block_ms: int | None) -> list[Any]:
        """Up to `count` entries after `cursor`, waiting up to `block_ms` for one (None: no wait)."""
        block = () if block_ms is None else ("BLOCK", block_ms)
        try:
            reply = await self.redis.execute_command(  # type: ignore[no-untyped-call,unused-ignore]
                "XREAD", "COUNT", count, *block, "STREAMS", self.key, cursor
            )
        except FAILURES as e:
            raise StreamInterrupted(f"reading {self.key} failed: {e}") from e
        if not reply:
            return []
        # RESP2: [[key, entries]]; RESP3: {key: entries}. Entries: [[id, [field, value, ...]], ...]
        entries: list[Any] = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
        return entries

    async def ack(self, last_id: str, progress: Mark | None = None) -> None:
        """Move the Redis hints: where reading resumes and below which the stream may be trimmed
        (`last_id`), and how far this consumer has handled the stream (`progress`, for
        backpressure). Losing them is harmless: the Iceberg position decides what is written."""
        self.acked = last_id
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(self.acks, names.ack_field(self.key, self.consumer), last_id)
                if progress is not None:
                    pipe.hset(names.progress(self.key), self.consumer, str(progress))
                await pipe.execute()
        except FAILURES as e:  # hints; the next ack writes them again
            log.warning("could not record position %s of %s: %s", last_id, self.key, e)

    async def report(self, progress: Mark) -> None:
        """Only the progress hint: an aggregate has read up to `progress` into its windows."""
        try:
            await self.redis.hset(names.progress(self.key), self.consumer, str(progress))
        except FAILURES as e:
            log.warning("could not record the progress of %s on %s: %s", self.consumer, self.key, e)


def sampled_days(model: TableModel, got: Collected) -> int:
    """How many days (of the model's partition column) SAMPLE_ENTRIES entries spread through the
    window hold events of: a cheap look at a backlog's first window, whose sink has told nothing
    yet (blocking: a thread's job)."""
    # pyarrow: only a worker reading a backlog gets here, never the web process (35 MB of RSS)
    import pyarrow as pa
    import pyarrow.compute as pc

    step = max(1, len(got.payloads) // SAMPLE_ENTRIES)
    payloads = got.payloads[::step][:SAMPLE_ENTRIES]
    counts = [p.count(b"\n") + 1 for p in payloads]  # NDJSON: one event per line
    try:
        rows = model.to_arrow(payloads, [got.received[0]] * sum(counts))
        days = pc.divide(rows.column(model.partition_column).cast(pa.int64()), 86_400_000_000)
    except Exception:  # noqa: BLE001 - a sample that does not parse tells nothing; the sink will tell
        return 0
    return int(pc.count_distinct(days).as_py())
