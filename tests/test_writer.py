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

from streamapp import names
from streamapp.redis_client import writer_client
from streamapp.settings import Settings
from streamapp.web.backlog import Backlog
from streamapp.web.writer import (
    DEDUPE_SPANS,
    BacklogFull,
    Entry,
    Limits,
    StreamWriter,
    Unchecked,
    dedupe_ids,
    rejected_dedupe_id,
)
from tests.conftest import stream_events as stored

CLICKS = names.stream("click")
SETS = f"{names.PREFIX}:dedupe:*"


def entry(ids: list[str], stream: str = CLICKS, received_us: int = 1_764_000_000_123_456) -> Entry:
    return Entry(stream, ids, b"\n".join(json.dumps({"event_id": i}).encode() for i in ids), received_us)


def ids_in(redis_server, type_name: str = "click") -> list[str]:
    return [json.loads(e)["event_id"] for e in stored(redis_server, type_name)]


UNLIMITED = Limits(max_events=10**12, max_bytes=10**15)


@pytest.fixture
async def client(redis_server, tmp_path):
    # the web writes only to a Redis a worker has checked against the lake: here, an empty one
    settings = Settings(redis_url=redis_server.url, warehouse=tmp_path / "wh")
    await asyncio.to_thread(redis_server.check, settings)
    r = writer_client(settings)  # the web's own client: it reconnects after a restart
    yield r
    await r.aclose()


@pytest.fixture
async def writer(client):
    w = StreamWriter(client, 3600, UNLIMITED)
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
        b"b": b"53",
    }
    # c and b: the stream's events and bytes of `e` so far
    assert (second[b"n"], second[b"c"], second[b"b"]) == (b"1", b"4", str(53 + len(second[b"e"])).encode())
    [(_, rejected)] = r.xrange(names.stream("rejected"))
    assert (rejected[b"n"], rejected[b"c"], rejected[b"b"]) == (b"1", b"1", str(len(rejected[b"e"])).encode())


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
    writer = StreamWriter(client, 2, UNLIMITED)  # sets of 2 s / DEDUPE_SPANS; the window is 2 to 3 s
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


def mark(r, index: int) -> str:
    """The progress mark of the stream's `index`-th entry, as a consumer reports it."""
    entry_id, fields = r.xrange(CLICKS)[index]
    return f"{entry_id.decode()} {fields[b'c'].decode()} {fields[b'b'].decode()}"


async def test_the_backlog_is_what_the_slowest_consumer_has_not_handled(writer, client, redis_server):
    r = redis_server.client()
    backlog = Backlog(client, [CLICKS, names.stream("keydown")], Limits(100, 10**9), bytes_from_maxmemory=False)
    for n in (10, 20, 30):
        await writer.write([entry([f"e{n}-{i}" for i in range(n)])])
    sizes = [len(fields[b"e"]) for _, fields in r.xrange(CLICKS)]
    await backlog.sample()
    assert (backlog.events, backlog.bytes) == (60, sum(sizes))  # no consumer yet: all of it waits
    progress = names.progress(CLICKS)
    r.hset(progress, mapping={"fast": mark(r, 2), "slow": "0-0 0 0"})
    await backlog.sample()
    assert backlog.events == 60  # the slowest consumer counts
    r.hset(progress, "slow", mark(r, 0))
    await backlog.sample()
    assert (backlog.events, backlog.bytes) == (50, sizes[1] + sizes[2])
    assert backlog.drain_per_second > 0  # 10 events handled while none was added
    # Entries trimmed were handled by everyone: the first entry left bounds the backlog too.
    r.xtrim(CLICKS, minid=r.xrange(CLICKS)[2][0], approximate=False)
    await backlog.sample()
    assert (backlog.events, backlog.bytes) == (30, sizes[2])
    # Entries written before they carried totals are not counted (not guessed).
    r.xadd(CLICKS, {"e": json.dumps({"event_id": "old"}), "r": "0"})
    await backlog.sample()
    assert backlog.events == 0


async def test_the_script_refuses_a_flush_over_the_backlog_limits_and_writes_none_of_it(client, redis_server):
    limits = Limits(max_events=50, max_bytes=10**9)
    writer = StreamWriter(client, 3600, limits)
    writer.start()
    r = redis_server.client()
    try:
        await writer.write([entry([f"a{i}" for i in range(30)])])
        await writer.write([entry([f"b{i}" for i in range(30)])])  # 30 waited: under 50, so it goes in
        with pytest.raises(BacklogFull) as full:
            await writer.write([entry(["c"])])  # 60 wait
        assert (full.value.stream, full.value.events) == (CLICKS, 60)
        assert len(ids_in(redis_server)) == 60 and not r.sismember(r.keys(SETS)[0], "c")  # nothing of it
        r.hset(names.progress(CLICKS), "sink", mark(r, 1))  # a consumer handled everything
        assert await writer.write([entry(["c"])]) == [()]
        limits.max_bytes = 10  # bytes count as well as events
        r.hset(names.progress(CLICKS), "sink", mark(r, 1))
        with pytest.raises(BacklogFull) as full:
            await writer.write([entry(["d"])])
        assert full.value.events == 1 and full.value.bytes == len(r.xrange(CLICKS)[-1][1][b"e"])
    finally:
        await writer.close()


async def test_a_restarted_redis_takes_no_event_until_it_is_checked(writer, redis_server):
    """Each start of Redis changes its run_id: the server the marker names is not this one, so the
    writer is refused (503) until the check a worker runs (streamapp.engine.recovery) has run."""
    await writer.write([entry(["before"])])
    redis_server.stop()
    redis_server.start(check=False)
    with pytest.raises(Unchecked):
        await writer.write([entry(["during"])])
    assert ids_in(redis_server) == ["before"]
    await asyncio.to_thread(redis_server.check)
    assert await writer.write([entry(["during"])]) == [()]
    assert ids_in(redis_server) == ["before", "during"]


async def test_close_waits_for_every_flush_in_flight_and_queued(client, redis_server):
    writer = StreamWriter(client, 3600, UNLIMITED)
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
