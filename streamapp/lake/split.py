"""A window whose rows touch many partitions, committed in several bounded commits, exactly once.

A commit writes one data file per partition its rows touch, and costs about 0.7 ms per file
(`streamapp.lake.files`): a window of backfilled events spread over years touches a partition per
day, up to one per day since 2000 (what the web accepts), ~9,800. So a window whose rows fall into
more than `max_files` partitions (STREAMAPP_MAX_FILES_PER_COMMIT) is committed in several commits
of at most that many files each, lowest partition values (oldest days) first. Only the last one
moves the stream position and the mark, so the position keeps its meaning, "every row of every
entry up to here is in the table", for everything that reads it (the sink, the check of a Redis
that restarted); and the agent acknowledges nothing to Redis before that last commit.

The commits before it say what they wrote, in the same commit as the rows, in the table property
`streamapp.split.<stream>|<consumer>` (`names.split_property`): a JSON list of claims
`[entry id X, partition value v]`, each meaning "every row of an entry after the position, up to
and including X, whose partition value is at most v, is in the table". Every attempt reads the
position and the claims from the refreshed table and drops what they cover before it writes, so
whenever a worker dies (or loses a commit race, or gets the window again with other bounds), the
next attempt writes the rest and nothing twice. A window delivered again after a crash can end
before a claim's X (a restarted reader closes its first windows at `n` events where the lost run
had read on): it then adds a claim of its own beside the old one, which stays until the position
passes its X. Claims another one covers (an X no later, a v no higher) are dropped, and so are
those at or before the position, which say nothing more than it does.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.table.metadata import TableMetadata

from streamapp import names
from streamapp.entries import BEFORE_ALL, DeadEntry, EntryId, Window, entry_id, format_id
from streamapp.lake.files import as_table_columns, partition_values

Claim = tuple[EntryId, int]  # (entry id X, partition value v)


def parse_claims(value: str | None) -> list[Claim]:
    if not value:
        return []
    return [(entry_id(x), int(v)) for x, v in json.loads(value)]


def dump_claims(claims: list[Claim]) -> str:
    return json.dumps([[format_id(x), v] for x, v in claims], separators=(",", ":"))


def normalize(claims: list[Claim]) -> list[Claim]:
    """The claims by entry id, without those another one covers: what is left has its ids rising
    and its partition values falling."""
    kept: list[Claim] = []
    for claim in sorted(set(claims)):
        kept = [k for k in kept if k[1] > claim[1]]  # k's id is no later than claim's: covered unless higher
        kept.append(claim)
    return kept


class Batch:
    """A window's rows and each row's partition value, made once per `write` (every attempt and
    every commit of the window uses them): sorted by partition value (stably: stream order within
    a partition), so that each commit's rows, the lowest partitions left, are one slice of them.
    `order[i]` is the place in the window (in stream order) of sorted row i."""

    def __init__(self, window: Window[Any]) -> None:
        self.window = window
        self.rows: pa.Table | None = None
        self.values: pa.Array[Any] | None = None
        self.order: pa.Array[Any] | None = None
        self.refused: list[DeadEntry] = []  # entries whose events cannot become rows: dead letters

    def load(self, metadata: TableMetadata) -> None:
        if self.rows is not None:
            return
        schema = metadata.schema()
        rows, self.refused = self.window.rows(0, frozenset(f.name for f in schema.fields if f.required))
        rows = as_table_columns(rows, schema)
        # each row's place in the window: the refused entries' events have none
        gone = {d.entry_id for d in self.refused}
        place = pa.array([i for i, e in enumerate(self.window.ids) if e not in gone], pa.int64()) if gone else None
        values = partition_values(metadata, rows)
        if values is not None:
            order = pc.sort_indices(values)
            rows, values = rows.take(order), values.take(order)
            self.order = order if place is None else place.take(order)
        elif place is not None:
            self.order = place
        self.rows, self.values = rows, values
        # what the reader sizes its next windows by (see `engine.reader`)
        self.window.partitions = 1 if values is None else pc.count_distinct(values).as_py()


@dataclass(frozen=True)
class Step:
    """One commit of a window: its rows, the properties it sets and removes."""

    start: int  # the window's first event (in stream order) the position does not cover
    rows: pa.Table  # none when the claims cover every row left: the commit only moves the position
    values: pa.Array[Any] | None  # the rows' partition values, sorted (None: not by one int value)
    partitions: int  # files it writes (0 when unknown: pyiceberg's path)
    properties: dict[str, str]
    removed: tuple[str, ...]
    final: bool  # it moves the position: the window is in the table


def next_step(properties: Mapping[str, str], batch: Batch, moved: dict[str, str], max_files: int) -> Step | None:
    """What the next commit of `batch`'s window writes, given the table's `properties` now
    (`batch` loaded); `moved`: the position (and mark) its last commit sets. None when the
    position covers the whole window."""
    window, rows, values = batch.window, batch.rows, batch.values
    assert rows is not None, "Batch.load first"
    key = names.position_property(window.stream_key, window.consumer)
    split_key = names.split_property(window.stream_key, window.consumer)
    committed = properties.get(key)
    after = entry_id(committed) if committed else BEFORE_ALL
    start = bisect.bisect_right(window.ids, after, key=entry_id)  # ids are in stream order
    if entry_id(window.last_id) <= after:  # (past its last event, a window may end in dead entries)
        return None
    claims = [c for c in parse_claims(properties.get(split_key)) if c[0] > after]
    if values is None:
        if claims:  # claims are only ever made with partition values: the spec changed meanwhile
            raise RuntimeError(f"{split_key} holds claims, but the table's partitions are no longer by one int value")
        left = (
            rows.slice(start)
            if batch.order is None
            else rows.filter(pc.greater_equal(batch.order, pa.scalar(start, batch.order.type)))
        )
        return Step(start, left, None, 0, dict(moved), (), final=True)
    if batch.order is None:
        raise AssertionError("Batch.load sorts rows with partition values")
    if start or claims:
        rows, values = _left(rows, values, batch.order, window, start, claims)
    last = entry_id(window.last_id)
    distinct = pc.count_distinct(values).as_py() if len(values) else 0
    if distinct > max_files:
        commits = -(-distinct // max_files)  # as few as the bound allows, of even sizes
        top = pc.unique(values)[-(-distinct // commits) - 1].as_py()  # unique keeps the (sorted) order
        count = pc.less_equal(values, pa.scalar(top, values.type)).true_count  # the lowest partitions: a prefix
        return Step(
            start,
            rows.slice(0, count),
            values.slice(0, count),
            -(-distinct // commits),
            {split_key: dump_claims(normalize([*claims, (last, top)]))},
            (),
            final=False,
        )
    beyond = [c for c in claims if c[0] > last]  # a lost run's longer window: the position does not cover them
    settings = dict(moved)
    removed: tuple[str, ...] = ()
    if beyond:
        settings[split_key] = dump_claims(beyond)
    elif split_key in properties:
        removed = (split_key,)
    return Step(start, rows, values, distinct, settings, removed, final=True)


def _left(
    rows: pa.Table, values: pa.Array[Any], order: pa.Array[Any], window: Window[Any], start: int, claims: list[Claim]
) -> tuple[pa.Table, pa.Array[Any]]:
    """The sorted rows neither the position (events before `start`) nor a claim (an entry up to
    its id, a value up to its value) covers: a slice when they are one run, as they are while a
    window is committed part by part, else a copy."""
    keep = pc.greater_equal(order, pa.scalar(start, order.type))
    for x, v in claims:
        cut = bisect.bisect_right(window.ids, x, key=entry_id)
        covered = pc.and_(pc.less(order, pa.scalar(cut, order.type)), pc.less_equal(values, pa.scalar(v, values.type)))
        keep = pc.and_(keep, pc.invert(covered))
    count = keep.true_count
    if count == 0:
        return rows.slice(0, 0), values.slice(0, 0)
    first = pc.index(keep, True).as_py()
    if pc.all(keep.slice(first, count)).as_py():
        return rows.slice(first, count), values.slice(first, count)
    return rows.filter(keep), values.filter(keep)
