"""Every name streamapp gives the state it keeps, in one place: Redis keys, the Iceberg table
properties it commits, and the tables it creates on its own (not declared by a model).

Redis keys are per shard (`STREAMAPP_SHARDS`): each shard's keys share one hash tag, `{streamapp}`
for shard 0 (the only one by default, and the keys of every release before shards) and
`{streamapp-<i>}` for shard i, so the ingest script, which touches several of a shard's keys
atomically, runs on Redis Cluster, and a cluster spreads the shards over its primaries. An event
goes to one shard (`shard_of`), by its dedupe id, so that a retried event meets its dedupe set.

The table properties are the durable half of exactly-once: each moves in the same Iceberg commit
as the rows it describes (see `streamapp.lake.sink` and `streamapp.lake.aggregate_sink`). They are
per stream key, hence per shard.
"""

import re
import zlib


def prefix(shard: int = 0) -> str:
    """The start of every Redis key of `shard`, with its hash tag."""
    return "streamapp:{streamapp}" if shard == 0 else f"streamapp:{{streamapp-{shard}}}"


# Redis
PREFIX = prefix(0)


def acks(shard: int = 0) -> str:
    """Hash: "<stream key>|<consumer>" -> a hint of the last entry id committed downstream, for
    the streams of `shard`."""
    return f"{prefix(shard)}:acks"


ACKS = acks(0)


def stream(type_name: str, shard: int = 0) -> str:
    """The Redis stream that holds events of one type (or "rejected") routed to `shard`."""
    return f"{prefix(shard)}:events:{type_name}"


def streams(type_name: str, shards: int) -> list[str]:
    """Every shard's stream of one type, shard 0 first."""
    return [stream(type_name, shard) for shard in range(shards)]


_SHARD = re.compile(r"^streamapp:\{streamapp(?:-(\d+))?\}:")


def shard_of_key(key: str) -> int:
    """The shard of one of streamapp's Redis keys (0 for a key of no shard)."""
    m = _SHARD.match(key)
    return int(m.group(1)) if m and m.group(1) else 0


def type_of_stream(key: str) -> str:
    """The event type (or "rejected") of a stream key of any shard."""
    return key.rpartition(":events:")[2]


def shard_of(dedupe_id: str, shards: int) -> int:
    """The shard an event goes to: a stable hash of its dedupe id (source and event_id, see
    `streamapp.web.writer.dedupe_ids`), the same in every process and every release."""
    return 0 if shards == 1 else zlib.crc32(dedupe_id.encode()) % shards


def dedupe_bucket(start_ms: int, shard: int = 0) -> str:
    """The set of event ids first written to `shard` in the time span that starts at `start_ms`
    (server clock, epoch milliseconds); see `streamapp.web.writer`."""
    return f"{prefix(shard)}:dedupe:{start_ms}"


# Leases (`streamapp.engine.leases`), all in shard 0's hash tag: one slot, so a script sees them all.
WORKERS = f"{PREFIX}:workers"  # ZSET: live worker id -> expiry (server clock, epoch ms)
WORKER_AGENTS = f"{PREFIX}:workers:agents"  # Hash: live worker id -> the agents it runs, comma-separated


def lease(agent: str, shard: int) -> str:
    """String: the id of the worker that runs `agent` on `shard`, with a PX expiry it renews."""
    return f"{PREFIX}:lease:{agent}:{shard}"


def ack_field(stream_key: str, consumer: str) -> str:
    return f"{stream_key}|{consumer}"


def progress(stream_key: str) -> str:
    """Hash: consumer -> the `entries.Mark` ("id events bytes") of the last entry it has handled
    (committed, or read into an aggregate's windows, which its replay cursor keeps in the stream).
    The web refuses new events (429) when the slowest consumer is too far behind its stream."""
    return f"{stream_key}:progress"


def checked(shard: int = 0) -> str:
    """String: the run_id of the Redis server holding `shard` that a worker last checked against
    the lake (see `streamapp.engine.recovery`). The web writes to a shard only while it names the
    server it talks to, so a Redis that restarted, maybe from older data, takes no event before it
    has been checked."""
    return f"{prefix(shard)}:checked"


CHECKED = checked(0)


def replicated(shard: int = 0) -> str:
    """Integer: incremented right before each WAIT (`STREAMAPP_REDIS_WAIT_REPLICAS`) on the
    server holding `shard`, so that the WAIT covers every write before it (see
    `streamapp.redis_client.write_and_wait`)."""
    return f"{prefix(shard)}:replicated"


REPLICATED = replicated(0)


# Iceberg table properties, per (stream, consumer): "<prefix><stream key>|<consumer>"
POSITION_PREFIX = "streamapp.position."  # the last stream entry id whose rows the table holds
REPLAY_PREFIX = "streamapp.replay."  # aggregates: the entry just before the oldest one open windows need
STATE_PREFIX = "streamapp.state."  # aggregates: the watermark the last commit closed windows with (JSON)
SNAPSHOT_PREFIX = "streamapp.snapshot."  # session aggregates: the file holding their open sessions
MARK_PREFIX = "streamapp.mark."  # the `entries.Mark` at the position: what a Redis that lost data lost
# Raw sinks: the rows after the position a window committed in several commits holds already (JSON
# claims [entry id, partition value], see `streamapp.lake.split`); absent when no window is halfway.
SPLIT_PREFIX = "streamapp.split."

# Iceberg table properties of an aggregate table, read by people and `python -m streamapp complete`.
WATERMARK = "streamapp.watermark"  # ISO time: the watermark of the last commit
COMPLETE_BEFORE = "streamapp.complete_before"  # ISO time: every window starting before it is final
ERASURES_TABLE = "events.erasures"  # the audit of `python -m streamapp forget`
ERASURES = "streamapp.erasures"  # JSON {user hash: erased at, epoch us}: what the sinks drop


def position_property(stream_key: str, consumer: str) -> str:
    return f"{POSITION_PREFIX}{stream_key}|{consumer}"


def mark_property(stream_key: str, consumer: str) -> str:
    return f"{MARK_PREFIX}{stream_key}|{consumer}"


def split_property(stream_key: str, consumer: str) -> str:
    return f"{SPLIT_PREFIX}{stream_key}|{consumer}"


def split_stream(prop: str) -> str | None:
    """The stream key of a split property, None for any other property."""
    if not prop.startswith(SPLIT_PREFIX):
        return None
    return prop[len(SPLIT_PREFIX) :].rpartition("|")[0]


def replay_property(stream_key: str, consumer: str) -> str:
    return f"{REPLAY_PREFIX}{stream_key}|{consumer}"


def state_property(stream_key: str, consumer: str) -> str:
    return f"{STATE_PREFIX}{stream_key}|{consumer}"


def snapshot_property(stream_key: str, consumer: str) -> str:
    return f"{SNAPSHOT_PREFIX}{stream_key}|{consumer}"


def position_stream(prop: str) -> str | None:
    """The stream key of a position property, None for any other property."""
    if not prop.startswith(POSITION_PREFIX):
        return None
    return prop[len(POSITION_PREFIX) :].rpartition("|")[0]


def mark_owner(prop: str) -> tuple[str, str] | None:
    """(stream key, consumer) of a mark property, None for any other property."""
    if not prop.startswith(MARK_PREFIX):
        return None
    stream, _, consumer = prop[len(MARK_PREFIX) :].rpartition("|")
    return stream, consumer


# Tables streamapp creates itself.
REJECTED_TABLE = "events.rejected"  # events the collector refused, with the reason
LATE_TABLE = "events.late"  # events that missed their aggregate window
DEAD_LETTER_TABLE = "events.dead_letter"  # stream entries a worker could not turn into rows
