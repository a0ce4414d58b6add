"""Redis clients, configured once for the two very different jobs they do."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from streamapp.settings import Settings


def writer_client(settings: Settings) -> Redis:
    """For ingest: fail fast (the client gets 503 and retries) and never resend a write by itself,
    since a resent script whose first reply was lost would store server-assigned ids twice."""
    return Redis.from_url(settings.redis_url, socket_connect_timeout=1, socket_timeout=5,
                          retry=Retry(NoBackoff(), 0), health_check_interval=0)


def reader_client(settings: Settings) -> Redis:
    """For the worker: blocking XREADs of up to a second, so the socket timeout is longer."""
    return Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=10,
                          retry=Retry(NoBackoff(), 0))
