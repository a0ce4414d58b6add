"""Prometheus metrics of the web and worker processes, declared once, served at `GET /metrics`.

Each process serves its own registry (the default one, which also carries prometheus-client's
process metrics: resident memory, CPU, open files). The web server serves it on its own port; the
worker on `STREAMAPP_WORKER_METRICS_PORT`. Labels are bounded sets (routes, event types, tables,
agents), never values a client chooses.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import weakref

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

log = logging.getLogger(__name__)

disable_created_metrics()  # type: ignore[no-untyped-call] # a `_created` timestamp per series doubles the page and no dashboard reads it

# Web: the edge.
HTTP_REQUESTS = Counter("streamapp_http_requests", "HTTP requests answered, by route and status", ["route", "status"])
EVENTS = Counter(
    "streamapp_events", "Events received, by type and outcome (accepted, duplicate, rejected)", ["type", "outcome"]
)
REDIS_WRITE_SECONDS = Histogram(
    "streamapp_redis_write_seconds",
    "Latency of one group-commit flush into Redis",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
# Every web process samples the same streams: with several, the most recent sample is the figure.
BACKLOG = Gauge(
    "streamapp_backlog_events",
    "Events in the Redis streams that their slowest consumer has not handled, summed over streams",
    multiprocess_mode="mostrecent",
)
BACKLOG_BYTES = Gauge(
    "streamapp_backlog_bytes",
    "Bytes of events in the Redis streams that their slowest consumer has not handled, summed over streams",
    multiprocess_mode="mostrecent",
)
REDIS_MEMORY_BYTES = Gauge(
    "streamapp_redis_memory_bytes", "Redis's used_memory, as last sampled", multiprocess_mode="mostrecent"
)
REDIS_EVICTED_KEYS = Counter(
    "streamapp_redis_evicted_keys",
    "Keys Redis evicted at maxmemory (dedupe ids among them: a retried event may then be stored twice)",
)
DRAIN_RATE = Gauge(
    "streamapp_drain_events_per_second",
    "Events/s the workers removed from the backlog (a moving average over the last 30 s)",
    multiprocess_mode="mostrecent",
)

# Worker: the sink.
COMMIT_SECONDS = Histogram(
    "streamapp_commit_seconds",
    "Latency of one window's Iceberg commit (Parquet write included)",
    ["table"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ROWS_COMMITTED = Counter("streamapp_rows_committed", "Rows committed to Iceberg", ["table"])
COMMIT_CONFLICTS = Counter("streamapp_commit_conflicts", "Iceberg commits retried after a conflict", ["table"])
FRESHNESS_SECONDS = Histogram(
    "streamapp_freshness_seconds",
    "Commit time minus received_at of the oldest row of each window: how stale the freshest table data can be",
    ["table"],
    buckets=(0.1, 0.25, 0.5, 1, 1.5, 2, 5, 10, 15, 30, 60, 300, 3600),
)
DEAD_LETTERS = Counter(
    "streamapp_dead_letters", "Stream entries an agent could not turn into rows, kept in events.dead_letter", ["agent"]
)
REDIS_NOT_REPLICATED = Counter(
    "streamapp_redis_not_replicated",
    "Flushes answered 503 because fewer than STREAMAPP_REDIS_WAIT_REPLICAS replicas confirmed them in time",
)
REDIS_LOST_EVENTS = Counter(
    "streamapp_redis_lost_events",
    "Events a Redis that came back with older data no longer held, by stream and by the consumer that had not "
    'committed them (consumer "": gone from Redis, whether or not any consumer had them)',
    ["stream", "consumer"],
)
WINDOW_EVENTS = Histogram(
    "streamapp_window_events",
    "Events per window handed to an agent",
    ["agent"],
    buckets=(1, 10, 100, 1000, 10_000, 100_000),
)
UNITS_OWNED = Gauge(
    "streamapp_units_owned",
    "Work units (agent, shard) this worker holds the lease of (see streamapp.engine.leases)",
    multiprocess_mode="mostrecent",
)


class Children:
    """A labelled metric's children by label values, each looked up once: `labels()` takes a lock
    and builds the key on every call, which the ingest path would pay per request. The values
    must come from bounded sets, as every label's do."""

    def __init__(self, metric: Counter, *fixed: str) -> None:
        self._metric = metric
        self._fixed = fixed
        self._children: dict[tuple[object, ...], Counter] = {}

    def __call__(self, *values: object) -> Counter:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*self._fixed, *map(str, values))
        return child


class Tally:
    """Increments of a labelled counter kept in a dict and added to it in bulk (`flush_tallies`:
    every second, and before each scrape and at shutdown). For the per-request counts: with
    several web processes every `inc()` costs a getpid() syscall, a lock and an mmap write, ~5%
    of a web process's CPU under load."""

    def __init__(self, metric: Counter, *fixed: str) -> None:
        self._children = Children(metric, *fixed)
        self._counts: dict[tuple[object, ...], int] = {}
        _tallies.add(self)

    def add(self, *values: object, n: int = 1) -> None:
        self._counts[values] = self._counts.get(values, 0) + n

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        for values, n in counts.items():
            self._children(*values).inc(n)


_tallies: weakref.WeakSet[Tally] = weakref.WeakSet()


def flush_tallies() -> None:
    for tally in list(_tallies):
        tally.flush()


async def flush_tallies_every(seconds: float) -> None:
    """Until cancelled; flushes once more on the way out."""
    try:
        while True:
            await asyncio.sleep(seconds)
            flush_tallies()
    finally:
        flush_tallies()


_registry = REGISTRY


def count_across_processes() -> None:
    """Serve the sums of every web process's metrics (`streamapp.web.processes`): prometheus-client's
    multiprocess mode, whose files the parent's PROMETHEUS_MULTIPROC_DIR names. Its process_*
    figures (memory, CPU) are per process and are not reported then."""
    global _registry
    _registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(_registry)  # type: ignore[no-untyped-call]


async def metrics_view(request: web.Request) -> web.Response:
    flush_tallies()  # this process's own counts are exact; other web processes' lag by at most a second
    return web.Response(body=generate_latest(_registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve_metrics(host: str, port: int) -> web.AppRunner | None:
    """The worker's metrics endpoint. A port already taken (a second worker on this machine) turns
    metrics off for this process with an error in the log, rather than stopping the worker."""
    webapp = web.Application()
    webapp.router.add_get("/metrics", metrics_view)
    runner = web.AppRunner(webapp, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        # Bound and listening here, not by TCPSite: two workers starting together can both bind
        # (SO_REUSEADDR, neither listening yet), and uvloop swallows the loser's failed listen(),
        # which then crashed aiohttp with an AttributeError instead of an OSError.
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        await web.SockSite(runner, sock).start()
    except OSError as e:
        log.error(
            "worker metrics: cannot listen on %s:%d (%s); metrics are off in this worker. "
            "Set STREAMAPP_WORKER_METRICS_PORT to a free port, or 0 to turn them off.",
            host,
            port,
            e,
        )
        await runner.cleanup()
        return None
    log.info("worker: metrics on http://%s:%d/metrics", host, port)
    return runner
