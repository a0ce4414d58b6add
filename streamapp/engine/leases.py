"""Which worker runs which work unit, an (agent, shard): leases in Redis.

Every worker runs the same loop every `STREAMAPP_LEASE_SECONDS` / 3:
- heartbeat: it writes its id with an expiry into `names.WORKERS` (and the agents it runs into
  `names.WORKER_AGENTS`), drops the workers whose expiry passed (by the server's clock: machines'
  clocks may differ), and reads who is alive;
- share (`quotas`): each agent's shards spread evenly over the live workers that run it;
- renew its leases (a script compares the owner, so nobody renews or deletes another's lease),
  take free units up to its share (SET NX PX), release what is above it gracefully (that run stops
  as on SIGTERM, its open window committed, then the lease is deleted, so another takes it at once).

A renewal that fails (the lease expired and another worker took it, or Redis did not answer for a
whole lease) stops that run at once. A worker stopping (SIGTERM) stops its runs gracefully, then
deletes its leases. A worker that died on this host (its pid is gone) is dropped by the others
right away, not after a lease: a restarted worker picks up where the dead one stopped.

Exactly-once never rests on the lease: a sink commits only if the shard's position in Iceberg is
the one it read (compare-and-set, `streamapp.lake.sink`), so a worker that lost its lease while
paused or cut off doubles nothing; the lease only keeps two workers from doing the same work.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable

from streamapp import metrics, names
from streamapp.redis_client import FAILURES, Client, text

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, order=True)
class Unit:
    """One agent on one shard: what one worker runs at a time."""

    agent: str
    shard: int

    def __str__(self) -> str:
        return f"{self.agent}/{self.shard}"


def worker_id() -> str:
    """host:pid:random: unique, and telling whether a worker of this host is still alive."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def quotas(shards: int, workers: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """agent -> worker -> how many of the agent's `shards` units that worker should own, for the
    live `workers` (id -> the agents it runs; `--only` may differ between workers). The same answer
    in every worker that sees the same workers. Each agent's shards go evenly to the workers that
    run it; one left over goes to the worker with the fewest units so far (ties: the lowest id), so
    that agents of one shard spread over the workers too."""
    runs: dict[str, list[str]] = {}
    for worker in sorted(workers):
        for agent in workers[worker]:
            runs.setdefault(agent, []).append(worker)
    total = dict.fromkeys(workers, 0)
    out: dict[str, dict[str, int]] = {}
    for agent in sorted(runs):
        eligible = runs[agent]
        base, extra = divmod(shards, len(eligible))
        share = dict.fromkeys(eligible, base)
        for worker in sorted(eligible, key=lambda w: (total[w], w))[:extra]:
            share[worker] += 1
        for worker in eligible:
            total[worker] += share[worker]
        out[agent] = share
    return out


# KEYS: WORKERS, WORKER_AGENTS. ARGV: me, lease ms, my agents. Returns the live workers' agents.
_HEARTBEAT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('ZREM', KEYS[1], gone)
  redis.call('HDEL', KEYS[2], gone)
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return redis.call('HGETALL', KEYS[2])
"""
# KEYS: lease keys. ARGV: me, lease ms. Returns 1 per lease still mine (renewed), else 0.
_RENEW_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
# KEYS: lease keys. ARGV: owner. Deletes those `owner` holds; returns how many.
_RELEASE_LUA = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    n = n + redis.call('DEL', key)
  end
end
return n
"""


class Leases:
    """The lease operations of worker `me`, which runs `agents`, through `redis`."""

    def __init__(self, redis: Client, me: str, agents: list[str], lease_seconds: float) -> None:
        self.redis, self.me, self.agents = redis, me, sorted(agents)
        self.lease_ms = max(1, int(lease_seconds * 1000))

    async def heartbeat(self) -> dict[str, list[str]]:
        """Say this worker is alive for one more lease; the live workers and the agents they run."""
        reply = await self.redis.eval(  # type: ignore[misc,unused-ignore]
            _HEARTBEAT_LUA, 2, names.WORKERS, names.WORKER_AGENTS, self.me, self.lease_ms, ",".join(self.agents)
        )
        flat = [text(v) for v in reply]
        return {flat[i]: [a for a in flat[i + 1].split(",") if a] for i in range(0, len(flat), 2)}

    async def acquire(self, unit: Unit) -> bool:
        return bool(await self.redis.set(names.lease(unit.agent, unit.shard), self.me, nx=True, px=self.lease_ms))

    async def renew(self, units: list[Unit]) -> list[bool]:
        """Extend the leases on `units` this worker still holds; False for each it does not."""
        if not units:
            return []
        keys = [names.lease(u.agent, u.shard) for u in units]
        reply = await self.redis.eval(_RENEW_LUA, len(keys), *keys, self.me, self.lease_ms)  # type: ignore[misc,unused-ignore]
        return [bool(int(v)) for v in reply]

    async def release(self, units: list[Unit], owner: str | None = None) -> int:
        """Delete the leases on `units` that `owner` (default: this worker) holds."""
        if not units:
            return 0
        keys = [names.lease(u.agent, u.shard) for u in units]
        return int(await self.redis.eval(_RELEASE_LUA, len(keys), *keys, owner or self.me))  # type: ignore[misc,unused-ignore]

    async def owner(self, unit: Unit) -> str | None:
        value = await self.redis.get(names.lease(unit.agent, unit.shard))
        return None if value is None else text(value)

    async def leave(self, worker: str | None = None) -> None:
        """Take `worker` (default: this one) off the live workers: the share is recomputed now."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(names.WORKERS, worker or self.me)
            pipe.hdel(names.WORKER_AGENTS, worker or self.me)
            await pipe.execute()

    async def reap(self, live: dict[str, list[str]], shards: int) -> dict[str, list[str]]:
        """Drop the workers of this host whose process is gone (killed, crashed) and their leases:
        their units go to the living now, not after a lease. `live` without them."""
        host = socket.gethostname()
        for worker in list(live):
            w_host, pid, _ = [*worker.rsplit(":", 2), "", ""][:3]
            if worker == self.me or w_host != host or _alive(pid):
                continue
            units = [Unit(agent, shard) for agent in live[worker] for shard in range(shards)]
            await self.release(units, owner=worker)
            await self.leave(worker)
            log.info("leases: worker %s is gone (no process %s on this host); its units are free", worker, pid)
            del live[worker]
        return live


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True  # another user's process, or not an id of ours: leave it to its lease
    return True


@dataclasses.dataclass
class _Run:
    task: asyncio.Task[None]
    stop: asyncio.Event  # set: the run flushes its open window and returns
    renewed: float  # time.monotonic() before the last renewal that succeeded
    releasing: asyncio.Task[None] | None = None


Start = Callable[[Unit, asyncio.Event], Awaitable[None]]


class Owner:
    """Keeps this worker's share of `units` running: `start(unit, stop)` runs one until `stop` is
    set (then flushes and returns) or it is cancelled (the lease was lost)."""

    def __init__(self, leases: Leases, shards: int, start: Start, *, lease_seconds: float, shutdown_seconds: float):
        self.leases, self.shards, self.start = leases, shards, start
        self.lease_seconds, self.shutdown_seconds = lease_seconds, shutdown_seconds
        self.every = lease_seconds / 3
        self.runs: dict[Unit, _Run] = {}
        self.lost: set[asyncio.Task[None]] = set()  # runs cancelled, maybe not finished yet
        self.failing = False  # Redis did not answer the last round (warn once, not each round)

    @property
    def units(self) -> list[Unit]:
        return [Unit(a, s) for a in self.leases.agents for s in range(self.shards)]

    async def run(self, stopping: asyncio.Event) -> None:
        """Until `stopping`: a round every lease / 3. Then stop every run gracefully (renewing
        while they flush), and release every lease so that the other workers take over now."""
        try:
            while not stopping.is_set():
                await self._round()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), timeout=self.every)
            for run in self.runs.values():
                run.stop.set()
            deadline = time.monotonic() + self.shutdown_seconds
            while (busy := [r.task for r in self.runs.values() if not r.task.done()]) and time.monotonic() < deadline:
                await asyncio.wait(busy, timeout=min(self.every, max(0.0, deadline - time.monotonic())))
                with contextlib.suppress(*FAILURES):
                    await self._renew()
            for unit, run in self.runs.items():
                if not run.task.done():
                    log.warning("leases: %s did not stop in time; cancelling (its window will be redelivered)", unit)
                    run.task.cancel()
        finally:
            tasks = [r.task for r in self.runs.values()] + [r.releasing for r in self.runs.values() if r.releasing]
            tasks += self.lost
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(*FAILURES):
                await self.leases.release(list(self.runs))
                await self.leases.leave()
                if self.runs:
                    log.info("leases: released %s", ", ".join(map(str, sorted(self.runs))))
            self.runs.clear()
            metrics.UNITS_OWNED.set(0)

    async def _round(self) -> None:
        try:
            live = await self.leases.heartbeat()
            live = await self.leases.reap(live, self.shards)
            await self._renew()
            await self._balance(live)
            if self.failing:
                log.info("leases: Redis answers again")
            self.failing = False
        except FAILURES as e:
            if not self.failing:
                log.warning("leases: Redis does not answer (%s); runs stop once their lease has passed", e)
            self.failing = True
            for unit, run in list(self.runs.items()):
                if time.monotonic() - run.renewed > self.lease_seconds:
                    self._lose(unit, "not renewed for a whole lease")
        metrics.UNITS_OWNED.set(len(self.runs))

    async def _renew(self) -> None:
        units = list(self.runs)
        sent = time.monotonic()
        for unit, held in zip(units, await self.leases.renew(units), strict=True):
            if unit not in self.runs:
                continue  # released meanwhile
            if held:
                self.runs[unit].renewed = sent
            else:
                self._lose(unit, "its lease expired and another worker holds it")

    async def _balance(self, live: dict[str, list[str]]) -> None:
        share = quotas(self.shards, live)
        me = self.leases.me
        for agent in self.leases.agents:
            want = share.get(agent, {}).get(me, 0)
            mine = sorted(u for u, r in self.runs.items() if u.agent == agent and r.releasing is None)
            for unit in mine[want:]:
                self._release(unit)
            if len(mine) >= want:
                continue
            # start looking at this worker's place among the agent's workers: fewer collisions
            eligible = sorted(w for w, agents in live.items() if agent in agents)
            first = eligible.index(me) * self.shards // len(eligible) if me in eligible else 0
            held = len(mine)
            for i in range(self.shards):
                unit = Unit(agent, (first + i) % self.shards)
                if held >= want:
                    break
                if unit in self.runs:
                    continue
                sent = time.monotonic()
                if await self.leases.acquire(unit):
                    held += 1
                    self._start(unit, sent)

    def _start(self, unit: Unit, renewed: float) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(self._guarded(unit, stop), name=f"agent:{unit}")
        self.runs[unit] = _Run(task, stop, renewed)
        log.info("leases: acquired %s (%d units here)", unit, len(self.runs))

    async def _guarded(self, unit: Unit, stop: asyncio.Event) -> None:
        try:
            await self.start(unit, stop)
        except Exception:
            log.exception("leases: the run of %s failed", unit)  # kept: the lease stays, nothing restarts it

    def _release(self, unit: Unit) -> None:
        """Above this worker's share: stop the run gracefully, then give the lease up."""
        run = self.runs[unit]
        run.stop.set()
        run.releasing = asyncio.create_task(self._hand_over(unit, run), name=f"release:{unit}")

    async def _hand_over(self, unit: Unit, run: _Run) -> None:
        done, _ = await asyncio.wait([run.task], timeout=self.shutdown_seconds)
        if not done:
            log.warning("leases: %s did not stop in time; cancelling (its window will be redelivered)", unit)
            run.task.cancel()
            await asyncio.gather(run.task, return_exceptions=True)
        try:
            await self.leases.release([unit])
        except FAILURES as e:
            log.warning("leases: could not release %s (%s); it frees itself in %.0fs", unit, e, self.lease_seconds)
        if self.runs.get(unit) is run:
            del self.runs[unit]
        metrics.UNITS_OWNED.set(len(self.runs))
        log.info("leases: released %s (%d units here)", unit, len(self.runs))

    def _lose(self, unit: Unit, why: str) -> None:
        """The lease is gone: stop at once, another worker may already run the unit."""
        run = self.runs.pop(unit)
        for task in (run.task, run.releasing):
            if task is not None and not task.done():
                task.cancel()
                self.lost.add(task)
                task.add_done_callback(self.lost.discard)
        log.warning("leases: lost %s (%s); its run is cancelled", unit, why)
