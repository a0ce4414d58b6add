"""The HTTP contract of POST /api/events against a real valkey-server: every input form, every
status code, and where each event ends up (its stream, the rejected stream, or nowhere with 4xx)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import math

import msgspec
import pytest

from streamapp import names
from streamapp.web.writer import DEDUPE_SPANS
from tests.conftest import stream_events

CLICK = {"type": "click", "x": 10, "y": 20}
KEY = {"type": "keydown", "key": "a", "code": "KeyA", "shift": True}


async def post(http, base, body, content_type="application/json", **headers):
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    if content_type is not None:
        headers["Content-Type"] = content_type
    async with http.post(base + "/api/events", data=body, headers=headers) as r:
        text = await r.read()
        return r.status, (json.loads(text) if text else None), r.headers


def stored(redis_server, type_name):
    return [msgspec.json.decode(e) for e in stream_events(redis_server, type_name)]


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "text/plain;charset=UTF-8", None])
async def test_single_event_in_each_json_content_type(web, http, redis_server, content_type):
    status, body, _ = await post(http, web, {**CLICK, "event_id": "c1"}, content_type)
    assert (status, body) == (202, {"accepted": 1, "duplicates": 0, "rejected": 0, "errors": []})
    [event] = stored(redis_server, "click")
    assert event["event_id"] == "c1" and event["x"] == 10 and event["button"] == 0


async def test_array_and_ndjson(web, http, redis_server):
    status, body, _ = await post(http, web, [CLICK, KEY, CLICK])
    assert (status, body["accepted"]) == (202, 3)
    nd = "\n".join(json.dumps(e) for e in [KEY, CLICK]) + "\n\n"
    status, body, _ = await post(http, web, nd, "application/x-ndjson")
    assert (status, body["accepted"]) == (202, 2)
    assert len(stored(redis_server, "click")) == 3
    assert len(stored(redis_server, "keydown")) == 2


async def test_gzip_body(web, http, redis_server):
    status, body, _ = await post(
        http, web, gzip.compress(json.dumps([CLICK] * 5).encode()), **{"Content-Encoding": "gzip"}
    )
    assert (status, body["accepted"]) == (202, 5)


async def test_server_assigns_ids_and_normalises_timestamps(web, http, redis_server):
    events = [CLICK, {**CLICK, "timestamp": 1_700_000_000_123}, {**CLICK, "timestamp": "2026-01-02T03:04:05.5+02:00"}]
    status, _, _ = await post(http, web, events)
    assert status == 202
    a, b, c = stored(redis_server, "click")
    assert len(a["event_id"]) == 36 and a["event_id"][14] == "7"  # UUIDv7
    assert a["event_id"] != b["event_id"]
    assert b["timestamp"] == "2023-11-14T22:13:20.123000Z"
    assert c["timestamp"] == "2026-01-02T01:04:05.500000Z"


async def test_mixed_batch_reports_each_bad_event_and_stores_it_as_rejected(web, http, redis_server):
    events = [
        CLICK,
        {"type": "click", "x": "10", "y": 1, "event_id": "bad-x"},
        {"type": "click", "x": 1, "y": 2, "colour": "red", "size": 3},
        {"type": "scroll", "dy": 3},
        {"x": 1, "y": 2},
        7,
        {"type": "keydown", "key": "a", "alt": 1},
        {"type": "click", "x": 2**31, "y": 0},
        {"type": "click", "x": 1, "y": 1, "button": 5},
        {"type": "click", "x": 1, "y": 1, "timestamp": "2026-01-01T00:00:00"},
        {"type": "click", "x": 1, "y": 1, "event_id": ""},
        {"type": "click", "x": 1, "y": 1, "properties": [1]},
        KEY,
    ]
    status, body, _ = await post(http, web, events)
    assert status == 202
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (2, 0, 11)
    errors = {e["index"]: e for e in body["errors"]}
    assert errors[1] == {"index": 1, "event_id": "bad-x", "field": "x", "message": "Expected `int`, got `str`"}
    assert errors[2]["field"] == "colour" and "colour, size" in errors[2]["message"]
    assert errors[3]["field"] == "type" and "'scroll'" in errors[3]["message"]
    assert errors[4]["field"] == "type" and "missing" in errors[4]["message"]
    assert errors[5]["field"] is None and "JSON object" in errors[5]["message"]
    assert errors[6]["field"] == "alt"
    assert errors[7]["field"] == "x" and "2147483647" in errors[7]["message"]
    assert errors[8]["field"] == "button" and "<= 4" in errors[8]["message"]
    assert errors[9]["field"] == "timestamp" and "timezone" in errors[9]["message"]
    assert errors[10]["field"] == "event_id"
    assert errors[11]["field"] == "properties"
    rejected = stored(redis_server, "rejected")
    assert len(rejected) == 11
    assert rejected[0]["raw"] == json.dumps(events[1], separators=(",", ":"))
    assert rejected[0]["event_id"] == "bad-x" and rejected[0]["event_type"] == "click"
    assert rejected[0]["reason"] == "Expected `int`, got `str`" and rejected[0]["field"] == "x"
    assert len(stored(redis_server, "click")) == 1 and len(stored(redis_server, "keydown")) == 1


async def test_all_rejected_is_422_with_the_same_body(web, http, redis_server):
    status, body, _ = await post(http, web, [{"type": "click"}, {"type": "keydown"}])
    assert status == 422
    assert body["accepted"] == 0 and body["rejected"] == 2
    assert [e["field"] for e in body["errors"]] == ["x", "key"]
    assert len(stored(redis_server, "rejected")) == 2


async def test_ndjson_line_that_is_not_json_is_an_error_of_its_own(web, http, redis_server):
    status, body, _ = await post(http, web, json.dumps(CLICK) + "\n{not json\n", "application/x-ndjson")
    assert status == 202 and body["accepted"] == 1 and body["rejected"] == 1
    assert body["errors"][0]["index"] == 1 and body["errors"][0]["message"].startswith("the line is not valid JSON")


async def test_duplicates_within_and_across_requests_keep_the_first_payload(web, http, redis_server):
    first = {**CLICK, "event_id": "dup-1", "x": 1}
    status, body, _ = await post(http, web, [first, {**first, "x": 2}])
    assert (status, body["accepted"], body["duplicates"]) == (202, 1, 1)
    status, body, _ = await post(http, web, {**first, "x": 3})
    assert (status, body["accepted"], body["duplicates"]) == (202, 0, 1)
    [event] = stored(redis_server, "click")
    assert event["x"] == 1
    # The id is remembered in a set that expires STREAMAPP_DEDUPE_SECONDS from now, or up to half
    # as long again later (DEDUPE_SPANS = 2).
    r = redis_server.client()
    [holder] = [k for k in r.keys("streamapp:{streamapp}:dedupe:*") if r.sismember(k, "dup-1")]
    assert 3590 < r.ttl(holder) <= 3600 + 1800


async def test_a_rejected_event_sent_again_is_stored_once(web, http, redis_server):
    """A client retrying a request whose events were refused (the 422 was lost, say) is told again
    what is wrong, but events.rejected gets each bad event once, as sent: its dedupe id is its raw
    JSON's hash. Two different bad events are two, even with the same event_id."""
    bad = {"type": "click", "x": 1, "event_id": "bad-1"}  # no y
    same_id = {"type": "click", "y": 1, "event_id": "bad-1"}  # no x
    no_id = {"type": "keydown", "key": 5}
    for _ in range(2):
        status, body, _ = await post(http, web, [bad, no_id])
        assert (status, body["rejected"], [e["field"] for e in body["errors"]]) == (422, 2, ["y", "key"])
    status, body, _ = await post(http, web, [same_id, same_id, {**CLICK, "event_id": "good"}])
    assert (status, body["accepted"], body["rejected"]) == (202, 1, 2)
    assert sorted(r["raw"] for r in stored(redis_server, "rejected")) == sorted(
        json.dumps(e, separators=(",", ":")) for e in (bad, no_id, same_id)
    )


async def test_without_write_keys_an_id_recorded_before_the_upgrade_is_still_found(web, http, redis_server, settings):
    """Dedupe ids are scoped by source only with write keys: without them an event_id is recorded
    as itself, as it was before, so ids already in Redis still make a retry a duplicate."""
    r = redis_server.client()
    span = math.ceil(settings.dedupe_seconds * 1000 / DEDUPE_SPANS)
    seconds, micros = r.time()
    now_ms = seconds * 1000 + micros // 1000
    r.sadd(names.dedupe_bucket(now_ms // span * span), "legacy-1")  # as the previous version recorded it
    status, body, _ = await post(http, web, {**CLICK, "event_id": "legacy-1"})
    assert (status, body["accepted"], body["duplicates"]) == (202, 0, 1)
    status, body, _ = await post(http, web, {**CLICK, "event_id": "new-1"})
    assert (status, body["accepted"]) == (202, 1)
    assert [k for k in r.keys(f"{names.PREFIX}:dedupe:*") if r.sismember(k, "new-1")]
    assert [e["event_id"] for e in stored(redis_server, "click")] == ["new-1"]


async def test_multi_member_gzip_is_read_whole(web, http, redis_server):
    nd = [gzip.compress((json.dumps({**CLICK, "event_id": f"m{i}"}) + "\n").encode()) for i in range(3)]
    status, body, _ = await post(http, web, b"".join(nd), "application/x-ndjson", **{"Content-Encoding": "gzip"})
    assert (status, body["accepted"]) == (202, 3)


async def test_oversized_event_in_a_batch_is_rejected_alone(web, http, redis_server):
    big = {**CLICK, "event_id": "big", "properties": {"blob": "x" * 40_000}}
    status, body, _ = await post(http, web, [CLICK, big])
    assert status == 202 and body["accepted"] == 1 and body["rejected"] == 1
    assert body["errors"][0]["event_id"] == "big" and "limit is 32768" in body["errors"][0]["message"]
    [rejected] = stored(redis_server, "rejected")
    assert rejected["event_id"] == "big"


async def test_health_and_readiness(web, http):
    async with http.get(web + "/healthz") as r:
        assert r.status == 200
    async with http.get(web + "/readyz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ready"


async def test_redis_down_gives_503_then_recovers_without_restarting_web(web, http, redis_server, caplog):
    caplog.set_level(logging.INFO, logger="streamapp.web.server")
    status, _, _ = await post(http, web, {**CLICK, "event_id": "before"})
    assert status == 202
    redis_server.stop()
    status, body, headers = await post(http, web, {**CLICK, "event_id": "during"})
    assert status == 503 and headers["Retry-After"] == "1" and "unavailable" in body["error"]
    for _ in range(3):
        async with http.get(web + "/readyz") as r:
            # /readyz is public: a fixed answer, not Redis' address nor its error text.
            assert (r.status, await r.text()) == (
                503,
                '{"status":"unavailable","error":"the event store is unavailable"}',
            )
    await asyncio.to_thread(redis_server.start)
    status, body, _ = await post(http, web, {**CLICK, "event_id": "during"})  # the client's retry
    assert (status, body["accepted"]) == (202, 1)
    for _ in range(2):
        async with http.get(web + "/readyz") as r:
            assert r.status == 200
    # The detail is in the log instead, once per change rather than per probe.
    readiness = [r.getMessage() for r in caplog.records if r.getMessage().startswith("readyz:")]
    assert len(readiness) == 2 and f"127.0.0.1:{redis_server.port}" in readiness[0], readiness
    assert readiness[1] == "readyz: Redis answers again"
    # The append-only file kept what was accepted before the restart.
    assert [e["event_id"] for e in stored(redis_server, "click")] == ["before", "during"]


async def test_concurrent_requests_share_flushes_and_all_land(web, http, redis_server):
    async def one(i):
        return await post(http, web, {**CLICK, "event_id": f"c{i}"})

    results = await asyncio.gather(*(one(i) for i in range(300)))
    assert all(status == 202 and body["accepted"] == 1 for status, body, _ in results)
    assert sorted(e["event_id"] for e in stored(redis_server, "click")) == sorted(f"c{i}" for i in range(300))
    # Group commit: requests that arrived during a flush rode the next one.
    flushes = redis_server.client().info("commandstats")["cmdstat_evalsha"]["calls"]
    assert flushes < 300


async def test_app_page_serves_a_project_route(settings, redis_server, http):
    from aiohttp import web as aioweb

    from streamapp.engine.app import App
    from streamapp.web.server import serve

    app = App()

    @app.page("/hello")
    async def hello(request):
        return aioweb.json_response({"hello": "world"})

    stopping = asyncio.Event()
    task = asyncio.create_task(serve(app, settings, stopping))
    try:
        for _ in range(100):
            try:
                async with http.get(f"http://127.0.0.1:{settings.port}/hello") as r:
                    assert (r.status, await r.json()) == (200, {"hello": "world"})
                    break
            except OSError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("the page never answered")
    finally:
        stopping.set()
        await task
