"""Backpressure: how many events wait in Redis, how fast the workers drain them, and when to say 429.

The backlog is what the Redis streams hold: events not yet committed to Iceberg, plus those
committed in the last few seconds that the worker has not trimmed yet (it trims every 5 s). That is
the memory ingest costs Redis, which is what the limit protects. The drain rate is measured, not
guessed: events added minus growth of the streams, over the last 30 s (each entry carries its
stream's running count of events, see `streamapp.entries`), so `Retry-After` tells a client when the
backlog should be back under the limit at the rate the workers are going.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from streamapp import metrics
from streamapp.entries import stream_events

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 1.0
HORIZON_SECONDS = 30.0
RESUME_FRACTION = 0.9  # Retry-After aims at the backlog being 10% under the limit
MAX_RETRY_AFTER = 60
NO_DRAIN_RETRY_AFTER = 30  # no worker is draining: come back later, not in a tight loop


def retry_after(backlog: int, limit: int, drain_per_second: float) -> int:
    """Seconds until `backlog` is drained to 90% of `limit` at the measured rate, 1..60."""
    excess = backlog - limit * RESUME_FRACTION
    if excess <= 0:
        return 1
    if drain_per_second <= 0:
        return NO_DRAIN_RETRY_AFTER
    return max(1, min(MAX_RETRY_AFTER, math.ceil(excess / drain_per_second)))


class Backlog:
    """Samples the streams' length every second in the web process; `over` is read per request."""

    def __init__(self, redis: Redis, streams: list[str], limit: int) -> None:
        self.redis = redis
        self.streams = streams
        self.limit = limit
        self.events = 0
        self.drain_per_second = 0.0
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()  # (time, added, length)

    @property
    def over(self) -> bool:
        return self.events > self.limit

    def retry_after(self) -> int:
        return retry_after(self.events, self.limit, self.drain_per_second)

    async def run(self) -> None:
        """Sample until cancelled. A failed sample keeps the last figures: Redis being down is
        answered with 503 by the write itself."""
        while True:
            try:
                await self.sample()
            except (RedisError, OSError) as e:
                log.debug("backlog sample failed: %s", e)
            # redis-py (8.1) can swallow a cancellation that lands inside a pipeline: honour it
            # here, or the web server's shutdown waits for this task forever.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            await asyncio.sleep(SAMPLE_SECONDS)

    async def sample(self) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xinfo_stream(stream)
            replies = await pipe.execute(raise_on_error=False)
        length = added = 0
        for reply in replies:
            if isinstance(reply, dict):  # else: the stream does not exist yet
                held, total = stream_events(reply)
                length += held
                added += total
        self._observe(time.monotonic(), added, length)

    def _observe(self, now: float, added: int, length: int) -> None:
        if self._samples and added < self._samples[-1][1]:
            self._samples.clear()  # Redis restarted or streams were deleted: counters began again
        self._samples.append((now, added, length))
        while now - self._samples[0][0] > HORIZON_SECONDS:
            self._samples.popleft()
        then, added_then, length_then = self._samples[0]
        if now > then:
            drained = (added - added_then) - (length - length_then)
            self.drain_per_second = max(0.0, drained / (now - then))
        self.events = length
        metrics.BACKLOG.set(length)
        metrics.DRAIN_RATE.set(self.drain_per_second)
