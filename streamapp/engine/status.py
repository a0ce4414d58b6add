"""`python -m streamapp status`: how far each agent is behind its stream, and what each table holds.

An agent's lag is measured from what is durable: the mark its table committed with its last
position (`names.mark_property`: the stream's running totals at that entry) against the totals of
the stream's newest entry, in events and bytes; and in seconds, from the oldest entry it has not
committed yet (its Redis id is its arrival time) to now. A consumer registered in Redis that has
committed nothing yet is listed with its whole stream as lag. The tables' figures are their
current snapshots' summaries (no data file is read), so the command is cheap to run every minute.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from pyiceberg.catalog import Catalog
from pyiceberg.table import Table
from redis.exceptions import RedisError

from streamapp import names
from streamapp.entries import RUNNING_BYTES, RUNNING_COUNT, Mark, entry_id
from streamapp.lake.catalog import all_tables
from streamapp.redis_client import Client, text
from streamapp.tabular import text_table


@dataclass(frozen=True)
class AgentStatus:
    agent: str
    stream: str
    table: str | None  # None: registered in Redis, nothing committed yet
    position: str | None  # the last entry id its table holds
    lag_events: int | None  # None: unknown (Redis unreachable, or entries written before totals)
    lag_bytes: int | None
    lag_seconds: float | None  # age of the oldest entry it has not committed; 0 when none
    last_commit: str | None  # ISO time of its table's newest snapshot
    shard: int = 0  # of `stream` (`STREAMAPP_SHARDS`)


@dataclass(frozen=True)
class TableStatus:
    table: str
    rows: int
    files: int
    bytes: int
    snapshots: int
    last_commit: str | None
    complete_before: str | None  # aggregates: every window starting before this is final


@dataclass(frozen=True)
class StreamStatus:
    stream: str
    entries: int  # in Redis now (XLEN)
    events: int | None  # ever written to it (the newest entry's running count)
    newest: str | None  # the newest entry id


@dataclass(frozen=True)
class Status:
    agents: list[AgentStatus]
    tables: list[TableStatus]
    streams: list[StreamStatus]
    redis_error: str | None  # why Redis's half is missing

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _snapshot_time(table: Table) -> str | None:
    snapshot = table.current_snapshot()
    if snapshot is None:
        return None
    return datetime.fromtimestamp(snapshot.timestamp_ms / 1000, UTC).isoformat(timespec="seconds")


def table_status(table: Table) -> TableStatus:
    snapshot = table.current_snapshot()
    summary = snapshot.summary if snapshot is not None and snapshot.summary is not None else None

    def figure(key: str) -> int:
        value = summary.get(key) if summary is not None else None
        return int(value) if value else 0

    return TableStatus(
        table=".".join(table.name()),
        rows=figure("total-records"),
        files=figure("total-data-files"),
        bytes=figure("total-files-size"),
        snapshots=len(table.metadata.snapshots),
        last_commit=_snapshot_time(table),
        complete_before=table.properties.get(names.COMPLETE_BEFORE),
    )


def committed(tables: list[Table]) -> dict[tuple[str, str], tuple[Table, str, Mark | None]]:
    """(stream key, consumer) -> (its table, its position, the mark at the position)."""
    found: dict[tuple[str, str], tuple[Table, str, Mark | None]] = {}
    for table in tables:
        props = table.properties
        for prop, value in props.items():
            if (stream := names.position_stream(prop)) is None:
                continue
            consumer = prop.rpartition("|")[2]
            mark = props.get(names.mark_property(stream, consumer))
            found[(stream, consumer)] = (table, value, Mark.parse(mark) if mark else None)
    return found


async def _stream_figures(redis: Client, stream: str) -> tuple[StreamStatus, dict[str, Mark | None]]:
    """The stream's figures and the progress marks its consumers registered."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xlen(stream)
        pipe.xrevrange(stream, "+", "-", count=1)
        pipe.hgetall(names.progress(stream))
        length, newest, progress = await pipe.execute()
    events = None
    newest_id = None
    if newest:
        newest_id = text(newest[0][0])
        fields = {text(k): text(v) for k, v in newest[0][1].items()}
        events = int(fields[RUNNING_COUNT]) if RUNNING_COUNT in fields else None
    consumers = {text(k): Mark.parse(text(v)) for k, v in progress.items()}
    return StreamStatus(stream, int(length), events, newest_id), consumers


async def _totals_at(redis: Client, stream: str, position: str) -> tuple[int, int] | None:
    """The running totals of `stream` at entry `position`, where Redis still holds it."""
    entries: Any = await redis.xrange(stream, position, position, count=1)
    if not entries:
        return None
    fields = {text(k): text(v) for k, v in entries[0][1].items()}
    if RUNNING_COUNT not in fields or RUNNING_BYTES not in fields:
        return None
    return int(fields[RUNNING_COUNT]), int(fields[RUNNING_BYTES])


async def gather(
    catalog: Catalog, redis: Client, streams: list[str], now: float | None = None, tables: list[Table] | None = None
) -> Status:
    """Every figure of `status`: the tables from the catalog (in a thread), the streams' and the
    agents' from Redis; with Redis unreachable, what the tables alone tell. `tables`: the catalog's
    tables loaded already (the dashboard reads them once per refresh for its scans too)."""
    if tables is None:
        tables = await asyncio.to_thread(all_tables, catalog)
    table_figures = await asyncio.to_thread(lambda: [table_status(t) for t in tables])
    positions = committed(tables)
    now = time.time() if now is None else now
    keys = sorted(set(streams) | {stream for stream, _ in positions})
    stream_figures: list[StreamStatus] = []
    agents: list[AgentStatus] = []
    redis_error = None
    try:
        registered: dict[str, dict[str, Mark | None]] = {}
        for stream in keys:
            figures, registered[stream] = await _stream_figures(redis, stream)
            stream_figures.append(figures)
        by_stream = {s.stream: s for s in stream_figures}
        pairs = sorted(set(positions) | {(s, c) for s, consumers in registered.items() for c in consumers})
        for stream, consumer in pairs:
            agents.append(await _agent(redis, stream, consumer, positions.get((stream, consumer)), by_stream, now))
    except (RedisError, OSError) as e:
        redis_error = f"{type(e).__name__}: {e}"
        agents = [
            AgentStatus(
                consumer,
                names.type_of_stream(stream),
                ".".join(t.name()),
                position,
                None,
                None,
                None,
                _snapshot_time(t),
                names.shard_of_key(stream),
            )
            for (stream, consumer), (t, position, _) in sorted(positions.items())
        ]
        stream_figures = []
    return Status(agents, table_figures, stream_figures, redis_error)


async def _agent(
    redis: Client,
    stream: str,
    consumer: str,
    commit: tuple[Table, str, Mark | None] | None,
    by_stream: dict[str, StreamStatus],
    now: float,
) -> AgentStatus:
    figures = by_stream[stream]
    table, position, mark = commit if commit is not None else (None, None, None)
    # the first entry it has not committed: its id's time is when it arrived
    after: Any = await redis.xrange(stream, f"({position}" if position else "-", "+", count=1)
    lag_seconds = max(0.0, now - entry_id(text(after[0][0]))[0] / 1000) if after else 0.0
    lag_events = lag_bytes = None
    if figures.events is not None and figures.newest is not None:
        newest = await _totals_at(redis, stream, figures.newest)
        if mark is None and position is None:
            base: tuple[int, int] | None = (0, 0)  # nothing committed: the whole stream (as counted) is lag
        elif mark is not None:
            base = (mark.events, mark.bytes)
        else:
            base = await _totals_at(redis, stream, position) if position else None
        if newest is not None and base is not None:
            lag_events, lag_bytes = max(0, newest[0] - base[0]), max(0, newest[1] - base[1])
    if not after:
        lag_events, lag_bytes = 0, 0  # nothing after its position
    return AgentStatus(
        agent=consumer,
        stream=names.type_of_stream(stream),
        table=".".join(table.name()) if table is not None else None,
        position=position,
        lag_events=lag_events,
        lag_bytes=lag_bytes,
        lag_seconds=round(lag_seconds, 3),
        last_commit=_snapshot_time(table) if table is not None else None,
        shard=names.shard_of_key(stream),
    )


def _total(values: list[Any]) -> Any:
    return None if any(v is None for v in values) else sum(values)


def agents_per_stream(agents: list[AgentStatus]) -> list[tuple[AgentStatus, int]]:
    """Each agent's figures over the shards of its stream type, with how many shards: lag summed,
    the oldest lag in seconds, the oldest position (the least fresh shard), the last commit."""
    groups: dict[tuple[str, str], list[AgentStatus]] = {}
    for a in agents:
        groups.setdefault((a.agent, a.stream), []).append(a)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append((group[0], 1))
            continue
        positions = [a.position for a in group]
        commits = [a.last_commit for a in group if a.last_commit]
        merged = AgentStatus(
            agent=group[0].agent,
            stream=group[0].stream,
            table=next((a.table for a in group if a.table), None),
            position=None if None in positions else min(positions, key=lambda p: entry_id(p or "0-0")),
            lag_events=_total([a.lag_events for a in group]),
            lag_bytes=_total([a.lag_bytes for a in group]),
            lag_seconds=None if any(a.lag_seconds is None for a in group) else max(a.lag_seconds or 0 for a in group),
            last_commit=max(commits) if commits else None,
        )
        out.append((merged, len(group)))
    return out


def streams_per_type(streams: list[StreamStatus]) -> list[tuple[str, StreamStatus, int]]:
    """(event type, its shards' figures summed, how many shards) per stream type."""
    groups: dict[str, list[StreamStatus]] = {}
    for st in streams:
        groups.setdefault(names.type_of_stream(st.stream), []).append(st)
    out = []
    for kind, group in groups.items():
        newest = [st.newest for st in group if st.newest]
        merged = StreamStatus(
            stream=group[0].stream if len(group) == 1 else kind,
            entries=sum(st.entries for st in group),
            events=_total([st.events for st in group]),
            newest=max(newest, key=entry_id) if newest else None,
        )
        out.append((kind, merged, len(group)))
    return out


def render(status: Status) -> str:
    """The three parts as text tables; with shards, each agent and stream summed over its stream
    type's shards (`--json` has them one by one), with a column saying how many."""

    def known(value: Any, unit: str = "") -> str:
        return "?" if value is None else f"{value:,}{unit}" if isinstance(value, int) else f"{value}{unit}"

    parts = ["Agents (lag: what Redis holds past the position its table committed)"]
    if status.redis_error:
        parts.append(f"Redis unreachable ({status.redis_error}): lag unknown")
    agents = agents_per_stream(status.agents)
    shard_column = ["shards"] if any(n > 1 for _, n in agents) or any(a.shard for a in status.agents) else []
    parts.append(
        text_table(
            ["agent", "stream", *shard_column, "table", "lag events", "lag bytes", "lag seconds", "last commit"],
            [
                [
                    a.agent,
                    a.stream,
                    *([str(n)] if shard_column else []),
                    a.table or "(none yet)",
                    known(a.lag_events),
                    known(a.lag_bytes),
                    "?" if a.lag_seconds is None else f"{a.lag_seconds:.1f}",
                    a.last_commit or "-",
                ]
                for a, n in agents
            ],
            count=False,
        )
    )
    parts.append("Tables")
    parts.append(
        text_table(
            ["table", "rows", "files", "bytes", "snapshots", "last commit", "complete before"],
            [
                [
                    t.table,
                    f"{t.rows:,}",
                    f"{t.files:,}",
                    f"{t.bytes:,}",
                    str(t.snapshots),
                    t.last_commit or "-",
                    t.complete_before or "-",
                ]
                for t in status.tables
            ],
            count=False,
        )
    )
    if status.streams:
        streams = streams_per_type(status.streams)
        sharded = any(n > 1 for _, _, n in streams)
        parts.append("Streams in Redis")
        parts.append(
            text_table(
                ["stream", *(["shards"] if sharded else []), "entries", "events ever", "newest entry"],
                [
                    [kind, *([str(n)] if sharded else []), f"{s.entries:,}", known(s.events), s.newest or "-"]
                    for kind, s, n in streams
                ],
                count=False,
            )
        )
    return "\n".join(parts)
