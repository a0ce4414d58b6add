"""The dashboard's figures, gathered at most once per `CACHE_SECONDS` however many pages poll.

One refresh loads every table's metadata once (for `streamapp.engine.status.gather`: lag, backlog,
per-table rows, files and last commit) and reads two small scans, both filtered on their tables'
partition column so only recent files are read: the last hour of `events.clicks_per_minute`, and
the last `HEATMAP_CLICKS` clicks of one page from the last day of `events.clicks`. Events per
second come from the streams' running totals (one Redis entry per stream), sampled at each refresh
and kept here for `HISTORY` samples: the chart starts when the process does.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.catalog import Catalog
from pyiceberg.expressions import And, EqualTo, GreaterThanOrEqual, Reference
from pyiceberg.expressions.literals import literal
from pyiceberg.table import Table

from streamapp.engine.status import Status, agents_per_stream, gather, streams_per_type
from streamapp.entries import entry_id
from streamapp.lake.catalog import all_tables
from streamapp.redis_client import Client

CACHE_SECONDS = 2.0  # a refresh serves every viewer for this long
HISTORY = 300  # events/s samples kept: 10 minutes at one refresh per 2 s
CLICKS_TABLE = "events.clicks"
PER_MINUTE_TABLE = "events.clicks_per_minute"
PER_MINUTE_SPAN = timedelta(hours=1)
HEATMAP_CLICKS = 2000  # the heatmap shows this page's latest clicks...
HEATMAP_SPAN = timedelta(days=1)  # ...of the last day (so only that day's partitions are read)
HEATMAP_COLUMNS = 40  # grid cells across; square cells, as many rows as the clicks reach
HEATMAP_MAX_ROWS = 120
MAX_PAGE_CHARS = 2048
MAX_CACHED_PAGES = 64


def _iso(t: datetime | float | None) -> str | None:
    if t is None:
        return None
    if isinstance(t, float | int):
        t = datetime.fromtimestamp(t, UTC)
    return t.astimezone(UTC).isoformat(timespec="seconds")


def per_minute(table: Table | None, now: datetime) -> dict[str, Any]:
    """Clicks per minute per page over the last hour: {"minutes": [iso...], "pages": {page: [n...]}},
    pages by their clicks, most first. A page of null is "" (clicks with no page_url)."""
    since = (now - PER_MINUTE_SPAN).replace(second=0, microsecond=0)
    minutes = [since + timedelta(minutes=i) for i in range(int(PER_MINUTE_SPAN.total_seconds() // 60) + 1)]
    index = {m: i for i, m in enumerate(minutes)}
    pages: dict[str, list[int]] = {}
    if table is not None:
        rows = table.scan(
            row_filter=GreaterThanOrEqual(term=Reference("window_start"), value=literal(since.isoformat())),
            selected_fields=("window_start", "page_url", "clicks"),
        ).to_arrow()
        for r in rows.to_pylist():
            i = index.get(r["window_start"])
            if i is not None:
                pages.setdefault(r["page_url"] or "", [0] * len(minutes))[i] += r["clicks"]
    ordered = dict(sorted(pages.items(), key=lambda kv: (-sum(kv[1]), kv[0])))
    return {"minutes": [_iso(m) for m in minutes], "pages": ordered}


def heatmap(table: Table | None, page: str, now: datetime) -> dict[str, Any]:
    """The latest clicks of `page` binned into square cells of document pixels: sparse
    [column, row, clicks] triples, the cell size and the grid's extent."""
    empty: dict[str, Any] = {"page": page, "clicks": 0, "cell": 0, "columns": 0, "rows": 0, "cells": [], "max": 0}
    if table is None or not page:
        return empty
    scan = table.scan(
        row_filter=And(
            GreaterThanOrEqual(term=Reference("event_time"), value=literal((now - HEATMAP_SPAN).isoformat())),
            EqualTo(term=Reference("page_url"), value=literal(page)),
        ),
        selected_fields=("event_time", "x", "y"),
    ).to_arrow()
    if scan.num_rows == 0:
        return empty
    if scan.num_rows > HEATMAP_CLICKS:
        scan = scan.sort_by([("event_time", "descending")]).slice(0, HEATMAP_CLICKS)
    xs = pc.max_element_wise(scan["x"], pa.scalar(0, pa.int32()))  # off-page (negative) clicks at the edge
    ys = pc.max_element_wise(scan["y"], pa.scalar(0, pa.int32()))
    width, height = int(pc.max(xs).as_py()) + 1, int(pc.max(ys).as_py()) + 1
    cell = max(1, math.ceil(width / HEATMAP_COLUMNS), math.ceil(height / HEATMAP_MAX_ROWS))
    counts: dict[tuple[int, int], int] = {}
    for x, y in zip(xs.to_pylist(), ys.to_pylist(), strict=True):
        key = (x // cell, y // cell)
        counts[key] = counts.get(key, 0) + 1
    return {
        "page": page,
        "clicks": scan.num_rows,
        "cell": cell,
        "columns": math.ceil(width / cell),
        "rows": math.ceil(height / cell),
        "cells": [[c, r, n] for (c, r), n in sorted(counts.items())],
        "max": max(counts.values()),
    }


def rates(history: deque[tuple[float, dict[str, int]]]) -> dict[str, list[list[float]]]:
    """Events per second per event type between consecutive samples: [[epoch seconds, rate]...]."""
    series: dict[str, list[list[float]]] = {}
    samples = list(history)
    for (t0, before), (t1, after) in itertools.pairwise(samples):
        for kind, total in after.items():
            previous = before.get(kind)
            if previous is not None and total >= previous and t1 > t0:  # a smaller total: Redis was reset
                series.setdefault(kind, []).append([round(t1, 3), round((total - previous) / (t1 - t0), 3)])
    return series


class Dashboard:
    """What `/api/dashboard` answers, cached: one refresh at a time, shared by every viewer."""

    def __init__(self, catalog: Catalog, redis: Client, streams: list[str]) -> None:
        self.catalog = catalog
        self.redis = redis
        self.streams = streams
        self.refreshes = 0
        self._history: deque[tuple[float, dict[str, int]]] = deque(maxlen=HISTORY)
        self._lock = asyncio.Lock()
        self._overview: tuple[float, dict[str, Any], dict[str, Table]] | None = None
        self._heatmaps: dict[str, dict[str, Any]] = {}  # by page, for the current refresh

    async def figures(self, page: str | None = None) -> dict[str, Any]:
        """Every figure, with the heatmap of `page` (default: the page with most clicks this hour)."""
        async with self._lock:
            now = time.time()
            if self._overview is None or now - self._overview[0] >= CACHE_SECONDS:
                self._overview = (now, *(await self._refresh(now)))
                self._heatmaps.clear()
            at, overview, tables = self._overview
            pages = list(overview["clicks_per_minute"]["pages"])
            chosen = page if page is not None else next((p for p in pages if p), "")
            if len(self._heatmaps) >= MAX_CACHED_PAGES:  # many pages asked for within one refresh
                self._heatmaps.clear()
            if chosen not in self._heatmaps:
                clicks = tables.get(CLICKS_TABLE)
                when = datetime.fromtimestamp(at, UTC)
                self._heatmaps[chosen] = await asyncio.to_thread(heatmap, clicks, chosen, when)
            return {**overview, "heatmap": self._heatmaps[chosen]}

    async def _refresh(self, now: float) -> tuple[dict[str, Any], dict[str, Table]]:
        self.refreshes += 1
        loaded = await asyncio.to_thread(all_tables, self.catalog)
        tables = {".".join(t.name()): t for t in loaded}
        status = await gather(self.catalog, self.redis, self.streams, now, tables=loaded)
        when = datetime.fromtimestamp(now, UTC)
        minutes = await asyncio.to_thread(per_minute, tables.get(PER_MINUTE_TABLE), when)
        totals = {kind: s.events for kind, s, _ in streams_per_type(status.streams)}  # over the shards
        self._history.append((now, {k: v for k, v in totals.items() if v is not None}))
        return (
            {
                "now": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
                "refresh_seconds": CACHE_SECONDS,
                "redis_error": status.redis_error,
                "events": {"totals": totals, "rates": rates(self._history)},
                "agents": _agents(status, now),
                "tables": [{**asdict(t), "age_seconds": _age(t.last_commit, now)} for t in status.tables],
                "clicks_per_minute": minutes,
            },
            tables,
        )


def _age(iso: str | None, now: float) -> float | None:
    return None if iso is None else round(max(0.0, now - datetime.fromisoformat(iso).timestamp()), 1)


def _agents(status: Status, now: float) -> list[dict[str, Any]]:
    """Each agent's figures, and its freshness: how old the newest event its table committed is
    (the committed position's entry id is when Redis received that event; with shards, of its
    least fresh shard)."""
    out = []
    for a, shards in agents_per_stream(status.agents):  # one row per agent and stream, over the shards
        newest = entry_id(a.position)[0] / 1000 if a.position else None
        out.append(
            {
                **asdict(a),
                "shards": shards,
                "newest_committed": _iso(newest),
                "freshness_seconds": None if newest is None else round(max(0.0, now - newest), 3),
            }
        )
    return out
