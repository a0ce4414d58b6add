"""Several web processes on one port (STREAMAPP_WEB_PROCESSES): a graceful stop loses no accepted
event, /metrics adds every process up, and a child that dies takes the server down (non-zero)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import aiohttp

from tests.conftest import stream_events, wait_until
from tests.test_http import CLICK


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == pid:  # the ppid
            found.append(int(stat.parent.name))
    return found


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _serving(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _start(spawn, settings, processes: int = 2):
    web = spawn("web", settings, STREAMAPP_WEB_PROCESSES=str(processes))
    wait_until(lambda: web.output().count("web: listening on") == processes, 30, what="every process to listen")
    assert _serving(settings.port)
    children = wait_until(
        lambda: (c := _children(web.proc.pid)) and len(c) == processes and c, 10, what=f"{processes} web processes"
    )
    return web, children


async def test_a_graceful_stop_of_several_processes_loses_no_accepted_event(settings, redis_server, spawn):
    """Clients post without pause on many connections while the parent gets SIGTERM: every event
    answered 202 is in Redis exactly once, and nothing is stored that was not sent. (A request
    cut off by the stop got no 202: it may or may not be stored, and its client retries it.)"""
    web, children = _start(spawn, settings)
    base = f"http://127.0.0.1:{settings.port}/api/events"
    sent: set[str] = set()
    accepted: list[str] = []

    async def client(n: int) -> None:
        # One connection per request: the kernel spreads connections, not requests, over the processes.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            for i in range(100_000):
                event_id = f"c{n}-{i}"
                sent.add(event_id)
                try:
                    async with http.post(base, data=json.dumps({**CLICK, "event_id": event_id})) as r:
                        if r.status != 202:
                            return
                        assert (await r.json())["accepted"] == 1
                        accepted.append(event_id)
                except aiohttp.ClientError:  # the server stopped
                    return

    before = {pid: _cpu_ticks(pid) for pid in children}
    clients = [asyncio.create_task(client(n)) for n in range(16)]
    await asyncio.sleep(1.5)
    busy = {pid: _cpu_ticks(pid) - before[pid] for pid in children}
    web.signal(signal.SIGTERM)
    await asyncio.wait_for(asyncio.gather(*clients), 30)
    assert await asyncio.to_thread(web.wait, 30) == 0, web.output()
    assert all(ticks >= 5 for ticks in busy.values()), f"a process served nothing: CPU ticks {busy}"
    assert _children(web.proc.pid) == []
    stored = [json.loads(e)["event_id"] for e in stream_events(redis_server, "click")]
    assert len(accepted) > 200, "the load was too light to stop during it"
    assert len(stored) == len(set(stored)), "an event was stored twice"
    assert set(accepted) <= set(stored), f"accepted but lost: {sorted(set(accepted) - set(stored))[:10]}"
    assert set(stored) <= sent
    assert "web: all processes stopped" in web.output()


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$", text, re.M)
    return float(m[1]) if m else 0.0


async def test_metrics_add_up_every_process(settings, redis_server, spawn):
    """40 requests on 40 connections land on both processes (all on one: odds 2 in 2^40); once the
    counts are in (within a second), every scrape, whichever process answers it, reports all 40."""
    web, _ = _start(spawn, settings)
    base = f"http://127.0.0.1:{settings.port}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for i in range(40):
            async with http.post(base + "/api/events", data=json.dumps({**CLICK, "event_id": f"m{i}"})) as r:
                assert r.status == 202

        async def scrape() -> str:
            async with http.get(base + "/metrics") as r:
                return await r.text()

        # Each process adds its counts to the shared files every second.
        deadline = time.monotonic() + 5
        while _metric(await scrape(), "streamapp_http_requests_total", route="/api/events", status="202") < 40:
            assert time.monotonic() < deadline, "the counts never added up to 40"
            await asyncio.sleep(0.2)
        for _ in range(10):
            text = await scrape()
            assert _metric(text, "streamapp_http_requests_total", route="/api/events", status="202") == 40
            assert _metric(text, "streamapp_events_total", type="click", outcome="accepted") == 40
            assert "streamapp_backlog_events" in text
    web.stop()
    assert web.proc.returncode == 0, web.output()


def test_a_child_that_dies_stops_the_server(settings, redis_server, spawn):
    web, children = _start(spawn, settings)
    os.kill(children[0], signal.SIGKILL)
    assert web.wait(30) == 1
    assert "exited with -9; stopping the others" in web.output()
    assert not Path(f"/proc/{children[1]}").exists(), "the other process was left running"
