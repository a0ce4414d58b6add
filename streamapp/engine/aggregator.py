"""Keyed, event-time windowed aggregates: the state one aggregate agent keeps between commits.

    stream.group_by(lambda e: e.page_url, column="page_url").tumbling(60).aggregate(
        "events.clicks_per_minute", clicks=count(), unique_users=distinct(lambda e: e.user_id))

Tumbling and hopping state is not stored anywhere: it is recomputed from the stream. Each commit
of the aggregate table records, with the rows, the position `P` read up to, the watermark `W` the
rows were closed with, and a replay cursor `R`: the entry just before the oldest event any
still-open window holds. The stream is trimmed no further than `R` (it is this consumer's Redis
ack), so after a crash the agent re-reads `(R, P]` and puts each event back into exactly the
windows that were open at that commit (those ending after `W`, or after `W - keep` for kept
windows, below), then goes on past `P` as new. Why not keep the state in Redis: it would have to
change atomically with an Iceberg commit, which no Redis operation can; a replay of at most one
window's span plus the grace period needs no second source of truth.

An event is windowed at its time stamp, or at its receipt (the ms part of its entry id) when it is
stamped later than that: `windowed_time`, the time the watermark counts it at too. A device clock
running ahead (the web accepts up to a day) would otherwise open a window a day ahead, and the
replay cursor, the stream's trim point and a restart's replay would stay behind that entry for the
day. So an entry's windows all end within one window of its receipt, and the replay stays bounded
by one window plus the grace period (plus `keep`) of processing time, whatever the stamps.
`events.late` and the raw tables keep the event's own time.

Late events (their window's end is at or behind the watermark) are never dropped. Lateness is
judged against the watermark of the last commit, not the live one, so a replay after a crash
takes exactly the decisions the lost run took. A late event whose window closed less than
`keep` seconds ago updates that window: its row is rewritten in the next commit (delete + append
in one Iceberg transaction). Older ones, and all of them with the default `keep=0`, go to
`events.late` with the window they missed.

Shards (`STREAMAPP_SHARDS`): the events of one key arrive on every shard's stream, so one
aggregate reads them all (`streamapp.engine.shards`), and `P`, `R` and the late table's position
are kept per stream: entry ids compare only within one stream (each entry is `add`ed with the index
of its stream, shard 0 first). The watermark stays one. The reader interleaves the shards, and a
different interleaving after a restart moves the watermark differently (its clock is the newest
receipt seen), but that changes no decision the lost run committed: an entry at or before its
stream's `P` is put back by comparison with the committed watermark `W` alone, whatever came
before it, and no flush is made before every stream is read up to its `P` (and its late position),
so no window closes while part of its events are still to be re-read. New entries may turn out
late differently than they would have: that is lateness by processing order, recorded as usual.

Session windows (per key, events less than `gap` apart) are the exception: whether a replayed
event joined a session depends on sessions that merged, closed and were evicted since, so a replay
cannot tell. Their open (and recently closed) sessions are written as a snapshot file with each
commit instead, referenced from the commit's properties, and reading resumes after `P`. A session
event is late when its own session would already be closed (`t + gap` at or behind the watermark)
or when it falls within `gap` of a session already written; sessions have no `keep`. Sessions use
the same `windowed_time`, so no session in a snapshot reaches past the newest receipt plus `gap`.
With shards the snapshot stays one and reading resumes after each shard's `P`: whether an event is
late depends only on the committed watermark and the sessions already written, which change only
at a flush, so the shards' interleaving between two flushes changes no decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from streamapp.engine.aggregations import Aggregation
from streamapp.engine.windows import Hopping, Interval, Sessions, Tumbling, Watermark, windowed_time
from streamapp.entries import BEFORE_ALL, DeadEntry, EntryId, entry_id, format_id, id_before
from streamapp.lake.aggregate_sink import Flush, LateEvent, Restored, ShardFlush, ShardRestored

M = TypeVar("M")


@dataclass
class Slot:
    """One (window, key): its accumulators and the first stream entry it holds."""

    window: Interval
    key: str | None
    accs: list[Any]
    first_id: EntryId
    emitted: bool = False  # a row for it is in the table
    dirty: bool = False  # a late event changed it since its row was written
    stream: int = 0  # several streams (shards): the one `first_id` is in
    # and where each stream's reading stood when it was opened: every later entry of it is after that
    after: tuple[EntryId, ...] | None = None


class Aggregator(Generic[M]):
    """The windows of one aggregate agent, fed stream entries in order; pure logic, no I/O.

    `closed` is the watermark of the last commit; entries up to `replay_through` were processed
    before that commit and are only put back into the windows it left open.
    """

    def __init__(
        self,
        key: Callable[[M], str | None],
        column: str,
        windows: Tumbling | Hopping,
        aggs: dict[str, Aggregation[Any]],
        watermark: Watermark,
        *,
        keep: float = 0.0,
        closed: float = -math.inf,
        replay_through: str | None = None,
        hold_until: str | None = None,
        replay_after: str = "0-0",
        shards: Sequence[ShardRestored] = (),
    ) -> None:
        self.windows = windows
        self._start(key, column, aggs, watermark, keep, closed, replay_through, hold_until, replay_after, shards)

    def _start(
        self,
        key: Callable[[M], str | None],
        column: str,
        aggs: dict[str, Aggregation[Any]],
        watermark: Watermark,
        keep: float,
        closed: float,
        replay_through: str | None,
        hold_until: str | None,
        replay_after: str = "0-0",
        shards: Sequence[ShardRestored] = (),
    ) -> None:
        """What every aggregator keeps, whatever its windows. `shards`: the streams after the
        first, for an aggregate that reads several (the first is `replay_through`, ...)."""
        self.key = key
        self.column = column
        self.aggs = list(aggs.values())
        self.names = list(aggs)
        self.watermark = watermark
        self.keep = keep
        self.closed = closed
        self.slots: dict[tuple[float, str | None], Slot] = {}
        self.late: list[LateEvent] = []
        streams = [ShardRestored(replay_through, replay_after, hold_until), *shards]
        self.several = len(streams) > 1
        # entries whose events could not be decoded or aggregated, per stream
        self.dead: list[list[DeadEntry]] = [[] for _ in streams]
        self._replay_through = [entry_id(s.position) if s.position else BEFORE_ALL for s in streams]
        self._starts = [entry_id(s.replay_after) for s in streams]  # where this run's reading starts
        # per stream: the last entry read (or, before any, where reading starts), None: never read.
        # One stream starts at its committed position, which its new entries (after it) follow.
        self.positions: list[EntryId | None] = [
            (start if self.several else p) if s.position else None
            for s, p, start in zip(streams, self._replay_through, self._starts, strict=True)
        ]
        # A late-table commit may have been made past `replay_through` before a crash: its
        # entries must be judged against the same `closed`, so no flush until they are read. With
        # several streams, nor before each is re-read up to its position: a shard's new entries may
        # come in while another's replay is not done, and a window closed then would miss its events.
        self._hold_until = [
            max(entry_id(s.late_position) if s.late_position else BEFORE_ALL, p if self.several else BEFORE_ALL)
            for s, p in zip(streams, self._replay_through, strict=True)
        ]
        self.complete = self.complete_before(closed)  # the marker the last commit recorded

    @property
    def position(self) -> EntryId | None:
        """The last entry read (or committed) of the first stream."""
        return self.positions[0]

    def _opened_at(self) -> tuple[EntryId, ...] | None:
        """Where each stream's reading stands, for a slot opened now (several streams only)."""
        if not self.several:
            return None
        return tuple(p if p is not None else start for p, start in zip(self.positions, self._starts, strict=True))

    def add(self, stream_id: str, event: M, event_time: float, stream: int = 0) -> None:
        """The event of entry `stream_id` of stream `stream` (several: its index, shard 0 first),
        stamped `event_time`, into its windows: those of its `windowed_time` (never after the
        entry's receipt)."""
        pos = entry_id(stream_id)
        received = pos[0] / 1000
        self.watermark.observe(event_time, received)
        replaying = pos <= self._replay_through[stream]
        key = self.key(event)
        for w in self.windows.assign(windowed_time(event_time, received)):
            if w.end <= self.closed - self.keep:
                if not replaying:
                    self.late.append(LateEvent(stream_id, event, event_time, w.start, w.end, key, stream))
                continue
            slot = self.slots.get((w.start, key))
            if slot is None:
                accs = [a.new() for a in self.aggs]
                slot = self.slots[(w.start, key)] = Slot(w, key, accs, pos, stream=stream, after=self._opened_at())
                slot.emitted = replaying and w.end <= self.closed
            elif replaying and not slot.emitted and w.end <= self.closed:
                # a window kept after its close, opened again by a shard's new entry before another
                # shard's replay reached it: that replayed entry says its row is in the table
                slot.emitted = True
            slot.accs = [a.add(acc, event) for a, acc in zip(self.aggs, slot.accs, strict=True)]
            if w.end <= self.closed and not replaying:
                slot.dirty = True
        self.positions[stream] = pos

    def refuse(self, entry: DeadEntry, stream: int = 0) -> None:
        """An entry (of stream `stream`) whose events cannot be decoded, or one of its events that
        the key function or an aggregation raised on: it goes to events.dead_letter with the next
        commit, and the position moves past it. Deterministic, so a replay refuses it again (and it
        is kept once)."""
        pos = entry_id(entry.entry_id)
        if pos > self._replay_through[stream]:
            self.dead[stream].append(entry)
        position = self.positions[stream]
        if position is None or pos > position:
            self.positions[stream] = pos

    def flush(self, now: float | None = None) -> Flush | None:
        """Close what the watermark passed. `now`: the reader is caught up at this wall-clock
        time (idle streams advance). None when there is nothing to commit."""
        if now is not None:
            self.watermark.tick(now)
        if all(p is None for p in self.positions) or any(
            (BEFORE_ALL if p is None else p) < h for p, h in zip(self.positions, self._hold_until, strict=True)
        ):
            return None
        w = self.watermark.value
        closing = [s for s in self._slots() if not s.emitted and s.window.end <= w]
        rewrite = [s for s in self._slots() if s.emitted and s.dirty]
        # The completeness marker moves with the watermark: commit each hour it passes even when
        # no window closed then.
        new_hour = self.closed > -math.inf and self.complete_before(w) > self.complete
        if not closing and not rewrite and not self.late and not any(self.dead) and not new_hour:
            return None
        rows = [self._row(s) for s in closing + rewrite]
        for s in closing + rewrite:
            s.emitted, s.dirty = True, False
        self._evict(w)
        late, self.late = self.late, []
        dead, self.dead = self.dead, [[] for _ in self.dead]
        self.closed, self.complete = w, self.complete_before(w)
        positions = [None if p is None else format_id(p) for p in self.positions]
        replay = self._replay_afters(positions)
        return Flush(
            rows=rows,
            rewrite=[(s.window.start, s.key) for s in rewrite],
            late=late,
            dead=dead[0],
            position=positions[0],
            replay_after=replay[0],
            shards=[ShardFlush(p, r, None, d) for p, r, d in zip(positions[1:], replay[1:], dead[1:], strict=True)],
            watermark=w,
            complete_before=self.complete,
            max_event=self.watermark.max_event,
            max_seen_at=self.watermark.max_seen_at,
            state=self._snapshot(),
        )

    def complete_before(self, watermark: float) -> float:
        """The hour boundary before which every window start's row is final at `watermark`: a
        window is final once its end is `keep` seconds behind the watermark."""
        if watermark == -math.inf:
            return -math.inf
        step = self.windows.step
        first_open = (math.floor((watermark - self.keep - self.windows.size) / step) + 1) * step
        return math.floor(first_open / 3600) * 3600

    def _slots(self) -> list[Slot]:
        return list(self.slots.values())

    def _evict(self, watermark: float) -> None:
        self.slots = {k: s for k, s in self.slots.items() if s.window.end > watermark - self.keep}

    def _replay_afters(self, positions: list[str | None]) -> list[str]:
        """Per stream, the replay cursor: just before the first entry an open window holds."""
        if not self.several:
            first = min((s.first_id for s in self.slots.values()), default=None)
            return [id_before(first) if first else self._at(positions, 0)]
        # each slot's first entry in its own stream; in the others, what it may hold comes after
        # where that stream's reading stood when it opened
        cursors: list[EntryId | None] = [None] * len(positions)
        for s in self.slots.values():
            assert s.after is not None
            for i, c in enumerate(s.after):
                if i == s.stream:
                    c = entry_id(id_before(s.first_id))
                lowest = cursors[i]
                if lowest is None or c < lowest:
                    cursors[i] = c
        return [self._at(positions, i) if c is None else format_id(c) for i, c in enumerate(cursors)]

    def _at(self, positions: list[str | None], stream: int) -> str:
        """Where reading stream `stream` resumes with no window open: after its position."""
        position = positions[stream]
        return position if position is not None else format_id(self._starts[stream])

    def _snapshot(self) -> dict[str, Any] | None:
        return None  # recomputed from the stream instead

    def _row(self, s: Slot) -> dict[str, Any]:
        row: dict[str, Any] = {"window_start": s.window.start, "window_end": s.window.end, self.column: s.key}
        row.update({n: a.result(acc) for n, a, acc in zip(self.names, self.aggs, s.accs, strict=True)})
        return row


class SessionAggregator(Aggregator[M]):
    """Session windows per key (see the module docstring): restored from the snapshot `state`
    the last commit wrote, reading on after `position`."""

    def __init__(
        self,
        key: Callable[[M], str | None],
        column: str,
        sessions: Sessions,
        aggs: dict[str, Aggregation[Any]],
        watermark: Watermark,
        *,
        closed: float = -math.inf,
        position: str | None = None,
        hold_until: str | None = None,
        state: dict[str, Any] | None = None,
        replay_after: str = "0-0",
        shards: Sequence[ShardRestored] = (),
    ) -> None:
        self.sessions = sessions
        self.by_key: dict[str | None, list[Slot]] = {}
        self.aggs = list(aggs.values())
        for k, start, end, first_id, emitted, accs in (state or {}).get("sessions", []):
            loaded = [a.load(v) for a, v in zip(self.aggs, accs, strict=True)]
            self.by_key.setdefault(k, []).append(
                Slot(Interval(start, end), k, loaded, (first_id[0], first_id[1]), emitted)
            )
        self._start(key, column, aggs, watermark, 0.0, closed, position, hold_until, replay_after, shards)

    def add(self, stream_id: str, event: M, event_time: float, stream: int = 0) -> None:
        pos = entry_id(stream_id)
        received = pos[0] / 1000
        self.watermark.observe(event_time, received)
        t = windowed_time(event_time, received)
        key = self.key(event)
        mine = self.by_key.setdefault(key, [])
        touching = [s for s in mine if self.sessions.touches(s.window, t)]
        written = [s for s in touching if s.emitted]
        if written or t + self.sessions.gap <= self.closed:
            w = written[0].window if written else self.sessions.window(t, t)
            self.late.append(LateEvent(stream_id, event, event_time, w.start, w.end, key, stream))
        else:
            slot = Slot(self.sessions.window(t, t), key, [a.new() for a in self.aggs], pos, stream=stream)
            for s in touching:  # the event bridges them: one session
                mine.remove(s)
                slot.window = Interval(min(slot.window.start, s.window.start), max(slot.window.end, s.window.end))
                slot.accs = [a.merge(x, y) for a, x, y in zip(self.aggs, slot.accs, s.accs, strict=True)]
                slot.first_id = min(slot.first_id, s.first_id)
            slot.accs = [a.add(acc, event) for a, acc in zip(self.aggs, slot.accs, strict=True)]
            mine.append(slot)
        self.positions[stream] = pos

    def complete_before(self, watermark: float) -> float:
        """New sessions start after `watermark - gap`, open ones where they started: everything
        starting before both (to the hour) is final."""
        if watermark == -math.inf:
            return -math.inf
        open_starts = (s.window.start for ss in self.by_key.values() for s in ss if not s.emitted)
        return math.floor(min([watermark - self.sessions.gap, *open_starts]) / 3600) * 3600

    def _slots(self) -> list[Slot]:
        return [s for ss in self.by_key.values() for s in ss]

    def _evict(self, watermark: float) -> None:
        # A written session is kept while an on-time event could still fall within `gap` of it.
        for k, ss in list(self.by_key.items()):
            ss[:] = [s for s in ss if not s.emitted or s.window.end > watermark - self.sessions.gap]
            if not ss:
                del self.by_key[k]

    def _replay_afters(self, positions: list[str | None]) -> list[str]:
        return [self._at(positions, i) for i in range(len(positions))]  # no replay: on after each

    def _snapshot(self) -> dict[str, Any]:
        return {
            "sessions": [
                [
                    s.key,
                    s.window.start,
                    s.window.end,
                    list(s.first_id),
                    s.emitted,
                    [a.dump(acc) for a, acc in zip(self.aggs, s.accs, strict=True)],
                ]
                for s in self._slots()
            ]
        }


def restore(
    restored: Restored,
    *,
    key: Callable[[Any], str | None],
    column: str,
    windows: Tumbling | Hopping | Sessions,
    aggs: dict[str, Aggregation[Any]],
    grace: float,
    keep: float = 0.0,
) -> Aggregator[Any]:
    """The aggregator as the last commit left it (see the module docstring): session windows from
    the snapshot it referenced, reading on after its position; other windows rebuilt by re-reading
    the stream after its replay cursor."""
    watermark = Watermark(
        grace, value=restored.watermark, max_event=restored.max_event, max_seen_at=restored.max_seen_at
    )
    if isinstance(windows, Sessions):
        return SessionAggregator(
            key,
            column,
            windows,
            aggs,
            watermark,
            closed=restored.watermark,
            position=restored.position,
            hold_until=restored.late_position,
            state=restored.state,
            replay_after=restored.replay_after,
            shards=restored.shards,
        )
    return Aggregator(
        key,
        column,
        windows,
        aggs,
        watermark,
        keep=keep,
        closed=restored.watermark,
        replay_through=restored.position,
        hold_until=restored.late_position,
        replay_after=restored.replay_after,
        shards=restored.shards,
    )
