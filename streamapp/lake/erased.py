"""Erased users as the sinks see them: events of a user that `python -m streamapp forget` erased,
received before the erasure and still in Redis then, are dropped on their way into a table.

`forget` records each erasure in the table property `streamapp.erasures` (`names.ERASURES`) of
every table it erases from, in the same commit as the delete: JSON {user hash: erased at, epoch
microseconds}. A sink reads the table's properties afresh before each commit attempt, and its
commit asserts the snapshot it read, so a sink commit racing the erasure either lands before it
(and its rows are deleted by it) or conflicts and is tried again with the erasure in view. Events
received after the erasure are kept: the user came back (new consent).

Only a hash of the user id is kept (`user_hash`): the record of an erasure must not hold the
very id it erased; whoever knows the id can still check it was erased.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from streamapp import names

Erasures = dict[str, int]  # user hash -> erased at (epoch microseconds)


def user_hash(user_id: str) -> str:
    """sha256 of the id (with a fixed prefix, so it matches no other table of hashes), 128 bits."""
    return hashlib.sha256(b"streamapp-erasure\0" + user_id.encode()).hexdigest()[:32]


def parse(properties: Mapping[str, str]) -> Erasures:
    raw = properties.get(names.ERASURES)
    return {str(k): int(v) for k, v in json.loads(raw).items()} if raw else {}


def dump(erasures: Erasures) -> str:
    return json.dumps(erasures, separators=(",", ":"), sort_keys=True)


def erased_before(erasures: Erasures, user_id: Any, received_us: int) -> bool:
    """Is this event (of `user_id`, received at `received_us`) one an erasure removed?"""
    if not erasures or not isinstance(user_id, str):
        return False
    at = erasures.get(user_hash(user_id))
    return at is not None and received_us < at


def drop_rows(
    rows: pa.Table, values: pa.Array[Any] | None, erasures: Erasures
) -> tuple[pa.Table, pa.Array[Any] | None, int]:
    """`rows` (with their partition `values`) without the rows of erased users received before
    their erasure; and how many were dropped. Needs `user_id` and `received_at` columns."""
    if not erasures or "user_id" not in rows.column_names or "received_at" not in rows.column_names:
        return rows, values, 0
    users = rows.column("user_id")
    erased = {u: erasures[h] for u in pc.unique(users).to_pylist() if u is not None and (h := user_hash(u)) in erasures}
    if not erased:
        return rows, values, 0
    received = rows.column("received_at").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    drop: Any = pa.array([False] * rows.num_rows)
    for user, at in erased.items():
        hit: Any = pc.and_(pc.equal(users, pa.scalar(user)), pc.less(received, pa.scalar(at, pa.int64())))
        drop = pc.or_(drop, pc.fill_null(hit, pa.scalar(False)))
    keep = pc.invert(drop)
    if isinstance(keep, pa.ChunkedArray):  # the columns are chunked; `values` is one array and must stay one
        keep = keep.combine_chunks()
    kept = rows.filter(keep)
    return kept, None if values is None else values.filter(keep), rows.num_rows - kept.num_rows


def json_user(text: str | None) -> Any:
    """The top-level `user_id` of a JSON object (parsed: escapes and spacing do not matter), else None."""
    if not text:
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj.get("user_id") if isinstance(obj, dict) else None


def scrub_ndjson(text: str, matches: Any) -> tuple[str | None, int]:
    """NDJSON `text` without the lines whose event `matches(user_id)`; None when no line is left;
    and how many lines went."""
    lines = text.split("\n")
    kept = [line for line in lines if not (line.strip() and matches(json_user(line)))]
    gone = len(lines) - len(kept)
    if not gone:
        return text, 0
    return ("\n".join(kept) if any(line.strip() for line in kept) else None), gone
