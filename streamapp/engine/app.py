"""`App`: the registry of agents, streams, tables and pages, in the style of Faust.

    from streamapp import app
    from models.click import ClickEvent

    @app.agent(app.stream(ClickEvent))
    async def clicks(stream):
        async for window in stream.take(app.settings.window_count, within=app.settings.window_seconds):
            await app.table("events.clicks").append(window)

The worker (`python -m streamapp worker`) imports every module in `agents/`, runs each agent (once
per shard it owns, see `streamapp.engine.leases`) in its own task and restarts one that raises,
from its last committed position.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import pkgutil
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from streamapp.engine.reader import StreamInterrupted
from streamapp.engine.stream import Stream
from streamapp.model import Event, event_types
from streamapp.settings import Settings
from streamapp.table_model import TableModel

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog

    from streamapp.lake.sink import TableSink

log = logging.getLogger(__name__)

AgentFn = Callable[[Stream[Any]], Awaitable[None]]
F = TypeVar("F", bound=AgentFn)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)
MAX_RESTART_DELAY = 30.0


@dataclasses.dataclass
class Agent:
    name: str
    fn: AgentFn
    stream: Stream[Any]

    async def run(self, stopping: asyncio.Event, stream: Stream[Any] | None = None) -> None:
        """Run the agent on `stream` (default: its own, bound to shard 0) until `stopping` is set,
        restarting it with backoff when it raises.

        A raising agent has not acknowledged its window, so the restart receives it again: a
        failing sink is retried, never skipped. An agent that returns has finished its job on this
        shard (an aggregate reads every shard from its run on shard 0): it is not run again.
        """
        stream = stream or self.stream
        where = f"{self.name}" if stream.bound.shards == 1 else f"{self.name} (shard {stream.bound.shard})"
        delay = 1.0
        while not stopping.is_set():
            started = time.monotonic()
            try:
                await stream.register()
                await self.fn(stream)
                if not stopping.is_set():
                    log.info("agent %s returned: finished", where)
                return
            except asyncio.CancelledError:
                raise
            except StreamInterrupted as e:  # Redis went away: its return, not the agent, is awaited
                log.warning("agent %s: %s; restarting in 1s from its last committed position", where, e)
                await _wait(stopping, 1.0)
                continue
            except Exception as e:  # noqa: BLE001 - whatever the agent raised, it restarts
                error = e
            if time.monotonic() - started > 2 * MAX_RESTART_DELAY:
                delay = 1.0  # a failure after a long healthy run starts the backoff over
            log.warning(
                "agent %s failed; restarting in %.0fs from its last committed position",
                where,
                delay,
                exc_info=error,
            )
            await _wait(stopping, delay)
            delay = min(delay * 2, MAX_RESTART_DELAY)


async def _wait(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less when the worker stops."""
    try:
        await asyncio.wait_for(stopping.wait(), timeout=seconds)
    except TimeoutError:
        pass


def import_all(package: str) -> list[str]:
    """Import every module of `package` (e.g. "models", "agents"); returns their names."""
    pkg = importlib.import_module(package)
    names = [f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")]
    for name in names:
        importlib.import_module(name)
    return names


class App:
    """The application: what runs where. One instance, `streamapp.app`, serves a project."""

    def __init__(self, name: str = "streamapp", *, models: str = "models", agents: str = "agents") -> None:
        self.name = name
        self.models_package = models
        self.agents_package = agents
        self.agents: dict[str, Agent] = {}
        self.pages: list[tuple[str, str, Handler]] = []
        self._tables: dict[str, TableSink] = {}
        self._settings: Settings | None = None
        self.catalog: Catalog | None = None  # the Iceberg catalog, opened by the worker

    @property
    def settings(self) -> Settings:
        """The settings in force: `configure()`d ones, else the environment's (read once)."""
        if self._settings is None:
            self._settings = Settings.from_env()
        return self._settings

    def configure(self, settings: Settings) -> None:
        self._settings = settings

    def stream(self, model: TableModel) -> Stream[Any]:
        """The stream of one event type (or of `Rejected`), for an agent to consume."""
        return Stream(model)

    def agent(self, stream: Stream[Any], *, name: str | None = None) -> Callable[[F], F]:
        """Register an async function that consumes `stream`. Its name is its consumer identity:
        the committed position is kept per (stream, name), so renaming an agent starts it over."""

        def register(fn: F) -> F:
            agent_name = name or f"{fn.__module__}.{fn.__qualname__}"
            if agent_name in self.agents:
                raise ValueError(f"agent {agent_name!r} is registered twice")
            self.agents[agent_name] = Agent(agent_name, fn, stream)
            return fn

        return register

    def table(self, name: str) -> TableSink:
        """The Iceberg table `name` ("namespace.table"), to `append(window)` to."""
        if name not in self._tables:
            if self.catalog is None:
                raise RuntimeError("no catalog is open: run agents with `python -m streamapp worker`")
            from streamapp.lake.sink import TableSink  # pyiceberg: never in the web process (86 MB of RSS)

            self._tables[name] = TableSink(
                self.catalog,
                name,
                keep_snapshots=self.settings.keep_snapshots,
                max_files=self.settings.max_files_per_commit,
                crash_at=self.settings.crash_at,
                target_file_bytes=self.settings.target_file_bytes,
            )
        return self._tables[name]

    def page(self, path: str, method: str = "GET") -> Callable[[H], H]:
        """Register an aiohttp handler on the web server, as Faust's `app.page` does."""

        def register(handler: H) -> H:
            self.pages.append((method, path, handler))
            return handler

        return register

    def discover_models(self) -> dict[str, type[Event]]:
        """Every event type the models package declares, by its wire `type`."""
        import_all(self.models_package)
        return event_types()

    def discover_agents(self) -> dict[str, Agent]:
        import_all(self.agents_package)
        return self.agents
