"""Hostile input, one request each, against the real server and a real valkey-server: every one
gets the contract's status code and a message naming the problem, never a 500, and nothing of a
refused request reaches an event stream (per-event refusals go to the rejected stream only).

Then the cost of gzip bombs, measured on a web server in its own process: time to the answer,
and how much the server's peak resident memory grew."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import http.client
import json
import os
import time
import urllib.parse
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.conftest import running_web, stream_events, wait_until
from tests.test_http import CLICK
from tests.test_ingest import FAR_FUTURE, NEAR_LIMITS

OK = {**CLICK, "event_id": "fine"}


def _deep(levels: int) -> bytes:
    return b'{"type":"click","x":1,"y":1,"properties":' + b'{"a":' * levels + b"1" + b"}" * (levels + 1)


def _bomb(inflated: int) -> bytes:
    """A gzip body that inflates to `inflated` bytes of zeros (~1000x compression)."""
    out = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"\0" * (1 << 20)
    parts = [out.compress(chunk) for _ in range(inflated >> 20)]
    return b"".join(parts) + out.flush()


# (id, body, extra headers, status, text the error must contain)
WHOLE_BODY = [
    ("not-json", b"{not json", {}, 400, "not valid JSON"),
    ("empty", b"", {}, 400, "empty"),
    ("whitespace", b" \n\t ", {}, 400, "empty"),
    ("empty-array", b"[]", {}, 400, "no events"),
    ("nan", b"NaN", {}, 400, "not valid JSON"),
    ("infinity", b'{"type":"click","x":1,"y":1,"properties":{"a":Infinity}}', {}, 400, "not valid JSON"),
    ("number-overflow", b'{"type":"click","x":1,"y":1,"properties":{"a":1e999}}', {}, 400, "out of range"),
    ("deep-object", _deep(20_000), {}, 400, "nested too deeply"),
    ("deep-array", b"[" * 100_000 + b"]" * 100_000, {}, 400, "nested too deeply"),
    ("invalid-utf8-tail", b'{"type":"click","x":1,"y":2}\xff', {}, 400, "not valid JSON"),
    ("invalid-utf8-in-string", b'{"type":"click","x":1,"y":1,"target":"\xc0\xaf"}', {}, 400, "not valid UTF-8"),
    ("lone-surrogate", b'{"type":"click","x":1,"y":1,"target":"\\ud800"}', {}, 400, "unpaired UTF-16 surrogate"),
    ("raw-nul-byte", b'{"type":"click","x":1,"y":1,"target":"a\x00b"}', {}, 400, "invalid character"),
    ("xml", b"{}", {"Content-Type": "application/xml"}, 415, "Content-Type"),
    ("latin-1", b"{}", {"Content-Type": "application/json; charset=latin-1"}, 415, "charset"),
    ("brotli", b"{}", {"Content-Encoding": "br"}, 415, "Content-Encoding"),
    ("deflate", b"{}", {"Content-Encoding": "deflate"}, 415, "Content-Encoding"),
    ("not-gzip", b"not gzip at all", {"Content-Encoding": "gzip"}, 400, "gzip"),
    (
        "gzip-truncated",
        gzip.compress(b'{"type":"click","x":1,"y":2}')[:-12],
        {"Content-Encoding": "gzip"},
        400,
        "truncated",
    ),
    ("body-over-limit", b" " * (1024 * 1024 + 1), {}, 413, "limit"),
    ("too-many-events", json.dumps([CLICK] * 501).encode(), {}, 413, "501 events"),
    (
        "too-many-lines",
        b"\n".join([json.dumps(CLICK).encode()] * 501),
        {"Content-Type": "application/x-ndjson"},
        413,
        "501 events",
    ),
    ("gzip-bomb", _bomb(10 << 20), {"Content-Encoding": "gzip"}, 413, "inflates"),
]

# Parseable events that are each refused: 422, the field named, the raw event kept as rejected.
PER_EVENT = [
    ("escaped-nul", {**CLICK, "target": "a\u0000b"}, "target", "NUL character"),
    ("nul-in-properties", {**CLICK, "properties": {"k": "\u0000"}}, "properties", "NUL character"),
    ("huge-string", {**CLICK, "page_url": "x" * 40_000}, None, "limit is 32768"),
    ("many-properties", {**CLICK, "properties": {f"k{i}": i for i in range(5000)}}, None, "limit is 32768"),
    ("type-array", {**CLICK, "type": ["click"]}, "type", "unknown event type"),
    ("type-number", {**CLICK, "type": 7}, "type", "unknown event type"),
    ("unknown-field", {**CLICK, "admin": True}, "admin", "unknown field"),
    ("float-x", {**CLICK, "x": 1.5}, "x", "Expected `int`"),
    ("bool-x", {**CLICK, "x": True}, "x", "Expected `int`"),
    ("int32-overflow", {**CLICK, "x": 2**31}, "x", "2147483647"),
    ("button-range", {**CLICK, "button": 5}, "button", "<= 4"),
    ("naive-timestamp", {**CLICK, "timestamp": "2026-11-27T10:00:00"}, "timestamp", "timezone"),
    ("garbage-timestamp", {**CLICK, "timestamp": "yesterday"}, "timestamp", "Invalid"),
    ("far-future", {**CLICK, "timestamp": "2999-01-01T00:00:00Z"}, "timestamp", "ahead of the server's clock"),
    ("epoch-seconds", {**CLICK, "timestamp": 1_764_000_000}, "timestamp", "in seconds?"),
    # In UTC these are past the year 9999 / before the year 1: converting them used to raise (500).
    ("year-9999-west-of-utc", {**CLICK, "timestamp": "9999-12-31T23:59:59-01:00"}, "timestamp", "ahead of the"),
    ("year-9999-max-offset", {**CLICK, "timestamp": "9999-12-31T23:59:59.999999-23:59"}, "timestamp", "ahead of"),
    ("year-1-east-of-utc", {**CLICK, "timestamp": "0001-01-01T00:00:00+23:59"}, "timestamp", "before 2000-01-01"),
    ("epoch-ms-past-year-9999", {**CLICK, "timestamp": 253_402_300_800_000}, "timestamp", "<= 253402300799999"),
    ("long-event-id", {**CLICK, "event_id": "e" * 129}, "event_id", "length <= 128"),
    ("newline-event-id", {**CLICK, "event_id": "a\nb"}, "event_id", "control character"),
    ("properties-list", {**CLICK, "properties": [1, 2]}, "properties", "Expected `object"),
    ("claims-source", {**CLICK, "source": "admin"}, "source", "set by the server"),
    ("not-an-object", "click", None, "must be a JSON object"),
]


async def _answer(http, base: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    async with http.post(base + "/api/events", data=body, headers={"Content-Type": "application/json", **headers}) as r:
        return r.status, await r.json()


@pytest.mark.parametrize(
    ("body", "headers", "status", "needle"), [c[1:] for c in WHOLE_BODY], ids=[c[0] for c in WHOLE_BODY]
)
async def test_whole_body_refusals(web, http, redis_server, body, headers, status, needle):
    got, reply = await _answer(http, web, body, headers)
    assert (got, needle in reply["error"]) == (status, True), reply
    assert redis_server.client().keys("streamapp:*events*") == []


@pytest.mark.parametrize(("event", "field", "needle"), [c[1:] for c in PER_EVENT], ids=[c[0] for c in PER_EVENT])
async def test_per_event_refusals(web, http, redis_server, event, field, needle):
    got, reply = await _answer(http, web, json.dumps([event]).encode(), {})
    assert got == 422, reply
    [error] = reply["errors"]
    assert (error["index"], error["field"], needle in error["message"]) == (0, field, True), error
    assert stream_events(redis_server, "click") == []
    [rejected] = stream_events(redis_server, "rejected")
    assert json.loads(json.loads(rejected)["raw"]) == event  # kept as sent
    # The same event beside a good one: the good one is stored, this one is not.
    got, reply = await _answer(http, web, json.dumps([OK, event]).encode(), {})
    assert (got, reply["accepted"], reply["errors"][0]["index"]) == (202, 1, 1)
    assert [json.loads(e)["event_id"] for e in stream_events(redis_server, "click")] == ["fine"]


RAW = [
    (
        "header-too-long",
        b"POST /api/events HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 10_000 + b"\r\n\r\n",
        400,
        b"more than 8190 bytes",
    ),
    (
        "url-too-long",
        b"POST /api/events?" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        b"more than 8190 bytes",
    ),
    (
        "bad-content-length",
        b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        400,
        b"Content-Length",
    ),
    ("bad-chunk", b"POST /api/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, b"chunk"),
    ("get-on-ingest", b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n", 405, b"Not Allowed"),
]


@pytest.mark.parametrize(("request_bytes", "status", "needle"), [c[1:] for c in RAW], ids=[c[0] for c in RAW])
async def test_malformed_http_is_refused_by_the_server(settings, web, redis_server, request_bytes, status, needle):
    reader, writer = await asyncio.open_connection("127.0.0.1", settings.port)
    writer.write(request_bytes)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(65536), timeout=5)
    writer.close()
    assert reply.split(b" ", 2)[1] == str(status).encode(), reply[:200]
    assert needle.lower() in reply.lower(), reply[:400]
    assert redis_server.client().keys("streamapp:*events*") == []


KEYS = {"k-web-123": "website"}

# A write key no configured key can match, as a client can send it: (id, the request's target, its
# X-Write-Key header as raw bytes, or None). Header bytes that are not UTF-8 reach the view as lone
# surrogates, which encoding the key for the comparison refused (500).
BAD_KEYS = [
    ("header-invalid-utf8", b"/api/events", b"\xff\xfe"),
    ("header-latin-1", b"/api/events", b"k-web-12\xe9"),
    ("header-valid-key-then-invalid-byte", b"/api/events", b"k-web-123\xff"),
    ("header-encoded-surrogate", b"/api/events", b"\xed\xa0\x80"),
    ("header-utf8-text", b"/api/events", "k-wéb-123 ключ 🔑".encode()),
    ("query-invalid-utf8", b"/api/events?writeKey=%FF%FE", None),
]


async def _raw_post(port: int, target: bytes, headers: bytes, body: bytes) -> tuple[int, dict[str, str], dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST "
        + target
        + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
        + headers
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    head, _, content = reply.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), fields, json.loads(content)


@pytest.mark.parametrize(("target", "key"), [c[1:] for c in BAD_KEYS], ids=[c[0] for c in BAD_KEYS])
async def test_a_write_key_of_any_bytes_is_refused_with_401(settings, redis_server, target, key):
    headers = b"Origin: https://shop.example\r\n" + (b"X-Write-Key: " + key + b"\r\n" if key is not None else b"")
    async with running_web(dataclasses.replace(settings, write_keys=KEYS)):
        status, fields, reply = await _raw_post(settings.port, target, headers, json.dumps(OK).encode())
        ok = await _raw_post(settings.port, b"/api/events", b"X-Write-Key: k-web-123\r\n", json.dumps(OK).encode())
    assert (status, reply) == (401, {"error": "the write key is not valid"})  # as for any wrong key
    assert fields["Access-Control-Allow-Origin"] == "*"
    assert ok[0] == 202  # the server goes on as before
    assert [json.loads(e)["source"] for e in stream_events(redis_server, "click")] == ["website"]


def _post(port: int, target: str, body: bytes, headers: dict[str, str | bytes]) -> tuple[int, dict, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("POST", target, body=body, headers={"Content-Type": "application/json", **headers})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def _no_error_logged(web) -> None:
    out = web.output()
    assert '"level":"ERROR"' not in out and "Traceback" not in out, out[-3000:]


@pytest.mark.parametrize("max_future", [86_400, FAR_FUTURE])
def test_timestamps_near_the_datetime_limits_get_202_or_a_422_naming_timestamp(
    settings, redis_server, spawn, max_future
):
    """Through the whole server: RFC 3339 times on the first and last days a datetime holds, with
    every offset, and epoch milliseconds at and beyond the model's bounds."""
    web = spawn("web", settings, STREAMAPP_MAX_FUTURE_SECONDS=str(max_future))
    wait_until(lambda: _get_ok(settings.port), 15, what="web to answer")

    @hsettings(max_examples=300, deadline=None)
    @given(times=st.lists(NEAR_LIMITS, min_size=1, max_size=4), with_good=st.booleans())
    def check(times, with_good):
        events = [{**CLICK, "timestamp": t} for t in times] + ([OK] if with_good else [])
        status, _, body = _post(settings.port, "/api/events", json.dumps(events).encode(), {})
        reply = json.loads(body)
        assert status == (202 if reply["accepted"] + reply["duplicates"] else 422), (status, reply)
        assert reply["rejected"] == len(reply["errors"]) and {e["field"] for e in reply["errors"]} <= {"timestamp"}

    check()
    _no_error_logged(web)


_HEADER_CONTROL = set(range(0x20)) - {0x09} | {0x7F}  # what an HTTP header value may not hold (RFC 9110)


def test_write_keys_of_any_bytes_get_401_never_500(settings, redis_server, spawn):
    """Any bytes as the X-Write-Key header or (percent-encoded) the writeKey parameter: the valid
    key is accepted, anything else is a 401 with CORS headers, and the HTTP parser refuses control
    characters in a header (400) before the view sees them."""
    web = spawn("web", settings, STREAMAPP_WRITE_KEYS="k-web-123:website")
    wait_until(lambda: _get_ok(settings.port), 15, what="web to answer")
    origin = {"Origin": "https://shop.example"}

    @hsettings(max_examples=300, deadline=None)
    @given(
        key=st.binary(max_size=40) | st.text(max_size=20).map(str.encode) | st.just(b"k-web-123"),
        in_query=st.booleans(),
    )
    def check(key, in_query):
        if not in_query and (b"\r" in key or b"\n" in key):
            return  # not a header: http.client refuses to send it
        if in_query:
            status, headers, body = _post(
                settings.port,
                "/api/events?writeKey=" + urllib.parse.quote_from_bytes(key),
                json.dumps(OK).encode(),
                origin,
            )
            given_key = key
        else:
            status, headers, body = _post(
                settings.port, "/api/events", json.dumps(OK).encode(), {"X-Write-Key": key, **origin}
            )
            given_key = key.strip(b" \t")  # optional whitespace around a header value is not part of it
            if _HEADER_CONTROL & set(key):
                assert status == 400, (status, body)
                return
        if given_key == b"k-web-123":
            assert status == 202, (status, body)
            return
        message = "the write key is not valid" if given_key else "a write key is required"
        assert (status, message in json.loads(body)["error"]) == (401, True), (key, status, body)
        assert headers["Access-Control-Allow-Origin"] == "*"

    check()
    _no_error_logged(web)


async def test_a_chunked_body_over_the_limit_is_refused_when_it_arrives_at_once(settings, redis_server):
    """No Content-Length to check up front, and the body already all buffered (the path that
    takes it without waiting): its size is still checked."""
    small = dataclasses.replace(settings, max_body_bytes=100)
    body = json.dumps([{**CLICK, "event_id": f"c{i}"} for i in range(3)]).encode()
    request = (
        b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    )
    async with running_web(small):
        reader, writer = await asyncio.open_connection("127.0.0.1", settings.port)
        writer.write(request)  # one write: the whole body is in the server's buffer before the view runs
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(65536), timeout=5)
        writer.close()
    assert reply.split(b" ", 2)[1] == b"413", reply[:300]
    assert b"over the limit of 100 bytes" in reply
    assert redis_server.client().keys("streamapp:*events*") == []


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.mark.parametrize("inflated", [10 << 20, 10 << 30], ids=["10MB-inflated", "10GB-inflated"])
def test_gzip_bomb_costs_the_server_almost_nothing(settings, redis_server, spawn, inflated):
    """Cost of one bomb to a web server in its own process: the CPU time it spent (user + system,
    from /proc/PID/stat: unlike wall time, not inflated by whatever else the machine runs), the
    wall time to the 413, and the growth of its peak RSS (VmHWM, reset first through
    /proc/PID/clear_refs). Printed for the record."""
    web = spawn("web", settings)
    pid = web.proc.pid
    wait_until(lambda: _get_ok(settings.port), 15, what="web to answer")
    bomb = _bomb(inflated)
    for _ in range(3):  # warm up with ordinary gzip requests: first-call costs are not the bomb's
        assert _post_status(settings.port, gzip.compress(json.dumps(OK).encode())) == 202
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib(pid, "VmRSS")
    cpu_before = _cpu_seconds(pid)
    started = time.perf_counter()
    status = _post_status(settings.port, bomb)
    elapsed = time.perf_counter() - started
    cpu = _cpu_seconds(pid) - cpu_before
    grown = _rss_kib(pid, "VmHWM") - before
    print(
        f"\ngzip bomb {len(bomb) / 1e6:.2f} MB -> {inflated >> 20} MiB: {status}, server CPU {cpu * 1000:.0f} ms, "
        f"wall {elapsed * 1000:.1f} ms, peak RSS +{grown} KiB (RSS before {before} KiB)"
    )
    assert status == 413
    assert cpu < 0.050, f"{cpu * 1000:.0f} ms of CPU"
    assert grown < 5 * 1024, f"{grown} KiB"
    assert _get_ok(settings.port)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/PID/stat, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _get_ok(port: int) -> bool:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/healthz")
        return c.getresponse().status == 200
    except OSError:
        return False


def _post_status(port: int, body: bytes) -> int:
    """POST the bomb; the server may answer and close before the whole upload is sent."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(
            "POST", "/api/events", body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )
    except (BrokenPipeError, ConnectionResetError):
        pass  # answered before the upload finished: read the answer
    return c.getresponse().status
