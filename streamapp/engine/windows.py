"""Event-time windows and the watermark: which windows an event falls in, and when a window closes.

Times are float epoch seconds. Windows are half-open, `[start, end)`, aligned to the epoch, so a
60 s window starts on the minute in UTC whatever process computes it.

The watermark is the event time before which no more events are expected. It is

    W = max_event_time - lateness + max(0, clock - clock_when_max_event_time_was_seen)

floored by its own past values (it never goes back); an event time later than the event's
receipt counts as its receipt time (`windowed_time`: a client clock running ahead must not make
everyone late, and the event cannot have happened after Redis received it). Aggregates window an
event at that same time, so no event opens a window later than its own receipt.
`clock` is processing time as seen through the stream: the Redis receive time (entry id) of each
entry read, and the wall clock only when the reader is caught up (`tick`). So:

- on a live stream, event time ~ receive time and W trails the newest event by `lateness`;
- on an idle stream, W keeps moving with the wall clock, and a window `[s, e)` closes `lateness`
  seconds after `e` even when no further event arrives (faust #250, quix #790 never close it);
- backfilled history (old event times received at once) is windowed by its event times: its
  receive times are close together, so W follows the events, not the wall clock;
- a backlog read after a restart does not look idle: the clock is the entries' receive times,
  so a worker that was down for an hour does not declare that hour's events late.

An event is late when it arrives more than `lateness` behind that extrapolated clock; lateness
therefore has to cover out-of-order delivery and client-side batching delays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def windowed_time(event_time: float, received: float) -> float:
    """The time an aggregate windows an event at, and the watermark counts: its own time, or its
    receipt (the Redis entry id) when it is stamped later than that. Such a stamp is a clock
    running ahead (up to STREAMAPP_MAX_FUTURE_SECONDS is accepted); kept as sent, it would hold its
    window, and the aggregate's replay and the stream's trim point, open until that time came."""
    return min(event_time, received)


@dataclass(frozen=True)
class Interval:
    """One event-time window, `[start, end)` in epoch seconds (a `Window` is something else: the
    batch of stream entries an agent takes, see `streamapp.entries`)."""

    start: float
    end: float


def _start_at_or_before(t: float, step: float) -> float:
    """The latest multiple of `step` at or before `t`. floor(t / step) alone can be off by one
    where the division rounds: -5e-324 / 2 underflows to -0.0, whose floor is 0, after t."""
    start = math.floor(t / step) * step
    if start > t:
        start -= step
    elif start + step <= t:
        start += step
    return start


@dataclass(frozen=True)
class Tumbling:
    """Back-to-back windows of `size` seconds: each event is in exactly one."""

    size: float

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError("a window size must be > 0")

    @property
    def step(self) -> float:
        """A window starts every `size` seconds, as hopping windows start every `step`."""
        return self.size

    def assign(self, t: float) -> list[Interval]:
        start = _start_at_or_before(t, self.size)
        return [Interval(start, start + self.size)]


@dataclass(frozen=True)
class Hopping:
    """Windows of `size` seconds starting every `step` seconds: each event is in every window
    whose `[start, start + size)` holds it, i.e. size/step of them when step divides size.
    (faust #514: hopping windows that missed or doubled events at the boundaries.)"""

    size: float
    step: float

    def __post_init__(self) -> None:
        if self.size <= 0 or self.step <= 0 or self.step > self.size:
            raise ValueError("hopping windows need 0 < step <= size")

    def assign(self, t: float) -> list[Interval]:
        last = _start_at_or_before(t, self.step)
        windows = []
        k = 0
        while (start := last - k * self.step) + self.size > t:
            windows.append(Interval(start, start + self.size))
            k += 1
        return windows[::-1]


@dataclass(frozen=True)
class Sessions:
    """Per key, events less than `gap` seconds apart share a session `[first, last + gap)`; an
    event may bridge two sessions into one. Which session an event joins depends on the others,
    so sessions are kept by `streamapp.engine.aggregator.SessionAggregator`, not assigned here."""

    gap: float

    def __post_init__(self) -> None:
        if self.gap <= 0:
            raise ValueError("a session gap must be > 0")

    def window(self, first: float, last: float) -> Interval:
        return Interval(first, last + self.gap)

    def touches(self, session: Interval, t: float) -> bool:
        """Is `t` less than `gap` from the session's first or last event (or between them)?"""
        return session.start - self.gap < t < session.end


class Watermark:
    """The watermark of one stream (see the module docstring). `lateness` in seconds."""

    def __init__(
        self, lateness: float, *, value: float = -math.inf, max_event: float = -math.inf, max_seen_at: float = -math.inf
    ) -> None:
        if lateness < 0:
            raise ValueError("lateness must be >= 0")
        self.lateness = lateness
        self.max_event = max_event
        self.max_seen_at = max_seen_at
        self.clock = max_seen_at
        self._value = value

    def observe(self, event_time: float, received: float) -> None:
        """An event with `event_time`, received (by Redis) at `received`. A time after its
        receipt (a client clock ahead) counts as its receipt time here, so it cannot push the
        watermark past every other event."""
        self.clock = max(self.clock, received)
        event_time = windowed_time(event_time, received)
        if event_time > self.max_event:
            self._value = self.value  # what the old maximum extrapolated to: W never goes back
            self.max_event, self.max_seen_at = event_time, self.clock

    def tick(self, now: float) -> None:
        """The reader is caught up at wall-clock `now`: nothing more was received until then."""
        self.clock = max(self.clock, now)

    @property
    def value(self) -> float:
        if self.max_event == -math.inf:
            return self._value
        idle = max(0.0, self.clock - self.max_seen_at)
        return max(self._value, self.max_event - self.lateness + idle)
