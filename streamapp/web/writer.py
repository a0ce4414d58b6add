"""Group commit into Redis: every request arriving while a write is in flight rides the next one.

One Lua script per flush deduplicates by `event_id` and appends the new events, atomically, so a
duplicate is never half-written. Awaiting one XADD per request caps ingest at a round trip per
request; a flush costs one round trip for all of them.

Each request adds one stream entry per event type it holds: `e` its events as NDJSON, `n` how many,
`r` when it was received, `c` and `b` how many events and bytes the stream has had so far (the
format is `streamapp.entries`). One entry per event cost Redis three times as much per event.

Shards (`STREAMAPP_SHARDS`): an event goes to the shard of its dedupe id (`names.shard_of`), so a
retried event meets its dedupe set; a request's events of one type are split into one entry per
shard (`shard_entries`). A flush is one script call per shard it touches, at the same time, each
with that shard's keys only (one hash tag: one cluster node). A request fails when any shard it
wrote to failed; what it wrote to the others is found as duplicates when it is retried.

Before it writes anything, the script checks that the server is the one a worker last checked
against the lake (`names.checked(shard)`; else `Unchecked`, 503) and that no stream of the flush is over
its backlog limits (`BacklogFull`, 429): the slowest consumer's progress against the stream's
totals, so the limit is overshot by one flush at most.

Dedupe: the ids first written in one span of `dedupe_seconds / DEDUPE_SPANS` (by the server's clock)
are members of one set, which expires when it leaves the window; an id is a duplicate when any of
the DEDUPE_SPANS + 1 youngest sets holds it. So an id is remembered for at least `dedupe_seconds`
and at most one span longer. That replaced a key per id (SET NX EX): a set member costs less memory,
and one SMISMEMBER per set checks a whole flush.

Every event carries a dedupe id (server-assigned ids and rejected events included), which makes a
flush idempotent: when a connection drops after Redis ran the script but before its reply arrived,
the client's automatic retry writes nothing twice (what it wrote comes back as duplicates). The
ids are `dedupe_ids` and `rejected_dedupe_id`: scoped by the write key's source, so that one source
cannot claim another's event_ids in advance, and deterministic for rejected events, so that a
client retrying a bad event does not store it twice.

With `STREAMAPP_REDIS_WAIT_REPLICAS` > 0 a flush is the script, then `WAIT` on the same connection
(`redis_client.write_and_wait`): its requests are answered only once that many replicas have the
flush, or `NotReplicated` (503) after `STREAMAPP_REDIS_WAIT_MS`. The events may then be on the
primary only: a failover may lose them, or they survive and the client's retry is a duplicate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import string
import time

import msgspec
from redis.exceptions import NoScriptError, ResponseError

from streamapp import metrics, names
from streamapp.entries import COUNT, EVENTS, RECEIVED, RUNNING_BYTES, RUNNING_COUNT
from streamapp.redis_client import Client, NotReplicated, write_and_wait

log = logging.getLogger(__name__)

# How many spans the dedupe window is cut into. Each flush checks DEDUPE_SPANS + 1 sets: with sets of
# 500,000 ids, 4 spans cost valkey 3.1-3.6 us of CPU per event, 2 spans 2.1-2.3. An id is remembered
# up to 1/DEDUPE_SPANS longer than asked, which costs memory; at maxmemory the oldest set is evicted
# whole.
DEDUPE_SPANS = 2

# The events and bytes of a stream that its slowest consumer has not handled: the stream's running
# totals (`c`, `b`) at its last entry minus those at the slowest consumer's progress mark, or at
# the first entry still in the stream when that is later (trimmed entries were handled); with no
# consumer registered, all it holds. `tail` is the stream's last entry, read by the caller.
# Returns -1, -1 for entries written before they carried totals. Shared by the ingest script and
# the backlog sampler (streamapp.web.backlog), so that 429 and the metric count the same thing.
BACKLOG_LUA_FUNCTIONS = string.Template("""
local function total(entry, name)
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == name then return tonumber(f[i + 1]), f end
  end
  return nil, f
end
local function backlog(key, progress, tail)
  if not tail then return 0, 0 end
  local tc, tb = total(tail, '$RUNNING_COUNT'), total(tail, '$RUNNING_BYTES')
  if not tc or not tb then return -1, -1 end
  local head = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)[1]
  local hc, f = total(head, '$RUNNING_COUNT')
  local hb = total(head, '$RUNNING_BYTES')
  local low_c, low_b = 0, 0
  if hc and hb then
    local n, e = 1, ''
    for i = 1, #f, 2 do
      if f[i] == '$COUNT' then n = tonumber(f[i + 1]) elseif f[i] == '$EVENTS' then e = f[i + 1] end
    end
    low_c, low_b = hc - n, hb - #e
  end
  local slow_c, slow_b
  for _, mark in ipairs(redis.call('HVALS', progress)) do
    local c, b = string.match(mark, '^%S+ (%d+) (%d+)$$')
    if c then
      c, b = tonumber(c), tonumber(b)
      if not slow_c or c < slow_c then slow_c = c end
      if not slow_b or b < slow_b then slow_b = b end
    end
  end
  if slow_c then
    low_c, low_b = math.max(low_c, slow_c), math.max(low_b, slow_b)
  end
  return math.max(0, tc - low_c), math.max(0, tb - low_b)
end
""").substitute(EVENTS=EVENTS, COUNT=COUNT, RUNNING_COUNT=RUNNING_COUNT, RUNNING_BYTES=RUNNING_BYTES)

# KEYS: the streams, their progress hashes (in the same order), the key naming the server checked
# against the lake (names.CHECKED), then DEDUPE_SPANS + 3 dedupe sets of consecutive spans, oldest
# first, around the writer's idea of the server's clock (one span either side of it).
# ARGV: span in ms, the sets to check (DEDUPE_SPANS + 1), the span number of the first set in KEYS,
# the backlog limits (events, bytes), the ids (MessagePack array, one per event, in entry order),
# the entries (MessagePack array of (stream index into KEYS, events, received_us)*), then each
# entry's events as NDJSON: payloads are passed as they are and XADDed whole unless one of their
# events is a duplicate. Returns, and writes only in the first case:
#   {server time in ms, 1, the 1-based positions in ids of the duplicates...};
#   {server time in ms, 0} when the writer's clock is more than a span off (it retries);
#   {server time in ms, 2} when this server is not the one last checked against the lake (it
#     restarted, maybe from older data: streamapp.engine.recovery);
#   {server time in ms, 3, stream index, events, bytes} when a stream's backlog is over a limit.
# The `#!lua` line makes Redis refuse the whole script with an OOM error when it is over maxmemory,
# instead of failing on the write that crosses it halfway through a flush.
_INGEST_LUA = (
    "#!lua\n"
    + BACKLOG_LUA_FUNCTIONS
    + """
local span, check, first = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local max_events, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local bucket = math.floor(now / span)
local streams = (#KEYS - check - 3) / 2
local base = 2 * streams + 1  -- the CHECKED key; the dedupe sets follow it
local cur = base + 1 + bucket - first
if cur - check < base or cur > #KEYS then
  return {now, 0}
end
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
if redis.call('GET', KEYS[base]) ~= run_id then
  return {now, 2}
end
local tails = {}
for s = 1, streams do
  local tail = redis.call('XREVRANGE', KEYS[s], '+', '-', 'COUNT', 1)[1]
  tails[s] = tail or false
  local events, bytes = backlog(KEYS[s], KEYS[streams + s], tail)
  if events > max_events or bytes > max_bytes then
    return {now, 3, s, events, bytes}
  end
end
"""
)
_INGEST_LUA += string.Template("""
local ids = cmsgpack.unpack(ARGV[6])
local n = #ids
local dup, ndup = {}, 0
-- unpack() is limited by Lua's C stack (8000): ids go to Redis in slices
for b = cur - check + 1, cur do
  for s = 1, n, 4000 do
    local found = redis.call('SMISMEMBER', KEYS[b], unpack(ids, s, math.min(n, s + 3999)))
    for i = 1, #found do
      if found[i] == 1 and not dup[s + i - 1] then
        dup[s + i - 1] = true
        ndup = ndup + 1
      end
    end
  end
end
local fresh = ids
if ndup > 0 then
  fresh = {}
  for i = 1, n do
    if not dup[i] then fresh[#fresh + 1] = ids[i] end
  end
end
local added = 0
for s = 1, #fresh, 4000 do
  added = added + redis.call('SADD', KEYS[cur], unpack(fresh, s, math.min(#fresh, s + 3999)))
end
if added < #fresh then
  -- an id twice in this flush (one request or two): the first is written, the others are duplicates
  local seen = {}
  for i = 1, n do
    if not dup[i] then
      if seen[ids[i]] then
        dup[i] = true
        ndup = ndup + 1
      else
        seen[ids[i]] = true
      end
    end
  end
end
if added > 0 then
  redis.call('PEXPIREAT', KEYS[cur], (bucket + check) * span)
end
local entries = cmsgpack.unpack(ARGV[7])
local count, size = {}, {}
local pos = 0
for g = 1, #entries, 3 do
  local key, events = KEYS[entries[g]], entries[g + 1]
  local payload = ARGV[7 + (g + 2) / 3]
  local kept = events
  if ndup > 0 then
    local parts, from = {}, 1
    for j = 1, events do
      local to = string.find(payload, '\\n', from, true) or (#payload + 1)
      if not dup[pos + j] then parts[#parts + 1] = string.sub(payload, from, to - 1) end
      from = to + 1
    end
    kept = #parts
    payload = table.concat(parts, '\\n')
  end
  if kept > 0 then
    local c, b = count[key], size[key]
    if c == nil then
      c, b = 0, 0
      local tail = tails[entries[g]]
      if tail then
        c = total(tail, '$RUNNING_COUNT') or 0
        b = total(tail, '$RUNNING_BYTES') or 0
      end
    end
    c, b = c + kept, b + #payload
    count[key], size[key] = c, b
    redis.call('XADD', key, '*', '$EVENTS', payload, '$COUNT', kept, '$RECEIVED', entries[g + 2], '$RUNNING_COUNT',
               string.format('%.0f', c), '$RUNNING_BYTES', string.format('%.0f', b))
  end
  pos = pos + events
end
local out = {now, 1}
if ndup > 0 then
  for i = 1, n do
    if dup[i] then out[#out + 1] = i end
  end
end
return out
""").substitute(EVENTS=EVENTS, COUNT=COUNT, RECEIVED=RECEIVED, RUNNING_COUNT=RUNNING_COUNT, RUNNING_BYTES=RUNNING_BYTES)

_pack = msgspec.msgpack.Encoder().encode

MAX_FLUSH_EVENTS = 5000  # bounds how long one script holds Redis
# A second flush leaves while the first runs in Redis, so that the web process prepares (and parses
# the next requests) while Redis writes, instead of each waiting for the other.
MAX_IN_FLIGHT = 2

_NONE: tuple[int, ...] = ()

# An event_id holds no control character (ingest refuses them), so these separators cannot occur in
# one: "<source>\x1f<event_id>" splits at its last \x1f, and a rejected event's id, which holds
# \x1e, is never an event's.
_SCOPE = "\x1f"
_REJECTED = "\x1e"


def dedupe_ids(event_ids: list[str], source: str | None) -> list[str]:
    """The dedupe ids of events sent with `source`'s write key: each event_id scoped by the source.
    Without write keys (source None) the event_id itself, as before scoping existed, so that ids
    already in Redis keep being found."""
    if source is None:
        return event_ids
    prefix = source + _SCOPE
    return [prefix + i for i in event_ids]


def rejected_dedupe_id(raw: str, source: str | None) -> str:
    """The dedupe id of a rejected event: a hash of its raw JSON (as ingest normalised it), scoped by
    the source like an event_id. The same bad event retried gets the same id, so it is stored once;
    two different ones differ (128-bit BLAKE2b)."""
    own = _REJECTED + hashlib.blake2b(raw.encode(), digest_size=16).hexdigest()
    return own if source is None else source + _SCOPE + own


@dataclasses.dataclass(slots=True)
class Entry:
    """The events of one request for one stream: they become one stream entry."""

    stream: str  # Redis stream key
    ids: list[str]  # one dedupe id per event: `dedupe_ids`, `rejected_dedupe_id`
    payload: bytes  # the events' JSON, separated by "\n"
    received_us: int
    shard: int = 0  # `names.shard_of` its ids: `stream` is that shard's (see `shard_entries`)


def shard_entries(
    type_name: str, ids: list[str], payload: bytes, received_us: int, shards: int
) -> list[tuple[Entry, list[int]]]:
    """The entries of one request's events of one stream type (`ids` their dedupe ids, `payload`
    their NDJSON lines in the same order) over `shards`: one per shard their ids go to
    (`names.shard_of`), each with the positions in `ids` of its events, in order."""
    by_shard: dict[int, list[int]] = {}
    for i, dedupe_id in enumerate(ids):
        by_shard.setdefault(names.shard_of(dedupe_id, shards), []).append(i)
    if len(by_shard) == 1:
        ((shard, positions),) = by_shard.items()
        return [(Entry(names.stream(type_name, shard), ids, payload, received_us, shard), positions)]
    lines = payload.split(b"\n")
    return [
        (
            Entry(
                names.stream(type_name, shard),
                [ids[i] for i in positions],
                b"\n".join([lines[i] for i in positions]),
                received_us,
                shard,
            ),
            positions,
        )
        for shard, positions in sorted(by_shard.items())
    ]


@dataclasses.dataclass
class Limits:
    """The backlog limits per stream that the script applies (see `streamapp.web.backlog`, which
    sizes `max_bytes` from Redis's maxmemory when the setting leaves it to it)."""

    max_events: int
    max_bytes: int


class Unchecked(Exception):
    """Redis restarted (maybe from older data) and no worker has checked it against the lake yet."""


class BacklogFull(Exception):
    """A stream holds more events (or bytes) than its slowest consumer has handled than allowed."""

    def __init__(self, stream: str, events: int, bytes_: int) -> None:
        super().__init__(f"{stream}: {events} events, {bytes_} bytes not handled yet")
        self.stream, self.events, self.bytes = stream, events, bytes_


@dataclasses.dataclass(slots=True)
class _Part:
    """What one flush writes to one shard: the script's arguments, and whose entries they are."""

    shard: int
    stream_index: dict[str, int] = dataclasses.field(default_factory=dict)  # stream key -> 1-based index
    ids: list[str] = dataclasses.field(default_factory=list)
    groups: list[int | str] = dataclasses.field(default_factory=list)
    payloads: list[bytes] = dataclasses.field(default_factory=list)
    members: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (request, entry, events)


def _assign(dups: list[int], members: list[tuple[int, int, int]], results: list[list[tuple[int, ...]]]) -> None:
    """Hand each entry of a shard's part the positions (0-based, within the entry) of its
    duplicates, from the script's 1-based positions in the part's ids."""
    offset = d = 0
    for p, i, n in members:
        end = offset + n
        mine = []
        while d < len(dups) and dups[d] <= end:
            mine.append(dups[d] - 1 - offset)
            d += 1
        if mine:
            results[p][i] = tuple(mine)
        if d == len(dups):
            return
        offset = end


@dataclasses.dataclass(slots=True)
class _Pending:
    entries: list[Entry]
    events: int
    future: asyncio.Future[list[tuple[int, ...]]]


class StreamWriter:
    """Appends entries to Redis streams with group commit. `write` returns once they are in Redis."""

    def __init__(
        self, redis: Client, dedupe_seconds: int, limits: Limits, *, wait_replicas: int = 0, wait_ms: int = 1000
    ) -> None:
        self._redis = redis
        self.limits = limits
        self._script = redis.register_script(_INGEST_LUA)
        self._wait_replicas, self._wait_ms = wait_replicas, wait_ms
        self._span_ms = max(1, math.ceil(dedupe_seconds * 1000 / DEDUPE_SPANS))
        # Per shard, the server's clock minus ours, learned from each reply: on a cluster each
        # shard's sets live on a node with its own clock, and one offset for all would flip
        # between them (a retry each time two clocks are a span apart); a dict entry costs nothing.
        self._clock_offset_ms: dict[int, int] = {}
        self._queue: list[_Pending] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stream-writer")

    async def close(self) -> None:
        """Flush what is queued, then stop. Called after the web server stopped taking requests."""
        while (self._queue or self._in_flight) and self._task is not None and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def write(self, entries: list[Entry]) -> list[tuple[int, ...]]:
        """For each entry, the positions (0-based, within the entry) of its events that were
        duplicates, usually none. Raises the Redis error if the flush failed."""
        if not entries:
            return []
        future: asyncio.Future[list[tuple[int, ...]]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(entries, sum(len(e.ids) for e in entries), future))
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                if len(self._in_flight) >= MAX_IN_FLIGHT:
                    await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue  # meanwhile more requests queued: they ride this flush
                batch: list[_Pending] = []
                size = 0
                while self._queue and (not batch or size + self._queue[0].events <= MAX_FLUSH_EVENTS):
                    pending = self._queue.pop(0)
                    batch.append(pending)
                    size += pending.events
                flush = asyncio.create_task(self._flush(batch))
                self._in_flight.add(flush)
                flush.add_done_callback(self._in_flight.discard)

    async def _flush(self, batch: list[_Pending]) -> None:
        parts: dict[int, _Part] = {}
        for p, pending in enumerate(batch):
            for i, e in enumerate(pending.entries):
                part = parts.get(e.shard)
                if part is None:
                    part = parts[e.shard] = _Part(e.shard)
                idx = part.stream_index.setdefault(e.stream, len(part.stream_index) + 1)
                part.ids += e.ids
                # str: the time as a Lua number would be written as 1.7e+15
                part.groups += (idx, len(e.ids), str(e.received_us))
                part.payloads.append(e.payload)
                part.members.append((p, i, len(e.ids)))
        started = time.perf_counter()
        outcomes: list[list[int] | BaseException]
        if len(parts) == 1:  # one shard (always so with STREAMAPP_SHARDS=1): no task to gather
            (part,) = parts.values()
            try:
                outcomes = [await self._write(part)]
            except Exception as error:  # noqa: BLE001 - every waiter learns the write failed
                outcomes = [error]
        else:  # one script per shard, each on the node that serves it, at the same time
            outcomes = await asyncio.gather(*map(self._write, parts.values()), return_exceptions=True)
        results = [[_NONE] * len(pending.entries) for pending in batch]
        failed: dict[int, BaseException] = {}  # request (index in batch) -> the error of a shard it wrote to
        for part, outcome in zip(parts.values(), outcomes, strict=True):
            if isinstance(outcome, BaseException):
                # The requests that wrote to this shard fail; what they wrote to other shards is
                # there, and their retry finds it as duplicates (same ids, same shards).
                if not isinstance(outcome, (Unchecked, BacklogFull, NotReplicated)):  # answered as such
                    log.warning(
                        "writing %d events of %d requests to Redis (shard %d) failed: %s",
                        len(part.ids),
                        len({p for p, _, _ in part.members}),
                        part.shard,
                        outcome,
                    )
                for p, _, _ in part.members:
                    failed.setdefault(p, outcome)
            elif outcome:
                _assign(outcome, part.members, results)
        if not failed:
            metrics.REDIS_WRITE_SECONDS.observe(time.perf_counter() - started)
        for p, pending in enumerate(batch):
            if pending.future.done():
                continue
            failure = failed.get(p)
            if failure is not None:
                pending.future.set_exception(failure)
            else:
                pending.future.set_result(results[p])

    async def _write(self, part: _Part) -> list[int]:
        """One shard's script call; the 1-based positions in `part.ids` of the duplicates."""
        args = [_pack(part.ids), _pack(part.groups), *part.payloads]
        streams = list(part.stream_index)
        reply = await self._call(part.shard, streams, args)
        if reply[1] == 0:  # our clock was off by more than a span: now we know the server's
            reply = await self._call(part.shard, streams, args)
        if reply[1] == 0:  # a ResponseError: the client is answered 503, as for any failed write
            raise ResponseError("the clock of Redis jumped by more than a dedupe span between two calls")
        if reply[1] == 2:
            raise Unchecked()
        if reply[1] == 3:
            raise BacklogFull(streams[reply[2] - 1], reply[3], reply[4])
        return reply[2:]

    async def _call(self, shard: int, streams: list[str], args: list[bytes]) -> list[int]:
        span = self._span_ms
        check = DEDUPE_SPANS + 1
        current = (time.time_ns() // 1_000_000 + self._clock_offset_ms.get(shard, 0)) // span
        first = current - check
        sets = [names.dedupe_bucket(b * span, shard) for b in range(first, current + 2)]
        keys = [*streams, *map(names.progress, streams), names.checked(shard), *sets]
        limits = [self.limits.max_events, self.limits.max_bytes]
        argv: list[int | bytes] = [span, check, first, *limits, *args]
        if self._wait_replicas:
            reply = await self._call_and_wait(shard, keys, argv)
        else:
            reply = await self._script(keys=keys, args=argv)
        self._clock_offset_ms[shard] = reply[0] - time.time_ns() // 1_000_000
        return reply

    async def _call_and_wait(self, shard: int, keys: list[str], argv: list[int | bytes]) -> list[int]:
        """The script, then WAIT for the replicas, on one connection; NotReplicated when fewer
        confirmed a flush that wrote (or found duplicates: their first copy must be there too)."""
        command = ("EVALSHA", self._script.sha, len(keys), *keys, *argv)
        for attempt in (1, 2):
            (result,), acked = await write_and_wait(
                self._redis, [command], self._wait_replicas, self._wait_ms, shard=shard
            )
            if isinstance(result, NoScriptError) and attempt == 1:
                await self._redis.script_load(_INGEST_LUA)  # a new or restarted server: load it, then again
                continue
            if isinstance(result, Exception):
                raise result
            break
        reply: list[int] = result
        if reply[1] == 1 and acked < self._wait_replicas:
            metrics.REDIS_NOT_REPLICATED.inc()
            raise NotReplicated(acked, self._wait_replicas)
        return reply
