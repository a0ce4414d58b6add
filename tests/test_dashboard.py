"""The live dashboard against a real valkey, a real worker and a real catalog: events go in through
the real web view, and every figure `/api/dashboard` answers equals a recount from the tables;
then Debian's chromium renders the page's charts from them (skipped, with the reason, where
chromium cannot be installed)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from streamapp import names
from streamapp.dashboard.data import HEATMAP_COLUMNS, HEATMAP_MAX_ROWS, Dashboard
from streamapp.dashboard.server import serve
from streamapp.lake.catalog import open_catalog
from streamapp.redis_client import reader_client
from streamapp.settings import Settings
from tests.conftest import ROOT, free_port, table_rows, wait_until
from tests.helpers import send, wait_rows

SHOP, CART = "https://shop.example/", "https://shop.example/cart"
STREAMS = [names.stream(t) for t in ("click", "keydown", "rejected")]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]

pytestmark = pytest.mark.timeout(600)  # the browser test's setup may install chromium with apt-get


def traffic(prefix: str, n: int, now: datetime) -> list[dict]:
    """Clicks on two pages over four minutes, in time order (none is late for its window), the
    last one just before the minute `now` is in (so the aggregate's idle watermark closes every
    window within its 1 s grace), two in three on SHOP, at spread-out spots; and a keydown per ten
    clicks."""
    end = now.replace(second=0, microsecond=0) - timedelta(milliseconds=1)
    events: list[dict] = []
    for i in range(n):
        page = CART if i % 3 == 2 else SHOP
        when = end - timedelta(seconds=240 * (n - 1 - i) / n)
        events.append(
            {
                "type": "click",
                "event_id": f"{prefix}{i}",
                "x": (i * 37) % 800,
                "y": (i * 53) % 1400,
                "page_url": page,
                "user_id": f"u{i % 5}",
                "timestamp": when.isoformat(),
            }
        )
        if i % 10 == 0:
            events.append({"type": "keydown", "key": "a", "event_id": f"{prefix}k{i}", "page_url": page})
    return events


@pytest.fixture
def fast(settings) -> Settings:
    """Aggregate windows close 1 s after the newest event (or idle time) passes them."""
    return dataclasses.replace(settings, grace_seconds=1.0, dashboard_port=free_port())


async def wait_per_minute(settings: Settings, clicks: int) -> None:
    def done() -> bool:
        return sum(r["clicks"] for r in table_rows(settings, "events.clicks_per_minute")) >= clicks

    await asyncio.to_thread(wait_until, done, 40, 0.3, f"{clicks} clicks in events.clicks_per_minute")


@contextlib.asynccontextmanager
async def dashboard_server(settings: Settings) -> AsyncIterator[tuple[str, Dashboard]]:
    client = reader_client(settings)
    dashboard = Dashboard(open_catalog(settings), client, STREAMS)
    stopping = asyncio.Event()
    task = asyncio.create_task(serve(dashboard, settings, stopping))
    try:
        yield f"http://127.0.0.1:{settings.dashboard_port}", dashboard
    finally:
        stopping.set()
        await task
        await client.aclose()


async def get(http, url: str) -> dict:
    for _ in range(100):  # the server may still be starting
        with contextlib.suppress(aiohttp.ClientConnectionError):
            async with http.get(url) as r:
                assert r.status == 200, await r.text()
                return await r.json()
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered")


def recount_per_minute(clicks: list[dict], since: datetime) -> dict[str, dict[str, int]]:
    counts: Counter = Counter()
    for r in clicks:
        minute = r["event_time"].astimezone(UTC).replace(second=0, microsecond=0)
        if minute >= since:
            counts[(r["page_url"], minute.isoformat(timespec="seconds"))] += 1
    out: dict[str, dict[str, int]] = {}
    for (page, minute), n in counts.items():
        out.setdefault(page, {})[minute] = n
    return out


def recount_heatmap(clicks: list[dict], page: str) -> tuple[int, dict[tuple[int, int], int]]:
    spots = [(max(0, r["x"]), max(0, r["y"])) for r in clicks if r["page_url"] == page]
    width, height = max(x for x, _ in spots) + 1, max(y for _, y in spots) + 1
    cell = max(1, math.ceil(width / HEATMAP_COLUMNS), math.ceil(height / HEATMAP_MAX_ROWS))
    return cell, dict(Counter((x // cell, y // cell) for x, y in spots))


async def test_the_figures_equal_a_recount_of_the_tables(web, http, fast, spawn):
    spawn("worker", fast)
    now = datetime.now(UTC)
    # older clicks on SHOP: two days ago (outside the heatmap's day), two hours ago (outside the
    # per-minute hour, inside the heatmap's day)
    old = [
        {"type": "click", "x": 5, "y": 5, "page_url": SHOP, "timestamp": (now - ago).isoformat()}
        for ago in [timedelta(days=2)] * 10 + [timedelta(hours=2)] * 10
    ]
    await send(http, web, old + traffic("a", 300, now))
    async with http.post(web + "/api/events", json={"type": "click", "x": 1, "event_id": "bad"}) as r:
        assert r.status == 422  # no y: stored in events.rejected
    clicks = await wait_rows(fast, "events.clicks", 320)
    await wait_rows(fast, "events.keydowns", 30)
    await wait_rows(fast, "events.rejected", 1)
    await wait_per_minute(fast, 320)

    async with dashboard_server(fast) as (base, dashboard):
        # two viewers at once: one refresh serves both
        first, again = await asyncio.gather(get(http, base + "/api/dashboard"), get(http, base + "/api/dashboard"))
        assert dashboard.refreshes == 1 and first == again
        d = first
        assert d["redis_error"] is None
        assert d["events"]["totals"] == {"click": 320, "keydown": 30, "rejected": 1}
        assert d["events"]["rates"] == {}  # one sample: no rate yet

        tables = {t["table"]: t for t in d["tables"]}
        for name in ("events.clicks", "events.keydowns", "events.rejected", "events.clicks_per_minute"):
            rows = table_rows(fast, name)
            assert tables[name]["rows"] == len(rows), name
            assert tables[name]["snapshots"] >= 1 and tables[name]["age_seconds"] is not None
        agents = {a["agent"]: a for a in d["agents"]}
        assert agents["clicks"]["lag_events"] == 0 and agents["clicks"]["lag_seconds"] == 0
        newest = max(r["received_at"] for r in clicks).timestamp()  # the newest committed event...
        fetched = datetime.fromisoformat(d["now"]).timestamp()
        assert abs(agents["clicks"]["freshness_seconds"] - (fetched - newest)) < 1.5  # ...is this old

        pm = d["clicks_per_minute"]
        since = datetime.fromisoformat(pm["minutes"][0])
        assert len(pm["minutes"]) == 61 and list(pm["pages"]) == [SHOP, CART]  # most clicks first
        served = {
            page: {m: n for m, n in zip(pm["minutes"], counts, strict=True) if n}
            for page, counts in pm["pages"].items()
        }
        assert served == recount_per_minute(clicks, since)
        assert sum(sum(c) for c in pm["pages"].values()) == 300  # not the older ones

        heat = d["heatmap"]  # no ?page=: the page with most clicks this hour
        assert heat["page"] == SHOP and heat["clicks"] == 210  # and 10 of the older ones
        day = datetime.fromisoformat(d["now"]) - timedelta(days=1)
        cell, cells = recount_heatmap([r for r in clicks if r["event_time"] >= day], SHOP)
        assert heat["cell"] == cell and {(c, r): n for c, r, n in heat["cells"]} == cells
        cart = (await get(http, base + "/api/dashboard?page=" + CART))["heatmap"]
        assert cart["page"] == CART and cart["clicks"] == 100
        assert (await get(http, base + "/api/dashboard?page=https://nowhere.example/"))["heatmap"]["clicks"] == 0
        async with http.get(base + "/api/dashboard", params={"page": "x" * 3000}) as r:
            assert r.status == 400 and "2048" in (await r.json())["error"]

        # events/s: the events posted between two refreshes, over the time between them
        await send(http, web, traffic("b", 40, datetime.now(UTC)))
        await asyncio.sleep(2.1)  # past the cache
        later = await get(http, base + "/api/dashboard")
        assert dashboard.refreshes == 2
        [(t1, rate)] = later["events"]["rates"]["click"]
        t0 = datetime.fromisoformat(d["now"]).timestamp()
        assert abs(rate * (t1 - t0) - 40) < 0.5, (rate, t1 - t0)
        assert later["events"]["totals"]["click"] == 360


async def test_an_empty_lake_and_a_stopped_redis_still_answer(http, fast, redis_server):
    async with dashboard_server(fast) as (base, _):
        d = await get(http, base + "/api/dashboard")
        assert (d["tables"], d["agents"], d["redis_error"]) == ([], [], None)
        assert d["clicks_per_minute"]["pages"] == {} and d["heatmap"]["clicks"] == 0
        redis_server.stop()
        await asyncio.sleep(2.1)  # past the cache
        d = await get(http, base + "/api/dashboard")
        assert d["redis_error"] is not None and d["events"]["totals"] == {}


async def test_the_page_draws_the_charts_in_chromium(web, http, fast, spawn, chromium):
    from playwright.async_api import async_playwright

    spawn("worker", fast)
    server = spawn("dashboard", fast, STREAMAPP_DASHBOARD_PORT=str(fast.dashboard_port))
    base = f"http://127.0.0.1:{fast.dashboard_port}"
    await send(http, web, traffic("a", 300, datetime.now(UTC)))
    await wait_per_minute(fast, 300)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = await (await browser.new_context(viewport={"width": 1040, "height": 800})).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.goto(base + "/")
        # the heatmap of the busiest page, a line per page in the per-minute chart, the agents
        await page.wait_for_selector("#heatmap rect.cell", timeout=15_000)
        assert await page.locator("#page").input_value() == SHOP
        assert await page.locator(f'#perminute path[data-series="{SHOP}"]').count() == 1
        assert await page.locator(f'#perminute path[data-series="{CART}"]').count() == 1
        assert await page.locator('#agents tr[data-agent="clicks_per_minute"]').count() == 1
        assert "300" in await page.locator('#tables tr[data-table="events.clicks"]').inner_text()
        shop_cells = await page.locator("#heatmap rect.cell title").all_inner_texts()
        # traffic while the page polls: the events/s chart gets a line
        for _ in range(4):
            await send(http, web, [{"type": "click", "x": 40 * j, "y": 30, "page_url": SHOP} for j in range(30)])
            await asyncio.sleep(1)
        await page.wait_for_selector('#rates path[data-series="click"]', timeout=15_000)
        # choosing the other page redraws the heatmap from its clicks
        await page.select_option("#page", CART)
        await page.wait_for_function(f"location.search === '?page=' + encodeURIComponent({json.dumps(CART)})")
        await page.wait_for_function(
            "titles => { const now = [...document.querySelectorAll('#heatmap rect.cell title')]"
            ".map(t => t.textContent); return now.length > 0 && JSON.stringify(now) !== JSON.stringify(titles); }",
            arg=shop_cells,
            timeout=10_000,
        )
        if os.environ.get("STREAMAPP_SCREENSHOT"):
            await page.select_option("#page", SHOP)
            await page.wait_for_function("document.querySelector('#page').value === " + json.dumps(SHOP))
            await page.wait_for_timeout(3500)  # a refresh after the choice: the SHOP heatmap drawn
            await page.screenshot(path=ROOT / "docs" / "dashboard.png", full_page=True)
        await browser.close()
    assert errors == []
    assert "Traceback" not in server.output()
    started = time.monotonic()
    server.stop()
    assert server.proc.returncode == 0 and time.monotonic() - started < 5
