"""Sharded streams (`STREAMAPP_SHARDS`) on the web side, against a real valkey and a real catalog:
each event lands in the stream of the shard of its dedupe id, a retry meets its dedupe set there
(rejected events too), a shard whose server is not checked refuses only its own events, the check
repairs only the streams of the shards it checks, and one shard keeps exactly today's keys.
(On a real cluster: tests/test_cluster.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pyarrow as pa
import pytest

from streamapp import names
from streamapp.engine.recovery import check
from streamapp.engine.status import agents_per_stream, gather, render
from streamapp.lake.catalog import open_catalog
from streamapp.redis_client import reader_client
from streamapp.web.writer import dedupe_ids, rejected_dedupe_id
from tests.conftest import running_web

SHARDS = 4
KEYS = {"k-web": "website"}  # a write key: the dedupe ids (so the routing) are scoped by its source
WEB = {"X-Write-Key": "k-web"}


def shard_events(redis_server, type_name: str) -> dict[int, list[dict]]:
    """The events each shard's stream of `type_name` holds."""
    r = redis_server.client()
    out: dict[int, list[dict]] = {}
    for shard in range(SHARDS):
        lines = [line for _, fields in r.xrange(names.stream(type_name, shard)) for line in fields[b"e"].split(b"\n")]
        out[shard] = [json.loads(line) for line in lines]
    return out


@pytest.fixture
async def sharded(settings, redis_server):
    """Settings with 4 shards and a write key, every shard checked (as a worker would)."""
    s = dataclasses.replace(settings, shards=SHARDS, write_keys=KEYS)
    await asyncio.to_thread(redis_server.check, s)
    return s


async def post(http, base: str, events: list) -> tuple[int, dict]:
    async with http.post(base + "/api/events", json=events, headers=WEB) as r:
        return r.status, await r.json()


def clicks(prefix: str, n: int) -> list[dict]:
    return [{"type": "click", "x": i, "y": 1, "event_id": f"{prefix}{i}"} for i in range(n)]


async def test_events_go_to_the_shard_of_their_dedupe_id_and_a_retry_is_a_duplicate(sharded, http, redis_server):
    keys = [{"type": "keydown", "key": "a", "code": "KeyA", "event_id": f"k{i}"} for i in range(40)]
    bad = [{"type": "click", "x": "not a number", "y": 1, "event_id": f"bad{i}"} for i in range(20)]
    events = clicks("c", 200) + keys + bad
    async with running_web(sharded) as base:
        status, body = await post(http, base, events)
        assert (status, body["accepted"], body["duplicates"], body["rejected"]) == (202, 240, 0, 20)
        # the same request again (a client's retry): nothing stored twice, rejected events included
        status, again = await post(http, base, events)
        assert (status, again["accepted"], again["duplicates"], again["rejected"]) == (202, 0, 240, 20)
        # half old, half new: the duplicates are found in each shard, and counted per request
        status, mixed = await post(http, base, clicks("c", 100) + clicks("n", 50))
        assert (status, mixed["accepted"], mixed["duplicates"]) == (202, 50, 100)

    stored = shard_events(redis_server, "click")
    for shard, found in stored.items():
        ids = [e["event_id"] for e in found]
        # every event is in the shard of its source-scoped id, and only there
        assert all(names.shard_of(d, SHARDS) == shard for d in dedupe_ids(ids, "website")), shard
        assert 20 < len(ids) < 120, (shard, len(ids))  # each shard got its share of 250
    assert sorted(e["event_id"] for found in stored.values() for e in found) == sorted(
        [f"c{i}" for i in range(200)] + [f"n{i}" for i in range(50)]
    )
    keydowns = shard_events(redis_server, "keydown")
    assert sorted(e["event_id"] for found in keydowns.values() for e in found) == sorted(e["event_id"] for e in keys)
    rejected = shard_events(redis_server, "rejected")
    assert sum(len(found) for found in rejected.values()) == 20  # the retry's rejected events: duplicates
    assert sum(1 for found in rejected.values() if found) > 1
    for shard, found in rejected.items():
        assert all(names.shard_of(rejected_dedupe_id(e["raw"], "website"), SHARDS) == shard for e in found)
    # each shard's dedupe sets are under its own tag
    r = redis_server.client()
    for shard in range(SHARDS):
        assert r.keys(names.dedupe_bucket(0, shard).removesuffix("0") + "*"), shard


async def test_an_unchecked_shard_refuses_its_events_only_and_the_check_repairs_only_its_streams(
    sharded, http, redis_server
):
    # The lake holds positions of shards 1 and 2 past what Redis has: shard 2's server "lost" its
    # stream (gone, and its marker with it), shard 1's was checked and kept taking events.
    far = "9999999999999-0"
    lost, kept = names.stream("click", 2), names.stream("click", 1)
    properties = {names.position_property(lost, "clicks"): far, names.position_property(kept, "clicks"): far}
    catalog = open_catalog(sharded)
    await asyncio.to_thread(catalog.create_namespace_if_not_exists, "events")
    await asyncio.to_thread(
        catalog.create_table, "events.positions", pa.schema([("n", pa.int64())]), properties=properties
    )
    r = redis_server.client()
    r.delete(names.checked(2))
    events = clicks("u", 80)
    ids = [e["event_id"] for e in events]
    to_shard = {i: names.shard_of(d, SHARDS) for i, d in zip(ids, dedupe_ids(ids, "website"), strict=True)}
    elsewhere = [e for e in events if to_shard[e["event_id"]] != 2]
    async with running_web(sharded) as base:
        status, _ = await post(http, base, events)
        assert status == 503  # some of its events go to shard 2
        async with http.get(base + "/readyz") as ready:
            assert ready.status == 503 and "1 of 4 shards" in (await ready.json())["error"]
        status, body = await post(http, base, elsewhere)
        # the other shards take events; the refused request's were written there: duplicates now
        assert (status, body["accepted"], body["duplicates"]) == (202, 0, len(elsewhere))
        assert r.xlen(names.stream("click", 2)) == 0

        client = reader_client(sharded)
        try:
            repairs = await check(client, catalog, SHARDS)
            assert [(x.stream, x.action) for x in repairs] == [(lost, "created")]  # not shard 1's stream
            assert await check(client, catalog, SHARDS) == []  # idempotent: every shard is checked
        finally:
            await client.aclose()
        status, body = await post(http, base, events)
        assert status == 202 and body["accepted"] == sum(1 for s in to_shard.values() if s == 2)
        async with http.get(base + "/readyz") as ready:
            assert ready.status == 200
    new = r.xrange(lost)
    assert new and all(entry > far.encode() for entry, _ in new)  # ids past the committed position
    assert r.xinfo_stream(kept)["last-generated-id"] < far.encode()  # shard 1 untouched


async def test_one_shard_keeps_the_keys_of_every_release_before_shards(settings, web, http, redis_server):
    assert settings.shards == 1
    async with http.post(web + "/api/events", json=[*clicks("o", 10), {"type": "click"}]) as r:
        assert r.status == 202
    keys = {k.decode() for k in redis_server.client().keys("*")}
    dedupe = {k for k in keys if k.startswith("streamapp:{streamapp}:dedupe:")}
    assert len(dedupe) == 1
    assert keys - dedupe == {
        "streamapp:{streamapp}:checked",
        "streamapp:{streamapp}:events:click",
        "streamapp:{streamapp}:events:rejected",
    }


async def test_status_lists_every_shard_and_sums_them_per_stream(sharded, http, redis_server):
    async with running_web(sharded) as base:
        status, _ = await post(http, base, clicks("s", 100))
        assert status == 202
    r = redis_server.client()
    click_streams = names.streams("click", SHARDS)
    for key in click_streams:  # a consumer registered on every shard, nothing committed yet
        r.hset(names.progress(key), "clicks", "0-1 0 0")
    client = reader_client(sharded)
    try:
        found = await gather(open_catalog(sharded), client, [*click_streams, *names.streams("keydown", SHARDS)])
    finally:
        await client.aclose()
    assert sorted((a.shard, a.stream) for a in found.agents) == [(s, "click") for s in range(SHARDS)]
    assert sum(a.lag_events or 0 for a in found.agents) == 100
    [(merged, shards)] = agents_per_stream(found.agents)
    assert (merged.agent, merged.stream, shards, merged.lag_events) == ("clicks", "click", SHARDS, 100)
    text = render(found)
    line = next(row for row in text.splitlines() if row.startswith("clicks "))
    assert [cell.strip() for cell in line.split("|")][1:5] == ["click", "4", "(none yet)", "100"], text
    stream_line = next(row for row in text.split("Streams in Redis")[1].splitlines() if row.startswith("click "))
    assert [cell.strip() for cell in stream_line.split("|")][1:4] == ["4", "4", "100"], text


async def test_the_backlog_limit_holds_per_shard_stream(sharded, http, redis_server):
    small = dataclasses.replace(sharded, max_backlog=10)
    r = redis_server.client()
    late = {shard_of_event(e): e for e in clicks("late", 40)}
    async with running_web(small) as base:
        assert (await post(http, base, clicks("b", 100)))[0] == 202  # ~25 events per shard, none handled
        status, body = await post(http, base, [late[1]])
        assert status == 429 and "'click' stream (shard 1)" in body["error"], body
        # shard 1's consumer handled everything: its events are taken, the other shards' still not
        tail = r.xrevrange(names.stream("click", 1), count=1)[0][1]
        r.hset(names.progress(names.stream("click", 1)), "clicks", f"0-1 {int(tail[b'c'])} {int(tail[b'b'])}")
        assert (await post(http, base, [late[1]]))[0] == 202
        status, body = await post(http, base, [late[2]])
        assert status == 429 and "'click' stream (shard 2)" in body["error"], body


def shard_of_event(event: dict) -> int:
    [dedupe_id] = dedupe_ids([event["event_id"]], "website")
    return names.shard_of(dedupe_id, SHARDS)
