"""Reading one Redis stream for one agent: in entry-id order, from a position, cut into windows.

Positions, not consumer groups: each agent reads the whole stream in entry-id order from the last
position it committed, so a sink can make a window idempotent by comparing entry ids with the
position stored in the Iceberg table (see `streamapp.lake.sink`). Redis keeps only a hint of that
position (`names.ACKS`), written after the commit; it decides where reading resumes and how far the
stream may be trimmed, never what is written. (An aggregate agent acks its replay cursor instead,
the oldest entry its open windows still need, and resumes from the cursor its table records.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from streamapp import metrics, names
from streamapp.entries import Window, entry_id, unpack
from streamapp.redis_client import text
from streamapp.table_model import TableModel

log = logging.getLogger(__name__)

READ_BLOCK_MS = 1000  # longest wait inside one XREAD: bounds how late a stop or a deadline is seen
# Most entries one XREAD asks for. A reply is parsed into Python objects in one go, and a big one
# falls out of the CPU caches: 2.9 us of CPU per entry at COUNT 50,000, 1.1 us at 500 (redis-py
# with hiredis, 300-byte entries, same valkey).
READ_COUNT = 500

# Run at agent start when the Iceberg table holds a position on this stream that is past the
# stream's last id (or the stream is missing): this Redis has lost the entries up to there (a wiped
# or replaced server) and its clock is behind, so new entries got ids the sink would take as already
# committed. Move the last id past the position (ARGV[1]) and re-append the entries it holds,
# atomically. Returns how many entries moved, or -1 when the stream's last id is at or past the
# position (the common case; "at" is a stream drained and committed to its last entry, whose
# entries must not move: they would get new ids and be written again).
_LIFT_LUA = """
local key = KEYS[1]
local floor_ms, floor_seq = tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', key) == 1 then
  local info = redis.call('XINFO', 'STREAM', key)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      local dash = string.find(info[i + 1], '-', 1, true)
      local ms = tonumber(string.sub(info[i + 1], 1, dash - 1))
      local seq = tonumber(string.sub(info[i + 1], dash + 1))
      if ms > floor_ms or (ms == floor_ms and seq >= floor_seq) then
        return -1
      end
    end
  end
end
local entries = redis.call('XRANGE', key, '-', '+')
redis.call('XADD', key, 'MAXLEN', '0', ARGV[1], '_', '')
for _, entry in ipairs(entries) do
  redis.call('XADD', key, '*', unpack(entry[2]))
end
return #entries
"""

Batch = tuple[list[str], list[bytes], list[int]]  # event ids, entry payloads, event receive times


class StreamReader:
    """The stream of `model` as agent `consumer` reads it, through `redis` (a client whose XREAD
    replies are left as hiredis parsed them, see `streamapp.redis_client.reader_client`), until
    `stopping` is set. `committed`: the highest position any Iceberg table holds for this stream
    (None: none does)."""

    def __init__(
        self, redis: Redis, model: TableModel, consumer: str, stopping: asyncio.Event, committed: str | None = None
    ) -> None:
        self.redis = redis
        self.model = model
        self.key = names.stream(model.type_name())
        self.consumer = consumer
        self.stopping = stopping
        self.acked = "0-0"  # the last position this agent acknowledged: reading resumes after it
        self._committed = committed
        self._needs_register = False  # set when Redis went away: it may come back empty

    async def register(self) -> None:
        """Record this consumer so the stream is never trimmed past what it has not committed,
        and make sure new entries get ids past every committed position (see `_LIFT_LUA`)."""
        self._needs_register = False
        if self.acked != "0-0" and (self._committed is None or entry_id(self.acked) > entry_id(self._committed)):
            self._committed = self.acked  # what this agent committed since the worker started
        if self._committed:
            ms, seq = entry_id(self._committed)
            moved = await self.redis.eval(_LIFT_LUA, 1, self.key, f"{ms}-{seq + 1}", ms, seq)
            if moved >= 0:
                log.error(
                    "%s: Redis's last id was behind the position committed to Iceberg (%s): this "
                    "Redis lost its data and its clock is behind. Moved %d entries past it.",
                    self.key,
                    self._committed,
                    moved,
                )
        field = names.ack_field(self.key, self.consumer)
        await self.redis.hsetnx(names.ACKS, field, "0-0")
        hint = await self.redis.hget(names.ACKS, field)
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
        pending: asyncio.Task[Batch] | None = None
        try:
            while True:
                if pending is not None:
                    ids, payloads, received = await pending
                    pending = None
                else:
                    ids, payloads, received = await self._collect(cursor, n, within, idle)
                if ids:
                    cursor = ids[-1]
                if ids or (idle and not self.stopping.is_set()):
                    if ids:
                        metrics.WINDOW_EVENTS.labels(self.consumer).observe(len(ids))
                    if prefetch and ids and not self.stopping.is_set():
                        pending = asyncio.create_task(self._collect(cursor, n, within, idle))
                    yield Window(self.model, self.key, self.consumer, ids, payloads, received)
                if self.stopping.is_set() and pending is None:
                    return  # a window prefetched when the stop came is handed out first
        finally:
            if pending is not None:
                pending.cancel()  # read, never handed out, never acked: read again after a restart

    async def _collect(self, cursor: str, n: int, within: float, idle: bool) -> Batch:
        """Read up to `n` events after `cursor`, until `within` seconds after the first (or, idle,
        after the start), or the stop: their ids, the entries' payloads and the receive times."""
        loop = asyncio.get_running_loop()
        ids: list[str] = []
        payloads: list[bytes] = []
        received: list[int] = []
        deadline: float | None = loop.time() + within if idle else None
        per_entry = 1  # events per entry in the last read: sizes XREAD's COUNT so a window stays near n
        while len(ids) < n and not self.stopping.is_set():
            block = READ_BLOCK_MS
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                block = max(1, min(READ_BLOCK_MS, int(remaining * 1000)))
            if self._needs_register:
                await self.register()
            entries = await self._read(cursor, max(1, min(READ_COUNT, (n - len(ids)) // per_entry)), block)
            read_before = len(ids)
            unpack(entries, n, ids, payloads, received)
            if len(ids) > read_before:
                cursor = ids[-1]
                per_entry = max(1, (len(ids) - read_before) // max(1, len(entries)))
                if deadline is None:
                    deadline = loop.time() + within
        return ids, payloads, received

    async def _read(self, cursor: str, count: int, block_ms: int) -> list[Any]:
        try:
            reply = await self.redis.execute_command(  # type: ignore[no-untyped-call]
                "XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", self.key, cursor
            )
        except (TimeoutError, RedisError, OSError) as e:
            log.warning("reading %s failed (%s); retrying in 1 s", self.key, e)
            self._needs_register = True
            await asyncio.sleep(1)
            return []
        if not reply:
            return []
        # RESP2: [[key, entries]]; RESP3: {key: entries}. Entries: [[id, [field, value, ...]], ...]
        entries: list[Any] = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
        return entries

    async def ack(self, last_id: str) -> None:
        """Move the Redis hint, from which reading resumes and below which the stream may be
        trimmed. Losing it is harmless: the Iceberg position decides what is written."""
        self.acked = last_id
        try:
            await self.redis.hset(names.ACKS, names.ack_field(self.key, self.consumer), last_id)
        except (TimeoutError, RedisError, OSError) as e:  # a hint; the next ack writes it again
            log.warning("could not record position %s of %s: %s", last_id, self.key, e)
