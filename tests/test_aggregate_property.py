"""Property: for random event times, delivery delays, clocks running ahead, read batches, idle ticks
and crashes, the committed aggregate equals a batch recomputation over the raw events, window by
window, and no event holds the replay (or, for sessions, the snapshot) beyond its receipt.

The Aggregator and the real AggregateSink (a SQLite Iceberg catalog) are driven as the worker
drives them; the stream is a list of entries read from a cursor, and a crash throws away the
aggregator and the sink and restores both from the tables, at any step of a commit.
"""

from __future__ import annotations

import tempfile
from collections import Counter, defaultdict
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from models.click import ClickEvent
from streamapp.engine import aggregations
from streamapp.engine.aggregations import count, distinct
from streamapp.engine.aggregator import Aggregator, restore
from streamapp.engine.windows import Hopping, Sessions, Tumbling, Watermark
from streamapp.entries import entry_id
from streamapp.lake.aggregate_sink import AggregateSink, aggregate_spec
from streamapp.lake.catalog import open_catalog
from streamapp.names import LATE_TABLE
from streamapp.settings import Settings

LATENESS = 10.0
GAP = 30.0
BASE = 1_795_000_000  # 2026-11-19
STREAM = "streamapp:{streamapp}:events:click"

event = st.tuples(
    st.integers(0, 400_000),  # event time offset, ms
    st.one_of(st.integers(0, 5_000), st.integers(15_000, 120_000)),  # delivery delay: on time, or late-ish
    st.sampled_from(["a", "b", None]),
    st.sampled_from(["u0", "u1", "u2", None]),
    # stamped this far (ms) after its receipt: a client clock running ahead, up to a day (the web
    # accepts that); mostly 0, an event stamped when it happened
    st.one_of(st.just(0), st.just(0), st.integers(1, 2_000), st.integers(1, 86_400_000)),
)


def AGGS() -> dict:
    """Every shipped aggregation; `max` and `min` also over windows where no event has a value."""
    return {
        "clicks": count(),
        "users": distinct(lambda e: e.user_id),
        "total_x": aggregations.sum(lambda e: e.x, type=int),
        "max_x": aggregations.max(lambda e: e.x if e.user_id else None, type=int),
        "min_half_y": aggregations.min(lambda e: e.y / 2 if e.page_url else None),
    }


def recount(evs: list) -> tuple:
    """The aggregations of AGGS, computed in one go over a window's events."""
    xs = [e.x for e in evs if e.user_id]
    halves = [e.y / 2 for e in evs if e.page_url]
    return (
        len(evs),
        len({e.user_id for e in evs} - {None}),
        sum(e.x for e in evs),
        max(xs) if xs else None,
        min(halves) if halves else None,
    )


@settings(max_examples=60, deadline=None)
@given(
    events=st.lists(event, min_size=8, max_size=60),
    kind=st.sampled_from(["tumbling", "hopping", "session"]),
    keep=st.sampled_from([0.0, 120.0, 1e9]),
    batches=st.lists(st.integers(1, 8), min_size=1, max_size=10),
    ticks=st.lists(st.floats(0, 1), min_size=1, max_size=10),
    crashes=st.dictionaries(
        st.integers(1, 6), st.sampled_from(["before_commit", "after_late", "after_commit"]), max_size=3
    ),
)
def test_streaming_aggregate_equals_batch_recount(events, kind, keep, batches, ticks, crashes):
    windows = {"tumbling": Tumbling(60), "hopping": Hopping(60, 20), "session": Sessions(GAP)}[kind]
    if kind == "session":
        keep = 0.0  # sessions are never rewritten
    arrivals = sorted(
        ((BASE * 1000 + t + d, t, ahead, page, user) for t, d, page, user, ahead in events), key=lambda a: a[0]
    )
    entries = []  # (stream id, event, event time, received)
    for seq, (received_ms, t, ahead, page, user) in enumerate(arrivals):
        stamp = (received_ms + ahead if ahead else BASE * 1000 + t) / 1000
        ev = ClickEvent(
            x=seq % 97 - 40,
            y=seq % 13,
            event_id=f"e{seq}",
            page_url=page,
            user_id=user,
            timestamp=datetime.fromtimestamp(stamp, UTC),
        )
        entries.append((f"{received_ms}-{seq}", ev, stamp, received_ms / 1000))

    with tempfile.TemporaryDirectory() as tmp:
        catalog = open_catalog(Settings(warehouse=tmp))
        spec = aggregate_spec("events.agg", "page_url", {n: (a.column_type, a.nullable) for n, a in AGGS().items()})

        def start():  # as the worker (re)starts an aggregate agent: from what the tables hold
            sink, r = AggregateSink.open(catalog, spec, STREAM, "prop", keep_snapshots=10)
            agg = restore(
                r, key=lambda e: e.page_url, column="page_url", windows=windows, aggs=AGGS(), grace=LATENESS, keep=keep
            )
            return sink, agg, r.replay_after

        sink, agg, cursor = start()
        flushes = step = 0
        final = entries[-1][3] + 100_000  # long after the last event: the watermark closes everything
        while True:
            pending = [x for x in entries if entry_id(x[0]) > entry_id(cursor)]
            batch = pending[: batches[step % len(batches)]]
            for stream_id, ev, t, _ in batch:
                agg.add(stream_id, ev, t)
            if batch:
                cursor = batch[-1][0]
            rest = pending[len(batch) :]
            if rest:  # caught up for a while (nothing received until the next entry), or not
                last = batch[-1][3]
                fraction = ticks[step % len(ticks)]
                now = last + fraction * (rest[0][3] - last) if fraction > 0.5 else None
            else:
                now = final
            step += 1
            flush = agg.flush(now)
            if flush is not None:
                flushes += 1
                assert_replay_bounded(flush, kind, windows, keep, entries)
                crash = crashes.get(flushes)
                if crash == "after_late" and flush.late:
                    sink.commit_late(flush)
                if crash is None or crash == "after_commit":
                    sink.commit(flush)
                if crash is not None:
                    sink, agg, cursor = start()
                    continue
            if not rest and flush is None:
                break

        aggregated = catalog.load_table("events.agg").scan().to_arrow().to_pylist()
        late = catalog.load_table(LATE_TABLE).scan().to_arrow().to_pylist()

    by_window = Counter((r["window_start"].timestamp(), r["page_url"]) for r in aggregated)
    assert all(c == 1 for c in by_window.values()), "a window has two rows"
    late_pairs = Counter((r["stream_id"], r["window_start"].timestamp()) for r in late)
    assert all(c == 1 for c in late_pairs.values()), "an event routed to events.late twice"

    received = {stream_id: rcv for stream_id, _, _, rcv in entries}
    for r in late:  # late means: behind a committed watermark, which trails every receipt by the lateness
        assert r["event_time"].timestamp() < received[r["stream_id"]] - LATENESS
        assert r["window_end"].timestamp() <= received[r["stream_id"]] - LATENESS
    members: dict[tuple, list] = defaultdict(list)  # (start, end, key) -> its events
    # The rule under test: an event is windowed at its time, or at its receipt if stamped later.
    if kind == "session":  # per key, sorted by time, cut where two events are `GAP` or more apart
        late_ids = {stream_id for stream_id, _ in late_pairs}
        by_key = defaultdict(list)
        for stream_id, ev, t, rcv in entries:
            if stream_id not in late_ids:
                by_key[ev.page_url].append((min(t, rcv), ev))
        for key, items in by_key.items():
            items.sort(key=lambda x: x[0])
            session: list = []
            for t, ev in items:
                if session and t - session[-1][0] >= GAP:
                    members[(session[0][0], session[-1][0] + GAP, key)] = [e for _, e in session]
                    session = []
                session.append((t, ev))
            members[(session[0][0], session[-1][0] + GAP, key)] = [e for _, e in session]
    else:
        for stream_id, ev, t, rcv in entries:
            for w in windows.assign(min(t, rcv)):
                if (stream_id, w.start) not in late_pairs:
                    members[(w.start, w.end, ev.page_url)].append(ev)
    batch = {k: recount(evs) for k, evs in members.items()}
    stream = {
        (r["window_start"].timestamp(), r["window_end"].timestamp(), r["page_url"]): tuple(r[n] for n in AGGS())
        for r in aggregated
    }
    assert stream == batch
    if keep == 1e9:
        assert late == []  # every late event updated its window


def assert_replay_bounded(flush, kind, windows, keep, entries) -> None:
    """Tumbling, hopping: the replay cursor is past every entry received a window plus `keep`
    before the watermark (its windows all ended by then, whatever its time stamp). Sessions: no
    session in the snapshot reaches past the newest receipt + gap (it closes `gap` + lateness
    after it). The watermark trails processing time by the lateness (plus delivery delay), so
    both bound the replay in processing time."""
    if kind == "session":
        newest = entry_id(flush.position)[0] / 1000
        assert all(end <= newest + GAP for _, _, end, *_ in flush.state["sessions"]), "a session ends ahead"
        return
    behind = [sid for sid, _, _, rcv in entries if rcv + windows.size + keep <= flush.watermark]
    assert not behind or entry_id(flush.replay_after) >= entry_id(behind[-1]), (behind[-1], flush.replay_after)


def test_rewriting_a_window_keeps_the_null_key_row_of_the_same_window(tmp_path):
    """Found by the property test: a late event rewrote (window, "a") and pyiceberg's
    copy-on-write delete took (window, null) with it."""
    T0 = 1_795_000_020  # on a minute
    catalog = open_catalog(Settings(warehouse=tmp_path))
    spec = aggregate_spec("events.agg", "page_url", {"clicks": (int, False), "users": (int, False)})
    sink, _ = AggregateSink.open(catalog, spec, STREAM, "prop", keep_snapshots=10)
    agg = Aggregator(
        lambda e: e.page_url, "page_url", Tumbling(60), {"clicks": count(), "users": count()}, Watermark(0), keep=600
    )
    for i, (t, page) in enumerate([(0, "a"), (1, None), (60, "a"), (61, None), (200, "b")]):
        agg.add(f"{(T0 + t) * 1000}-{i}", ClickEvent(x=0, y=0, page_url=page), T0 + t)
    sink.commit(agg.flush())
    agg.add(f"{(T0 + 201) * 1000}-9", ClickEvent(x=0, y=0, page_url="a"), T0 + 2)  # late: rewrites (0, "a")
    agg.add(f"{(T0 + 202) * 1000}-9", ClickEvent(x=0, y=0), T0 + 62)  # late: rewrites (60, null)
    flush = agg.flush()
    assert len(flush.rewrite) == 2
    sink.commit(flush)
    rows = catalog.load_table("events.agg").scan().to_arrow().to_pylist()
    assert sorted(((r["window_start"].timestamp() - T0, r["page_url"] or ""), r["clicks"]) for r in rows) == [
        ((0, ""), 1),
        ((0, "a"), 2),
        ((60, ""), 2),
        ((60, "a"), 1),
    ]
