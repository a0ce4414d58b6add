"""streamapp on a real Valkey Cluster (3 primaries, 3 replicas, `tests/cluster.py`): the pipeline
end to end, and a primary SIGKILLed under load, with and without `STREAMAPP_REDIS_WAIT_REPLICAS`.

The figures (failover time, events lost without WAIT) are printed (`pytest -s`) and recorded in
bench/RESULTS.md; the throughput cost of WAIT is bench/cluster.py's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import signal
import time
from collections import Counter

import aiohttp
import pytest

from streamapp import names
from streamapp.settings import Settings
from tests.cluster import Cluster, Node
from tests.conftest import check_redis, free_port, running_web, table_rows, wait_until
from tests.helpers import assert_exactly_once, clicks, send, wait_rows

AUTO_FAILOVER_SECONDS = 8.0  # then the test forces it (CLUSTER FAILOVER TAKEOVER) and says so
LAG = 1.0  # seconds the replica is paused (falls behind) before its primary is killed


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def make_settings(tmp_path, cluster):
    """Settings on the cluster, through a node that does not serve streamapp's slot (so every
    command first meets a MOVED), with an empty cluster and lake."""
    cluster.flush()
    home = cluster.owner(names.CHECKED)
    entry = next(n for n in cluster.live() if n is not home)

    def make(wait_replicas: int = 0) -> Settings:
        return Settings(
            port=free_port(),
            redis_url=entry.url,
            redis_cluster=True,
            redis_wait_replicas=wait_replicas,
            warehouse=tmp_path / "warehouse",
            window_count=1000,
            window_seconds=0.3,
            shutdown_seconds=10,
            worker_metrics_port=free_port(),
            web_processes=1,
        )

    return make


def worker_env(settings: Settings) -> dict[str, str]:
    return {"STREAMAPP_REDIS_CLUSTER": "1", "STREAMAPP_REDIS_WAIT_REPLICAS": str(settings.redis_wait_replicas)}


async def wait_ready(http: aiohttp.ClientSession, base: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with http.get(base + "/readyz") as r:
            if r.status == 200:
                return
        await asyncio.sleep(0.1)
    raise AssertionError("the web never became ready")


async def test_events_reach_iceberg_exactly_once_through_the_cluster(make_settings, spawn, http):
    settings = make_settings()
    spawn("worker", settings, **worker_env(settings))
    async with running_web(settings) as base:
        await wait_ready(http, base)
        events = clicks("c", 300)
        await send(http, base, events)
        await send(http, base, events[:100])  # retried: duplicates, stored once
        rows = await wait_rows(settings, "events.clicks", 300)
        await asyncio.sleep(1)  # a doubled window would land by now
        assert_exactly_once(table_rows(settings, "events.clicks"), {e["event_id"] for e in events})
        assert len(rows) == 300


async def test_shards_spread_over_the_primaries_and_take_events(make_settings, cluster, http):
    """`STREAMAPP_SHARDS=4`: each shard's keys share a hash tag, the tags' slots fall on every
    primary, one script per shard runs on its node, and each event is in its shard's stream once."""
    shards = 4
    settings = dataclasses.replace(make_settings(), shards=shards)
    owners = {shard: cluster.owner(names.stream("click", shard)) for shard in range(shards)}
    assert len({node.port for node in owners.values()}) == 3  # every primary holds a shard
    for shard, node in owners.items():  # a shard's keys are all on its node: one slot
        slots = {
            node.client().execute_command("CLUSTER", "KEYSLOT", k)
            for k in (names.checked(shard), names.stream("click", shard), names.dedupe_bucket(0, shard))
        }
        assert len(slots) == 1
    await asyncio.to_thread(check_redis, settings)
    async with running_web(settings) as base:
        await wait_ready(http, base)
        events = clicks("s", 400)
        await send(http, base, events)
        await send(http, base, events[:100])  # retried: found in the shards' dedupe sets
    stored: dict[int, list[str]] = {}
    for shard, node in owners.items():
        key = names.stream("click", shard)
        stored[shard] = [
            json.loads(line)["event_id"] for _, f in node.client().xrange(key) for line in f[b"e"].split(b"\n")
        ]
        assert all(names.shard_of(i, shards) == shard for i in stored[shard])
    assert sorted(i for ids in stored.values() for i in ids) == sorted(e["event_id"] for e in events)
    assert all(stored.values())


@dataclasses.dataclass
class Load:
    """Clients posting small batches of clicks, each retrying a batch until it is answered 202
    (as a tracker does), so every event is either answered 202 or still being retried at the end."""

    base: str
    tag: str
    acked: dict[str, float] = dataclasses.field(default_factory=dict)  # event_id -> when answered 202
    failures: Counter[str] = dataclasses.field(default_factory=Counter)
    stopping: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def client(self, http: aiohttp.ClientSession, n: int, batch: int = 5) -> None:
        seq = 0
        while not self.stopping.is_set():
            events = [{"type": "click", "x": 1, "y": 2, "event_id": f"{self.tag}-{n}-{seq + i}"} for i in range(batch)]
            seq += batch
            while not self.stopping.is_set():
                try:
                    async with http.post(
                        self.base + "/api/events",
                        data=json.dumps(events),
                        headers={"Content-Type": "application/json"},
                        timeout=aiohttp.ClientTimeout(total=10),
                    ) as r:
                        body = await r.json()
                        if r.status == 202:
                            assert body["accepted"] + body["duplicates"] == batch, body
                            now = time.monotonic()
                            self.acked.update((e["event_id"], now) for e in events)
                            break
                        assert r.status == 503, (r.status, body)  # never 500
                        self.failures[str(r.status)] += 1
                except (aiohttp.ClientError, TimeoutError) as e:
                    self.failures[type(e).__name__] += 1
                await asyncio.sleep(0.05)

    async def run(self, http: aiohttp.ClientSession, clients: int = 16) -> None:
        await asyncio.gather(*(self.client(http, n) for n in range(clients)))


def fail_over(cluster: Cluster, old: Node, replica: Node) -> tuple[float, bool]:
    """SIGKILL `old` (a primary) while its `replica` is paused (behind by what it missed), resume
    the replica, wait until it serves the slots. Returns (seconds from the kill to a cluster that
    is ok again, whether the failover had to be forced)."""
    killed = time.monotonic()
    old.kill()
    replica.resume()

    def promoted() -> bool:
        try:
            info = replica.client().cluster("info")
            return replica.role() == "master" and info["cluster_state"] == "ok"
        except Exception:  # noqa: BLE001 - the node is busy being elected
            return False

    forced = False
    try:
        wait_until(promoted, AUTO_FAILOVER_SECONDS, 0.02, "the replica to be promoted")
    except AssertionError:
        forced = True
        replica.client().execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
        wait_until(promoted, 20, 0.02, "the replica to be promoted after TAKEOVER")
    return time.monotonic() - killed, forced


def longest_gap(times: list[float], since: float) -> tuple[float, float]:
    """The longest time without a 202 from `since` on: (its length, when it ended)."""
    times = sorted(t for t in times if t >= since)
    gaps = [(b - a, b) for a, b in zip([since, *times], times, strict=False)]
    return max(gaps)


async def kill_primary_under_load(settings: Settings, cluster: Cluster, spawn, http, tag: str) -> dict:
    """Load; the replica of the primary serving streamapp's slot (SIGSTOP, its link cut) and the
    worker (SIGSTOP) fall LAG seconds behind; the primary is SIGKILLed and the replica, resumed,
    takes over; the killed node comes back as a replica; load on; stop. Returns what was acked
    and the timings."""
    old = cluster.owner(names.CHECKED)
    replica = cluster.replica_of(old)
    worker = spawn("worker", settings, **worker_env(settings))
    async with running_web(settings) as base:
        await wait_ready(http, base)
        load = Load(base, tag)
        running = asyncio.create_task(load.run(http))
        await asyncio.sleep(1.0)
        replica.pause()
        # and its link is cut, so what the primary writes from now on never reaches it (paused
        # alone, it would read the whole stream from its socket buffers when resumed)
        await asyncio.to_thread(old.client().execute_command, "CLIENT", "KILL", "TYPE", "replica")
        worker.signal(signal.SIGSTOP)  # the worker is behind too: what it has not committed is at stake
        paused = time.monotonic()
        await asyncio.sleep(LAG)
        before = len(load.acked)
        killed = time.monotonic()
        failover, forced = await asyncio.to_thread(fail_over, cluster, old, replica)
        worker.signal(signal.SIGCONT)
        # The promoted replica has no replica of its own: the killed node comes back as one (it
        # learns from the cluster that its slots moved), so WAIT 1 can be met again.
        await asyncio.to_thread(old.start)
        await asyncio.to_thread(wait_until, lambda: max(load.acked.values()) > killed, 30, 0.05, "a 202 again")
        await asyncio.sleep(1.5)
        load.stopping.set()
        await running
        await asyncio.to_thread(cluster.wait_ok)
    gone = re.search(r"Events gone from Redis: (\d+)", worker.output())
    outage, recovered = longest_gap(list(load.acked.values()), paused)
    return {
        "acked": set(load.acked),
        "acked_before_kill": before,
        "acked_while_behind": sum(paused <= t < killed for t in load.acked.values()),
        "acked_after_recovery": {i for i, t in load.acked.items() if t >= recovered},
        "failover_s": failover,
        "forced": forced,
        "ingest_outage_s": outage,
        "kill_to_202_s": recovered - killed,
        "gone_from_redis": int(gone.group(1)) if gone else 0,
        "failures": dict(load.failures),
    }


async def drained(settings: Settings, must: set[str], timeout: float = 40) -> list[dict]:
    """The rows of events.clicks once every id of `must` is there and a few windows passed."""

    def done() -> list[dict] | None:
        rows = table_rows(settings, "events.clicks")
        return rows if must <= {r["event_id"] for r in rows} else None

    await asyncio.to_thread(wait_until, done, timeout, 0.3, f"{len(must)} events in events.clicks")
    await asyncio.sleep(2)  # a doubled window would land by now
    return table_rows(settings, "events.clicks")


async def test_a_primary_killed_under_load_loses_nothing_answered_202_with_wait(make_settings, cluster, spawn, http):
    settings = make_settings(wait_replicas=1)
    run = await kill_primary_under_load(settings, cluster, spawn, http, "w1")
    rows = await drained(settings, run["acked"])
    counts = Counter(r["event_id"] for r in rows)
    doubled = sorted(i for i, n in counts.items() if n > 1)
    assert not doubled, doubled[:10]
    assert run["acked"] <= set(counts)  # every 202 is in Iceberg, exactly once
    assert run["acked_while_behind"] == 0  # nothing was answered 202 while the replica was behind
    print(
        f"\nWAIT=1: {len(run['acked'])} events answered 202 ({run['acked_before_kill']} before the kill), all in "
        f"Iceberg once ({len(counts) - len(run['acked'])} more rows of events whose 202 was not seen); failover "
        f"{run['failover_s']:.2f}s{' (forced)' if run['forced'] else ''}, from the kill to a 202 "
        f"{run['kill_to_202_s']:.2f}s, longest time without a 202 (the replica's lag included) "
        f"{run['ingest_outage_s']:.2f}s; events gone from Redis (the worker's check): {run['gone_from_redis']}; "
        f"non-202 answers {run['failures']}"
    )


async def test_a_primary_killed_under_load_without_wait_is_counted(make_settings, cluster, spawn, http):
    settings = make_settings(wait_replicas=0)
    run = await kill_primary_under_load(settings, cluster, spawn, http, "w0")
    # What was answered after the failover lands exactly once: the pipeline recovered.
    rows = await drained(settings, run["acked_after_recovery"])
    counts = Counter(r["event_id"] for r in rows)
    assert not any(counts[i] > 1 for i in run["acked_after_recovery"])
    lost = run["acked"] - set(counts)
    doubled = sorted(i for i, n in counts.items() if n > 1)
    assert run["acked_while_behind"] > 0  # without WAIT the primary answered on alone
    print(
        f"\nWAIT=0: {len(run['acked'])} events answered 202 ({run['acked_before_kill']} before the kill, "
        f"{run['acked_while_behind']} while the replica was {LAG:g}s behind); lost in "
        f"the failover: {len(lost)}; stored twice: {len(doubled)}; failover {run['failover_s']:.2f}s"
        f"{' (forced)' if run['forced'] else ''}, from the kill to a 202 {run['kill_to_202_s']:.2f}s; events "
        f"gone from Redis (the worker's check): {run['gone_from_redis']}; "
        f"non-202 answers {run['failures']}"
    )


async def test_wait_on_one_redis_answers_503_until_a_replica_has_the_events(settings, redis_server, tmp_path, http):
    """WAIT without a cluster: a Redis with no replica cannot confirm (503, nothing lost: the
    retry after a replica attached is a duplicate, answered 202); once one is attached, 202."""
    settings = dataclasses.replace(settings, redis_wait_replicas=1, redis_wait_ms=200)
    async with running_web(settings) as base:
        event = {"type": "click", "x": 1, "y": 2, "event_id": "w-1"}
        post = {"data": json.dumps(event), "headers": {"Content-Type": "application/json"}}
        async with http.post(base + "/api/events", **post) as r:
            body = await r.json()
            assert r.status == 503 and "not on enough replicas" in body["error"], body
        replica = Node(free_port(), tmp_path / "replica")
        replica.start_replica_of(redis_server.port)
        try:
            await asyncio.to_thread(
                wait_until, lambda: replica.info("replication")["master_link_status"] == "up", 20, 0.05, "sync"
            )
            async with http.post(base + "/api/events", **post) as r:
                assert r.status == 202 and await r.json() == {
                    "accepted": 0,
                    "duplicates": 1,
                    "rejected": 0,
                    "errors": [],
                }
            assert len(replica.client().xrange(names.stream("click"))) == 1  # the replica has it
        finally:
            replica.stop()
