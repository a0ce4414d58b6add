"""The collector edge against a real valkey-server: write keys, CORS, the clock-skew policy,
backpressure (429), Redis out of memory (503), slow clients (slowloris), metrics, the OpenAPI
description. Each test says where the events of a refused request end up: nowhere."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio import Redis

from streamapp.logs import JsonFormatter
from streamapp.web.backlog import Backlog, retry_after
from streamapp.web.ingest import Ingest
from streamapp.web.writer import Limits
from tests.conftest import RedisServer, free_port, running_web, stream_events
from tests.helpers import wait_rows
from tests.test_http import CLICK, post, stored

KEYS = {"k-web-123": "website", "k-ios-456": "ios"}


async def test_write_keys_are_required_and_name_the_source(settings, redis_server, http):
    keyed = dataclasses.replace(settings, write_keys=KEYS)
    async with running_web(keyed) as base:
        status, body, _ = await post(http, base, {**CLICK, "event_id": "no-key"})
        assert status == 401 and "write key is required" in body["error"]
        status, body, _ = await post(http, base, {**CLICK, "event_id": "bad-key"}, **{"X-Write-Key": "k-web-12"})
        assert status == 401 and "not valid" in body["error"]
        status, body, _ = await post(http, base, {**CLICK, "event_id": "h"}, **{"X-Write-Key": "k-web-123"})
        assert (status, body["accepted"]) == (202, 1)
        async with http.post(base + "/api/events?writeKey=k-ios-456", data=json.dumps({**CLICK, "event_id": "q"})) as r:
            assert r.status == 202  # sendBeacon cannot set headers: the key rides in the query
        status, body, _ = await post(
            http,
            base,
            [{**CLICK, "event_id": "claims", "source": "ios"}, {"type": "click", "event_id": "bad"}],
            **{"X-Write-Key": "k-web-123"},
        )
        assert status == 422 and [e["field"] for e in body["errors"]] == ["source", "x"]
    assert {e["event_id"]: e["source"] for e in stored(redis_server, "click")} == {"h": "website", "q": "ios"}
    assert [r["source"] for r in stored(redis_server, "rejected")] == ["website", "website"]


async def test_with_write_keys_an_event_id_is_deduplicated_per_source(settings, redis_server, http):
    """One source cannot claim another's event_ids in advance (they used to be dropped as
    duplicates for an hour); a source's own retries are still duplicates, whichever way its key is
    sent. The stored events keep their own event_id."""
    keyed = dataclasses.replace(settings, write_keys=KEYS)
    web_key, ios_key = {"X-Write-Key": "k-web-123"}, {"X-Write-Key": "k-ios-456"}
    bad = {"type": "click", "x": 1, "event_id": "bad-1"}  # no y
    async with running_web(keyed) as base:
        status, body, _ = await post(http, base, [{**CLICK, "event_id": "c-1", "x": 1}, bad], **ios_key)
        assert (status, body["accepted"], body["duplicates"], body["rejected"]) == (202, 1, 0, 1)
        status, body, _ = await post(http, base, [{**CLICK, "event_id": "c-1", "x": 2}, bad], **web_key)
        assert (status, body["accepted"], body["duplicates"], body["rejected"]) == (202, 1, 0, 1)
        # website retries, also twice inside one request, and by the query parameter (sendBeacon)
        events = [{**CLICK, "event_id": "c-1", "x": 3}, {**CLICK, "event_id": "c-2"}, {**CLICK, "event_id": "c-2"}]
        status, body, _ = await post(http, base, [*events, bad], **web_key)
        assert (status, body["accepted"], body["duplicates"], body["rejected"]) == (202, 1, 2, 1)
        async with http.post(
            base + "/api/events?writeKey=k-web-123", data=json.dumps([{**CLICK, "event_id": "c-1"}])
        ) as r:
            assert (r.status, (await r.json())["duplicates"]) == (202, 1)
    assert [(e["event_id"], e["source"], e["x"]) for e in stored(redis_server, "click")] == [
        ("c-1", "ios", 1),
        ("c-1", "website", 2),
        ("c-2", "website", 10),
    ]
    # the same bad event: once per source
    assert sorted((r["event_id"], r["source"]) for r in stored(redis_server, "rejected")) == [
        ("bad-1", "ios"),
        ("bad-1", "website"),
    ]


async def test_without_write_keys_source_is_null(web, http, redis_server):
    assert (await post(http, web, {**CLICK, "event_id": "open"}))[0] == 202
    assert stored(redis_server, "click")[0]["source"] is None


async def test_cors_any_origin_by_default(web, http):
    headers = {
        "Origin": "https://shop.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-write-key",
    }
    async with http.options(web + "/api/events", headers=headers) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert "X-Write-Key" in r.headers["Access-Control-Allow-Headers"]
    # Errors carry the headers too, so a page can read its per-event errors and Retry-After.
    status, _, headers = await post(http, web, {"type": "click"}, **{"Origin": "https://shop.example"})
    assert status == 422 and headers["Access-Control-Allow-Origin"] == "*"
    assert headers["Access-Control-Expose-Headers"] == "Retry-After"
    async with http.get(web + "/healthz", headers={"Origin": "https://shop.example"}) as r:
        assert "Access-Control-Allow-Origin" not in r.headers  # CORS is for ingest only


async def test_cors_allow_list(settings, redis_server, http):
    listed = dataclasses.replace(settings, cors_origins=("https://shop.example",))
    async with running_web(listed) as base:
        preflight = {"Access-Control-Request-Method": "POST"}
        async with http.options(base + "/api/events", headers={"Origin": "https://shop.example", **preflight}) as r:
            assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "https://shop.example"
            assert r.headers["Vary"] == "Origin"
        async with http.options(base + "/api/events", headers={"Origin": "https://evil.example", **preflight}) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        # A text/plain POST needs no preflight, so the POST itself is refused too.
        status, body, headers = await post(
            http, base, {**CLICK, "event_id": "evil"}, "text/plain", Origin="https://evil.example"
        )
        assert status == 403 and "https://evil.example" in body["error"]
        status, _, headers = await post(
            http, base, {**CLICK, "event_id": "shop"}, "text/plain", Origin="https://shop.example"
        )
        assert status == 202 and headers["Access-Control-Allow-Origin"] == "https://shop.example"
        assert (await post(http, base, {**CLICK, "event_id": "curl"}))[0] == 202  # no Origin: not a browser
    assert [e["event_id"] for e in stored(redis_server, "click")] == ["shop", "curl"]


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def test_clock_skew_policy(web, http, redis_server):
    now = datetime.now(UTC)
    events = [
        {**CLICK, "event_id": "hour-ahead", "timestamp": _iso(now + timedelta(hours=1))},
        {**CLICK, "event_id": "backfill", "timestamp": "2001-02-03T04:05:06Z"},
        {**CLICK, "event_id": "two-days-ahead", "timestamp": _iso(now + timedelta(days=2))},
        {**CLICK, "event_id": "seconds", "timestamp": int(now.timestamp())},
        {**CLICK, "event_id": "1999", "timestamp": "1999-12-31T23:59:59+00:00"},
        {**CLICK, "event_id": "year-9999", "timestamp": 253402300799999},
    ]
    status, body, _ = await post(http, web, events)
    assert (status, body["accepted"], body["rejected"]) == (202, 2, 4)
    errors = {e["event_id"]: e for e in body["errors"]}
    assert {e["field"] for e in errors.values()} == {"timestamp"}
    assert re.search(
        r"is 17\d{4} s ahead of the server's clock; the limit is 86400 s", errors["two-days-ahead"]["message"]
    )
    assert "was it sent in seconds?" in errors["seconds"]["message"]
    assert "before 2000-01-01" in errors["1999"]["message"]
    assert "ahead" in errors["year-9999"]["message"]
    assert [e["event_id"] for e in stored(redis_server, "click")] == ["hour-ahead", "backfill"]
    assert len(stored(redis_server, "rejected")) == 4  # kept, with the reason, in events.rejected


def test_retry_after_follows_the_measured_drain_rate():
    assert retry_after(1_100, 1_000, drain_per_second=100) == 2  # 200 over 90% of the limit, 100/s
    assert retry_after(50_000, 1_000, drain_per_second=10) == 60  # capped
    assert retry_after(1_100, 1_000, drain_per_second=0) == 30  # nothing drains: no tight loop
    assert retry_after(800, 1_000, drain_per_second=0) == 1


async def test_a_stalled_backlog_gives_429_at_the_limit_and_202_within_2_s_of_the_drain(
    settings, redis_server, http, spawn
):
    """No worker runs: each stream's backlog is all it holds, and the script that writes refuses the
    request that finds it over the limit, whatever was sampled: one request over, never more."""
    small = dataclasses.replace(settings, max_backlog=20, grace_seconds=1)
    async with running_web(small) as base:
        for i in range(3):  # 0, 10, then 20 waiting: not over the limit of 20
            batch = [{**CLICK, "event_id": f"b{i}-{j}"} for j in range(10)]
            assert (await post(http, base, batch))[0] == 202
        status, body, headers = await post(http, base, [{**CLICK, "event_id": f"late-{j}"} for j in range(10)])
        assert status == 429, body
        assert "30 events" in body["error"] and "'click' stream" in body["error"] and "20 events" in body["error"]
        assert headers["Retry-After"] == "30"  # nothing drains: come back later, not in a tight loop
        assert len(stored(redis_server, "click")) == 30  # the refused events are nowhere
        assert (await post(http, base, {"type": "keydown", "key": "a"}))[0] == 202  # other streams are not held

        spawn("worker", small)
        await wait_rows(small, "events.clicks", 30)
        drained = time.monotonic()
        while (status := (await post(http, base, {**CLICK, "event_id": "after"}))[0]) == 429:
            await asyncio.sleep(0.05)
        assert status == 202 and time.monotonic() - drained < 2.0
        async with http.get(base + "/metrics") as r:
            text = await r.text()
        assert float(re.search(r"^streamapp_drain_events_per_second (\S+)$", text, re.M)[1]) >= 0


async def test_a_rate_the_worker_keeps_up_with_never_gets_a_429(settings, redis_server, http, spawn):
    """Held longer than the aggregate's window and grace: clicks_per_minute keeps its open minute's
    clicks in the stream (it re-reads them after a restart), and that is not backlog: what counts is
    what each consumer has handled (read into its windows, for an aggregate), not what Redis keeps.
    Before, 150 events/s against a limit of 1,000 got 429 within seconds."""
    steady = dataclasses.replace(settings, max_backlog=1000, grace_seconds=1)
    spawn("worker", steady)
    statuses: Counter[int] = Counter()
    async with running_web(steady) as base:
        for _ in range(200):  # the web takes events once the worker has checked Redis
            if (await post(http, base, {**CLICK, "event_id": "first"}))[0] == 202:
                break
            await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = 0
        while loop.time() - start < 65:  # 60 s windows + 1 s of grace, and some
            batch = [{**CLICK, "event_id": f"s{n}-{j}", "page_url": f"/p{j % 3}"} for j in range(15)]
            statuses[(await post(http, base, batch))[0]] += 1
            n += 1
            await asyncio.sleep(max(0.0, start + n * 0.1 - loop.time()))  # 150 events/s
    assert statuses == Counter({202: n}), statuses


async def test_the_backlog_sampler_stops_when_redis_py_swallows_its_cancellation():
    backlog = Backlog(Redis.from_url("redis://127.0.0.1:1"), [], Limits(10, 10), bytes_from_maxmemory=False)

    async def sample_swallowing_cancel():  # what redis-py's pipeline sometimes does
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(10)

    backlog.sample = sample_swallowing_cancel
    task = asyncio.create_task(backlog.run())
    await asyncio.sleep(0.05)  # inside the sample
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert done and task.cancelled()


@pytest.mark.parametrize(
    ("backlog_bytes", "refusal"),
    [
        (0, "bytes"),  # the default: half of maxmemory waiting in one stream is its limit
        (10**9, "nearly full"),  # a byte limit past the memory: Redis at 90% of it is the limit
    ],
)
async def test_redis_nearly_full_is_429_before_maxmemory_and_keeps_every_dedupe_id(
    settings, tmp_path, http, backlog_bytes, refusal
):
    """Limits count bytes as well: a few big events fill Redis long before the event limit. The
    web answers 429 before maxmemory, Redis evicts nothing (a dedupe id evicted would let a retry
    in twice), and a write that still reaches the cap is a 503 that stores nothing of its request."""
    tight = RedisServer(free_port(), tmp_path / "tight", maxmemory="8mb")
    tight.start()
    try:
        small = dataclasses.replace(
            settings,
            redis_port=tight.port,
            redis_url=tight.url,
            max_event_bytes=40_000,
            max_backlog_bytes=backlog_bytes,
        )
        tight.check(small)
        answered: dict[str, int] = {}
        async with running_web(small) as base:
            for i in range(400):
                batch = [{**CLICK, "event_id": f"m{i}-{j}", "properties": {"pad": "x" * 30_000}} for j in range(5)]
                status, body, _ = await post(http, base, batch)
                assert status in (202, 429, 503), (status, body)
                for event in batch:
                    answered[event["event_id"]] = status
                if status == 429:
                    assert refusal in body["error"], body
                    break
                await asyncio.sleep(0.3)  # slower than the sampler: the guard, not the cap, stops it
            else:
                raise AssertionError("8 MB of maxmemory never filled")
            info = tight.client().info()
            assert info["used_memory"] < info["maxmemory"] and info["evicted_keys"] == 0
            assert info["maxmemory_policy"] == "noeviction"
            first = next(k for k, v in answered.items() if v == 202)
            status, body, _ = await post(http, base, {**CLICK, "event_id": first})
            assert status == 429  # still full; the id is remembered all the same:
            assert tight.client().sismember(tight.client().keys("streamapp:*dedupe*")[0], first)
        in_redis = stream_events(tight, "click")
        kept = {json.loads(e)["event_id"] for e in in_redis}
        assert kept == {k for k, v in answered.items() if v == 202}  # all or nothing per request
        assert len(in_redis) == len(kept)
    finally:
        tight.stop()


async def _raw(port: int):
    return await asyncio.open_connection("127.0.0.1", port)


async def test_slow_clients_are_cut_off(settings, redis_server, http):
    quick = dataclasses.replace(settings, request_timeout_seconds=1.5)
    async with running_web(quick) as base:
        # Headers one byte at a time, never finished: the connection is closed.
        reader, writer = await _raw(quick.port)
        started = time.monotonic()
        head = b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        closed = None
        for byte in head * 10:
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                closed = time.monotonic() - started
                break
            if reader.at_eof():
                closed = time.monotonic() - started
                break
            await asyncio.sleep(0.05)
        assert closed is not None and closed < 4, closed
        writer.close()

        # Whole head, then the body trickles: 408 after the timeout.
        reader, writer = await _raw(quick.port)
        writer.write(
            b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"type":'
        )
        await writer.drain()
        started = time.monotonic()
        reply = await asyncio.wait_for(reader.read(4096), timeout=5)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
        assert b"did not arrive within 1.5 s" in reply
        assert 1.3 < time.monotonic() - started < 3
        writer.close()
        assert (await post(http, base, {**CLICK, "event_id": "ok"}))[0] == 202
    assert [e["event_id"] for e in stored(redis_server, "click")] == ["ok"]


async def test_a_client_gone_mid_body_is_counted_not_logged_as_an_error(web, http, redis_server, caplog):
    """A page closed while its request was on the way: nothing to answer, nothing stored, and no
    ERROR line (before the catch-all in the view, aiohttp logged a traceback for each)."""
    caplog.set_level(logging.INFO)
    async with http.get(web + "/metrics") as r:
        before = await r.text()
    _, writer = await _raw(int(web.rsplit(":", 1)[1]))
    writer.write(b'POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"type":')
    await writer.drain()
    await asyncio.sleep(0.2)  # the view is waiting for the rest of the body
    writer.close()
    name, labels = "streamapp_http_requests_total", {"route": "/api/events", "status": "400"}
    for _ in range(50):
        async with http.get(web + "/metrics") as r:
            after = await r.text()
        if _metric(after, name, **labels) > _metric(before, name, **labels):
            break
        await asyncio.sleep(0.05)
    assert _metric(after, name, **labels) - _metric(before, name, **labels) == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert redis_server.client().keys("streamapp:*events*") == []


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # the exposition sorts labels
    pattern = rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$" if labels else rf"^{re.escape(name)} (\S+)$"
    m = re.search(pattern, text, re.M)
    return float(m[1]) if m else 0.0


async def test_web_metrics_count_requests_and_events(web, http):
    async with http.get(web + "/metrics") as r:
        before = await r.text()
        assert r.headers["Content-Type"].startswith("text/plain")
    await post(
        http,
        web,
        [
            {**CLICK, "event_id": "m1"},
            {**CLICK, "event_id": "m1"},
            {"type": "click"},
            {"type": "nope"},
            {"type": "keydown", "key": "a"},
        ],
    )
    await post(http, web, b"{oops")
    async with http.get(web + "/metrics") as r:
        after = await r.text()

    def grew(name: str, **labels: str) -> float:
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert grew("streamapp_events_total", type="click", outcome="accepted") == 1
    assert grew("streamapp_events_total", type="click", outcome="duplicate") == 1
    assert grew("streamapp_events_total", type="click", outcome="rejected") == 1
    assert grew("streamapp_events_total", type="unknown", outcome="rejected") == 1
    assert grew("streamapp_events_total", type="keydown", outcome="accepted") == 1
    assert grew("streamapp_http_requests_total", route="/api/events", status="202") == 1
    assert grew("streamapp_http_requests_total", route="/api/events", status="400") == 1
    assert grew("streamapp_redis_write_seconds_count") == 1
    assert "streamapp_backlog_events" in after and "process_resident_memory_bytes" in after


async def test_web_metrics_count_every_route_and_what_no_route_takes(settings, redis_server, http):
    """Requests are counted per route without a middleware: ingest counts its own (a refused origin
    included), the other routes through a wrapper, and a catch-all route answers aiohttp's own 404,
    or 405 with Allow, counted as "unmatched"."""
    listed = dataclasses.replace(settings, cors_origins=("https://shop.example",))
    async with running_web(listed) as base:
        async with http.get(base + "/metrics") as r:
            before = await r.text()
        assert (await post(http, base, {**CLICK, "event_id": "x"}, Origin="https://evil.example"))[0] == 403
        async with http.get(base + "/healthz") as r:
            assert r.status == 200
        async with http.head(base + "/healthz") as r:
            assert r.status == 200
        async with http.get(base + "/nowhere/at/all") as r:
            assert r.status == 404 and "Not Found" in await r.text()
        async with http.get(base + "/api/events") as r:
            assert r.status == 405 and set(r.headers["Allow"].split(",")) == {"POST", "OPTIONS"}
        async with http.post(base + "/healthz") as r:
            assert r.status == 405 and set(r.headers["Allow"].split(",")) == {"GET", "HEAD"}
        async with http.get(base + "/metrics") as r:
            after = await r.text()

    def grew(**labels: str) -> float:
        name = "streamapp_http_requests_total"
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert grew(route="/api/events", status="403") == 1
    assert grew(route="/healthz", status="200") == 2
    assert grew(route="unmatched", status="404") == 1
    assert grew(route="unmatched", status="405") == 2
    assert grew(route="/metrics", status="200") == 1  # the scrape before, counted once it was answered


async def test_an_unforeseen_failure_is_a_json_500_with_cors_counted_and_logged_once(
    settings, redis_server, http, monkeypatch, caplog
):
    """Whatever the view raises (here a bug planted in validation) is answered like any error: JSON
    with a request id, the CORS headers the page needs to read it, counted, and one ERROR line
    holding that id and the traceback, which aiohttp does not log again."""

    def broken(self, *args, **kwargs):
        raise RuntimeError("a bug in validation")

    listed = dataclasses.replace(settings, cors_origins=("https://shop.example",))
    caplog.set_level(logging.INFO)
    async with running_web(listed) as base:
        async with http.get(base + "/metrics") as r:
            before = await r.text()
        with monkeypatch.context() as m:
            m.setattr(Ingest, "parse", broken)
            status, body, headers = await post(http, base, {**CLICK, "event_id": "x"}, Origin="https://shop.example")
        assert (await post(http, base, {**CLICK, "event_id": "y"}, Origin="https://shop.example"))[0] == 202
        async with http.get(base + "/metrics") as r:
            after = await r.text()
    request_id = body["request_id"]
    assert (status, body) == (500, {"error": "internal error", "request_id": request_id}) and len(request_id) == 36
    assert (headers["Access-Control-Allow-Origin"], headers["Vary"]) == ("https://shop.example", "Origin")
    assert headers["X-Request-Id"] == request_id
    name = "streamapp_http_requests_total"
    assert (
        _metric(after, name, route="/api/events", status="500")
        - _metric(before, name, route="/api/events", status="500")
        == 1
    )
    [error] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert error.levelno == logging.ERROR and request_id in error.getMessage()
    line = json.loads(JsonFormatter().format(error))
    assert line["request_id"] == request_id and line["exception"].count("RuntimeError: a bug in validation") == 1
    assert [e["event_id"] for e in stored(redis_server, "click")] == ["y"]


async def test_worker_metrics_and_json_commit_log(settings, web, http, spawn):
    worker = spawn("worker", settings)
    await post(http, web, [{**CLICK, "event_id": f"w{i}"} for i in range(25)])
    url = f"http://127.0.0.1:{settings.worker_metrics_port}/metrics"
    deadline = time.monotonic() + 30
    while True:
        try:
            async with http.get(url) as r:
                text = await r.text()
            if _metric(text, "streamapp_rows_committed_total", table="events.clicks") == 25:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the worker never reported 25 committed rows"
        await asyncio.sleep(0.3)
    assert _metric(text, "streamapp_commit_seconds_count", table="events.clicks") >= 1
    assert _metric(text, "streamapp_freshness_seconds_count", table="events.clicks") >= 1
    assert _metric(text, "streamapp_window_events_sum", agent="clicks") == 25
    commits = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{") and '"rows"' in line]
    assert sum(c["rows"] for c in commits if c["table"] == "events.clicks") == 25
    for c in commits:
        assert c["level"] == "INFO" and c["bytes"] > 0 and c["duration_seconds"] > 0 and c["lag_seconds"] >= 0


async def test_a_second_worker_on_a_taken_metrics_port_runs_without_metrics(caplog, http):
    """Two workers on one machine: the one that does not get the port logs it and goes on."""
    from streamapp.metrics import serve_metrics

    port = free_port()
    first = await serve_metrics("127.0.0.1", port)
    assert first is not None
    try:
        assert await serve_metrics("127.0.0.1", port) is None
        assert "metrics are off in this worker" in caplog.text
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200  # the first one still serves
    finally:
        await first.cleanup()


async def test_openapi_is_generated_from_the_models(web, http):
    async with http.get(web + "/api/openapi.json") as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["openapi"] == "3.1.0"
    schemas = doc["components"]["schemas"]
    click = schemas["ClickEvent"]
    assert click["required"] == ["type", "x", "y"] and click["additionalProperties"] is False
    assert click["properties"]["button"]["maximum"] == 4
    assert "source" not in click["properties"]  # server-set
    assert "key" in schemas["KeydownEvent"]["required"]
    post_op = doc["paths"]["/api/events"]["post"]
    assert set(post_op["responses"]) == {"202", "422", "400", "401", "403", "408", "413", "415", "429", "503", "500"}
    internal = post_op["responses"]["500"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert schemas[internal]["required"] == ["error", "request_id"]
    assert post_op["requestBody"]["content"]["application/json"]["schema"]["oneOf"][1]["maxItems"] == 500
    assert "security" not in post_op


async def test_openapi_declares_write_keys_when_configured(settings, redis_server, http):
    async with running_web(dataclasses.replace(settings, write_keys=KEYS)) as base:
        async with http.get(base + "/api/openapi.json") as r:
            doc = await r.json()
    assert doc["paths"]["/api/events"]["post"]["security"] == [{"writeKeyHeader": []}, {"writeKeyQuery": []}]
    assert doc["components"]["securitySchemes"]["writeKeyHeader"]["name"] == "X-Write-Key"
    assert "k-web-123" not in json.dumps(doc)


@pytest.mark.parametrize(
    "raw, message",
    [
        ("key-without-source", "item 1 is not KEY:SOURCE"),
        ("a:web,:ios", "item 2 is not KEY:SOURCE"),
        ("a:web,a:ios", "item 2 repeats a key"),
    ],
)
def test_write_key_setting_errors_never_echo_keys(raw, message):
    from streamapp.settings import Settings, SettingsError

    with pytest.raises(SettingsError) as e:
        Settings.from_env({"STREAMAPP_WRITE_KEYS": raw}, dotenv=None)
    assert message in str(e.value) and "key-without-source" not in str(e.value)
