"""An aggregate over several shard streams (STREAMAPP_SHARDS): entry ids of one stream compare
only with that stream's, so positions, replay cursors and late positions are per stream, and one
commit moves them all. Pure aggregator + the real AggregateSink (a SQLite Iceberg catalog), driven
as the worker drives them, with the shards' entries interleaved at random and crashes at any step
of a commit; then the merged reader against a real valkey."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import random
import re
import signal
import tempfile
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.click import ClickEvent
from streamapp import names
from streamapp.engine.aggregations import count, distinct
from streamapp.engine.aggregator import restore
from streamapp.engine.reader import StreamReader
from streamapp.engine.shards import ShardReaders
from streamapp.engine.windows import Hopping, Sessions, Tumbling
from streamapp.entries import DeadEntry, entry_id
from streamapp.lake.aggregate_sink import AggregateSink, StaleState, aggregate_spec
from streamapp.lake.catalog import open_catalog
from streamapp.names import LATE_TABLE, position_property, replay_property
from streamapp.redis_client import reader_client
from streamapp.settings import Settings
from tests.conftest import table_rows
from tests.test_compare_and_set import after_next_refresh

LATENESS = 10.0
BASE = 1_795_000_000_000  # ms, 2026-11-19
SHARDS = 3
KEYS = names.streams("click", SHARDS)


def AGGS() -> dict:
    return {"clicks": count(), "users": distinct(lambda e: e.user_id)}


event = st.tuples(
    st.integers(0, 300_000),  # event time offset, ms
    st.one_of(st.integers(0, 3_000), st.integers(15_000, 90_000)),  # delivery delay: on time, or late-ish
    st.integers(0, SHARDS - 1),
    st.sampled_from(["a", "b", None]),
    st.sampled_from(["u0", "u1", "u2", None]),
)


def shard_entries(events: list[tuple]) -> list[list[tuple]]:
    """Per shard, entries (stream id, event, event time, received) in receipt order. Each shard
    numbers its ids on its own (the same ids recur on other shards, as in Redis)."""
    streams: list[list[tuple]] = [[] for _ in range(SHARDS)]
    arrivals = sorted(((BASE + t + d, t, shard, page, user) for t, d, shard, page, user in events), key=lambda a: a[:2])
    for n, (received_ms, t, shard, page, user) in enumerate(arrivals):
        ev = ClickEvent(
            x=0,
            y=0,
            event_id=f"e{n}",
            page_url=page,
            user_id=user,
            timestamp=datetime.fromtimestamp((BASE + t) / 1000, UTC),
        )
        # the seq part is the entry's rank in its stream: ids such as "…-0" recur across shards
        streams[shard].append((f"{received_ms}-{len(streams[shard])}", ev, (BASE + t) / 1000, received_ms / 1000))
    return streams


def run(catalog, windows, keep, streams, order, ticks, crashes) -> None:
    """Feed the shards' entries to an aggregator as the worker does, `order` choosing which shard's
    next few entries come next; `crashes`: the flush numbers at which the worker dies, and where."""
    spec = aggregate_spec("events.agg", "page_url", {n: (a.column_type, a.nullable) for n, a in AGGS().items()})

    def start():
        sink, r = AggregateSink.open(catalog, spec, KEYS, "prop", keep_snapshots=10)
        agg = restore(
            r, key=lambda e: e.page_url, column="page_url", windows=windows, aggs=AGGS(), grace=LATENESS, keep=keep
        )
        return sink, agg, [r.replay_after, *(s.replay_after for s in r.shards)]

    sink, agg, cursors = start()
    acked = list(cursors)
    final = max(e[3] for s in streams for e in s) + 100_000
    flushes = step = 0
    while True:
        assert step < 5_000, "the aggregate does not finish"
        pending = [[x for x in s if entry_id(x[0]) > entry_id(c)] for s, c in zip(streams, cursors, strict=True)]
        shard, take = order[step % len(order)]
        if not pending[shard]:  # that shard is read to its end: the next one with entries
            shard = next((i for i, p in enumerate(pending) if p), shard)
        batch = pending[shard][:take]
        for stream_id, ev, t, _ in batch:
            agg.add(stream_id, ev, t, shard)
        if batch:
            cursors[shard] = batch[-1][0]
            pending[shard] = pending[shard][len(batch) :]
        read = max(
            (x[3] for s, c in zip(streams, cursors, strict=True) for x in s if entry_id(x[0]) <= entry_id(c)), default=0
        )
        unread = min((p[0][3] for p in pending if p), default=None)
        fraction = ticks[step % len(ticks)]
        # the wall clock may only tick when every shard is caught up: before the next receipt anywhere
        now = (
            final
            if unread is None
            else (read + fraction * (unread - read) if fraction > 0.5 and unread >= read else None)
        )
        step += 1
        flush = agg.flush(now)
        if flush is not None:
            flushes += 1
            for i, part in enumerate(flush.streams()):  # the trim point (acked) never goes back
                if part.position is not None:
                    assert entry_id(part.replay_after) >= entry_id(acked[i])
            crash = crashes.get(flushes)
            if crash == "after_late" and flush.late:
                sink.commit_late(flush)
            if crash is None or crash == "after_commit":
                sink.commit(flush)
                acked = [p.replay_after if p.position else a for p, a in zip(flush.streams(), acked, strict=True)]
            if crash is not None:
                sink, agg, cursors = start()
                continue
        if unread is None and flush is None:
            break


def committed(catalog) -> tuple[dict, list[dict]]:
    rows = catalog.load_table("events.agg").scan().to_arrow().to_pylist()
    by_window = Counter((r["window_start"].timestamp(), r["page_url"]) for r in rows)
    assert all(c == 1 for c in by_window.values()), "a window has two rows"
    table = {(r["window_start"].timestamp(), r["page_url"]): (r["clicks"], r["users"]) for r in rows}
    return table, catalog.load_table(LATE_TABLE).scan().to_arrow().to_pylist()


def recount(streams, windows, late: list[dict]) -> dict:
    """The batch recomputation over every shard's events, but those in events.late: sessions per
    key cut where two events are a gap apart; other windows window by window (a hopping event may
    miss one of its windows and be in the next)."""
    members: dict[tuple, list] = defaultdict(list)
    if isinstance(windows, Sessions):
        late_ids = {r["event_id"] for r in late}
        by_key = defaultdict(list)
        for s in streams:
            for _, ev, t, rcv in s:
                if ev.event_id not in late_ids:
                    by_key[ev.page_url].append((min(t, rcv), ev))
        for key, items in by_key.items():
            items.sort(key=lambda x: x[0])
            session: list = []
            for t, ev in items:
                if session and t - session[-1][0] >= windows.gap:
                    members[(session[0][0], key)] = [e for _, e in session]
                    session = []
                session.append((t, ev))
            members[(session[0][0], key)] = [e for _, e in session]
    else:
        missed = {(r["event_id"], r["window_start"].timestamp()) for r in late}
        for s in streams:
            for _, ev, t, rcv in s:
                for w in windows.assign(min(t, rcv)):
                    if (ev.event_id, w.start) not in missed:
                        members[(w.start, ev.page_url)].append(ev)
    return {k: (len(evs), len({e.user_id for e in evs} - {None})) for k, evs in members.items()}


@settings(max_examples=30, deadline=None)
@given(
    events=st.lists(event, min_size=8, max_size=50),
    kind=st.sampled_from(["tumbling", "hopping", "session"]),
    keep=st.sampled_from([0.0, 120.0]),
    order=st.lists(st.tuples(st.integers(0, SHARDS - 1), st.integers(1, 6)), min_size=1, max_size=12),
    ticks=st.lists(st.floats(0, 1), min_size=1, max_size=8),
    crashes=st.dictionaries(
        st.integers(1, 6), st.sampled_from(["before_commit", "after_late", "after_commit"]), max_size=3
    ),
)
def test_three_interleaved_shards_with_crashes_equal_a_recount(events, kind, keep, order, ticks, crashes):
    """Every event is in its window's row or in events.late, once, whatever the interleaving and
    the crashes: a replay after a crash re-reads each shard from its own cursor and puts back
    exactly what the committed windows lacked."""
    windows = {"tumbling": Tumbling(60), "hopping": Hopping(60, 20), "session": Sessions(30)}[kind]
    keep = 0.0 if kind == "session" else keep
    streams = shard_entries(events)
    with tempfile.TemporaryDirectory() as tmp:
        catalog = open_catalog(Settings(warehouse=tmp))
        run(catalog, windows, keep, streams, order, ticks, crashes)
        table, late = committed(catalog)
        props = catalog.load_table("events.agg").properties
    pairs = Counter((r["event_id"], r["window_start"]) for r in late)
    assert all(c == 1 for c in pairs.values()), "an event routed to events.late twice"
    assert table == recount(streams, windows, late)
    for i, s in enumerate(streams):  # each shard's position is its last entry, in its own numbering
        assert props.get(position_property(KEYS[i], "prop")) == (s[-1][0] if s else None)


def test_a_crash_mid_window_gives_the_rows_of_an_uninterrupted_run(tmp_path):
    """On-time events spread over 3 shards: killed after its second commit (windows open, the
    Redis ack not moved), the restarted aggregate re-reads each shard from its replay cursor and
    writes exactly the rows of a run that was never interrupted, and of a recount."""
    events = [(i * 2_000, 500, i % SHARDS, "ab"[i % 2 if i % 7 else 0], f"u{i % 5}") for i in range(150)]
    streams = shard_entries(events)
    order = [(0, 2), (1, 2), (2, 2)]  # the shards in turn, a few seconds apart: within the lateness
    results = []
    for crashes in ({}, {2: "after_commit"}, {1: "before_commit", 3: "after_commit"}):
        catalog = open_catalog(Settings(warehouse=tmp_path / f"run{len(results)}"))
        run(catalog, Tumbling(60), 0.0, streams, order, [0.0], crashes)
        table, late = committed(catalog)
        assert late == []
        results.append(table)
    assert results[0] == results[1] == results[2] == recount(streams, Tumbling(60), [])
    assert sum(c for c, _ in results[0].values()) == 150


def test_a_replay_cursor_is_per_shard_and_holds_what_open_windows_need(tmp_path):
    """A window open on shard 1's early entry keeps shard 1's cursor before it, while shard 0,
    whose entries are all in closed windows, is not held back."""
    catalog = open_catalog(Settings(warehouse=tmp_path))
    spec = aggregate_spec("events.agg", "page_url", {n: (a.column_type, a.nullable) for n, a in AGGS().items()})
    sink, r = AggregateSink.open(catalog, spec, KEYS, "c", keep_snapshots=5)
    agg = restore(r, key=lambda e: e.page_url, column="page_url", windows=Tumbling(60), aggs=AGGS(), grace=5)
    T = 1_795_000_020  # on a minute
    click = ClickEvent(x=0, y=0, page_url="a", user_id="u")
    agg.add(f"{T * 1000}-0", click, T, 0)  # [T, T+60) from shard 0
    agg.add(f"{(T + 70) * 1000}-0", click, T + 70, 1)  # [T+60, T+120) from shard 1
    agg.add(f"{(T + 80) * 1000}-0", click, T + 80, 0)  # W = T+75: [T, T+60) closes
    flush = agg.flush()
    assert [p.position for p in flush.streams()] == [f"{(T + 80) * 1000}-0", f"{(T + 70) * 1000}-0", None]
    # shard 0: the open window was opened while shard 0 stood at its first entry, so not before it
    assert flush.replay_after == f"{T * 1000}-0"
    assert flush.shards[0].replay_after == f"{(T + 70) * 1000 - 1}-18446744073709551615"
    sink.commit(flush)
    props = catalog.load_table("events.agg").properties
    assert props[replay_property(KEYS[1], "c")] == flush.shards[0].replay_after
    assert position_property(KEYS[2], "c") not in props  # never read: nothing recorded
    _, again = AggregateSink.open(catalog, spec, KEYS, "c", keep_snapshots=5)
    assert [again.position, *(s.position for s in again.shards)] == [p.position for p in flush.streams()]
    assert again.shards[1].replay_after == "0-0"


def test_a_commit_is_refused_when_any_shard_moved(settings, monkeypatch):
    """The compare-and-set covers every shard's position: a writer that saw shard 2 at one
    position fails once another writer moved shard 2 alone."""
    catalog = open_catalog(settings)
    spec = aggregate_spec("events.agg", "page_url", {n: (a.column_type, a.nullable) for n, a in AGGS().items()})
    one, r = AggregateSink.open(catalog, spec, KEYS, "c", keep_snapshots=5)
    two, _ = AggregateSink.open(open_catalog(settings), spec, KEYS, "c", keep_snapshots=5)

    def flush_at(positions: list[str | None]):
        agg = restore(r, key=lambda e: e.page_url, column="page_url", windows=Tumbling(60), aggs=AGGS(), grace=5)
        for shard, p in enumerate(positions):
            if p is not None:
                agg.add(p, ClickEvent(x=0, y=0, page_url="a"), entry_id(p)[0] / 1000 - 100, shard)
        return agg.flush(time.time())

    after_next_refresh(monkeypatch, two.table, lambda: one.commit(flush_at([None, None, "5-0"])))
    with pytest.raises(StaleState, match=r"position in streamapp:\{streamapp-2\}:events:click at None, found 5-0"):
        two.commit(flush_at(["7-0", None, "4-0"]))
    props = catalog.load_table("events.agg").properties
    assert props[position_property(KEYS[2], "c")] == "5-0"
    assert position_property(KEYS[0], "c") not in props


async def test_the_merged_reader_reads_every_shard_in_receipt_order_and_wakes_on_any(redis_server, settings):
    """Entries of 3 shards, each XREAD on one key; a batch holds the shards up to a common receipt
    time; idle batches come every `within`; an entry on the last shard wakes a blocked read."""
    sync = redis_server.client()
    for ms in range(1, 41):  # shard 0: an entry every ms; shard 1: every 4 ms; shard 2: none
        sync.xadd(KEYS[0], {"e": b'{"x":0,"y":0}', "r": str(ms * 1000)}, id=f"{ms}-0")
        if ms % 4 == 0:
            sync.xadd(KEYS[1], {"e": b'{"x":0,"y":0}', "r": str(ms * 1000)}, id=f"{ms}-0")
    client = reader_client(settings)
    stopping = asyncio.Event()
    first = StreamReader(client, ClickEvent, "merged", stopping, window_bytes=1 << 20)
    readers = ShardReaders(first, SHARDS)
    await readers.register()
    assert sync.hget(names.acks(2), names.ack_field(KEYS[2], "merged")) == b"0-0"
    seen: list[list[str]] = [[] for _ in range(SHARDS)]
    batches = readers.batches(["0-0"] * SHARDS, 12, 0.3)
    while sum(map(len, seen)) < 50:
        batch = await anext(batches)
        zero, one = batch.windows[0].ids, batch.windows[1].ids
        if len(seen[0]) + len(zero) < 40 and one:  # shard 0 has more: shard 1 is not read past it
            assert zero and entry_id(one[-1])[0] <= entry_id(zero[-1])[0], (zero, one)
        for shard, w in enumerate(batch.windows):
            seen[shard] += w.ids
    assert seen[0] == [f"{ms}-0" for ms in range(1, 41)] and seen[1] == [f"{ms}-0" for ms in range(4, 41, 4)]
    began = time.monotonic()
    idle = await anext(batches)
    assert len(idle) == 0 and idle.idle and 0.25 < time.monotonic() - began < 1.0
    late = asyncio.get_running_loop().call_later(0.1, lambda: sync.xadd(KEYS[2], {"e": b'{"x":0,"y":0}', "r": "1"}))
    began = time.monotonic()
    got: list[str] = []
    while not got:
        got = (await anext(batches)).windows[2].ids
    assert time.monotonic() - began < 0.6  # the blocked read on shard 2 answered (the batch then runs its 0.3 s)
    late.cancel()
    await readers.ack(["40-0", None, got[0]])
    assert sync.hget(names.acks(0), names.ack_field(KEYS[0], "merged")) == b"40-0"
    assert sync.hget(names.acks(2), names.ack_field(KEYS[2], "merged")) == got[0].encode()
    stopping.set()
    await batches.aclose()
    await client.aclose()


def write_sharded(client, events: list[ClickEvent], shards: int, chunk: int = 20) -> None:
    """Write clicks as the web does with `shards` shards: each request of `chunk` events split by
    shard (by its dedupe id, here the event_id: no write keys), one entry per shard touched, all
    with the request's receipt time (an explicit id: one ms per request), running totals kept."""
    totals = [[0, 0] for _ in range(shards)]
    ms = int(time.time() * 1000) - 60_000
    for k in range(0, len(events), chunk):
        ms += 5
        parts: dict[int, list[bytes]] = defaultdict(list)
        for e in events[k : k + chunk]:
            parts[names.shard_of(e.event_id, shards)].append(msgspec.json.encode(e))
        for shard, lines in sorted(parts.items()):
            payload = b"\n".join(lines)
            totals[shard][0] += len(lines)
            totals[shard][1] += len(payload)
            fields = {"e": payload, "n": len(lines), "r": ms * 1000, "c": totals[shard][0], "b": totals[shard][1]}
            client.xadd(names.stream("click", shard), fields, id=f"{ms}-0")


async def test_four_shards_sigkill_and_restart_equal_a_recount(settings, spawn):
    """STREAMAPP_SHARDS=4: clicks spread over the 4 shard streams; the aggregate worker is killed
    (SIGKILL) right after a commit that left windows open, before its Redis acks moved; restarted
    (2 workers when workers share the shards, else 1), the clicks per minute and unique users per
    page equal a recount of the events written, exactly, and every shard's position and ack is kept."""
    from tests.test_aggregate_agent import AGG, PAGES, START, aggregated, wait_aggregated

    rng = random.Random(4)
    events = sorted(
        (
            ClickEvent(
                x=1,
                y=1,
                event_id=f"s{i}",
                page_url=rng.choice(PAGES),
                user_id=f"u{rng.randrange(7)}",
                timestamp=START + timedelta(seconds=rng.uniform(0, 240)),
            )
            for i in range(300)
        ),
        key=lambda e: e.timestamp,
    )
    write_sharded(redis_sync(settings), events, 4)
    sharded = dataclasses.replace(settings, window_count=8, grace_seconds=1.0)  # several commits, windows open
    only = "worker --agent clicks_per_minute"
    doomed = spawn(only, sharded, STREAMAPP_SHARDS="4", STREAMAPP_CRASH_AT="aggregate_after_commit:2")
    assert await asyncio.to_thread(doomed.wait, 60) == -signal.SIGKILL, doomed.output()
    shared = importlib.util.find_spec("streamapp.engine.leases") is not None  # workers share (agent, shard) units
    # the killed worker's leases (if any) run out in 2 s
    workers = [
        spawn(only, sharded, STREAMAPP_SHARDS="4", STREAMAPP_LEASE_SECONDS="2") for _ in range(2 if shared else 1)
    ]
    expected: dict[tuple, tuple[int, int]] = {}
    users: dict[tuple, set] = defaultdict(set)
    for e in events:
        key = (e.timestamp.replace(second=0, microsecond=0), e.page_url)
        expected[key] = (expected.get(key, (0, 0))[0] + 1, 0)
        users[key].add(e.user_id)
    expected = {k: (c, len(users[k])) for k, (c, _) in expected.items()}
    assert await wait_aggregated(sharded, len(expected)) == expected
    resumed = "".join(w.output() for w in workers)
    [(positions, afters)] = re.findall(r"position (\[.*?\]), watermark .*re-reading after (\[.*?\])", resumed)
    assert "None" not in positions and afters != positions  # every shard was read; open windows replayed
    await asyncio.sleep(2)  # a double write would land now
    assert aggregated(sharded) == expected
    assert table_rows(sharded, "events.late") == []
    props = open_catalog(sharded).load_table(AGG).properties
    client = redis_sync(settings)
    for shard in range(4):
        key = names.stream("click", shard)
        [(last, _)] = client.xrevrange(key, count=1)
        assert props[position_property(key, "clicks_per_minute")] == last.decode()
        ack = client.hget(names.acks(shard), names.ack_field(key, "clicks_per_minute"))
        assert ack is not None and entry_id(ack.decode()) <= entry_id(last.decode())
    assert all("Traceback" not in w.output() for w in workers)


def redis_sync(settings):
    import redis

    return redis.Redis.from_url(settings.redis_url)


def test_a_dead_entry_of_one_shard_goes_to_dead_letters_under_that_shard(tmp_path):
    """An entry refused on shard 2 is kept once, named by shard 2's stream, and moves only shard
    2's position (its id, "5-0", also exists on shard 0, where it is a different entry)."""
    catalog = open_catalog(Settings(warehouse=tmp_path))
    spec = aggregate_spec("events.agg", "page_url", {n: (a.column_type, a.nullable) for n, a in AGGS().items()})
    sink, r = AggregateSink.open(catalog, spec, KEYS, "c", keep_snapshots=5)
    agg = restore(r, key=lambda e: e.page_url, column="page_url", windows=Tumbling(60), aggs=AGGS(), grace=5)
    agg.add("5-0", ClickEvent(x=0, y=0, page_url="a"), 0.005, 0)
    agg.refuse(DeadEntry("5-0", "{not json", "unreadable entry"), 2)
    flush = agg.flush()
    assert [p.position for p in flush.streams()] == ["5-0", None, "5-0"] and [p.dead for p in flush.streams()][:2] == [
        [],
        [],
    ]
    for _ in range(2):  # a replay commits it again: kept once
        sink.commit(flush)
        sink, _ = AggregateSink.open(catalog, spec, KEYS, "c", keep_snapshots=5)
    letters = catalog.load_table(names.DEAD_LETTER_TABLE)
    assert [(d["stream"], d["entry_id"]) for d in letters.scan().to_arrow().to_pylist()] == [(KEYS[2], "5-0")]
    assert letters.properties[position_property(KEYS[2], "c")] == "5-0"
    assert position_property(KEYS[0], "c") not in letters.properties
