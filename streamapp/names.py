"""Every name streamapp gives the state it keeps, in one place: Redis keys, the Iceberg table
properties it commits, and the tables it creates on its own (not declared by a model).

Redis keys share the `{streamapp}` hash tag so that the ingest script, which touches several of
them atomically, also runs on Redis Cluster (one slot, so one primary holds them all: sharded
streams, which spread over the primaries, are `STREAMAPP_SHARDS`' business).

The table properties are the durable half of exactly-once: each moves in the same Iceberg commit
as the rows it describes (see `streamapp.lake.sink` and `streamapp.lake.aggregate_sink`).
"""

# Redis
PREFIX = "streamapp:{streamapp}"
ACKS = f"{PREFIX}:acks"  # hash: "<stream key>|<consumer>" -> a hint of the last entry id committed downstream


def stream(type_name: str) -> str:
    """The Redis stream that holds events of one type (or "rejected")."""
    return f"{PREFIX}:events:{type_name}"


def dedupe_bucket(start_ms: int) -> str:
    """The set of event ids first written in the time span that starts at `start_ms` (server clock,
    epoch milliseconds); see `streamapp.web.writer`."""
    return f"{PREFIX}:dedupe:{start_ms}"


def ack_field(stream_key: str, consumer: str) -> str:
    return f"{stream_key}|{consumer}"


def progress(stream_key: str) -> str:
    """Hash: consumer -> the `entries.Mark` ("id events bytes") of the last entry it has handled
    (committed, or read into an aggregate's windows, which its replay cursor keeps in the stream).
    The web refuses new events (429) when the slowest consumer is too far behind its stream."""
    return f"{stream_key}:progress"


# String: the run_id of the Redis server a worker last checked against the lake (see
# `streamapp.engine.recovery`). The web writes only while it names the server it talks to, so a
# Redis that restarted, maybe from older data, takes no event before it has been checked.
CHECKED = f"{PREFIX}:checked"


# Integer: incremented right before each WAIT (`STREAMAPP_REDIS_WAIT_REPLICAS`), so that the WAIT
# covers every write before it (see `streamapp.redis_client.write_and_wait`).
REPLICATED = f"{PREFIX}:replicated"


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
