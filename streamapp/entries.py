"""The stream-entry format, in one place: what the web's writer appends to a Redis stream, what
the worker's reader takes back out of it, and what the backlog counts.

One entry holds the events of one request for one stream:

- `e` (EVENTS): the events' JSON, one per line (NDJSON; msgspec never writes a raw newline inside
  JSON, so each newline separates two events);
- `n` (COUNT): how many events `e` holds (absent in entries written before entries held several: 1);
- `r` (RECEIVED): when the server received the request, epoch microseconds;
- `c` (RUNNING_COUNT): how many events the stream has had up to and including this entry, and
- `b` (RUNNING_BYTES): how many bytes of `e` it has had up to and including this entry, so the
  backlog is counted in events and bytes from a stream's entries at two positions alone (see
  `Mark`); entries written before `b` existed have `c` only, older ones neither.

Entry ids are Redis's "ms-seq". An entry is one position: a window never splits one, so every
event of an entry has the entry's id. `Window` is a run of consecutive entries as the reader hands
them to an agent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import msgspec

if TYPE_CHECKING:  # the web process never builds Arrow tables
    import pyarrow as pa

    from streamapp.table_model import TableModel

M = TypeVar("M")

EVENTS, COUNT, RECEIVED, RUNNING_COUNT, RUNNING_BYTES = "e", "n", "r", "c", "b"
_E, _N, _R, _C, _B = EVENTS.encode(), COUNT.encode(), RECEIVED.encode(), RUNNING_COUNT.encode(), RUNNING_BYTES.encode()

EntryId = tuple[int, int]
BEFORE_ALL: EntryId = (-1, -1)  # before every entry: nothing committed yet


def entry_id(value: str) -> EntryId:
    """A Redis stream id "ms-seq" as a tuple that compares in stream order."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def format_id(position: EntryId) -> str:
    return f"{position[0]}-{position[1]}"


def id_before(position: EntryId) -> str:
    """The stream id just before `position`: a cursor from which XREAD returns it."""
    ms, seq = position
    return f"{ms}-{seq - 1}" if seq > 0 else f"{ms - 1}-18446744073709551615"


def ndjson_array(ndjson: bytes) -> bytes:
    """Events stored as NDJSON, as one JSON array (each newline separates two events)."""
    return b"[" + ndjson.replace(b"\n", b",") + b"]"


@dataclass(frozen=True, slots=True)
class Mark:
    """Where a stream stands at one of its entries: the entry's id and the stream's running totals
    there. Events (or bytes) after a mark = the last entry's totals minus the mark's."""

    id: str
    events: int  # `c` of the entry
    bytes: int  # `b` of the entry

    def __str__(self) -> str:
        return f"{self.id} {self.events} {self.bytes}"

    @classmethod
    def parse(cls, text: str) -> Mark | None:
        """A mark as `str` wrote it; None for anything else (a bare id written before marks)."""
        parts = text.split()
        if len(parts) != 3:
            return None
        return cls(parts[0], int(parts[1]), int(parts[2]))


@dataclass(slots=True)
class Collected:
    """Events read for one window: ids and receive times one per event, payloads one per entry."""

    ids: list[str]
    payloads: list[bytes]
    received: list[int]
    bytes: int = 0  # of the payloads
    last: Mark | None = None  # the stream's totals at the last entry, when it carries them

    def add(self, entries: list[Any], limit: int, max_bytes: int) -> None:
        """Add the events of XREAD `entries` ([[id, [field, value, ...]], ...], as hiredis parsed
        them), stopping at the first entry that finds `limit` events or `max_bytes` of payloads
        collected: the rest are read again for the next window."""
        ids, payloads, received = self.ids, self.payloads, self.received
        for raw_id, fields in entries:
            if len(ids) >= limit or self.bytes >= max_bytes:
                break
            if len(fields) == 4:  # [e, payload, r, received_us]: one event, written before entries held several
                e, r = (1, 3) if fields[0] == _E else (3, 1)
                ids.append(raw_id.decode())
                payloads.append(fields[e])
                received.append(int(fields[r]))
                self.bytes += len(fields[e])
                self.last = None
                continue
            f = dict(zip(fields[::2], fields[1::2], strict=True))  # several events of one request
            count = int(f.get(_N, 1))
            entry = raw_id.decode()
            ids.extend([entry] * count)
            payloads.append(f[_E])
            received.extend([int(f[_R])] * count)
            self.bytes += len(f[_E])
            c, b = f.get(_C), f.get(_B)
            self.last = Mark(entry, int(c), int(b)) if c is not None and b is not None else None


class Window(Sequence[M], Generic[M]):
    """Consecutive entries of one stream, as an agent receives them: their payloads, the stream id
    and receive time of each event (an entry holding several events repeats its id), and the
    events, decoded when first asked for: a raw sink never asks, it builds its table from the
    payloads.

    An agent hands a window to `app.table(...).append(window)`, which writes its rows and the
    stream position it ends at in one Iceberg commit.
    """

    def __init__(
        self,
        model: TableModel,
        stream_key: str,
        consumer: str,
        ids: list[str],
        payloads: list[bytes],
        received_us: list[int],
        last: Mark | None = None,
    ) -> None:
        self.model = model
        self.stream_key = stream_key
        self.consumer = consumer
        self.ids = ids
        self.payloads = payloads
        self.received_us = received_us
        self.last = last  # the stream's totals at the window's last entry, when the entry carries them
        # How many partitions of its table its rows fall into, once a raw sink has worked that out
        # (None before): the reader reads the next windows past their count while this is high, so
        # that a backfill's files hold more rows each (see `streamapp.engine.reader`).
        self.partitions: int | None = None

    @functools.cached_property
    def events(self) -> list[M]:
        events: list[M] = _decoder(self.model)(ndjson_array(b"\n".join(self.payloads)))
        if len(events) != len(self.ids):
            raise ValueError(
                f"{self!r}: its entries hold {len(events)} events, but their counts (n) say {len(self.ids)}"
            )
        return events

    @property
    def last_id(self) -> str:
        return self.ids[-1]

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, i: int) -> M: ...

    @overload
    def __getitem__(self, i: slice) -> list[M]: ...

    def __getitem__(self, i: int | slice) -> M | list[M]:
        return self.events[i]

    def __iter__(self) -> Iterator[M]:
        return iter(self.events)

    def to_arrow(self, start: int = 0) -> pa.Table:
        """The window's rows as the model's table schema, from its `start`-th event on."""
        table = self.model.to_arrow(self.payloads, self.received_us)
        return table.slice(start) if start else table

    def __repr__(self) -> str:
        return f"<Window {self.stream_key} {len(self)} events {self.ids[0]}..{self.last_id}>"


_decoders: dict[TableModel, Callable[[bytes], list[Any]]] = {}


def _decoder(model: TableModel) -> Callable[[bytes], list[Any]]:
    """One decoder per model, made on first use."""
    decode = _decoders.get(model)
    if decode is None:
        decode = _decoders[model] = msgspec.json.Decoder(list[model]).decode  # type: ignore[valid-type]
    return decode
