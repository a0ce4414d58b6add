"""Redis clients, configured once for the two very different jobs they do.

Against the embedded server (REDIS_URL unset) they authenticate with its password, read from (or,
first, created in) the state directory; a REDIS_URL is used as it is. Either way the password is in no
command line and no log line. Building a client reads that file: do it off the event loop.
"""

from __future__ import annotations

from typing import Any

import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff

from streamapp import names
from streamapp.redis_server import embedded_password
from streamapp.settings import Settings


def _address(settings: Settings) -> tuple[str, dict[str, Any]]:
    """The URL to connect to and, for the embedded server, its password."""
    if settings.embedded_redis:
        return settings.embedded_redis_url, {"password": embedded_password(settings)}
    return settings.redis_url, {}


def writer_client(settings: Settings) -> Redis:
    """For ingest: a few quick retries (a pooled connection may be stale after a Redis restart;
    flushes are idempotent, see `writer`), then fail fast so the client gets 503 and retries."""
    url, auth = _address(settings)
    return Redis.from_url(
        url,
        socket_connect_timeout=0.5,
        socket_timeout=5,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 3),
        **auth,
    )


def reader_client(settings: Settings) -> Redis:
    """For the worker: blocking XREADs of up to a second, so the socket timeout is longer.

    XREAD replies are left as hiredis parsed them: redis-py's own callback turns each entry's
    fields into a dict in Python, 14% of a draining worker's time (py-spy); `Stream` reads the
    two fields it wrote directly."""
    url, auth = _address(settings)
    client = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10, retry=Retry(NoBackoff(), 0), **auth)
    client.set_response_callback("XREAD", _as_parsed)
    return client


def text(value: bytes | str) -> str:
    """A reply's value as text. redis-py types replies as bytes or str; these clients get bytes."""
    return value.decode() if isinstance(value, bytes) else value


async def server_run_id(redis: Redis) -> str:
    """The run_id of the server `redis` talks to: it changes with every start of the server."""
    return str((await redis.info("server"))["run_id"])


async def is_checked(redis: Redis) -> bool:
    """Has this server been checked against the lake since it started (`streamapp.engine.recovery`)?
    The web takes events only then (the ingest script tests the same marker)."""
    marker = await redis.get(names.CHECKED)
    return marker is not None and text(marker) == await server_run_id(redis)


def _as_parsed(response: Any, **options: Any) -> Any:
    return response


# What an unreachable, restarting or full Redis raises: the client should retry later (503).
UNAVAILABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ResponseError,  # OOM, MISCONF (disk full for the AOF), cluster moves
    OSError,
)
