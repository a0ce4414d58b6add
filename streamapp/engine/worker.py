"""The worker process: create tables, run its share of the agents' shards (each (agent, shard) held
by one worker at a time through a lease, `streamapp.engine.leases`), trim what all consumers
committed, check
Redis against the lake after each of its starts (`streamapp.engine.recovery`), remove orphan files
and old metadata (`streamapp.lake.maintain`), stop gracefully on SIGTERM (open windows are flushed
and committed, then the process exits)."""

from __future__ import annotations

import asyncio
import logging
import signal

from pyiceberg.catalog import Catalog
from pyiceberg.table import Table

from streamapp import names
from streamapp.engine.app import Agent, App
from streamapp.engine.leases import Leases, Owner, Unit, worker_id
from streamapp.engine.recovery import keep_checked
from streamapp.entries import Mark, entry_id
from streamapp.lake.catalog import ensure_table, open_catalog
from streamapp.lake.maintain import keep_clean
from streamapp.lake.retention import keep_retention
from streamapp.metrics import serve_metrics
from streamapp.redis_client import FAILURES, Client, lease_client, reader_client, text
from streamapp.rejected import Rejected
from streamapp.table_model import TableModel

log = logging.getLogger(__name__)

TRIM_EVERY_SECONDS = 5.0


def create_tables(app: App, catalog: Catalog) -> list[Table]:
    """Create (or evolve) the table of every declared model and of rejected events."""
    models: list[TableModel] = [*app.discover_models().values(), Rejected]
    return [ensure_table(catalog, model) for model in models]


async def trim_streams(redis: Client, shards: int = 1) -> dict[str, str]:
    """Trim each stream of every shard below the lowest position any of its consumers committed.

    Never MAXLEN: that drops entries no one has read. A stream whose consumer never committed
    keeps everything, which is the safe side of a forgotten agent (or of a shard no worker owns).
    """
    lowest: dict[str, str] = {}
    for shard in range(shards):
        for field, value in (await redis.hgetall(names.acks(shard))).items():
            stream, _, _consumer = text(field).rpartition("|")
            pos = text(value)
            if stream not in lowest or entry_id(pos) < entry_id(lowest[stream]):
                lowest[stream] = pos
    for stream, pos in lowest.items():
        if pos != "0-0":
            await redis.xtrim(stream, minid=pos, approximate=False)
    return lowest


async def _trimmer(redis: Client, shards: int, stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        try:
            await trim_streams(redis, shards)
        except FAILURES as e:
            log.warning("trimming streams failed: %s", e)
        try:
            await asyncio.wait_for(stopping.wait(), timeout=TRIM_EVERY_SECONDS)
        except TimeoutError:
            pass


async def _hold_places(redis: Client, agents: list[Agent], shards: int, stopping: asyncio.Event) -> None:
    """Register every agent on every shard, whichever worker runs it (maybe none yet), retrying
    while Redis (or a cluster failing over) does not answer, rather than exiting."""
    while not stopping.is_set():
        try:
            for agent in agents:
                for shard in range(shards):
                    key = names.stream(agent.stream.model.type_name(), shard)
                    await redis.hsetnx(names.acks(shard), names.ack_field(key, agent.name), "0-0")
                    await redis.hsetnx(names.progress(key), agent.name, str(Mark("0-0", 0, 0)))
            return
        except FAILURES as e:
            log.warning("worker: Redis does not answer (%s); again in 1s", e)
            try:
                await asyncio.wait_for(stopping.wait(), timeout=1.0)
            except TimeoutError:
                pass


async def run_worker(app: App, only: list[str] | None = None) -> None:
    """Run every agent, or those named in `only` (so that agents can share the load across
    processes: each worker is a process with its own interpreter lock)."""
    settings = app.settings
    agents = app.discover_agents()
    if not agents:
        raise SystemExit(f"no agents found in package {app.agents_package!r}")
    every = list(agents.values())
    if only:
        unknown = sorted(set(only) - set(agents))
        if unknown:
            raise SystemExit(f"no agent named {', '.join(unknown)}; the agents are {', '.join(agents)}")
        agents = {name: agent for name, agent in agents.items() if name in only}
    app.catalog = catalog = await asyncio.to_thread(open_catalog, settings)  # connects: not on the loop
    tables = await asyncio.to_thread(create_tables, app, catalog)
    log.info("worker: tables %s ready; agents %s", ", ".join(".".join(t.name()) for t in tables), ", ".join(agents))

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    metrics_server = (
        await serve_metrics(settings.host, settings.worker_metrics_port) if settings.worker_metrics_port else None
    )
    redis = await asyncio.to_thread(reader_client, settings)  # may read the password file
    # Every agent on every shard holds its place in the trim from here on, even before a worker
    # first runs it: this one's trimmer must not drop what they have not read.
    await _hold_places(redis, every, settings.shards, stopping)

    async def start(unit: Unit, stop: asyncio.Event) -> None:
        agent = agents[unit.agent]
        stream = agent.stream.fresh()  # one per run: runs of several shards read side by side
        stream.bind(redis, agent.name, stop, settings=settings, catalog=catalog, shard=unit.shard)
        await agent.run(stop, stream)

    leases_redis = await asyncio.to_thread(lease_client, settings)
    leases = Leases(leases_redis, worker_id(), list(agents), settings.lease_seconds)
    owner = Owner(
        leases, settings.shards, start, lease_seconds=settings.lease_seconds, shutdown_seconds=settings.shutdown_seconds
    )
    log.info("worker: %s, lease %.0fs, %d shards", leases.me, settings.lease_seconds, settings.shards)
    tasks = [asyncio.create_task(owner.run(stopping), name="leases")]
    tasks.append(asyncio.create_task(_trimmer(redis, settings.shards, stopping), name="trimmer"))
    retention = keep_retention(catalog, settings.retention, settings.keep_snapshots, stopping)
    tasks.append(asyncio.create_task(retention, name="retention"))
    tasks.append(
        asyncio.create_task(
            keep_checked(redis, catalog, settings.shards, stopping, settings.crash_at), name="redis-check"
        )
    )
    tasks.append(asyncio.create_task(keep_clean(catalog, settings, stopping), name="storage-upkeep"))
    try:
        await stopping.wait()
        log.info("worker: stopping; flushing open windows (up to %.0fs)", settings.shutdown_seconds)
        # the leases' task stops the runs within shutdown_seconds, then gives the leases up
        _, late = await asyncio.wait(tasks, timeout=settings.shutdown_seconds + 2)
        for task in late:
            log.warning("worker: %s did not stop in time; cancelling (its window will be redelivered)", task.get_name())
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await redis.aclose()
        await leases_redis.aclose()
        if metrics_server is not None:
            await metrics_server.cleanup()
    log.info("worker: stopped")
