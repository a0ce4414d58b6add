"""Leases on (agent, shard) units against a real valkey-server: the share, the compare-and-set
operations, expiry and take-over, and the loop that owns units (`streamapp.engine.leases`)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys

import pytest
from redis.asyncio import Redis

from streamapp import names
from streamapp.engine.leases import Leases, Owner, Unit, quotas


@pytest.fixture
async def redis(redis_server):
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def totals(share: dict[str, dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for per_worker in share.values():
        for worker, n in per_worker.items():
            out[worker] = out.get(worker, 0) + n
    return out


def test_share_spreads_every_unit_evenly():
    agents = ["clicks", "clicks_per_minute", "keydowns", "rejected"]
    share = quotas(4, {w: agents for w in ("c", "a", "b")})
    assert all(sum(s.values()) == 4 for s in share.values())  # every unit has one owner
    assert sorted(totals(share).values()) == [5, 5, 6]  # 16 units over 3 workers
    assert quotas(4, {w: agents for w in ("b", "a", "c")}) == share  # the same in every worker
    # one shard, four agents, two workers: two agents each, not all four on the first
    assert totals(quotas(1, {"a": agents, "b": agents})) == {"a": 2, "b": 2}
    # more workers than units: the extra ones own nothing
    assert totals(quotas(1, {w: ["clicks"] for w in "abc"})) == {"a": 1, "b": 0, "c": 0}


def test_share_follows_each_workers_agents():
    """`--only` differs between workers: an agent's shards go only to workers that run it."""
    share = quotas(4, {"a": ["clicks"], "b": ["clicks", "keydowns"]})
    assert share["keydowns"] == {"b": 4}
    assert share["clicks"] == {"a": 2, "b": 2}


async def test_acquire_renew_release_only_by_the_owner(redis):
    unit = Unit("clicks", 2)
    me = Leases(redis, "host-a:1:x", ["clicks"], 5)
    other = Leases(redis, "host-b:2:y", ["clicks"], 5)
    assert await me.acquire(unit)
    assert not await other.acquire(unit)
    assert await other.renew([unit]) == [False]
    assert await other.release([unit]) == 0
    assert await me.owner(unit) == "host-a:1:x"
    assert await redis.get(names.lease("clicks", 2)) == b"host-a:1:x"
    assert await me.renew([unit]) == [True]
    assert 4000 < await redis.pttl(names.lease("clicks", 2)) <= 5000
    assert await me.release([unit]) == 1
    assert await me.owner(unit) is None
    assert await other.acquire(unit)


async def test_a_lease_not_renewed_expires_and_another_takes_it(redis):
    unit = Unit("clicks", 0)
    dead = Leases(redis, "host-a:1:x", ["clicks"], 0.5)
    other = Leases(redis, "host-b:2:y", ["clicks"], 0.5)
    assert await dead.acquire(unit)
    assert set(await dead.heartbeat()) == {"host-a:1:x"}
    await asyncio.sleep(0.3)
    assert not await other.acquire(unit)
    await asyncio.sleep(0.4)  # the lease has passed unrenewed
    assert await other.acquire(unit)
    assert await dead.renew([unit]) == [False]  # back from a pause: it is not its any more
    assert await other.heartbeat() == {"host-b:2:y": ["clicks"]}  # the silent worker left the live set


class Recorder:
    """Runs that wait for their stop, noting what ran, what stopped gracefully, what was cancelled."""

    def __init__(self) -> None:
        self.running: set[Unit] = set()
        self.stopped: list[Unit] = []
        self.cancelled: list[Unit] = []

    async def __call__(self, unit: Unit, stop: asyncio.Event) -> None:
        self.running.add(unit)
        try:
            await stop.wait()
            self.stopped.append(unit)
        except asyncio.CancelledError:
            self.cancelled.append(unit)
            raise
        finally:
            self.running.discard(unit)


async def until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def owning(redis, me: str, agents: list[str], shards: int, lease: float = 0.6):
    recorder, stopping = Recorder(), asyncio.Event()
    owner = Owner(Leases(redis, me, agents, lease), shards, recorder, lease_seconds=lease, shutdown_seconds=2)
    task = asyncio.create_task(owner.run(stopping))
    try:
        yield recorder, stopping, task
    finally:
        stopping.set()
        await task


async def test_owners_split_the_units_and_hand_them_over_on_stop(redis):
    agents = ["clicks", "keydowns"]
    async with owning(redis, "h:1:a", agents, 3) as (a, _, _), owning(redis, "h:2:b", agents, 3) as (b, b_stop, b_task):
        await until(lambda: len(a.running) == 3 and len(b.running) == 3)
        assert not a.running & b.running
        b_stop.set()
        await b_task
        assert len(b.stopped) >= 3 and not b.running and not b.cancelled  # stopped gracefully
        assert await redis.hlen(names.WORKER_AGENTS) == 1  # b left at once
        await until(lambda: len(a.running) == 6, timeout=2)  # within a round, not after a lease
        keys = [names.lease(u.agent, u.shard) for u in sorted(a.running)]
        assert set(await redis.mget(keys)) == {b"h:1:a"}
    assert await redis.exists(*keys) == 0  # released on stop
    assert not a.cancelled


async def test_a_joining_worker_gets_its_share_from_a_graceful_release(redis):
    async with owning(redis, "h:1:a", ["clicks"], 4) as (a, _, _):
        await until(lambda: len(a.running) == 4)
        async with owning(redis, "h:2:b", ["clicks"], 4) as (b, _, _):
            await until(lambda: len(a.running) == 2 and len(b.running) == 2)
            assert len(a.stopped) == 2 and not a.cancelled  # flushed, not cut off


async def test_a_lost_lease_cancels_its_run_at_once(redis):
    async with owning(redis, "h:1:a", ["clicks"], 1) as (a, _, _):
        await until(lambda: a.running == {Unit("clicks", 0)})
        # a paused worker's lease passed and another took it
        await redis.set(names.lease("clicks", 0), "elsewhere:9:z")
        await until(lambda: a.cancelled == [Unit("clicks", 0)], timeout=2)
        assert not a.running
    assert await redis.get(names.lease("clicks", 0)) == b"elsewhere:9:z"  # not deleted on stop


async def test_a_dead_worker_of_this_host_is_dropped_before_its_lease_passes(redis):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = f"{socket.gethostname()}:{done.stdout.strip()}:x"  # its process has exited
    dead = Leases(redis, gone, ["clicks"], 30)
    await dead.heartbeat()
    assert await dead.acquire(Unit("clicks", 0))
    async with owning(redis, "h:1:a", ["clicks"], 1, lease=30) as (a, _, _):
        await until(lambda: a.running == {Unit("clicks", 0)}, timeout=2)
    assert await redis.hexists(names.WORKER_AGENTS, gone) == 0
