"""The browser tracker end to end: Debian's chromium, driven by Playwright, on the real demo page,
against the real web server, valkey-server and worker; rows are read back from Iceberg."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import os
import re
import time
from datetime import UTC, datetime, timedelta

import pytest
from playwright.async_api import async_playwright

from tests.conftest import ROOT, running_web
from tests.helpers import wait_rows

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

# The first test's setup may install chromium with apt-get: more than the usual 180 s on a slow mirror.
pytestmark = pytest.mark.timeout(600)


@pytest.fixture
async def page(chromium):
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        context = await browser.new_context(viewport={"width": 800, "height": 600})
        yield await context.new_page()
        await browser.close()


class Posts:
    """The tracker's requests to /api/events from every tab, as the browser saw them: events and
    outcome. A beacon is not seen."""

    def __init__(self, page) -> None:
        self.seen: list[dict] = []
        self._started: dict = {}
        page.context.on("request", lambda r: self._started.setdefault(r, time.monotonic()))
        page.context.on("response", lambda r: self._add(r.request, r.status, r))
        page.context.on("requestfailed", lambda r: self._add(r, "failed", None))

    def _add(self, request, status, response) -> None:
        if "/api/events" in request.url:
            self.seen.append(
                {
                    "url": request.url,
                    "body": request.post_data,
                    "events": json.loads(request.post_data),
                    "status": status,
                    "response": response,
                    "started": self._started.pop(request),
                    "ended": time.monotonic(),
                }
            )

    def events(self) -> list[dict]:
        return [e for post in self.seen for e in post["events"]]


async def until(predicate, what: str, timeout: float = 15) -> None:
    """Wait until predicate() (a plain or an async function) is true."""
    deadline = time.monotonic() + timeout
    while not await _value(predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def center(page, selector: str) -> tuple[int, int]:
    """A whole-pixel point inside the element: the page has no scroll, so page = viewport coordinates."""
    box = await page.locator(selector).bounding_box()
    return round(box["x"] + box["width"] / 2), round(box["y"] + box["height"] / 2)


async def stats(page) -> dict:
    return await page.evaluate("streamapp.stats()")


async def _value(value):
    return await value if inspect.isawaitable(value) else value


async def sent_all(page, n: int) -> bool:
    """Whether the tracker has sent n events and holds none; it must have dropped none."""
    s = await stats(page)
    assert s["dropped"] == 0 and s["sent"] <= n, s
    return s["sent"] == n and s["pending"] == 0


async def test_demo_page_clicks_and_keys_land_in_iceberg(web, settings, spawn, page):
    spawn("worker", settings)
    posts = Posts(page)
    started = datetime.now().astimezone()
    await page.goto(web + "/demo")
    buy, pro = await center(page, "#buy"), await center(page, "#plans > button.plan >> nth=1")
    name, password, notes = await center(page, "#name"), await center(page, "#password"), await center(page, "#notes")
    await page.mouse.click(*buy)
    await page.mouse.click(*pro, button="middle")
    await page.mouse.click(*name)
    await page.keyboard.press("Shift+O")
    await page.keyboard.type("k", delay=20)
    await page.keyboard.press("Control+a")
    await page.keyboard.press("Enter")
    await page.mouse.click(*password)
    await page.keyboard.type("hunter2", delay=20)
    await page.mouse.click(*notes)  # inside data-streamapp-ignore: not even the click
    await page.keyboard.type("secret", delay=20)
    await until(lambda: sent_all(page, 10), "the tracker to send 10 events")
    await until(lambda: len(posts.events()) == 10, "Playwright to see the responses")

    session_id = await page.evaluate("sessionStorage.getItem('streamapp.session_id')")
    user_id = await page.evaluate("localStorage.getItem('streamapp.anonymous_id')")
    sent = posts.events()
    assert {p["status"] for p in posts.seen} == {202}
    assert all(p["url"] == web + "/api/events" for p in posts.seen)
    assert all(UUID4.match(e["event_id"]) and ISO_Z.match(e["timestamp"]) for e in sent), sent
    assert len({e["event_id"] for e in sent}) == 10  # so the rows below are everything it sent
    order = {e["event_id"]: i for i, e in enumerate(sent)}

    clicks = sorted(await wait_rows(settings, "events.clicks", 4), key=lambda r: order[r["event_id"]])
    keys = sorted(await wait_rows(settings, "events.keydowns", 6), key=lambda r: order[r["event_id"]])
    assert [(r["x"], r["y"], r["button"], r["target"]) for r in clicks] == [
        (*buy, 0, "button#buy.primary"),
        (*pro, 1, "section#plans > button.plan"),
        (*name, 0, "input#name"),
        (*password, 0, "input#password"),
    ]
    assert [
        (r["key"], r["code"], r["alt"], r["ctrl"], r["meta"], r["shift"], r["repeat"], r["target"]) for r in keys
    ] == [
        ("Shift", "ShiftLeft", False, False, False, True, False, "input#name"),
        ("O", "KeyO", False, False, False, True, False, "input#name"),
        ("k", "KeyK", False, False, False, False, False, "input#name"),
        ("Control", "ControlLeft", False, True, False, False, False, "input#name"),
        ("a", "KeyA", False, True, False, False, False, "input#name"),
        ("Enter", "Enter", False, False, False, False, False, "input#name"),
    ]
    rows = clicks + keys
    assert {(r["page_url"], r["session_id"], r["user_id"]) for r in rows} == {(web + "/demo", session_id, user_id)}
    assert UUID4.match(session_id) and UUID4.match(user_id) and session_id != user_id
    assert {r["event_id"] for r in rows} == set(order)
    # event_time is the browser's timestamp, in the order things happened.
    times = [r["event_time"] for r in sorted(rows, key=lambda r: order[r["event_id"]])]
    assert times == sorted(times) and started <= times[0]
    assert all(r["event_time"] <= r["received_at"] for r in rows)

    if os.environ.get("STREAMAPP_SCREENSHOT"):
        await page.wait_for_timeout(300)  # the page's counters refresh every 250 ms
        await page.screenshot(path=ROOT / os.environ["STREAMAPP_SCREENSHOT"], full_page=True)


async def test_retries_keep_event_ids_and_rows_arrive_once(web, settings, spawn, page, redis_server):
    """The first POST reaches the server but its answer is lost; the retries find Redis down (503
    with Retry-After); once Redis is back the same events are re-sent and stored once."""
    spawn("worker", settings)
    posts = Posts(page)
    routed = []

    async def lose_first_answer(route):
        routed.append(route)
        if len(routed) > 1:
            await route.continue_()
            return
        response = await route.fetch()  # the server stores the events and answers 202...
        assert response.status == 202
        await asyncio.to_thread(redis_server.stop)
        await route.abort("connectionreset")  # ...which the browser never gets

    await page.route(lambda url: url.startswith(web + "/api/events"), lose_first_answer)
    await page.goto(web + "/demo")
    buy = await center(page, "#buy")
    await page.mouse.click(*buy)
    await page.mouse.click(buy[0] + 5, buy[1])
    await page.evaluate("streamapp.flush()")
    await until(lambda: any(p["status"] == 503 for p in posts.seen), "a 503 while Redis is down")
    await asyncio.to_thread(redis_server.start)
    await until(lambda: sent_all(page, 2), "the tracker to deliver its 2 events")
    await until(lambda: posts.seen[-1]["status"] == 202, "Playwright to see the 202")

    statuses = [p["status"] for p in posts.seen]
    assert statuses[0] == "failed" and set(statuses[1:-1]) == {503} and statuses[-1] == 202, statuses
    # After a 503 the tracker waits at least its Retry-After (1 s), give or take Playwright's lag.
    pairs = zip(posts.seen[1:], posts.seen[2:], strict=False)  # each retry and the one before it
    assert all(b["started"] - a["ended"] >= 0.9 for a, b in pairs), posts.seen
    assert len({p["body"] for p in posts.seen}) == 1  # every retry re-sent the same bytes
    assert await posts.seen[-1]["response"].json() == {"accepted": 0, "duplicates": 2, "rejected": 0, "errors": []}
    assert (await stats(page))["retries"] == len(posts.seen) - 1
    rows = await wait_rows(settings, "events.clicks", 2)
    assert sorted((r["event_id"], r["x"]) for r in rows) == sorted(
        (e["event_id"], e["x"]) for e in posts.seen[0]["events"]
    )
    assert [e["x"] for e in posts.seen[0]["events"]] == [buy[0], buy[0] + 5]


async def test_leaving_the_page_sends_pending_events_with_a_beacon(web, settings, spawn, page):
    spawn("worker", settings)
    posts = Posts(page)
    await page.goto(web + "/demo")
    await page.evaluate("streamapp.init({flushInterval: 60000})")  # no timed flush: only leaving sends
    buy = await center(page, "#buy")
    await page.mouse.click(*buy)
    await page.keyboard.press("x")
    assert (await stats(page))["pending"] == 2
    await page.goto("about:blank")  # pagehide
    [click] = await wait_rows(settings, "events.clicks", 1)
    [key] = await wait_rows(settings, "events.keydowns", 1)
    assert (click["x"], click["y"], click["target"], click["page_url"]) == (*buy, "button#buy.primary", web + "/demo")
    assert (key["key"], key["target"]) == ("x", "button#buy.primary")  # the clicked button has the focus
    assert posts.seen == []  # no fetch: the beacon carried them


async def test_cross_origin_with_a_write_key_rows_carry_its_source(settings, spawn, page):
    keyed = dataclasses.replace(settings, write_keys={"k-web": "website"})
    spawn("worker", keyed)
    posts = Posts(page)
    async with running_web(keyed) as collector:
        # The page is on localhost, the collector on 127.0.0.1: without the server's CORS headers
        # the tracker could not read the answer and would retry forever.
        await page.goto(f"http://localhost:{keyed.port}/demo")
        await page.evaluate(f"streamapp.init({{endpoint: '{collector}/api/events', writeKey: 'k-web'}})")
        buy = await center(page, "#buy")
        await page.mouse.click(*buy)
        await page.evaluate("streamapp.flush()")
        await until(lambda: sent_all(page, 1), "the tracker to send its event")
        assert (await stats(page))["retries"] == 0
        await page.mouse.click(buy[0] + 1, buy[1])
        await page.goto("about:blank")  # the beacon carries the key too
        rows = await wait_rows(keyed, "events.clicks", 2)
    assert [(p["url"], p["status"]) for p in posts.seen] == [(collector + "/api/events?writeKey=k-web", 202)]
    assert sorted((r["x"], r["source"], r["page_url"]) for r in rows) == [
        (buy[0], "website", f"http://localhost:{keyed.port}/demo"),
        (buy[0] + 1, "website", f"http://localhost:{keyed.port}/demo"),
    ]


async def test_full_queue_drops_the_oldest_and_a_422_is_not_retried(web, page):
    posts = Posts(page)
    warnings: list[str] = []
    page.on("console", lambda m: warnings.append(m.text) if m.type == "warning" else None)
    await page.goto(web + "/demo")
    # A visitor's clock two days fast: the server rejects every event's timestamp (422).
    await page.clock.set_fixed_time(datetime.now(UTC) + timedelta(days=2))
    await page.evaluate("streamapp.init({flushInterval: 60000, maxQueue: 3, writeKey: 'k 1&'})")
    for x in range(100, 105):
        await page.mouse.click(x, 10)
    assert await stats(page) == {"recorded": 5, "sent": 0, "dropped": 2, "retries": 0, "pending": 3}
    await page.evaluate("streamapp.flush()")
    await until(lambda: len(warnings) == 1, "the tracker's warning")
    [post] = posts.seen
    assert (post["url"], post["status"]) == (web + "/api/events?writeKey=k%201%26", 422)
    assert [e["x"] for e in post["events"]] == [102, 103, 104]  # the two oldest were dropped
    prefix = "streamapp: dropped 3 events: HTTP 422 "
    assert warnings[0].startswith(prefix)
    assert [(e["index"], e["field"]) for e in json.loads(warnings[0][len(prefix) :])["errors"]] == [
        (0, "timestamp"),
        (1, "timestamp"),
        (2, "timestamp"),
    ]
    # Dropped, not queued again for a retry.
    assert await stats(page) == {"recorded": 5, "sent": 0, "dropped": 5, "retries": 0, "pending": 0}


async def test_batches_stay_under_the_keepalive_limit(web, page):
    posts = Posts(page)
    await page.goto(web + "/demo")
    # Every event carries a 20 kB page_url (a URL the server itself would refuse: over 8190 bytes).
    await page.evaluate("history.replaceState(null, '', '/demo?pad=' + 'x'.repeat(20000))")
    await page.evaluate("streamapp.init({flushInterval: 60000, keepParams: ['pad']})")
    for x in range(100, 107):
        await page.mouse.click(x, 10)
    await page.evaluate("streamapp.flush()")  # one flush sends all of it, batch after batch
    await until(lambda: sent_all(page, 7), "the tracker to send 7 events")
    await until(lambda: len(posts.events()) == 7, "Playwright to see the responses")
    assert [len(p["events"]) for p in posts.seen] == [3, 3, 1]
    assert all(len(p["body"].encode()) <= 60 * 1024 and p["status"] == 202 for p in posts.seen)
    assert [e["x"] for e in posts.events()] == list(range(100, 107))


async def test_a_429_is_retried_after_its_retry_after(web, page):
    posts = Posts(page)

    async def busy_once(route):
        if posts.seen:
            await route.continue_()
        else:
            await route.fulfill(status=429, json={"error": "busy"}, headers={"Retry-After": "2"})

    await page.route(lambda url: url.startswith(web + "/api/events"), busy_once)
    await page.goto(web + "/demo")
    await page.mouse.click(100, 10)
    await page.evaluate("streamapp.flush()")
    await until(lambda: sent_all(page, 1), "the tracker to deliver its event")
    await until(lambda: len(posts.seen) == 2, "Playwright to see the 202")
    first, second = posts.seen
    assert (first["status"], second["status"], first["body"]) == (429, 202, second["body"])
    # Without Retry-After the first retry comes within 0.5 s. (The times are when Playwright told
    # this process, a few ms after the browser knew.)
    assert 1.9 <= second["started"] - first["ended"] < 3


async def test_ids_session_per_tab_user_per_browser_and_without_random_uuid(web, page):
    # Over plain http to a non-loopback host the page is not a secure context: no randomUUID.
    await page.add_init_script("delete Crypto.prototype.randomUUID")
    posts = Posts(page)
    await page.goto(web + "/demo")
    await page.evaluate("streamapp.init({flushInterval: 60000})")
    for x in range(100, 103):
        await page.mouse.click(x, 10)
    await page.evaluate("streamapp.flush()")
    await until(lambda: len(posts.seen) == 1, "the first batch")
    await page.reload()  # the same tab: the same session
    await page.mouse.click(200, 10)
    other = await page.context.new_page()  # another tab: another session, the same anonymous user
    await other.goto(web + "/demo")
    await other.mouse.click(300, 10)
    for p in (page, other):
        await p.evaluate("streamapp.flush()")
    await until(lambda: len(posts.events()) == 5 and all(p["status"] == 202 for p in posts.seen), "5 events sent")
    events = sorted(posts.events(), key=lambda e: e["x"])
    assert await page.evaluate("typeof crypto.randomUUID") == "undefined"
    assert all(UUID4.match(e["event_id"]) for e in events) and len({e["event_id"] for e in events}) == 5
    assert [e["x"] for e in events] == [100, 101, 102, 200, 300]
    sessions = [e["session_id"] for e in events]
    assert len(set(sessions[:4])) == 1 and sessions[4] != sessions[0]
    assert sessions[4] == await other.evaluate("sessionStorage.getItem('streamapp.session_id')")
    assert {e["user_id"] for e in events} == {await other.evaluate("localStorage.getItem('streamapp.anonymous_id')")}


async def test_keys_typed_into_sensitive_fields_are_never_recorded(web, settings, spawn, page):
    """Card, one-time-code and password fields (by type, autocomplete or inputmode) and a field
    marked data-streamapp-ignore: no keydown at all, while the plain text field's keys are recorded."""
    spawn("worker", settings)
    posts = Posts(page)
    await page.goto(web + "/demo")
    await page.evaluate("streamapp.init({flushInterval: 60000})")
    # Beside the demo's #password, #card (cc-number) and #otp (one-time-code): the other rules.
    await page.evaluate(
        """for (const [id, attrs] of [
            ['csc', {autocomplete: 'section-pay billing CC-CSC'}],  // one token of several, any case
            ['expiry', {autocomplete: 'cc-exp'}],
            ['holder', {autocomplete: 'cc-name'}],
            ['fresh', {autocomplete: 'new-password'}],
            ['shown', {type: 'password', autocomplete: 'current-password'}],  // "show password" below
            ['pin', {inputmode: 'numeric'}],
            ['opted', {'data-streamapp-ignore': ''}],
        ]) {
            const input = document.createElement('input');
            input.id = id;
            for (const [k, v] of Object.entries(attrs)) input.setAttribute(k, v);
            document.body.append(input);
        }"""
    )
    typed = {
        "#password": "hunter2",
        "#card": "4242424242424242",
        "#otp": "918273",
        "#csc": "737",
        "#expiry": "1230",
        "#holder": "Ada Lovelace",
        "#fresh": "correcthorse",
        "#shown": "battery",
        "#pin": "5150",
        "#opted": "private",
    }
    await page.focus("#name")
    await page.keyboard.type("ab", delay=10)
    for field, text in typed.items():
        if field == "#shown":  # a "show password" button turns the field into plain text
            await page.evaluate("document.getElementById('shown').type = 'text'")
        await page.focus(field)
        await page.keyboard.type(text, delay=10)
        await page.keyboard.press("Enter")
    await page.focus("#name")
    await page.keyboard.type("c", delay=10)
    await page.evaluate("streamapp.flush()")
    await until(lambda: sent_all(page, 3), "the tracker to send the 3 keys typed into #name")
    assert (await stats(page))["recorded"] == 3  # nothing else was even queued
    rows = await wait_rows(settings, "events.keydowns", 3)
    assert sorted((r["key"], r["target"]) for r in rows) == [
        ("a", "input#name"),
        ("b", "input#name"),
        ("c", "input#name"),
    ]
    await until(lambda: len(posts.events()) == 3, "Playwright to see the responses")
    assert sorted(e["event_id"] for e in posts.events()) == sorted(r["event_id"] for r in rows)


async def test_page_url_without_query_and_fragment_unless_kept(web, page):
    posts = Posts(page)
    warnings: list[str] = []
    page.on("console", lambda m: warnings.append(m.text) if m.type == "warning" else None)
    await page.goto(web + "/demo?token=secret&utm_source=x#access_token=y")
    await page.evaluate("streamapp.init({flushInterval: 60000})")
    await page.mouse.click(100, 10)
    await page.evaluate("streamapp.init({keepParams: ['utm_source', 'utm_campaign']})")
    await page.mouse.click(101, 10)
    # The page's order and encoding; a parameter repeated is kept each time; another is dropped.
    await page.evaluate(
        "history.replaceState(null, '', '/demo?utm_campaign=a%20b&q=typed+text&utm_source=y&utm_source=z#t')"
    )
    await page.mouse.click(102, 10)
    await page.evaluate("streamapp.init({keepParams: 'utm_source'})")  # not a list: warned, keeps none
    await page.mouse.click(103, 10)
    await page.evaluate("streamapp.flush()")
    await until(lambda: sent_all(page, 4), "the tracker to send 4 events")
    await until(lambda: len(posts.events()) == 4, "Playwright to see the responses")
    assert [e["page_url"] for e in posts.events()] == [
        web + "/demo",
        web + "/demo?utm_source=x",
        web + "/demo?utm_campaign=a%20b&utm_source=y&utm_source=z",
        web + "/demo",
    ]
    body = "".join(p["body"] for p in posts.seen)
    assert "secret" not in body and "access_token" not in body and "typed" not in body
    assert warnings == ["streamapp: keepParams must be an array of parameter names; keeping none"]
