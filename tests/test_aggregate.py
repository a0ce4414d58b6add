"""The aggregate's state machine with a controlled clock: when windows close, what is late, what a
restart rebuilds. Times are seconds; an entry's id is its receive time in ms, as in Redis."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest

from streamapp.engine.aggregations import count, distinct
from streamapp.engine.aggregator import Aggregator, SessionAggregator, restore
from streamapp.engine.windows import Hopping, Sessions, Tumbling, Watermark
from streamapp.entries import entry_id
from streamapp.lake.aggregate_sink import Flush, Restored


@dataclass
class E:
    page: str | None
    user: str | None


@dataclass
class X:
    page: str | None
    x: object


class Feed:
    """Entries with increasing ids, as Redis assigns them."""

    def __init__(self) -> None:
        self.seq = 0

    def id(self, received: float) -> str:
        self.seq += 1
        return f"{int(received * 1000)}-{self.seq}"


MINUTE = Tumbling(60)


def make(windows=MINUTE, lateness: float = 10, keep: float = 0.0, after: Flush | None = None, aggs=None) -> Aggregator:
    """An aggregator as a worker starts one: new, or restored from what the commit `after` recorded
    (its snapshot through JSON, as the table holds it)."""
    if after is None:
        restored = Restored(None, "0-0", None, -math.inf, -math.inf, -math.inf, None)
    else:
        state = json.loads(json.dumps(after.state)) if after.state is not None else None
        restored = Restored(
            after.position, after.replay_after, None, after.watermark, after.max_event, after.max_seen_at, state
        )
    aggs = aggs or {"clicks": count(), "users": distinct(lambda e: e.user)}
    return restore(
        restored, key=lambda e: e.page, column="page_url", windows=windows, aggs=aggs, grace=lateness, keep=keep
    )


def rows(flush: Flush | None) -> dict:
    assert flush is not None
    return {(r["window_start"], r["page_url"]): (r["clicks"], r["users"]) for r in flush.rows}


def test_a_window_closes_when_the_watermark_passes_its_end_not_before():
    agg, feed = make(), Feed()
    for t, page, user in [
        (1000, "a", "u1"),
        (1010, "a", "u2"),
        (1019, "a", "u1"),
        (1030, "b", None),
        (1079, "a", "u3"),
    ]:
        agg.add(feed.id(t), E(page, user), t)  # live: received when it happened
    assert rows(agg.flush()) == {(960, "a"): (3, 2)}  # W = 1069: [960, 1020) closes, [1020, 1080) not
    agg.add(feed.id(1080), E("a", "u1"), 1079.5)
    assert agg.flush() is None  # W = 1069.5
    agg.add(feed.id(1090), E("a", "u9"), 1090)  # W = 1080
    assert rows(agg.flush()) == {(1020, "a"): (2, 2), (1020, "b"): (1, 0)}


def test_windows_before_the_first_flush_all_close_at_once():
    agg, feed = make(), Feed()
    for t in (950, 1000, 1019):
        agg.add(feed.id(t), E("a", "u"), t)
    agg.add(feed.id(1031), E("a", "u"), 1031)  # W = 1021
    assert rows(agg.flush()) == {(900, "a"): (1, 1), (960, "a"): (2, 1)}
    assert agg.flush() is None  # written once


def test_an_idle_stream_closes_its_last_window_lateness_seconds_after_its_end():
    """faust #250, quix #790: with no further event, the window still closes on time."""
    agg, feed = make(), Feed()
    agg.add(feed.id(1065), E("a", "u"), 1065)
    assert agg.flush(now=1066) is None
    assert agg.flush(now=1089.9) is None  # W = 1065 - 10 + 24.9 < 1080
    assert rows(agg.flush(now=1090)) == {(1020, "a"): (1, 1)}  # end 1080 + lateness 10
    agg.add(feed.id(1090.1), E("a", "u"), 1079.999)  # its window ended exactly at the watermark
    agg.add(feed.id(1090.2), E("a", "u"), 1080)  # the next window's first instant: on time
    f = agg.flush(now=1200)
    assert [x.window_start for x in f.late] == [1020]
    assert rows(f) == {(1080, "a"): (1, 1)}


def test_hopping_counts_each_event_in_every_window_that_holds_it():
    agg, feed = make(windows=Hopping(60, 20)), Feed()
    for t in (1000, 1020, 1039.999, 1040):
        agg.add(feed.id(t), E("a", "u"), t)
    f = agg.flush(now=10_000)
    assert rows(f) == {
        (960, "a"): (1, 1),
        (980, "a"): (3, 1),
        (1000, "a"): (4, 1),
        (1020, "a"): (3, 1),
        (1040, "a"): (1, 1),
    }


def test_late_events_go_to_the_late_list_by_default_with_the_window_they_missed():
    agg, feed = make(), Feed()
    agg.add(feed.id(1000), E("a", "u1"), 1000)
    agg.add(feed.id(1100), E("a", "u1"), 1100)  # W = 1090: [960, 1020) closes
    assert rows(agg.flush()) == {(960, "a"): (1, 1)}
    late_id = feed.id(1101)
    agg.add(late_id, E("a", "u2"), 1010)  # its window closed at the last commit
    agg.add(feed.id(1102), E("b", "u2"), 1085)  # behind W (1090) but its window [1080, 1140) is open
    f = agg.flush(now=1200)
    assert [(x.stream_id, x.window_start, x.key) for x in f.late] == [(late_id, 960, "a")]
    assert rows(f) == {(1080, "a"): (1, 1), (1080, "b"): (1, 1)}  # the late one is counted nowhere else


def test_with_keep_a_late_event_rewrites_its_closed_window():
    agg, feed = make(keep=300), Feed()
    agg.add(feed.id(1000), E("a", "u1"), 1000)
    agg.add(feed.id(1100), E("a", "u1"), 1100)
    assert rows(agg.flush()) == {(960, "a"): (1, 1)}
    agg.add(feed.id(1101), E("a", "u2"), 1010)
    agg.add(feed.id(1102), E(None, "u2"), 1011)  # a key the closed window did not have yet
    f = agg.flush()
    assert rows(f) == {(960, "a"): (2, 2), (960, None): (1, 1)}
    assert f.rewrite == [(960, "a")]  # its old row is replaced
    assert f.late == []
    agg.add(feed.id(1500), E("a", "u3"), 1500)  # W = 1490: [960, 1020) is past keep now
    agg.flush()
    agg.add(feed.id(1501), E("a", "u3"), 1012)
    assert [x.window_start for x in agg.flush(now=1502).late] == [960]


def test_a_restart_rebuilds_the_open_windows_and_counts_nothing_twice():
    """Crash after a commit: a fresh aggregator restored from that commit's properties re-reads
    the stream after its replay cursor and ends with the same rows as one that never crashed."""
    feed = Feed()
    received_and_time = [
        (1000, 1000),
        (1025, 1024),
        (1040, 1040),
        (1041, 1035),
        (1085, 1085),
        (1092, 1092),  # W = 1082: [1020, 1080) closes, [1080, 1140) stays open
        (1100, 1010),  # late: committed at once
        (1101, 1081),  # read, then the worker dies before committing it
        (1150, 1150),
        (1160, 1079),
        (1215, 1215),
        (1230, 1139),
    ]
    entries = [(feed.id(r), E("a" if i % 3 else "b", f"u{i % 4}"), t) for i, (r, t) in enumerate(received_and_time)]

    def run(agg: Aggregator, part) -> tuple[dict, list, list[Flush]]:
        emitted, late, flushes = {}, [], []
        for stream_id, e, t in part:
            agg.add(stream_id, e, t)
            if (f := agg.flush()) is not None:
                assert not set(rows(f)) & set(emitted), "a window emitted twice"
                emitted.update(rows(f))
                late += [x.stream_id for x in f.late]
                flushes.append(f)
        return emitted, late, flushes

    never = make()
    reference, ref_late, _ = run(never, entries)
    reference.update(rows(never.flush(now=10_000)))

    emitted, late, flushes = run(make(), entries[:8])
    c = flushes[-1]  # the last commit: what the table properties hold
    assert c.position == entries[6][0] and entry_id(c.replay_after) < entry_id(entries[4][0])  # [1080, 1140) open
    restarted = make(after=c)
    replayed = [x for x in entries if entry_id(x[0]) > entry_id(c.replay_after)]
    assert len(replayed) == len(entries) - 4  # from the first entry of the open window on
    more, more_late, _ = run(restarted, replayed)
    assert not set(more) & set(emitted), "a window emitted twice across the restart"
    emitted.update(more)
    emitted.update(rows(restarted.flush(now=10_000)))
    assert emitted == reference
    assert sorted(late + more_late) == sorted(ref_late) == sorted(entries[i][0] for i in (6, 9, 11))


def test_the_completeness_marker_is_the_last_hour_whose_windows_are_all_final():
    agg, feed = make(), Feed()
    agg.add(feed.id(3600 * 5 + 30), E("a", "u"), 3600 * 5 + 30)
    f = agg.flush(now=3600 * 6 + 69.9)  # W = 6:00:59.9: the window [5:59, 6:00) is final
    assert f.complete_before == 3600 * 6
    agg2 = make(keep=300)
    agg2.add(feed.id(3600 * 5 + 30), E("a", "u"), 3600 * 5 + 30)
    assert agg2.flush(now=3600 * 6 + 69.9).complete_before == 3600 * 5  # kept windows may still change


def sessions(after: Flush | None = None) -> SessionAggregator:
    agg = make(Sessions(30), after=after)
    assert isinstance(agg, SessionAggregator)
    return agg


def spans(flush: Flush | None) -> dict:
    assert flush is not None
    return {(r["window_start"], r["window_end"], r["page_url"]): (r["clicks"], r["users"]) for r in flush.rows}


def test_sessions_merge_bridge_and_close_gap_plus_lateness_after_their_last_event():
    agg, feed = sessions(), Feed()
    for t, page, user in [
        (1000, "a", "u1"),
        (1050, "a", "u2"),
        (1010, "b", "u1"),
        (1029.9, "a", "u3"),
        (1039.9, "b", "u2"),
    ]:
        agg.add(feed.id(1050), E(page, user), t)  # a: 1000, 1029.9 and 1050 chain into one session
    assert agg.flush(now=1050) is None
    agg.add(feed.id(1080), E("a", "u1"), 1080)  # exactly `gap` after 1050: a new session
    assert spans(agg.flush(now=1080)) == {(1010, 1069.9, "b"): (2, 2)}  # W = 1070
    assert spans(agg.flush(now=1091)) == {(1000, 1080, "a"): (3, 3)}  # W = 1081 (idle)
    assert spans(agg.flush(now=1121)) == {(1080, 1110, "a"): (1, 1)}


def test_an_event_bridging_two_open_sessions_makes_one():
    agg, feed = sessions(), Feed()
    agg.add(feed.id(1000), E("a", "u1"), 1000)
    agg.add(feed.id(1050), E("a", "u2"), 1050)
    agg.add(feed.id(1051), E("a", "u1"), 1025)  # within 30 s of both
    assert spans(agg.flush(now=10_000)) == {(1000, 1080, "a"): (3, 2)}


def test_late_session_events_go_to_the_late_list():
    agg, feed = sessions(), Feed()
    agg.add(feed.id(1000), E("a", "u1"), 1000)
    assert spans(agg.flush(now=1041)) == {(1000, 1030, "a"): (1, 1)}  # W = 1031
    agg.add(feed.id(1042), E("a", "u2"), 1020)  # within the gap of the written session
    agg.add(feed.id(1043), E("b", "u2"), 1000)  # its own session [1000, 1030) is behind W
    agg.add(feed.id(1044), E("b", "u2"), 1002)  # ([1002, 1032) is not: on time)
    f = agg.flush(now=1100)
    assert [(x.key, x.window_start, x.window_end) for x in f.late] == [("a", 1000, 1030), ("b", 1000, 1030)]
    assert spans(f) == {(1002, 1032, "b"): (1, 1)}


def test_sessions_restore_from_their_snapshot():
    """What a commit's snapshot holds is enough to go on: no replay of the stream."""
    feed = Feed()
    entries = [
        (feed.id(r), E(p, u), t)
        for r, t, p, u in [
            (1000, 1000, "a", "u1"),
            (1001, 1001, "b", "u1"),
            (1040, 1020, "a", "u2"),
            (1045, 1045, "b", "u2"),
            (1060, 1060, "a", "u3"),
            (1061, 1031, "b", "u3"),
            (1100, 1085, "a", "u1"),
            (1130, 1060, "b", "u4"),
            (1200, 1190, "a", "u2"),
        ]
    ]
    never, reference = sessions(), {}
    for stream_id, e, t in entries:
        never.add(stream_id, e, t)
        if (f := never.flush()) is not None:
            reference.update(spans(f))
    reference.update(spans(never.flush(now=10_000)))
    first, emitted = sessions(), {}
    commit = None
    for stream_id, e, t in entries[:6]:
        first.add(stream_id, e, t)
        if (f := first.flush()) is not None:
            emitted.update(spans(f))
            commit = f
    assert commit is not None and commit.state["sessions"]  # open sessions in the snapshot
    assert commit.replay_after == commit.position  # read on after the position, nothing again
    restarted = sessions(after=commit)
    for stream_id, e, t in entries:
        if entry_id(stream_id) > entry_id(commit.position):
            restarted.add(stream_id, e, t)
            if (f := restarted.flush()) is not None:
                assert not set(spans(f)) & set(emitted)
                emitted.update(spans(f))
    emitted.update(spans(restarted.flush(now=10_000)))
    assert emitted == reference


def test_the_session_completeness_marker_waits_for_open_sessions():
    agg, feed = sessions(), Feed()
    agg.add(feed.id(3600 * 5 + 3590), E("a", "u"), 3600 * 5 + 3590)  # a session from 5:59:50
    agg.add(feed.id(3600 * 7), E("b", "u"), 3600 * 7)  # W = 6:59:50; a's session closed at 6:00:30
    assert agg.flush().complete_before == 3600 * 6
    for i in range(1, 200):  # b: an open session going on, from 7:00 for over an hour (to 8:06:20)
        agg.add(feed.id(3600 * 7 + 20 * i), E("b", "u"), 3600 * 7 + 20 * i)
    agg.add(feed.id(3600 * 8 + 390), E("c", "u"), 3600 * 8 + 390)  # W = 8:06:20
    f = agg.flush()
    assert f is not None and f.complete_before == 3600 * 7  # not 8:00: b's session started at 7:00


def test_sum_min_max_skip_missing_values_and_min_max_of_none_is_null():
    from streamapp.engine import aggregations

    aggs = {
        "total": aggregations.sum(lambda e: e.x),
        "low": aggregations.min(lambda e: e.x, type=int),
        "high": aggregations.max(lambda e: e.x, type=int),
    }
    agg = Aggregator(lambda e: e.page, "page_url", MINUTE, aggs, Watermark(10))
    feed = Feed()
    for t, page, x in [(1000, "a", 3), (1001, "a", None), (1002, "a", -7), (1003, "b", None), (1100, "a", 1)]:
        agg.add(feed.id(t), X(page, x), t)
    flush = agg.flush()
    assert flush is not None
    got = {(r["window_start"], r["page_url"]): (r["total"], r["low"], r["high"]) for r in flush.rows}
    assert got == {(960, "a"): (-4.0, -7, 3), (960, "b"): (0.0, None, None)}
    assert [type(v) for v in got[(960, "a")]] == [float, int, int]  # a double column, then two longs


def test_a_value_that_does_not_fit_its_column_is_a_clear_error():
    from streamapp.engine import aggregations

    with pytest.raises(TypeError, match=r"fn returned 2.5 for a long column; pass type=float"):
        aggregations.max(lambda e: e.x, type=int).add(None, X("a", 2.5))
    with pytest.raises(TypeError, match="not a number"):
        aggregations.sum(lambda e: e.x).add(0.0, X("a", "3"))
    with pytest.raises(TypeError, match="not a finite number"):
        aggregations.min(lambda e: e.x).add(None, X("a", math.nan))
    with pytest.raises(TypeError, match="type must be int"):
        aggregations.sum(lambda e: e.x, type=str)  # type: ignore[arg-type]


class Mean:
    """A user's own aggregation: nothing in streamapp names it, the Aggregation Protocol is enough."""

    column_type = float
    nullable = True

    def new(self) -> list[float]:
        return [0.0, 0]

    def add(self, acc: list[float], event: X) -> list[float]:
        if event.x is not None:
            acc[0] += event.x
            acc[1] += 1
        return acc

    def merge(self, a: list[float], b: list[float]) -> list[float]:
        return [a[0] + b[0], a[1] + b[1]]

    def result(self, acc: list[float]) -> float | None:
        return acc[0] / acc[1] if acc[1] else None

    def dump(self, acc: list[float]) -> list[float]:
        return acc

    def load(self, value: list[float]) -> list[float]:
        return value


def test_a_user_defined_aggregation_runs_in_sessions_through_a_restart():
    """Sessions snapshot every accumulator (dump) and restore it (load); two sessions an event
    bridges are merged."""
    from streamapp.engine import aggregations

    aggs = {"mean": Mean(), "high": aggregations.max(lambda e: e.x), "n": count()}
    agg = make(Sessions(30), lateness=60, aggs=aggs)
    feed = Feed()
    for t, page, x in [(900, "b", 1), (1000, "a", 2), (1050, "a", 4)]:  # "a": two sessions, 50 s apart
        agg.add(feed.id(t), X(page, x), t)
    first = agg.flush()  # W = 990: b's session closes; a's two stay open, in the snapshot
    assert first is not None and [r["page_url"] for r in first.rows] == ["b"]
    restored = make(Sessions(30), lateness=60, aggs=aggs, after=first)  # as a restart finds it
    restored.add(feed.id(1060), X("a", 9), 1025)  # bridges them: one session [1000, 1080)
    flush = restored.flush(now=2000)
    assert flush is not None
    assert [(r["window_start"], r["window_end"], r["mean"], r["high"], r["n"]) for r in flush.rows] == [
        (1000, 1080, 5.0, 9.0, 3)
    ]


HOUR0 = 3600 * 500_000  # on an hour
DAY_AHEAD = 23 * 3600  # within STREAMAPP_MAX_FUTURE_SECONDS: accepted by the web


@pytest.mark.parametrize(
    "windows, keep", [(MINUTE, 0.0), (MINUTE, 300.0), (Hopping(60, 20), 0.0)], ids=["tumbling", "keep", "hopping"]
)
def test_an_event_stamped_a_day_ahead_holds_the_replay_for_one_window_plus_grace_plus_keep(windows, keep):
    """The issue: one event stamped now + 23 h opened a window 23 h ahead, and the replay cursor
    (the stream's trim point with it) stayed behind that entry for 23 h. It is windowed at its
    receipt time, so after window + grace + keep of processing time the cursor is past it."""
    agg, feed = make(windows=windows, keep=keep), Feed()
    received = HOUR0 + 30.5
    flushes = []
    for s in range(900):  # an on-time click a second, flushed each second (processing time)
        now = HOUR0 + s
        agg.add(feed.id(now), E("a", "u1"), now)
        if s == 30:
            ahead = feed.id(received)
            agg.add(ahead, E("b", "u2"), received + DAY_AHEAD)
        if (f := agg.flush(now=now)) is not None:
            flushes.append((now, f))
    bound = received + windows.size + 10 + keep
    past = [(now, entry_id(f.replay_after) >= entry_id(ahead)) for now, f in flushes if now >= bound]
    assert past and all(is_past for _, is_past in past), past[:3]
    b_rows = [
        (r["window_start"], r["window_end"], r["clicks"]) for _, f in flushes for r in f.rows if r["page_url"] == "b"
    ]
    assert b_rows == [(w.start, w.end, 1) for w in windows.assign(received)]  # counted at its receipt


def test_a_session_event_stamped_a_day_ahead_closes_gap_plus_grace_after_its_receipt():
    """A session has no replay cursor (its snapshot is written each commit), but a session 23 h
    ahead would sit open in every snapshot for 23 h: it starts at its receipt instead."""
    agg, feed = sessions(), Feed()
    received = HOUR0 + 60.5
    written = {}
    for s in range(400):
        now = HOUR0 + s
        if s % 40 == 0:  # on-time clicks of "a", 40 s apart: a session each
            agg.add(feed.id(now), E("a", "u1"), now)
        if s == 60:
            agg.add(feed.id(received), E("b", "u2"), received + DAY_AHEAD)
        if (f := agg.flush(now=now)) is not None:
            written.update({(r["window_start"], r["page_url"]): now for r in f.rows})
            ends = [end for _, _, end, *_ in f.state["sessions"]]
            assert all(end <= now + 30 for end in ends), (
                "a session in the snapshot reaches past the newest receipt + gap"
            )
    assert written[(received, "b")] == math.ceil(received + 30 + 10)  # gap + grace after its receipt
