"""Every name streamapp gives the state it keeps, in one place: Redis keys, the Iceberg table
properties it commits, and the tables it creates on its own (not declared by a model).

Redis keys share the `{streamapp}` hash tag so that the ingest script, which touches several of
them atomically, also runs on Redis Cluster (one slot).

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


# Iceberg table properties, per (stream, consumer): "<prefix><stream key>|<consumer>"
POSITION_PREFIX = "streamapp.position."  # the last stream entry id whose rows the table holds
REPLAY_PREFIX = "streamapp.replay."  # aggregates: the entry just before the oldest one open windows need
STATE_PREFIX = "streamapp.state."  # aggregates: the watermark the last commit closed windows with (JSON)
SNAPSHOT_PREFIX = "streamapp.snapshot."  # session aggregates: the file holding their open sessions

# Iceberg table properties of an aggregate table, read by people and `python -m streamapp complete`.
WATERMARK = "streamapp.watermark"  # ISO time: the watermark of the last commit
COMPLETE_BEFORE = "streamapp.complete_before"  # ISO time: every window starting before it is final


def position_property(stream_key: str, consumer: str) -> str:
    return f"{POSITION_PREFIX}{stream_key}|{consumer}"


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


# Tables streamapp creates itself.
REJECTED_TABLE = "events.rejected"  # events the collector refused, with the reason
LATE_TABLE = "events.late"  # events that missed their aggregate window
