"""The stream an agent consumes: `app.stream(Model)`, cut into windows by `take`, or keyed by
`group_by` for a windowed aggregate.

    @app.agent(app.stream(ClickEvent), name="clicks")
    async def clicks(stream):
        async for window in stream.take(app.settings.window_count, within=app.settings.window_seconds):
            await app.table(ClickEvent.table).append(window)

    @app.agent(app.stream(ClickEvent), name="clicks_per_minute")
    async def clicks_per_minute(stream):
        await stream.group_by(lambda e: e.page_url, column="page_url").tumbling(60).aggregate(
            "events.clicks_per_minute", clicks=count(), unique_users=distinct(lambda e: e.user_id))

The worker binds each agent's stream to Redis and one shard (`bind`) before it runs the agent: with
`STREAMAPP_SHARDS` > 1 the agent function runs once per shard it owns (`streamapp.engine.leases`),
each run with its own stream; reading itself is
`streamapp.engine.reader`'s job.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from streamapp import names
from streamapp.engine.aggregations import Aggregation
from streamapp.engine.reader import StreamReader
from streamapp.engine.windows import Hopping, Sessions, Tumbling
from streamapp.entries import Window
from streamapp.settings import Settings
from streamapp.table_model import TableModel

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog

    from streamapp.redis_client import Client

M = TypeVar("M")


@dataclass(frozen=True)
class Bound:
    """What the worker gives a stream before its agent runs."""

    reader: StreamReader
    settings: Settings
    catalog: Catalog | None  # for an aggregate's sink

    @property
    def shard(self) -> int:
        """The shard this run of the agent reads (0 to `shards` - 1)."""
        return self.reader.shard

    @property
    def shards(self) -> int:
        """How many shards each event type has (`STREAMAPP_SHARDS`)."""
        return self.settings.shards


class Stream(Generic[M]):
    """The events of one model (an `Event` subclass, or `Rejected`) for one agent."""

    def __init__(self, model: TableModel) -> None:
        self.model = model
        self.key = names.stream(model.type_name())
        self._bound: Bound | None = None

    def bind(
        self,
        redis: Client,
        consumer: str,
        stopping: asyncio.Event,
        *,
        settings: Settings,
        catalog: Catalog | None = None,
        shard: int = 0,
    ) -> None:
        """Called by the worker before the agent runs: where to read (`shard`), who reads (the
        agent's name), when to stop, and what an aggregate's sink needs (settings, catalog)."""
        if not 0 <= shard < settings.shards:
            raise ValueError(f"shard {shard} is not one of the {settings.shards} shards (STREAMAPP_SHARDS)")
        self.key = names.stream(self.model.type_name(), shard)
        reader = StreamReader(
            redis,
            self.model,
            consumer,
            stopping,
            window_bytes=settings.window_bytes,
            wait_replicas=settings.redis_wait_replicas,
            wait_ms=settings.redis_wait_ms,
            shard=shard,
        )
        self._bound = Bound(reader, settings, catalog)

    def fresh(self) -> Stream[M]:
        """A new, unbound stream of the same model: the worker gives each shard's run its own."""
        return Stream(self.model)

    @property
    def bound(self) -> Bound:
        if self._bound is None:
            raise RuntimeError("the stream is not bound: run agents with `python -m streamapp worker`")
        return self._bound

    @property
    def reader(self) -> StreamReader:
        return self.bound.reader

    @property
    def consumer(self) -> str:
        """The name of the agent reading this stream (set by the worker)."""
        return self.reader.consumer

    async def register(self) -> None:
        """At each (re)start of the agent: see `StreamReader.register`."""
        await self.reader.register()

    async def take(self, n: int, within: float) -> AsyncIterator[Window[M]]:
        """Windows of up to `n` events, each closed at most `within` seconds after its first event.

        A window also closes once its events' JSON holds `STREAMAPP_WINDOW_BYTES`. It is
        acknowledged when the agent asks for the next one. If the agent raises instead, the window
        is not acknowledged, and the agent's restart receives it again. On shutdown the open window
        is handed out early, so nothing read is held back.
        """
        reader = self.reader
        async for window in reader.windows(reader.acked, n, within, prefetch=True):
            yield window
            await reader.ack(window.last_id, window.last)

    def group_by(self, key: Callable[[M], str | None], *, column: str) -> GroupBy[M]:
        """Key the events for a windowed aggregate; `column` names the key's column in its table."""
        return GroupBy(self, key, column)


@dataclass
class GroupBy(Generic[M]):
    """`stream.group_by(key, column=...)`: the events of a stream by a string key."""

    stream: Stream[M]
    key: Callable[[M], str | None]
    column: str

    def tumbling(self, size: float, grace: float | None = None) -> Windowed[M]:
        """Back-to-back windows of `size` seconds; `grace`: allowed lateness (default
        `STREAMAPP_GRACE_SECONDS`)."""
        return Windowed(self, Tumbling(size), grace)

    def hopping(self, size: float, step: float, grace: float | None = None) -> Windowed[M]:
        """Windows of `size` seconds starting every `step` seconds."""
        return Windowed(self, Hopping(size, step), grace)

    def session(self, gap: float, grace: float | None = None) -> Windowed[M]:
        """Per key, a window of events less than `gap` seconds apart: `[first, last + gap)`."""
        return Windowed(self, Sessions(gap), grace)


@dataclass
class Windowed(Generic[M]):
    """Keyed events in event-time windows, ready to `aggregate` into a table."""

    group: GroupBy[M]
    windows: Tumbling | Hopping | Sessions
    grace: float | None

    async def aggregate(self, table: str, *, keep: float = 0.0, **aggs: Aggregation[Any]) -> None:
        """Run until the worker stops: one row per (window, key) into `table` (created with
        `window_start`, `window_end`, the key column and one column per aggregation, partitioned
        by day(window_start)), written when the watermark passes the window's end, exactly once.
        Late events update their window for `keep` seconds after it closed, then go to
        `events.late` (see `streamapp.engine.aggregator`); session windows take no `keep`.
        With shards, the agent's run on shard 0 reads every shard (`streamapp.engine.shards`);
        its runs on the others return at once."""
        if not aggs:
            raise ValueError("aggregate() needs at least one column, e.g. clicks=count()")
        if keep < 0:
            raise ValueError("keep must be >= 0")
        if keep and isinstance(self.windows, Sessions):
            raise ValueError("session windows are never rewritten: late events go to events.late (keep=0)")
        bound = self.group.stream.bound
        if bound.shard != 0:
            return  # the events of a key are on every shard: the run on shard 0 reads them all
        if bound.catalog is None:
            raise RuntimeError("an aggregate needs the Iceberg catalog: run agents with `python -m streamapp worker`")
        # pyiceberg: loaded by the worker that runs this, never by the web process (86 MB of RSS)
        from streamapp.engine.aggregate_loop import run_aggregate

        grace = bound.settings.grace_seconds if self.grace is None else self.grace
        await run_aggregate(
            bound.reader,
            bound.catalog,
            bound.settings,
            key=self.group.key,
            column=self.group.column,
            windows=self.windows,
            grace=grace,
            table=table,
            keep=keep,
            aggs=aggs,
            shards=bound.shards,
        )
