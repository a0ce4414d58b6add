"""Redis key names, in one place. All share the `{streamapp}` hash tag so that the ingest script,
which touches several of them atomically, also runs on Redis Cluster (one slot)."""

PREFIX = "streamapp:{streamapp}"
ACKS = f"{PREFIX}:acks"  # hash: "<stream key>|<consumer>" -> last entry id committed downstream


def stream(type_name: str) -> str:
    """The Redis stream that holds events of one type (or "rejected")."""
    return f"{PREFIX}:events:{type_name}"


def dedupe_bucket(start_ms: int) -> str:
    """The set of event ids first written in the time span that starts at `start_ms` (server clock,
    epoch milliseconds); see `streamapp.writer`."""
    return f"{PREFIX}:dedupe:{start_ms}"


def ack_field(stream_key: str, consumer: str) -> str:
    return f"{stream_key}|{consumer}"
