"""Checking a Redis against the lake: after every start of Redis, before it takes new events.

A Redis can come back with older data than it had: `appendfsync everysec` loses up to a second in a
power cut, a restore from backup or a failover to a lagging replica loses more. The Iceberg tables
then hold positions (stream entry ids) past what the stream still has, and two things must hold:

- No entry is written twice: the entries still in the stream keep their ids (nothing is moved or
  re-appended), so each consumer's sink drops those at or before its own position, as it always
  does; a consumer behind them reads them as usual, and one whose prefetch ran ahead starts over
  from its position (`engine.reader.StreamInterrupted`).
- New events get ids past every committed position: were the server's clock behind those ids, a new
  event could get an id a sink takes as committed and skip. `XSETID` moves the stream's last id up
  to the highest committed position (a missing stream is created empty there).

Per shard (`STREAMAPP_SHARDS`): the web writes to a shard only while its marker
(`names.checked(shard)`) holds the run_id of the server holding the shard, and every start (or
failover) of that server changes the run_id: so no event is taken for that shard between a restart
and this check, which repairs that shard's streams (`names.shard_of_key`) and sets that marker. The
check is idempotent and sets the marker last, so a worker killed at any step of it leaves the next
check to do it again. Whatever Redis lost is counted from the totals each commit records with its
position (`names.mark_property`): per consumer, the events that were gone before it committed them
(`streamapp_redis_lost_events`), and in the log. Events accepted after the last commit of any
consumer and lost with Redis leave no trace to count; with `appendfsync everysec` that is at most
the last second before a crash.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from pyiceberg.catalog import Catalog
from pyiceberg.table import Table
from redis.exceptions import ResponseError

from streamapp import metrics, names
from streamapp.entries import RUNNING_BYTES, RUNNING_COUNT, Mark, entry_id, format_id
from streamapp.faults import crashpoint
from streamapp.lake.catalog import all_tables, committed_positions
from streamapp.redis_client import FAILURES, Client, server_run_id, text

log = logging.getLogger(__name__)

CHECK_EVERY_SECONDS = 1.0

# KEYS[1]: a stream; ARGV[1]: the highest position committed from it. Makes new entries get ids past
# it, touching no entry: "ok" (its last id is there already: a check killed halfway, done again),
# "moved" (XSETID) or "created" (the stream was missing: an entry at the next id, trimmed at once,
# leaves it empty with that last id).
_RAISE_LUA = """
local key, floor = KEYS[1], ARGV[1]
local dash = string.find(floor, '-', 1, true)
local floor_ms, floor_seq = tonumber(string.sub(floor, 1, dash - 1)), tonumber(string.sub(floor, dash + 1))
if redis.call('EXISTS', key) == 0 then
  redis.call('XADD', key, 'MAXLEN', '0', floor_ms .. '-' .. (floor_seq + 1), '_', '')
  return 'created'
end
local info = redis.call('XINFO', 'STREAM', key)
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then
    local last = info[i + 1]
    local d = string.find(last, '-', 1, true)
    local ms, seq = tonumber(string.sub(last, 1, d - 1)), tonumber(string.sub(last, d + 1))
    if ms > floor_ms or (ms == floor_ms and seq >= floor_seq) then
      return 'ok'
    end
  end
end
redis.call('XSETID', key, floor)
return 'moved'
"""


@dataclasses.dataclass(frozen=True)
class Repair:
    """What the check found and did for one stream whose Redis copy was behind the lake."""

    stream: str
    committed: str  # the highest committed position
    tail: str | None  # the stream's last entry when the check began
    action: str  # "moved" or "created"
    gone: int | None  # events Redis no longer held, counted from the marks (None: not countable)
    missing: dict[str, int]  # consumer -> events gone before it committed them


def committed_marks(tables: list[Table]) -> dict[str, dict[str, Mark]]:
    """stream key -> consumer -> the mark its last commit recorded, over these tables."""
    found: dict[str, dict[str, Mark]] = {}
    for table in tables:
        for prop, value in table.properties.items():
            owner = names.mark_owner(prop)
            mark = Mark.parse(value) if owner else None
            if owner and mark:
                stream, consumer = owner
                mine = found.setdefault(stream, {})
                if consumer not in mine or entry_id(mark.id) > entry_id(mine[consumer].id):
                    mine[consumer] = mark
    return found


def lost(marks: dict[str, Mark], tail_id: str | None, tail: Mark | None) -> tuple[int | None, dict[str, int]]:
    """(events gone from Redis, per consumer the events gone before it committed them), from the
    consumers' marks and the stream's last entry as Redis came back (`tail_id` None: no entry
    left; `tail` None while `tail_id` is set: an entry without totals, so nothing is countable)."""
    if not marks or (tail_id is not None and tail is None):
        return None, {}
    top = max(marks.values(), key=lambda m: entry_id(m.id))
    if tail is not None and entry_id(tail.id) >= entry_id(top.id):
        return 0, {}
    kept = tail.events if tail is not None else 0
    missing = {c: top.events - max(m.events, kept) for c, m in marks.items()}
    return max(0, top.events - kept), {c: n for c, n in missing.items() if n > 0}


async def _last_id(redis: Client, stream: str) -> str | None:
    """The stream's last-generated-id: the highest id it ever gave (None: no such stream)."""
    try:
        info = await redis.xinfo_stream(stream)
    except ResponseError:  # no such key
        return None
    return text(info["last-generated-id"])


async def _tail(redis: Client, stream: str) -> tuple[str | None, Mark | None]:
    """The stream's last entry: its id, and its totals when it carries them."""
    entries = await redis.xrevrange(stream, count=1)
    if not entries:
        return None, None
    raw_id, fields = entries[0]
    assert raw_id is not None  # an entry always has its id
    c, b = (fields or {}).get(RUNNING_COUNT.encode()), (fields or {}).get(RUNNING_BYTES.encode())
    entry = text(raw_id)
    return entry, Mark(entry, int(c), int(b)) if c is not None and b is not None else None


async def check(
    redis: Client, catalog: Catalog, shards: int, *, force: bool = False, crash_at: tuple[str, ...] = ()
) -> list[Repair]:
    """Check the server holding each of the `shards` against the tables of `catalog`, each shard
    unless it is checked already (or `force`); returns the streams it repaired. Each shard is done
    on its own: its server's run_id, its marker (`names.checked`), its streams only, then its
    marker, so a shard whose server did not restart keeps taking events meanwhile. Raises
    RedisError when Redis does not answer."""
    servers = await asyncio.gather(*(server_run_id(redis, shard) for shard in range(shards)))
    markers = await asyncio.gather(*(redis.get(names.checked(shard)) for shard in range(shards)))
    todo = [
        shard
        for shard, (server, marker) in enumerate(zip(servers, markers, strict=True))
        if force or marker is None or text(marker) != server
    ]
    if not todo:
        return []
    tables = await asyncio.to_thread(all_tables, catalog)
    positions = committed_positions(tables)
    marks = committed_marks(tables)
    crashpoint(crash_at, "check_after_reading_the_lake")
    repairs = []
    for shard in todo:
        mine = {stream: p for stream, p in positions.items() if names.shard_of_key(stream) == shard}
        repairs += await _check_shard(redis, mine, marks, crash_at)
        await redis.set(names.checked(shard), servers[shard])
        log.info(
            "Redis (run %s) checked against the tables%s: %d streams, %d behind",
            servers[shard][:12],
            f" for shard {shard}" if shards > 1 else "",
            len(mine),
            sum(1 for r in repairs if names.shard_of_key(r.stream) == shard),
        )
    return repairs


async def _check_shard(
    redis: Client, positions: dict[str, str], marks: dict[str, dict[str, Mark]], crash_at: tuple[str, ...]
) -> list[Repair]:
    """Raise each of these streams (one shard's) that is behind its committed position."""
    repairs = []
    for stream, position in sorted(positions.items()):
        last = await _last_id(redis, stream)
        if last is not None and entry_id(last) >= entry_id(position):
            continue
        # Reported before the repair: a kill between the two reports it again, never not at all.
        tail_id, tail = await _tail(redis, stream)
        gone, missing = lost(marks.get(stream, {}), tail_id, tail)
        repair = Repair(stream, position, tail_id, "created" if last is None else "moved", gone, missing)
        repairs.append(repair)
        _report(repair)
        await redis.eval(_RAISE_LUA, 1, stream, format_id(entry_id(position)))  # only raises, never lowers
        crashpoint(crash_at, "check_after_raising_a_stream")
    return repairs


def _report(r: Repair) -> None:
    metrics.REDIS_LOST_EVENTS.labels(r.stream, "").inc(r.gone or 0)
    for consumer, n in r.missing.items():
        metrics.REDIS_LOST_EVENTS.labels(r.stream, consumer).inc(n)
    log.error(
        "%s: Redis came back without the entries after %s up to %s, which the tables hold (it restarted from "
        "older data: a power cut, a restore, a failover to a lagging replica). New events now get ids after %s "
        "(%s). Events gone from Redis: %s; per consumer, gone before it committed them: %s",
        r.stream,
        r.tail or "its start",
        r.committed,
        r.committed,
        r.action,
        "unknown (entries without totals)" if r.gone is None else r.gone,
        ", ".join(f"{c} {n}" for c, n in sorted(r.missing.items())) or "none",
        extra={"stream": r.stream, "lost_events": r.gone, "missing": r.missing},
    )


async def keep_checked(
    redis: Client, catalog: Catalog, shards: int, stopping: asyncio.Event, crash_at: tuple[str, ...] = ()
) -> None:
    """The worker's task: check the server of each of the `shards` now and whenever it has
    restarted (or failed over) since, until the worker stops."""
    while not stopping.is_set():
        try:
            await check(redis, catalog, shards, crash_at=crash_at)
        except FAILURES as e:
            log.debug("checking Redis failed (%s); again in %.0fs", e, CHECK_EVERY_SECONDS)
        except Exception as e:  # noqa: BLE001 - the catalog's (PostgreSQL restarting, a REST server down)
            log.warning("checking Redis failed: the catalog: %s; again in %.0fs", e, CHECK_EVERY_SECONDS)
        try:
            await asyncio.wait_for(stopping.wait(), timeout=CHECK_EVERY_SECONDS)
        except TimeoutError:
            pass
