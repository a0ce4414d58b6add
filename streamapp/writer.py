"""Group commit into Redis: every request arriving while a write is in flight rides the next one.

One Lua script per flush deduplicates by `event_id` (SET NX with the dedupe TTL) and XADDs the
new events, atomically, so a duplicate is never half-written. Awaiting one XADD per request caps
ingest at a round trip per request; a flush costs one round trip for all of them.

Every entry carries a dedupe key (server-assigned ids included), which makes a flush idempotent:
when a connection drops after Redis ran the script but before its reply arrived, the client's
automatic retry writes nothing twice (the entries it already wrote come back as duplicates).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import msgspec
from redis.asyncio import Redis

from streamapp import keys, metrics

log = logging.getLogger(__name__)

# ARGV: ttl, seen-key prefix, and one MessagePack array of (stream index into KEYS, dedupe key,
# payload, received_at_us)*: one argument instead of four per entry, since packing arguments one by
# one in redis-py was 30% of the web process's time on 100-event arrays.
# Returns 1 per entry written, 0 per duplicate. The `#!lua` line makes Redis refuse the whole script
# with an OOM error when it is over maxmemory, instead of failing on the write that crosses it
# halfway through a flush.
_INGEST_LUA = """#!lua
local ttl = tonumber(ARGV[1])
local seen = ARGV[2]
local entries = cmsgpack.unpack(ARGV[3])
local out = {}
for i = 1, #entries, 4 do
  if redis.call('SET', seen .. entries[i + 1], '1', 'NX', 'EX', ttl) then
    redis.call('XADD', KEYS[entries[i]], '*', 'e', entries[i + 2], 'r', entries[i + 3])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

_pack = msgspec.msgpack.Encoder().encode

MAX_FLUSH_ENTRIES = 5000  # bounds how long one script holds Redis


@dataclasses.dataclass(slots=True)
class Entry:
    stream: str  # Redis stream key
    dedupe_key: str  # the event_id; a fresh unique id for rejected events
    payload: bytes
    received_us: int


@dataclasses.dataclass(slots=True)
class _Pending:
    entries: list[Entry]
    future: asyncio.Future[list[int]]


class StreamWriter:
    """Appends entries to Redis streams with group commit. `write` returns once they are in Redis."""

    def __init__(self, redis: Redis, dedupe_seconds: int) -> None:
        self._redis = redis
        self._script = redis.register_script(_INGEST_LUA)
        self._ttl = str(dedupe_seconds)
        self._queue: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stream-writer")

    async def close(self) -> None:
        """Flush what is queued, then stop. Called after the web server stopped taking requests."""
        while self._queue and self._task is not None and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def write(self, entries: list[Entry]) -> list[int]:
        """1 for each entry written, 0 for each duplicate. Raises the Redis error if the flush failed."""
        if not entries:
            return []
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(entries, future))
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch, size = [], 0
                while self._queue and (not batch or size + len(self._queue[0].entries) <= MAX_FLUSH_ENTRIES):
                    pending = self._queue.pop(0)
                    batch.append(pending)
                    size += len(pending.entries)
                await self._flush(batch)

    async def _flush(self, batch: list[_Pending]) -> None:
        stream_index: dict[str, int] = {}
        flat: list[int | str | bytes] = []
        for pending in batch:
            for e in pending.entries:
                idx = stream_index.setdefault(e.stream, len(stream_index) + 1)
                # str, not bytes: the Lua cmsgpack of Redis and Valkey reads no bin type; the time
                # as str never passes through a Lua float.
                flat += (idx, e.dedupe_key, e.payload.decode(), str(e.received_us))
        args = [self._ttl, keys.SEEN, _pack(flat)]
        started = time.perf_counter()
        try:
            results = await self._script(keys=list(stream_index), args=args)
            metrics.REDIS_WRITE_SECONDS.observe(time.perf_counter() - started)
        except Exception as error:  # every waiter learns the write failed; none is left hanging
            log.warning("writing %d events of %d requests to Redis failed: %s", len(flat) // 4, len(batch), error)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        offset = 0
        for pending in batch:
            n = len(pending.entries)
            if not pending.future.done():
                pending.future.set_result([int(r) for r in results[offset:offset + n]])
            offset += n
