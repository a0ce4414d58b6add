"""The source: a Redis stream of one event type, read in order and cut into windows.

Positions, not consumer groups: each agent reads the whole stream in entry-id order from the last
position it committed, so the sink can make a window idempotent by comparing entry ids with the
position stored in the Iceberg table (see `streamapp.sink`). Redis keeps only a hint of that
position (`keys.ACKS`), written after the commit; it decides where reading resumes and how far the
stream may be trimmed, never what is written. (An aggregate agent acks its replay cursor instead,
the oldest entry its open windows still need, and resumes from the cursor its table records.)
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from streamapp import keys, metrics

if TYPE_CHECKING:
    import pyarrow as pa

    from streamapp.aggregate import GroupBy
    from streamapp.app import App

log = logging.getLogger(__name__)

M = TypeVar("M")

READ_BLOCK_MS = 1000  # longest wait inside one XREAD: bounds how late a stop or a deadline is seen
# Most entries one XREAD asks for. A reply is parsed into Python objects in one go, and a big one
# falls out of the CPU caches: 2.9 us of CPU per entry at COUNT 50,000, 1.1 us at 500 (redis-py
# with hiredis, 300-byte entries, same valkey).
READ_COUNT = 500


def entry_id(value: str) -> tuple[int, int]:
    """A Redis stream id "ms-seq" as a tuple that compares in stream order."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


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


class Window(Sequence[M]):
    """Consecutive entries of one stream: their payloads, the stream id and receive time of each
    event (an entry holding several events repeats its id), and the events, decoded when first
    asked for: a raw sink never asks, it builds its table from the payloads.

    An agent hands a window to `app.table(...).append(window)`, which writes its rows and the
    stream position it ends at in one Iceberg commit.
    """

    def __init__(self, model: Any, stream_key: str, consumer: str, ids: list[str], payloads: list[bytes],
                 received_us: list[int]) -> None:
        self.model = model
        self.stream_key = stream_key
        self.consumer = consumer
        self.ids = ids
        self.payloads = payloads
        self.received_us = received_us

    @functools.cached_property
    def events(self) -> list[M]:
        events = _decoder(self.model)(ndjson_array(b"\n".join(self.payloads)))
        if len(events) != len(self.ids):
            raise ValueError(f"{self!r}: its entries hold {len(events)} events, but their counts (n) say {len(self.ids)}")
        return events

    @property
    def last_id(self) -> str:
        return self.ids[-1]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):  # type: ignore[override]
        return self.events[i]

    def __iter__(self) -> Iterator[M]:
        return iter(self.events)

    def to_arrow(self, start: int = 0) -> pa.Table:
        """The window's rows as the model's table schema, from its `start`-th event on."""
        table = self.model.to_arrow(self.payloads, self.received_us)
        return table.slice(start) if start else table

    def __repr__(self) -> str:
        return f"<Window {self.stream_key} {len(self)} events {self.ids[0]}..{self.last_id}>"


def ndjson_array(ndjson: bytes) -> bytes:
    """Events stored as NDJSON, as one JSON array: msgspec never writes a raw newline inside JSON,
    so each one separates two events."""
    return b"[" + ndjson.replace(b"\n", b",") + b"]"


@functools.cache
def _decoder(model: Any) -> Callable[[bytes], list]:
    return msgspec.json.Decoder(list[model]).decode


class Stream(Generic[M]):
    """The events of one model, as `app.stream(Model)` returns it to an agent."""

    def __init__(self, model: type[M], app: App | None = None) -> None:
        self.model = model
        self.app = app
        self.key = keys.stream(model.type_name())  # type: ignore[attr-defined]
        self._redis: Redis | None = None
        self._consumer = ""
        self._stopping: asyncio.Event | None = None
        self._acked = "0-0"
        self._committed: str | None = None
        self._needs_register = False  # set when Redis went away: it may come back empty

    @property
    def consumer(self) -> str:
        """The name of the agent reading this stream (set by the worker)."""
        return self._consumer

    def bind(self, redis: Redis, consumer: str, stopping: asyncio.Event, committed: str | None = None) -> None:
        """Called by the worker before the agent runs: where to read, who reads, and the highest
        position any Iceberg table has committed for this stream (None: none has)."""
        self._redis, self._consumer, self._stopping = redis, consumer, stopping
        self._committed = committed

    async def register(self) -> None:
        """Record this consumer so the stream is never trimmed past what it has not committed,
        and make sure new entries get ids past every committed position (see `_LIFT_LUA`)."""
        assert self._redis is not None
        self._needs_register = False
        if self._acked != "0-0" and (self._committed is None or entry_id(self._acked) > entry_id(self._committed)):
            self._committed = self._acked  # what this agent committed since the worker started
        if self._committed:
            ms, seq = entry_id(self._committed)
            moved = await self._redis.eval(_LIFT_LUA, 1, self.key, f"{ms}-{seq + 1}", ms, seq)
            if moved >= 0:
                log.error("%s: Redis's last id was behind the position committed to Iceberg (%s): this "
                          "Redis lost its data and its clock is behind. Moved %d entries past it.",
                          self.key, self._committed, moved)
        field = keys.ack_field(self.key, self._consumer)
        await self._redis.hsetnx(keys.ACKS, field, "0-0")
        hint = await self._redis.hget(keys.ACKS, field)
        if hint and entry_id(hint.decode()) > entry_id(self._acked):
            self._acked = hint.decode()

    async def take(self, n: int, within: float) -> AsyncIterator[Window[M]]:
        """Windows of up to `n` events, each closed at most `within` seconds after its first event.

        A window is acknowledged when the agent asks for the next one. If the agent raises
        instead, the window is not acknowledged, and the agent's restart receives it again.
        On shutdown the open window is handed out early, so nothing read is held back.
        """
        async for window in self.read(self._acked, n, within, prefetch=True):
            yield window
            await self.ack(window.last_id)

    async def read(self, after: str, n: int, within: float, *, idle: bool = False,
                   prefetch: bool = False) -> AsyncIterator[Window[M]]:
        """Like `take`, from the entry after `after`, and acknowledging nothing (the caller
        `ack`s what it committed). `idle=True`: an empty window every `within` seconds while
        nothing arrives, so the caller sees time pass. `prefetch=True`: the next window is read
        and decoded while the caller handles this one (its commit runs in a thread, so reading
        overlaps it); only for callers whose handling does not depend on when a window was read."""
        if self._redis is None or self._stopping is None:
            raise RuntimeError("the stream is not bound: run agents with `python -m streamapp worker`")
        if n < 1 or within <= 0:
            raise ValueError("take() needs n >= 1 and within > 0")
        cursor = after
        pending: asyncio.Task | None = None
        try:
            while True:
                if pending is not None:
                    ids, payloads, received = await pending
                    pending = None
                else:
                    ids, payloads, received = await self._collect(cursor, n, within, idle)
                if ids:
                    cursor = ids[-1]
                if ids or (idle and not self._stopping.is_set()):
                    if ids:
                        metrics.WINDOW_EVENTS.labels(self._consumer).observe(len(ids))
                    if prefetch and ids and not self._stopping.is_set():
                        pending = asyncio.create_task(self._collect(cursor, n, within, idle))
                    yield Window(self.model, self.key, self._consumer, ids, payloads, received)
                if self._stopping.is_set() and pending is None:
                    return  # a window prefetched when the stop came is handed out first
        finally:
            if pending is not None:
                pending.cancel()  # read, never handed out, never acked: read again after a restart

    async def _collect(self, cursor: str, n: int, within: float, idle: bool) -> tuple[list[str], list[bytes], list[int]]:
        """Read up to `n` events after `cursor`, until `within` seconds after the first (or, idle,
        after the start), or the stop: their ids, the entries' payloads and the receive times."""
        assert self._stopping is not None
        loop = asyncio.get_running_loop()
        ids: list[str] = []
        payloads: list[bytes] = []
        received: list[int] = []
        deadline: float | None = loop.time() + within if idle else None
        per_entry = 1  # events per entry in the last read: sizes XREAD's COUNT so a window stays near n
        while len(ids) < n and not self._stopping.is_set():
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
            for raw_id, fields in entries:
                if len(ids) >= n:
                    break  # the rest is read again for the next window
                if len(fields) == 4:  # [b"e", payload, b"r", received_us]: one event
                    e, r = (1, 3) if fields[0] == b"e" else (3, 1)
                    ids.append(raw_id.decode())
                    payloads.append(fields[e])
                    received.append(int(fields[r]))
                    continue
                # Several events of one request: e holds them as NDJSON, n says how many.
                f = dict(zip(fields[::2], fields[1::2]))
                count = int(f.get(b"n", 1))
                ids.extend([raw_id.decode()] * count)
                payloads.append(f[b"e"])
                received.extend([int(f[b"r"])] * count)
            if len(ids) > read_before:
                cursor = ids[-1]
                per_entry = max(1, (len(ids) - read_before) // max(1, len(entries)))
                if deadline is None:
                    deadline = loop.time() + within
        return ids, payloads, received

    def group_by(self, key: Callable[[M], str | None], *, column: str) -> GroupBy[M]:
        """Key the events for a windowed aggregate; `column` names the key's column in its table."""
        from streamapp.aggregate import GroupBy

        return GroupBy(self, key, column)

    async def _read(self, cursor: str, count: int, block_ms: int) -> list:
        assert self._redis is not None
        try:
            reply = await self._redis.execute_command("XREAD", "COUNT", count, "BLOCK", block_ms,
                                                      "STREAMS", self.key, cursor)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            log.warning("reading %s failed (%s); retrying in 1 s", self.key, e)
            self._needs_register = True
            await asyncio.sleep(1)
            return []
        if not reply:
            return []
        # RESP2: [[key, entries]]; RESP3: {key: entries}. Entries: [[id, [field, value, ...]], ...]
        return next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]

    async def ack(self, last_id: str) -> None:
        """Move the Redis hint, from which reading resumes and below which the stream may be
        trimmed. Losing it is harmless: the Iceberg position decides what is written."""
        self._acked = last_id
        assert self._redis is not None
        try:
            await self._redis.hset(keys.ACKS, keys.ack_field(self.key, self._consumer), last_id)
        except (RedisError, OSError, asyncio.TimeoutError) as e:  # a hint; the next ack writes it again
            log.warning("could not record position %s of %s: %s", last_id, self.key, e)
