"""The ingest script against a real valkey-server: one entry per request and stream, dedupe by
time-bucketed sets (inside one flush, across sets, expiry after the window), the running count
that lets the backlog be counted in events."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from redis.asyncio import Redis

from streamapp import names
from streamapp.entries import stream_events
from streamapp.web.backlog import Backlog
from streamapp.web.writer import DEDUPE_SPANS, Entry, StreamWriter, dedupe_ids, rejected_dedupe_id
from tests.conftest import stream_events as stored

CLICKS = names.stream("click")
SETS = f"{names.PREFIX}:dedupe:*"


def entry(ids: list[str], stream: str = CLICKS, received_us: int = 1_764_000_000_123_456) -> Entry:
    return Entry(stream, ids, b"\n".join(json.dumps({"event_id": i}).encode() for i in ids), received_us)


def ids_in(redis_server, type_name: str = "click") -> list[str]:
    return [json.loads(e)["event_id"] for e in stored(redis_server, type_name)]


@pytest.fixture
async def client(redis_server):
    r = Redis.from_url(redis_server.url)
    yield r
    await r.aclose()


@pytest.fixture
async def writer(client):
    w = StreamWriter(client, dedupe_seconds=3600)
    w.start()
    yield w
    await w.close()


async def test_one_entry_per_request_and_stream_with_its_count(writer, redis_server):
    assert await writer.write([entry(["a", "b", "c"]), entry(["r1"], names.stream("rejected"))]) == [(), ()]
    assert await writer.write([entry(["d"])]) == [()]
    r = redis_server.client()
    [(_, first), (_, second)] = r.xrange(CLICKS)
    assert first == {
        b"e": b'{"event_id": "a"}\n{"event_id": "b"}\n{"event_id": "c"}',
        b"n": b"3",
        b"r": b"1764000000123456",
        b"c": b"3",
    }
    assert (second[b"n"], second[b"c"]) == (b"1", b"4")  # c: the stream's events so far
    [(_, rejected)] = r.xrange(names.stream("rejected"))
    assert (rejected[b"n"], rejected[b"c"]) == (b"1", b"1")


async def test_duplicates_inside_one_flush_are_written_once(writer, redis_server):
    await writer.write([entry(["warm-up"])])  # loads the script, so that the next flush is one call
    r = redis_server.client()
    r.config_resetstat()
    # Two requests queued together ride one flush: an id twice in the first, and again in the second.
    first, second = await asyncio.gather(writer.write([entry(["x", "y", "x"])]), writer.write([entry(["y", "z"])]))
    assert r.info("commandstats")["cmdstat_evalsha"]["calls"] == 1
    assert (first, second) == ([(2,)], [(0,)])
    assert ids_in(redis_server) == ["warm-up", "x", "y", "z"]
    [*_, (_, a), (_, b)] = r.xrange(CLICKS)
    assert (a[b"n"], a[b"c"], b[b"n"], b[b"c"]) == (b"2", b"3", b"1", b"4")


async def test_an_entry_of_duplicates_only_is_not_written(writer, redis_server):
    await writer.write([entry(["p", "q"])])
    assert await writer.write([entry(["q", "p"]), entry(["s"])]) == [(0, 1), ()]
    assert ids_in(redis_server) == ["p", "q", "s"]
    assert redis_server.client().xlen(CLICKS) == 2


async def test_thousands_of_ids_in_one_flush(writer, redis_server):
    """The script hands ids to Redis in slices (Lua's unpack() stops at 8000 values)."""
    many = [f"m{i}" for i in range(9000)]
    assert await writer.write([entry(many)]) == [()]
    assert await writer.write([entry(["new", *many[-3:]])]) == [(1, 2, 3)]
    assert len(ids_in(redis_server)) == 9001


async def test_an_id_is_a_duplicate_in_a_later_set_inside_the_window_and_new_after_it(client, redis_server):
    writer = StreamWriter(client, dedupe_seconds=2)  # sets of 2 s / DEDUPE_SPANS; the window is 2 to 3 s
    assert DEDUPE_SPANS == 2
    writer.start()
    try:
        started = time.monotonic()
        assert await writer.write([entry(["w"])]) == [()]
        r = redis_server.client()
        [holder] = r.keys(SETS)
        await asyncio.sleep(1.2)
        assert await writer.write([entry(["w", "w2"])]) == [(0,)]
        assert time.monotonic() - started < 2, "the machine was too slow for this test's timing"
        assert len(r.keys(SETS)) == 2  # "w2" went to a newer set
        assert r.sismember(holder, "w") and not r.sismember(holder, "w2")
        await asyncio.sleep(3.1 - (time.monotonic() - started))
        assert not r.exists(holder)  # expired when it left the window: Redis holds no old ids
        assert await writer.write([entry(["w"])]) == [()]
    finally:
        await writer.close()
    assert ids_in(redis_server) == ["w", "w2", "w"]


async def test_dedupe_follows_the_servers_clock_not_the_writers(writer, redis_server, monkeypatch):
    """A writer whose clock is an hour ahead of Redis's: its first flush finds the sets it would
    pick are not the server's, learns the server's clock from the reply and tries again."""
    import types

    from streamapp.web import writer as module

    await writer.write([entry(["k"])])
    ahead = types.SimpleNamespace(perf_counter=time.perf_counter, time_ns=lambda: time.time_ns() + 3_600_000_000_000)
    monkeypatch.setattr(module, "time", ahead)
    assert await writer.write([entry(["k", "k2"])]) == [(0,)]
    server_ms = int(redis_server.client().time()[0]) * 1000
    starts = [int(k.rpartition(b":")[2]) for k in redis_server.client().keys(SETS)]
    assert all(abs(s - server_ms) < 3600 * 1000 / DEDUPE_SPANS * 2 for s in starts)


async def test_the_dedupe_sets_expire_with_the_window(writer, redis_server):
    await writer.write([entry(["t"])])
    r = redis_server.client()
    [holder] = r.keys(SETS)
    assert 3600 <= r.ttl(holder) <= 3600 * (1 + 1 / DEDUPE_SPANS)


async def test_the_backlog_counts_events_not_entries(writer, client, redis_server):
    r = redis_server.client()
    # Entries written before entries held several events: one event each, no count.
    for i in range(3):
        r.xadd(CLICKS, {"e": json.dumps({"event_id": f"old{i}"}), "r": "0"})
    backlog = Backlog(client, [CLICKS, names.stream("keydown")], limit=100)
    await backlog.sample()
    assert backlog.events == 3
    for n in (10, 20, 30):
        await writer.write([entry([f"e{n}-{i}" for i in range(n)])])
    await backlog.sample()
    # The old entries count one each on top of the 60 counted: 3 + 3 entries over (never under).
    assert backlog.events == 3 + 3 + 60
    oldest_new = r.xrange(CLICKS)[3][0]
    r.xtrim(CLICKS, minid=oldest_new, approximate=False)  # what the worker does once the old ones are committed
    await backlog.sample()
    assert backlog.events == 60
    r.xtrim(CLICKS, minid=r.xrange(CLICKS)[1][0], approximate=False)
    await backlog.sample()
    assert backlog.events == 50
    assert backlog.drain_per_second > 0  # 10 events (not one entry) left while none was added


def test_stream_events_from_xinfo():
    def info(length, first, last, added=0):
        return {
            "length": length,
            "entries-added": added,
            "first-entry": first and ("1-0", first),
            "last-entry": last and ("2-0", last),
        }

    assert stream_events(info(0, None, None, added=7)) == (0, 7)
    assert stream_events(info(2, {b"e": b"x", b"r": b"0"}, {b"e": b"y", b"r": b"0"}, added=5)) == (2, 5)
    assert stream_events(info(3, {b"n": b"4", b"c": b"10"}, {b"n": b"5", b"c": b"25"})) == (19, 25)
    assert stream_events(info(1, {b"n": b"5", b"c": b"25"}, {b"n": b"5", b"c": b"25"})) == (5, 25)


async def test_close_waits_for_every_flush_in_flight_and_queued(client, redis_server):
    writer = StreamWriter(client, dedupe_seconds=3600)
    writer.start()
    writes = [asyncio.create_task(writer.write([entry([f"s{i}-{j}" for j in range(300)])])) for i in range(40)]
    await asyncio.sleep(0)  # all queued; the first flushes leave
    await writer.close()
    assert all(w.done() and w.result() == [()] for w in writes)
    assert len(ids_in(redis_server)) == 40 * 300


async def test_flushes_in_flight_together_still_write_an_id_once(writer, redis_server):
    # 40 requests of 300 events are more than one flush (5,000 events at most): several leave
    # while others run; each id is in two of them.
    writes = [writer.write([entry([f"o{(i + k) % 40}-{j}" for j in range(150) for k in (0, 1)])]) for i in range(40)]
    results = await asyncio.gather(*writes)
    assert sum(300 - len(dups) for [dups] in results) == 40 * 150
    assert sorted(ids_in(redis_server)) == sorted(f"o{i}-{j}" for i in range(40) for j in range(150))


async def test_a_flush_whose_sets_cannot_be_placed_is_refused_whole(writer, redis_server, monkeypatch):
    """Our clock jumps an hour between the call and its retry: the script writes nothing either
    time and the requests get the error (503 from the web view), not a partial write."""
    import types

    from redis.exceptions import ResponseError

    from streamapp.web import writer as module

    jumps = iter(range(1, 100))
    clock = types.SimpleNamespace(
        perf_counter=time.perf_counter, time_ns=lambda: time.time_ns() + next(jumps) * 3_600_000_000_000 * 10
    )
    monkeypatch.setattr(module, "time", clock)
    with pytest.raises(ResponseError, match="clock"):
        await writer.write([entry(["j1", "j2"])])
    monkeypatch.undo()
    assert redis_server.client().exists(CLICKS) == 0 and redis_server.client().keys(SETS) == []
    assert await writer.write([entry(["j1", "j2"])]) == [()]  # a client's retry is written


# What ingest lets through as an event_id (1-128 characters, no control character), and source names.
_event_ids = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=128)
_sources = st.none() | st.text(min_size=1, max_size=20)


@hsettings(max_examples=500)
@given(a=st.tuples(_sources, _event_ids), b=st.tuples(_sources, _event_ids), cut=st.integers(1, 127))
def test_a_dedupe_id_is_one_event_id_of_one_source(a, b, cut):
    """Scoped ids of different (source, event_id) pairs never meet: whatever a client chooses as its
    event_id, it cannot produce the id of another source's event, nor one from before keys."""

    def one(source, event_id):
        return dedupe_ids([event_id], source)[0]

    assert (one(*a) == one(*b)) == (a == b)
    source, event_id = a
    if cut < len(event_id):  # the same text split elsewhere between source and event_id
        head, tail = event_id[:cut], event_id[cut:]
        for other in ((source or "") + head, (source or "") + "\x1f" + head):
            assert one(other, tail) != one(*a)
    assert one("website", event_id) != one(None, event_id) != one("ios", event_id)


def test_without_write_keys_the_dedupe_id_is_the_event_id():
    """As before scoping: ids already in Redis keep being found after an upgrade."""
    ids = ["c-1", "k-1"]
    assert dedupe_ids(ids, None) is ids
    assert dedupe_ids(ids, "website") == ["website\x1fc-1", "website\x1fk-1"]


@given(a=st.tuples(_sources, st.text()), b=st.tuples(_sources, st.text()), event=st.tuples(_sources, _event_ids))
def test_a_rejected_events_dedupe_id_is_its_source_and_raw_json(a, b, event):
    assert rejected_dedupe_id(a[1], a[0]) == rejected_dedupe_id(a[1], a[0])  # a retry is a duplicate
    assert (rejected_dedupe_id(a[1], a[0]) == rejected_dedupe_id(b[1], b[0])) == (a == b)
    rid = rejected_dedupe_id(a[1], a[0])
    assert rid not in dedupe_ids([event[1]], event[0])  # never an event's
    # nor that of an event whose event_id copies it as far as an event_id can (no control characters)
    printable = re.sub(r"[\x00-\x1f\x7f]", "", rid)
    for forged in (printable, printable[-32:], rid.rpartition("\x1f")[2].lstrip("\x1e")):
        assert rid not in dedupe_ids([forged], a[0])


def test_different_rejected_events_never_share_a_dedupe_id():
    raws = [json.dumps({"type": "click", "x": i}) for i in range(20_000)]
    assert len({rejected_dedupe_id(r, None) for r in raws}) == len(raws)
    assert len({rejected_dedupe_id(r, s) for r in raws[:100] for s in ("website", "ios", None)}) == 300
