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
from dataclasses import dataclass, field
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


# What refusing an entry's events raises: JSON or values the model or pyarrow refuse (pyarrow's
# ArrowInvalid and ArrowTypeError are ValueError and TypeError), counts that disagree.
REFUSED = (ValueError, TypeError, KeyError, UnicodeError, msgspec.MsgspecError)


def _check_required(rows: pa.Table, required: frozenset[str]) -> None:
    for name in required:
        if name in rows.column_names and rows.column(name).null_count:
            raise ValueError(
                f"{name} is required by the table but null (an event written before the model required it)"
            )


@dataclass(frozen=True, slots=True)
class DeadEntry:
    """A stream entry that cannot become rows (unreadable, or its events refused), and why: it goes
    to `events.dead_letter` (see `streamapp.lake.dead_letter`) instead of holding its stream back."""

    entry_id: str
    payload: str  # the events as stored (NDJSON); for an unreadable entry, all its fields
    error: str
    received_us: int | None = None


def _fields_text(fields: list[Any]) -> str:
    """An entry's fields as JSON text, whatever their bytes hold."""
    pairs = zip(fields[::2], fields[1::2], strict=False)
    return msgspec.json.encode(
        {bytes(k).decode(errors="replace"): bytes(v).decode(errors="replace") for k, v in pairs}
    ).decode()


@dataclass(slots=True)
class Collected:
    """Events read for one window: ids and receive times one per event, payloads one per entry, and
    the entries that cannot be read."""

    ids: list[str]
    payloads: list[bytes]
    received: list[int]
    bytes: int = 0  # of the payloads
    last: Mark | None = None  # the stream's totals at the last entry, when it carries them
    end: str | None = None  # the last entry read, readable or not
    dead: list[DeadEntry] = field(default_factory=list)

    def add(self, entries: list[Any], limit: int, max_bytes: int) -> None:
        """Add the events of XREAD `entries` ([[id, [field, value, ...]], ...], as hiredis parsed
        them), stopping at the first entry that finds `limit` events or `max_bytes` of payloads
        collected: the rest are read again for the next window. An entry without its events and
        receive time (a corrupted one) is kept as a `DeadEntry`."""
        ids, payloads, received = self.ids, self.payloads, self.received
        for raw_id, fields in entries:
            if len(ids) >= limit or self.bytes >= max_bytes:
                break
            entry = self.end = raw_id.decode()
            try:
                f = dict(zip(fields[::2], fields[1::2], strict=True))
                payload, count, at = f[_E], int(f.get(_N, 1)), int(f[_R])
                if count < 1:
                    raise ValueError(f"it says it holds {count} events")
            except (KeyError, ValueError) as e:
                error = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                self.dead.append(DeadEntry(entry, _fields_text(fields), f"unreadable entry: {error}"))
                self.last = None
                continue
            ids.extend([entry] * count)
            payloads.append(payload)
            received.extend([at] * count)
            self.bytes += len(payload)
            c, b = f.get(_C), f.get(_B)
            self.last = Mark(entry, int(c), int(b)) if c is not None and b is not None else None


class Told:
    """What a sink found out about a window once it was handed out, kept by the reader after the
    window itself is gone: holding the window would keep its payloads and decoded events (a
    window's worth of memory per agent) alive until the next window after it was handled."""

    __slots__ = ("partitions",)

    def __init__(self) -> None:
        self.partitions: int | None = None


class Window(Sequence[M], Generic[M]):
    """Consecutive entries of one stream, as an agent receives them: their payloads, the stream id
    and receive time of each event (an entry holding several events repeats its id), and the
    events, decoded when first asked for: a raw sink never asks, it builds its table from the
    payloads.

    An agent hands a window to `app.table(...).append(window)`, which writes its rows and the
    stream position it ends at in one Iceberg commit. Entries that cannot be read are in `dead`
    (their position is in the window's span all the same).
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
        *,
        dead: list[DeadEntry] | None = None,
        end: str | None = None,
    ) -> None:
        self.model = model
        self.stream_key = stream_key
        self.consumer = consumer
        self.ids = ids
        self.payloads = payloads
        self.received_us = received_us
        self.last = last  # the stream's totals at the window's last entry, when the entry carries them
        self.told = Told()
        self.dead = dead or []
        self._end = end

    @functools.cached_property
    def events(self) -> list[M]:
        events: list[M] = _decoder(self.model)(ndjson_array(b"\n".join(self.payloads)))
        if len(events) != len(self.ids):
            raise ValueError(
                f"{self!r}: its entries hold {len(events)} events, but their counts (n) say {len(self.ids)}"
            )
        return events

    @property
    def partitions(self) -> int | None:
        """How many partitions of its table its rows fall into, once a raw sink has worked that out
        (None before): the reader reads the next windows past their count while this is high, so
        that a backfill's files hold more rows each (see `streamapp.engine.reader`)."""
        return self.told.partitions

    @partitions.setter
    def partitions(self, count: int) -> None:
        self.told.partitions = count

    @property
    def last_id(self) -> str:
        """The window's last entry, readable or not: the position committing it moves to."""
        return self._end or self.ids[-1]

    def entries(self, start: int = 0) -> Iterator[tuple[str, bytes, list[int]]]:
        """The readable entries from the `start`-th event on (an entry boundary): each one's id,
        payload and its events' receive times."""
        ids, k, i = self.ids, 0, 0
        while i < len(ids):
            j = i
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            if i >= start:
                yield ids[i], self.payloads[k], self.received_us[i:j]
            i, k = j, k + 1

    def rows(self, start: int = 0, required: frozenset[str] = frozenset()) -> tuple[pa.Table, list[DeadEntry]]:
        """The window's rows from its `start`-th event on, and the entries that cannot become rows
        (events the model or pyarrow refuse, or a null in a `required` column of the table): the
        whole window in one go, or entry by entry when that fails, to find which."""
        try:
            rows = self.to_arrow(start)
            _check_required(rows, required)
            return rows, []
        except REFUSED:
            pass
        tables, dead = [], []
        for entry, payload, received in self.entries(start):
            try:
                rows = self.model.to_arrow([payload], received)
                _check_required(rows, required)
                tables.append(rows)
            except REFUSED as e:
                dead.append(DeadEntry(entry, payload.decode(errors="replace"), f"{type(e).__name__}: {e}", received[0]))
        import pyarrow as pa  # only where a window failed: the web never gets here (RSS)

        return (pa.concat_tables(tables) if tables else self.model.to_arrow([], [])), dead

    def decoded(self) -> tuple[list[str], list[M], list[DeadEntry]]:
        """Each event's entry id and the event (two lists of one length: no tuple per event), and
        the entries whose events cannot be decoded: all in one go, or entry by entry when that
        fails, to find which."""
        try:
            return self.ids, self.events, []
        except REFUSED:
            pass
        ids: list[str] = []
        out: list[M] = []
        dead = []
        decode = _decoder(self.model)
        for entry, payload, received in self.entries():
            try:
                events = decode(ndjson_array(payload))
                if len(events) != len(received):
                    raise ValueError(f"it holds {len(events)} events, but its count (n) says {len(received)}")
            except REFUSED as e:
                dead.append(DeadEntry(entry, payload.decode(errors="replace"), f"{type(e).__name__}: {e}", received[0]))
                continue
            ids += [entry] * len(events)
            out += events
        return ids, out, dead

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
        first = self.ids[0] if self.ids else self.dead[0].entry_id if self.dead else "-"
        return f"<Window {self.stream_key} {len(self)} events {first}..{self.last_id}>"


_decoders: dict[TableModel, Callable[[bytes], list[Any]]] = {}


def _decoder(model: TableModel) -> Callable[[bytes], list[Any]]:
    """One decoder per model, made on first use: into the model's own objects, and only for events
    it no longer describes (written before it changed) into its `stored_type`."""
    decode = _decoders.get(model)
    if decode is None:
        strict = msgspec.json.Decoder(list[model]).decode  # type: ignore[valid-type]
        lenient = msgspec.json.Decoder(list[model.stored_type()]).decode  # type: ignore[misc]

        def decode(data: bytes) -> list[Any]:
            try:
                events: list[Any] = strict(data)
            except msgspec.ValidationError:
                events = lenient(data)
            return events

        _decoders[model] = decode
    return decode
