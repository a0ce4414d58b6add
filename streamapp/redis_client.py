"""Redis clients, configured once for the two very different jobs they do.

Against the embedded server (REDIS_URL unset) they authenticate with its password, read from (or,
first, created in) the state directory; a REDIS_URL is used as it is. Either way the password is in no
command line and no log line. Building a client reads that file: do it off the event loop.

With `STREAMAPP_REDIS_CLUSTER=1` the clients are redis-py's `RedisCluster`, which finds the slots'
primaries from the node REDIS_URL names and follows MOVED/ASK redirects and failovers. The keys of
one shard share one hash tag (`names.prefix`), so each script runs on the one primary serving that
shard's slot, and server state (run_id, memory) is read from that node too (`shard` arguments).
"""

from __future__ import annotations

from typing import Any

import redis.exceptions
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff

from streamapp import names
from streamapp.redis_server import embedded_password
from streamapp.settings import Settings

Client = Redis | RedisCluster


def _address(settings: Settings) -> tuple[str, dict[str, Any]]:
    """The URL to connect to and, for the embedded server, its password."""
    if settings.embedded_redis:
        return settings.embedded_redis_url, {"password": embedded_password(settings)}
    return settings.redis_url, {}


def _connect(settings: Settings, **options: Any) -> Client:
    url, auth = _address(settings)
    if settings.redis_cluster:
        return RedisCluster.from_url(url, **options, **auth)
    return Redis.from_url(url, **options, **auth)


def writer_client(settings: Settings) -> Client:
    """For ingest: a few quick retries (a pooled connection may be stale after a Redis restart;
    flushes are idempotent, see `writer`), then fail fast so the client gets 503 and retries. The
    socket waits for WAIT's timeout on top of a script's time."""
    return _connect(
        settings,
        socket_connect_timeout=0.5,
        socket_timeout=5 + settings.redis_wait_ms / 1000,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 3),
    )


def reader_client(settings: Settings) -> Client:
    """For the worker: blocking XREADs of up to a second, so the socket timeout is longer.

    XREAD replies are left as hiredis parsed them: redis-py's own callback turns each entry's
    fields into a dict in Python, 14% of a draining worker's time (py-spy); `Stream` reads the
    two fields it wrote directly. A cluster client retries a few times (a failover moves the slot
    to another node: it asks the cluster again); the worker starts over from its position anyway."""
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), 3) if settings.redis_cluster else Retry(NoBackoff(), 0)
    client = _connect(
        settings, socket_connect_timeout=2, socket_timeout=10 + settings.redis_wait_ms / 1000, retry=retry
    )
    client.set_response_callback("XREAD", _as_parsed)
    return client


def text(value: bytes | str) -> str:
    """A reply's value as text. redis-py types replies as bytes or str; these clients get bytes."""
    return value.decode() if isinstance(value, bytes) else value


async def home(redis: Client, shard: int = 0) -> dict[str, Any]:
    """Keyword arguments sending a command without keys (WAIT) to the node that serves the keys of
    `shard`: on a cluster, the primary of their slot; on one Redis, nothing to add."""
    if not isinstance(redis, RedisCluster):
        return {}
    await redis.initialize()  # a no-op once the client knows the slots
    return {"target_nodes": redis.get_node_from_key(names.checked(shard))}


async def _forget_slots(redis: Client, error: BaseException) -> None:
    """A node failed a command of a pipeline that returned its errors (`write_and_wait`): redis-py
    then does not ask the cluster where the slots went, as its own retries do. Make the next
    command ask (what redis-py's pipeline does on these errors): after a failover the slot's new
    primary is found, instead of the dead one being tried forever."""
    if isinstance(redis, RedisCluster) and isinstance(error, RedisCluster.ERRORS_ALLOW_RETRY):
        await redis.aclose()


# INFO through a script keyed on streamapp's slot, not INFO sent to a node by name: a script goes
# where the slot is served (a stale idea of the slots meets MOVED and is corrected), while INFO to
# the node redis-py last knew could, after a failover, ask the old primary, back as a replica.
_INFO_LUA = "return redis.call('INFO', ARGV[1])"


async def server_info(redis: Client, section: str, shard: int = 0) -> dict[str, Any]:
    """INFO `section` of the server that holds the keys of `shard`, numbers as int."""
    raw = text(await redis.eval(_INFO_LUA, 1, names.checked(shard), section))  # type: ignore[misc,unused-ignore]
    info: dict[str, Any] = {}
    for line in raw.splitlines():
        key, sep, value = line.partition(":")
        if sep and not key.startswith("#"):
            info[key] = int(value) if value.isdigit() else value
    return info


# KEYS[1]: names.checked(shard) (for the slot). The run_id of the server that runs it.
RUN_ID_LUA = "return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')"


async def server_run_id(redis: Client, shard: int = 0) -> str:
    """The run_id of the server that holds the keys of `shard`: it changes with every start of the
    server, and with a failover (the promoted replica is another process)."""
    return text(await redis.eval(RUN_ID_LUA, 1, names.checked(shard)))  # type: ignore[misc,unused-ignore]


async def is_checked(redis: Client, shard: int = 0) -> bool:
    """Has the server holding `shard` been checked against the lake since it started
    (`streamapp.engine.recovery`)? The web takes events only then (the ingest script tests the
    same marker)."""
    marker = await redis.get(names.checked(shard))
    return marker is not None and text(marker) == await server_run_id(redis, shard)


async def write_and_wait(
    redis: Client, commands: list[tuple[Any, ...]], replicas: int, timeout_ms: int, shard: int = 0
) -> tuple[list[Any], int]:
    """Run `commands` (keyed in the slot of `shard`), then WAIT for `replicas`, on one connection to
    the node serving the slot (WAIT counts the replicas that have this connection's writes). An
    INCR of `names.REPLICATED` goes between them: WAIT then covers every write the server made
    before it, including those of other connections, even when `commands` wrote nothing (a flush
    of duplicates, whose first copy another connection wrote; a reader, which writes nothing).

    Returns each command's result or exception, and how many replicas acknowledged (0 when the
    slot moved to another node meanwhile: the WAIT then says nothing about these writes)."""
    target = await home(redis, shard)
    async with redis.pipeline(transaction=False) as pipe:
        for command in commands:
            pipe.execute_command(*command)
        pipe.execute_command("INCR", names.replicated(shard))
        pipe.execute_command("WAIT", replicas, timeout_ms, **target)
        try:
            results = await pipe.execute(raise_on_error=False)
        except Exception as e:
            await _forget_slots(redis, e)
            raise
    for result in results:
        if isinstance(result, Exception):
            await _forget_slots(redis, result)
    *done, marker, acked = results
    for failed in (marker, acked):
        if isinstance(failed, Exception):
            raise failed
    if target and (await home(redis, shard))["target_nodes"].name != target["target_nodes"].name:
        return done, 0
    return done, int(acked)


class NotReplicated(Exception):
    """WAIT timed out: fewer replicas than `STREAMAPP_REDIS_WAIT_REPLICAS` confirmed the writes."""

    def __init__(self, acked: int, wanted: int) -> None:
        super().__init__(f"{acked} of {wanted} replicas confirmed the write in time")
        self.acked, self.wanted = acked, wanted


def _as_parsed(response: Any, **options: Any) -> Any:
    return response


# What an unreachable, restarting, failing-over or full Redis raises: the client should retry
# later (503). Cluster states (CLUSTERDOWN, TRYAGAIN, MASTERDOWN, MOVED) are ResponseErrors;
# RedisClusterException (no node serves the slot, the cluster cannot be discovered) is not a
# RedisError.
UNAVAILABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ResponseError,  # OOM, MISCONF (disk full for the AOF), cluster states
    redis.exceptions.ClusterError,  # e.g. redirected too many times while slots move
    redis.exceptions.RedisClusterException,
    OSError,
)

# Whatever a call to Redis can fail with, for the worker's tasks that retry.
FAILURES = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError, TimeoutError)


def lease_client(settings: Settings) -> Client:
    """For the leases (`streamapp.engine.leases`): short commands whose answer must come well
    within a lease, so a Redis that hangs is noticed before the lease runs out."""
    timeout = max(0.2, settings.lease_seconds / 3)
    return _connect(settings, socket_connect_timeout=timeout, socket_timeout=timeout)
