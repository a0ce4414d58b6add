"""Backpressure: what waits in Redis, how fast the workers drain it, and how full Redis is.

A stream's backlog is what its slowest consumer has not handled yet: the events (and bytes) after
the progress mark that consumer last reported (`names.progress`; a raw sink reports each commit,
an aggregate each batch it reads into its windows, which its replay cursor keeps in the stream).
What Redis keeps only for replay or until the next trim is not backlog. The writer's script
counts it per stream before every flush and refuses the flush over `STREAMAPP_MAX_BACKLOG` events
or `STREAMAPP_MAX_BACKLOG_BYTES` bytes (429): exact, overshot by one flush at most.

This module samples the same figures every second for the metrics and for `Retry-After` (the drain
rate is measured: events added minus backlog growth, over the last 30 s), and Redis's memory: a
request gets 429 before it is read once Redis is at 90% of its maxmemory, whatever the backlog,
and evictions (which would drop dedupe ids) are counted and logged.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from typing import Any

from streamapp import metrics, names
from streamapp.entries import RUNNING_COUNT
from streamapp.redis_client import FAILURES, Client, home, server_info
from streamapp.web.writer import BACKLOG_LUA_FUNCTIONS, Limits

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 1.0
HORIZON_SECONDS = 30.0
RESUME_FRACTION = 0.9  # Retry-After aims at the backlog being 10% under the limit
MAX_RETRY_AFTER = 60
NO_DRAIN_RETRY_AFTER = 30  # no worker is draining: come back later, not in a tight loop
MEMORY_FRACTION = 0.9  # 429 once Redis uses this much of its maxmemory
NO_MAXMEMORY_BACKLOG_BYTES = 1 << 30  # the bytes limit when Redis has no maxmemory

# KEYS: the streams, then their progress hashes. Returns per stream: backlog events, backlog bytes,
# events ever added (the last entry's running count; 0 for an empty or missing stream).
_SAMPLE_LUA = (
    BACKLOG_LUA_FUNCTIONS
    + f"""
local streams = #KEYS / 2
local out = {{}}
for s = 1, streams do
  local tail = redis.call('XREVRANGE', KEYS[s], '+', '-', 'COUNT', 1)[1]
  local events, bytes = backlog(KEYS[s], KEYS[streams + s], tail)
  out[#out + 1] = events
  out[#out + 1] = bytes
  out[#out + 1] = tail and total(tail, '{RUNNING_COUNT}') or 0
end
return out
"""
)


def retry_after(backlog: int, limit: int, drain_per_second: float) -> int:
    """Seconds until `backlog` is drained to 90% of `limit` at the measured rate, 1..60."""
    excess = backlog - limit * RESUME_FRACTION
    if excess <= 0:
        return 1
    if drain_per_second <= 0:
        return NO_DRAIN_RETRY_AFTER
    return max(1, min(MAX_RETRY_AFTER, math.ceil(excess / drain_per_second)))


class Backlog:
    """Samples the streams (every shard's) and Redis's memory every second in the web process."""

    def __init__(self, redis: Client, streams: list[str], limits: Limits, *, bytes_from_maxmemory: bool) -> None:
        self.redis = redis
        self.streams = streams
        self.limits = limits
        self._bytes_from_maxmemory = bytes_from_maxmemory
        self._script = redis.register_script(_SAMPLE_LUA)
        self.events = 0  # summed over the streams
        self.bytes = 0
        self.drain_per_second = 0.0
        self.used_memory = 0
        self.maxmemory = 0
        self._evicted: dict[str, int] = {}  # per server (cluster node name; "" for one Redis)
        self._by_shard: dict[int, list[str]] = {}
        for stream in streams:
            self._by_shard.setdefault(names.shard_of_key(stream), []).append(stream)
        self._policy_checked = False
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()  # (time, added, backlog)

    @property
    def memory_full(self) -> bool:
        return bool(self.maxmemory) and self.used_memory >= MEMORY_FRACTION * self.maxmemory

    def retry_after(self, events: int | None = None) -> int:
        """When to come back: when the workers should have drained `events` (default: the sampled
        backlog) to under the limit."""
        return retry_after(self.events if events is None else events, self.limits.max_events, self.drain_per_second)

    async def run(self) -> None:
        """Sample until cancelled. A failed sample keeps the last figures: Redis being down is
        answered with 503 by the write itself."""
        while True:
            try:
                await self.sample()
            except FAILURES as e:
                log.debug("backlog sample failed: %s", e)
            # redis-py (8.1) can swallow a cancellation that lands inside a pipeline: honour it
            # here, or the web server's shutdown waits for this task forever.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            await asyncio.sleep(SAMPLE_SECONDS)

    async def sample(self) -> None:
        # One script per shard (its keys share a hash tag: one cluster node), all at once.
        figures: list[list[int]] = await asyncio.gather(
            *(self._script(keys=[*streams, *map(names.progress, streams)]) for streams in self._by_shard.values())
        )
        # The memory of each server holding a shard, once per server (one Redis: once).
        servers: dict[str, int] = {}
        for shard in self._by_shard:
            target = await home(self.redis, shard)
            servers.setdefault(target["target_nodes"].name if target else "", shard)
        infos = await asyncio.gather(*(self._server(node, shard) for node, shard in servers.items()))
        self._observe_memory(infos)
        # -1: a stream whose entries carry no totals yet (written before they did): not counted
        flat = [v for f in figures for v in f]
        backlog, backlog_bytes, added = (sum(max(0, v) for v in flat[i::3]) for i in range(3))
        self._observe(time.monotonic(), added, backlog, backlog_bytes)

    async def _server(self, node: str, shard: int) -> tuple[str, dict[str, Any], int]:
        memory = await server_info(self.redis, "memory", shard)
        stats = await server_info(self.redis, "stats", shard)
        return node, memory, int(stats.get("evicted_keys", 0))

    def _observe_memory(self, servers: list[tuple[str, dict[str, Any], int]]) -> None:
        """Memory figures of the fullest server: ingest is refused (429) as soon as any server is
        nearly full, since the body is not read yet and its events could go to any shard."""

        def fullness(memory: dict[str, Any]) -> tuple[float, int]:
            used, cap = int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))
            return (used / cap if cap else 0.0), used

        fullest = max((memory for _, memory, _ in servers), key=fullness)
        self.used_memory, self.maxmemory = int(fullest.get("used_memory", 0)), int(fullest.get("maxmemory", 0))
        metrics.REDIS_MEMORY_BYTES.set(self.used_memory)
        if self._bytes_from_maxmemory:
            caps = [int(memory.get("maxmemory", 0)) for _, memory, _ in servers]
            self.limits.max_bytes = min(c for c in caps if c) // 2 if any(caps) else NO_MAXMEMORY_BACKLOG_BYTES
        for node, memory, evicted in servers:
            policy = memory.get("maxmemory_policy", "noeviction")
            if not self._policy_checked and policy != "noeviction":
                log.warning(
                    "Redis's maxmemory-policy is %s: at maxmemory it may evict dedupe ids, and a retried "
                    "event would then be stored twice; use noeviction (ingest answers 429 before the cap)",
                    policy,
                )
            before = self._evicted.get(node)
            if before is not None and evicted > before:
                metrics.REDIS_EVICTED_KEYS.inc(evicted - before)
                log.error(
                    "Redis evicted %d keys at maxmemory (policy %s): dedupe ids may be gone, so an event "
                    "retried now may be stored twice",
                    evicted - before,
                    policy,
                )
            self._evicted[node] = evicted
        self._policy_checked = True

    def _observe(self, now: float, added: int, backlog: int, backlog_bytes: int) -> None:
        if self._samples and added < self._samples[-1][1]:
            self._samples.clear()  # Redis restarted or streams were deleted: counters began again
        self._samples.append((now, added, backlog))
        while now - self._samples[0][0] > HORIZON_SECONDS:
            self._samples.popleft()
        then, added_then, backlog_then = self._samples[0]
        if now > then:
            drained = (added - added_then) - (backlog - backlog_then)
            self.drain_per_second = max(0.0, drained / (now - then))
        self.events, self.bytes = backlog, backlog_bytes
        metrics.BACKLOG.set(backlog)
        metrics.BACKLOG_BYTES.set(backlog_bytes)
        metrics.DRAIN_RATE.set(self.drain_per_second)
