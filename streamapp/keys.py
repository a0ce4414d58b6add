"""Redis key names, in one place. All share the `{streamapp}` hash tag so that the ingest script,
which touches several of them atomically, also runs on Redis Cluster (one slot)."""

PREFIX = "streamapp:{streamapp}"
SEEN = f"{PREFIX}:seen:"  # + event_id: present while the id is inside the dedupe window
ACKS = f"{PREFIX}:acks"  # hash: "<stream key>|<consumer>" -> last entry id committed downstream


def stream(type_name: str) -> str:
    """The Redis stream that holds events of one type (or "rejected")."""
    return f"{PREFIX}:events:{type_name}"


def ack_field(stream_key: str, consumer: str) -> str:
    return f"{stream_key}|{consumer}"
