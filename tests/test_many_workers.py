"""Many worker processes share the agents' shards through leases (`streamapp.engine.leases`):
workers killed, paused and scaled while events keep arriving through the real web app, and every
event lands in Iceberg exactly once."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections import Counter

import aiohttp
import pytest

from streamapp import app as default_app
from streamapp import names
from streamapp.engine.leases import Unit
from streamapp.lake.catalog import open_catalog
from tests.conftest import free_port, running_web, table_rows, wait_until
from tests.helpers import assert_exactly_once, clicks, send, wait_rows

SHARDS = 4
LEASE = 2


@pytest.fixture
def sharded(settings, redis_server):
    sharded = dataclasses.replace(settings, shards=SHARDS, lease_seconds=LEASE, window_count=50, window_seconds=0.3)
    redis_server.check(sharded)  # every shard's marker: the web writes to a shard only once it is checked
    return sharded


def units() -> list[Unit]:
    return [Unit(agent, shard) for agent in sorted(default_app.discover_agents()) for shard in range(SHARDS)]


def owners(redis_server) -> dict[Unit, int | None]:
    """Unit -> the pid of the worker holding its lease (None: free)."""
    every = units()
    held = redis_server.client().mget([names.lease(u.agent, u.shard) for u in every])
    return {u: None if v is None else int(v.decode().split(":")[1]) for u, v in zip(every, held, strict=True)}


def settled(held: dict[Unit, int | None]) -> bool:
    """Every unit owned, 6/5/5 over three workers, each owning some shard of the raw clicks sink."""
    clicks = {pid for u, pid in held.items() if u.agent == "clicks"}
    return None not in held.values() and sorted(Counter(held.values()).values()) == [5, 5, 6] and len(clicks) == 3


def start_worker(spawn, settings):
    return spawn(
        "worker",
        settings,
        STREAMAPP_SHARDS=str(SHARDS),
        STREAMAPP_LEASE_SECONDS=str(LEASE),
        STREAMAPP_WORKER_METRICS_PORT=str(free_port()),
    )


async def wait_owners(redis_server, predicate, what: str, timeout: float = 20) -> dict[Unit, int | None]:
    def check():
        held = owners(redis_server)
        return held if predicate(held) else None

    return await asyncio.to_thread(wait_until, check, timeout, 0.1, what)


class Sender:
    """Sends clicks through the web app without pause until stopped; `sent`: their event ids."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.sent: set[str] = set()
        self.stopping = asyncio.Event()
        self.task = asyncio.create_task(self._run(http, base))

    async def _run(self, http, base) -> None:
        batch = 0
        while not self.stopping.is_set():
            events = clicks(f"b{batch}-", 20)
            await send(http, base, events, chunk=20)
            self.sent.update(e["event_id"] for e in events)
            batch += 1
            await asyncio.sleep(0.03)

    async def stop(self) -> set[str]:
        self.stopping.set()
        await self.task
        return self.sent


async def assert_all_in_once(settings, redis_server, sent: set[str]) -> None:
    await wait_rows(settings, "events.clicks", len(sent), timeout=45)
    await asyncio.sleep(1.5)  # a double write would land now
    rows = table_rows(settings, "events.clicks")
    assert len(rows) == len({r["event_id"] for r in rows}) == len(sent)
    assert_exactly_once(rows, sent)
    # the events were spread over the shards, and each shard's position is at its stream's end
    table = open_catalog(settings).load_table("events.clicks")
    client = redis_server.client()
    for shard in range(SHARDS):
        key = names.stream("click", shard)
        [(last, _)] = client.xrevrange(key, count=1)
        assert table.properties[names.position_property(key, "clicks")] == last.decode()


async def test_killed_and_paused_workers_shards_move_and_each_event_lands_once(sharded, redis_server, spawn, http):
    async with running_web(sharded) as base:
        workers = [start_worker(spawn, sharded) for _ in range(3)]
        by_pid = {w.proc.pid: w for w in workers}
        sender = Sender(http, base)
        held = await wait_owners(redis_server, settled, "16 units over 3 workers, the clicks over all 3")
        await asyncio.sleep(1)  # events flow through every worker
        # the victims both run some shard of the raw clicks sink, so each is mid-window
        readers = Counter(pid for u, pid in held.items() if u.agent == "clicks")
        killed, paused = (by_pid[pid] for pid, _ in readers.most_common(2))
        (survivor,) = set(workers) - {killed, paused}
        killed.signal(signal.SIGKILL)
        paused.signal(signal.SIGSTOP)
        try:
            await wait_owners(
                redis_server, lambda h: set(h.values()) == {survivor.proc.pid}, "the survivor to own every unit"
            )
            await asyncio.sleep(1)
        finally:
            paused.signal(signal.SIGCONT)
        # back from its pause, the worker finds its leases gone, stops those runs, rejoins
        await wait_owners(redis_server, lambda h: paused.proc.pid in h.values(), "the paused worker to rejoin")
        sent = await sender.stop()
        await assert_all_in_once(sharded, redis_server, sent)
    assert "leases: lost clicks/" in paused.output(), paused.output()[-3000:]
    assert "leases: acquired clicks/" in survivor.output()


async def test_scaling_one_three_one_while_sending(sharded, redis_server, spawn, http):
    async with running_web(sharded) as base:
        first = start_worker(spawn, sharded)
        sender = Sender(http, base)
        await wait_owners(redis_server, lambda h: set(h.values()) == {first.proc.pid}, "one worker to own every unit")
        await asyncio.sleep(1)
        more = [start_worker(spawn, sharded) for _ in range(2)]
        pids = {first.proc.pid} | {w.proc.pid for w in more}
        held = await wait_owners(redis_server, settled, "the units spread over 3 workers")
        assert set(held.values()) == pids
        await asyncio.sleep(1)
        for worker in more:
            worker.signal(signal.SIGTERM)  # graceful: the others take over at once, not after a lease
        for worker in more:
            assert await asyncio.to_thread(worker.wait, 20) == 0
        # released on stop: taken within a round of the leases (lease / 3), well before a lease passes
        await wait_owners(
            redis_server, lambda h: set(h.values()) == {first.proc.pid}, "one worker to own every unit again", LEASE
        )
        sent = await sender.stop()
        await assert_all_in_once(sharded, redis_server, sent)
    for worker in more:
        assert "leases: released clicks/" in worker.output()
        assert "lost" not in worker.output()
