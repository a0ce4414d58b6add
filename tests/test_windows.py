"""Window assignment and the watermark, as pure logic with a controlled clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from streamapp.engine.windows import Hopping, Interval, Sessions, Tumbling, Watermark


def test_tumbling_windows_are_half_open_and_epoch_aligned():
    w = Tumbling(60)
    assert w.assign(0) == [Interval(0, 60)]
    assert w.assign(59.999) == [Interval(0, 60)]
    assert w.assign(60) == [Interval(60, 120)]  # the end belongs to the next window
    assert w.assign(1_795_776_030.5) == [Interval(1_795_776_000, 1_795_776_060)]
    assert w.assign(-0.5) == [Interval(-60, 0)]


def test_hopping_windows_at_the_boundaries():
    w = Hopping(60, 20)
    assert w.assign(65) == [Interval(20, 80), Interval(40, 100), Interval(60, 120)]
    assert w.assign(60) == [Interval(20, 80), Interval(40, 100), Interval(60, 120)]  # not [0, 60)
    assert w.assign(59.999) == [Interval(0, 60), Interval(20, 80), Interval(40, 100)]
    assert Hopping(60, 60).assign(60) == Tumbling(60).assign(60)
    with pytest.raises(ValueError):
        Hopping(20, 60)


@given(t=st.floats(-1e6, 1e10, allow_nan=False), size=st.integers(1, 600), step=st.integers(1, 600))
@example(t=-5e-324, size=2, step=2)  # t / step underflows to -0.0: floor gave the window after t
def test_hopping_puts_each_event_in_exactly_the_windows_that_hold_it(t, size, step):
    """faust #514: hopping windows computed wrong ranges. Brute force over every window start
    near t is the reference."""
    if step > size:
        size, step = step, size
    got = Hopping(size, step).assign(t)
    k0 = math.floor(t / step)
    reference = [
        Interval(k * step, k * step + size)
        for k in range(k0 - size // step - 2, k0 + 2)
        if k * step <= t < k * step + size
    ]
    assert got == reference
    if size % step == 0:
        assert len(got) == size // step


def test_watermark_trails_the_newest_event_by_the_lateness():
    wm = Watermark(10)
    assert wm.value == -math.inf
    wm.observe(100, received=100)
    assert wm.value == 90
    wm.observe(95, received=100.5)  # out of order: the watermark does not go back
    assert wm.value == 90.5  # half a second passed since the newest event was received
    wm.observe(130, received=130)
    assert wm.value == 120


def test_an_idle_stream_moves_the_watermark_with_the_wall_clock():
    """faust #250 / quix #790: windows that never close when no further event comes."""
    wm = Watermark(10)
    wm.observe(65, received=65)
    wm.tick(100)
    assert wm.value == 90
    wm.tick(130)
    assert wm.value == 120  # [60, 120) closes at 120 + lateness, with no event after 65


def test_backfilled_history_follows_its_event_times_not_the_wall_clock():
    """A day of old events sent at once: received within a second of each other."""
    wm = Watermark(10)
    old = 1_700_000_000
    for i in range(1000):
        assert wm.value < old + i * 60 - 5  # the next event, 5 s out of order, is not late
        wm.observe(old + i * 60, received=2_000_000_000 + i / 1000)
    assert wm.value == old + 999 * 60 - 10
    wm.tick(2_000_000_001)  # caught up, a second after the last one: a second more, not years
    assert wm.value == pytest.approx(old + 999 * 60 - 10 + 0.001, abs=1e-3)


def test_a_backlog_read_after_downtime_is_timed_by_receive_time():
    """A worker down for an hour reads what arrived meanwhile: its clock is the entries' receive
    times, so events that arrived on time are not declared late because the reader was slow."""
    wm = Watermark(10)
    for t in range(0, 3600, 5):
        wm.observe(t - 3, received=t)  # each event 3 s old when received, inside the lateness
        assert wm.value <= t - 3 - 10 + 5  # at most one inter-arrival gap ahead
    # the events arrived 3 s late and lateness is 10 s: none of them was behind the watermark


def test_the_watermark_never_goes_back_after_idling():
    wm = Watermark(10)
    wm.observe(100, received=100)
    wm.tick(150)
    assert wm.value == 140
    wm.observe(110, received=150)  # a newer maximum, 40 s old: behind the extrapolated clock
    assert wm.value == 140  # held, not moved back to 110 - 10
    wm.tick(189)
    assert wm.value == 140  # extrapolating from 110 now: it holds until that passes 140
    wm.tick(191)
    assert wm.value == 141


def test_a_slow_backfill_is_not_declared_late():
    """History sent at half its real pace: each event raises the maximum, so the extrapolation
    starts over at each one and never runs ahead of the events."""
    wm = Watermark(10)
    for i in range(600):
        t = 1_700_000_000 + i
        assert wm.value < t - 5
        wm.observe(t, received=2_000_000_000 + 2 * i)


def test_a_clock_in_the_future_does_not_push_the_watermark():
    """A client whose clock is an hour ahead: its events cannot move the watermark past the time
    they were received, or everyone else would be late (aggregates window them there too)."""
    wm = Watermark(10)
    wm.observe(1000 + 3600, received=1000)
    assert wm.value == 990
    wm.observe(1001, received=1001)
    assert wm.value == 991


def test_restored_watermark_continues_from_the_commit():
    wm = Watermark(10, value=120, max_event=125, max_seen_at=126)
    assert wm.value == 120  # never below what was committed
    wm.tick(140)
    assert wm.value == 125 - 10 + 14


def test_a_session_takes_events_less_than_gap_apart():
    s = Sessions(30)
    w = s.window(100, 140)
    assert w == Interval(100, 170)
    assert s.touches(w, 120) and s.touches(w, 70.001) and s.touches(w, 169.999)
    assert not s.touches(w, 70) and not s.touches(w, 170)  # exactly `gap` away: a new session
    with pytest.raises(ValueError):
        Sessions(0)
