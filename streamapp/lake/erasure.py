"""`python -m streamapp forget --user-id U`: erase a user's rows from every table that holds them
(GDPR art. 17, CCPA), with copy-on-write deletes, and keep an audit row in `events.erasures`.

Per table, in one commit each (through `commit_with_retry`: a conflict with a worker's append is
tried again on the refreshed table, never applied over rows it did not read):

- a table with a `user_id` column (the event tables, `events.rejected`): `Transaction.delete` of
  `user_id = U`; pyiceberg drops files holding only such rows and rewrites the others without them;
- `events.rejected` (`raw`), `events.late` (`event`): rows whose JSON's top-level `user_id` is U
  (parsed, not a substring) go; `events.dead_letter` (`payload`, NDJSON): the events of U are cut
  out of the payload, and a row left with none goes. The files holding such rows are rewritten in
  one overwrite commit;
- aggregate tables hold counts per window and key, no user ids: untouched (see README).

The same commit records the erasure in the table's `streamapp.erasures` property, which the sinks
read (`streamapp.lake.erased`): events of U still in Redis then never land afterwards. A commit
carries only the snapshot it read; stream positions and other properties are kept as they are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
from pyiceberg.catalog import Catalog
from pyiceberg.expressions import AlwaysTrue, And, BooleanExpression, EqualTo, LessThan, Reference
from pyiceberg.expressions.literals import literal
from pyiceberg.io.pyarrow import ArrowScan
from pyiceberg.table import FileScanTask, Table

from streamapp import names
from streamapp.entries import entry_id
from streamapp.lake import erased, files
from streamapp.lake.catalog import TableSpec, all_tables, ensure_table
from streamapp.lake.commit import assert_snapshot_read, commit_with_retry, table_name
from streamapp.lake.upkeep import expire_old_snapshots
from streamapp.model import table_schema

log = logging.getLogger(__name__)

AUDIT_SPEC = TableSpec(
    names.ERASURES_TABLE,
    table_schema(
        [
            ("erased_at", "timestamptz", True),
            ("user_hash", "string", True),  # erased.user_hash: the audit must not keep the id it erased
            ("rows_removed", "long", True),
            ("tables", "string", True),  # JSON {table: rows removed}
            ("command", "string", True),
            ("requested_by", "string", False),  # OS user@host that ran it
        ]
    ),
    "erased_at",
)

# An erasure stays in a table's property until every stream position there is past it (all events
# received before it are committed or dropped), and at least this long (clocks differ).
KEEP_ERASURE = timedelta(days=1)


@dataclass
class Report:
    user_hash: str
    erased_at: datetime
    removed: dict[str, int] = field(default_factory=dict)  # table -> rows removed
    rewritten: dict[str, int] = field(default_factory=dict)  # table -> rows kept with events cut out
    untouched: list[str] = field(default_factory=list)  # tables without user data (aggregates)

    @property
    def total(self) -> int:
        return sum(self.removed.values())


def forget(
    catalog: Catalog,
    user_id: str,
    *,
    command: str,
    requested_by: str | None,
    keep_snapshots: int,
    now: datetime | None = None,
) -> Report:
    """Erase `user_id` everywhere (blocking: call from a thread); returns the report, also
    appended to `events.erasures`."""
    if not user_id:
        raise ValueError("the user id is empty")
    at = now or datetime.now(UTC)
    report = Report(erased.user_hash(user_id), at)
    audit = ensure_table(catalog, AUDIT_SPEC)
    for table in sorted(all_tables(catalog), key=table_name):
        name = table_name(table)
        if name == names.ERASURES_TABLE:
            continue
        columns = set(table.schema().column_names)
        if name in (names.REJECTED_TABLE, names.LATE_TABLE, names.DEAD_LETTER_TABLE):
            removed, rewritten = _rewrite_json(table, name, user_id, report, keep_snapshots)
            report.removed[name] = removed
            if rewritten:
                report.rewritten[name] = rewritten
        elif "user_id" in columns:
            report.removed[name] = _delete_column(table, user_id, report, keep_snapshots)
        else:
            report.untouched.append(name)
    row = {
        "erased_at": at,
        "user_hash": report.user_hash,
        "rows_removed": report.total,
        "tables": json.dumps(report.removed, sort_keys=True),
        "command": command,
        "requested_by": requested_by,
    }

    def append(table: Table) -> None:
        with table.transaction() as tx:
            tx.append(pa.Table.from_pylist([row], schema=AUDIT_SPEC.schema.as_arrow()))
            expire_old_snapshots(tx, keep_snapshots)

    commit_with_retry(audit, append)
    log.info("erased user %s: %d rows from %d tables", report.user_hash, report.total, len(report.removed))
    return report


def _recorded(table: Table, report: Report) -> dict[str, str]:
    """The table's `streamapp.erasures` with this erasure, without those every stream position
    of the table is past (the sinks no longer meet events received before them)."""
    erasures = erased.parse(table.properties)
    erasures[report.user_hash] = int(report.erased_at.timestamp() * 1_000_000)
    positions = [entry_id(v)[0] * 1000 for k, v in table.properties.items() if names.position_stream(k) is not None]
    if positions:
        done = min(min(positions), int((report.erased_at - KEEP_ERASURE).timestamp() * 1_000_000))
        erasures = {h: t for h, t in erasures.items() if t >= done or h == report.user_hash}
    return {names.ERASURES: erased.dump(erasures)}


def _delete_column(table: Table, user_id: str, report: Report, keep_snapshots: int) -> int:
    """Delete `user_id = U` received before the erasure (copy-on-write) and record the erasure, in
    one commit. (Events of U received since, landed while this commit was retried, are kept.)"""
    match: BooleanExpression = EqualTo(term=Reference("user_id"), value=literal(user_id))
    if "received_at" in table.schema().column_names:
        match = And(match, LessThan(term=Reference("received_at"), value=literal(report.erased_at.isoformat())))

    def attempt(table: Table) -> int:
        found = table.scan(row_filter=match, selected_fields=("user_id",)).to_arrow().num_rows
        with table.transaction() as tx:
            if found:
                tx.delete(match)
            else:  # still a snapshot: a sink append read before this commit must conflict with it
                assert_snapshot_read(tx)
            tx.set_properties(_recorded(table, report))
            expire_old_snapshots(tx, keep_snapshots)
        return found

    return commit_with_retry(table, attempt)


def _rewrite_json(table: Table, name: str, user_id: str, report: Report, keep_snapshots: int) -> tuple[int, int]:
    """Rewrite the files of `table` holding JSON of `user_id`, without it; (rows removed, rows
    rewritten with some of their events cut out)."""

    def matches(user: Any) -> bool:
        return isinstance(user, str) and user == user_id

    before = int(report.erased_at.timestamp() * 1_000_000)

    def attempt(table: Table) -> tuple[int, int]:
        metadata = table.metadata
        replaced: list[FileScanTask] = []
        kept: list[pa.Table] = []
        removed = rewritten = 0
        for task in table.scan().plan_files():
            rows = ArrowScan(metadata, table.io, metadata.schema(), AlwaysTrue()).to_table([task])
            new, gone, cut = _scrub(name, rows, matches, before)
            if gone or cut:
                replaced.append(task)
                kept.append(new)
                removed, rewritten = removed + gone, rewritten + cut
        with table.transaction() as tx:
            if replaced:
                with tx.update_snapshot().overwrite() as rewrite:
                    for task in replaced:
                        rewrite.delete_data_file(task.file)
                    rows = pa.concat_tables(kept)
                    if rows.num_rows:
                        values = files.partition_values(tx.table_metadata, rows)
                        for new_file in files.data_files(
                            tx.table_metadata, table.io, rows, values, rewrite.commit_uuid, final=True
                        ):
                            rewrite.append_data_file(new_file)
            else:  # see _delete_column
                assert_snapshot_read(tx)
            tx.set_properties(_recorded(table, report))
            expire_old_snapshots(tx, keep_snapshots)
        return removed, rewritten

    return commit_with_retry(table, attempt)


def _received_before(rows: pa.Table, before: int) -> list[bool]:
    """Per row: received before `before` (epoch us)? `received_at`, else the stream entry's id
    (`events.late`: the time Redis took it); unknown: yes."""
    if "received_at" in rows.column_names:
        times = rows.column("received_at").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_pylist()
    else:
        times = [entry_id(str(s))[0] * 1000 for s in rows.column("stream_id").to_pylist()]
    return [t is None or t < before for t in times]


def _scrub(name: str, rows: pa.Table, matches: Callable[[Any], bool], before: int) -> tuple[pa.Table, int, int]:
    """One file's rows without the user's received before `before`: (rows kept, rows removed,
    rows rewritten)."""
    old = _received_before(rows, before)
    if name == names.DEAD_LETTER_TABLE:
        payloads: list[str | None] = []
        cut = 0
        for text, early in zip(rows.column("payload").to_pylist(), old, strict=True):
            if not early:
                payloads.append(text)
                continue
            payload, gone = erased.scrub_ndjson(text or "", matches)
            payloads.append(payload)
            cut += bool(gone) and payload is not None
        keep = pa.array([p is not None for p in payloads])
        if keep.true_count == rows.num_rows and not cut:
            return rows, 0, 0
        index = rows.schema.get_field_index("payload")
        texts = pa.array([p or "" for p in payloads], rows.schema.field(index).type)  # the gone ones: filtered out
        rows = rows.set_column(index, rows.schema.field(index), texts)
        return rows.filter(keep), rows.num_rows - keep.true_count, cut
    column = "raw" if name == names.REJECTED_TABLE else "event"
    users = rows.column("user_id").to_pylist() if "user_id" in rows.column_names else [None] * rows.num_rows
    drop = [
        early and (matches(u) or matches(erased.json_user(t)))
        for u, t, early in zip(users, rows.column(column).to_pylist(), old, strict=True)
    ]
    if not any(drop):
        return rows, 0, 0
    keep = pa.array([not d for d in drop])
    return rows.filter(keep), sum(drop), 0
