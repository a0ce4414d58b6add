"""Dead letters: stream entries a worker cannot turn into rows, kept in `events.dead_letter` with
why, so that one bad entry never holds its stream back.

An entry is dead when it cannot be read (a corrupted entry), decoded (an event its model no longer
describes), or turned into a row its table takes (a value pyarrow refuses, a required column
null). The rest of its window lands as usual; the dead entry is committed here first, with this
table's own position for the (stream, consumer), so a window delivered again writes it once; then
the window's commit moves the consumer's position past it. Each is counted
(`streamapp_dead_letters_total{agent}`) and logged with its entry id and the error.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import UTC, datetime

import pyarrow as pa
from pyiceberg.catalog import Catalog
from pyiceberg.table import Table

from streamapp import metrics, names
from streamapp.entries import BEFORE_ALL, DeadEntry, entry_id
from streamapp.lake import erased
from streamapp.lake.catalog import TableSpec, ensure_table
from streamapp.lake.commit import commit_with_retry
from streamapp.lake.upkeep import SMALL_FILE_BYTES, Upkeep, expire_old_snapshots, snapshot_figure
from streamapp.model import table_schema

log = logging.getLogger(__name__)


SCHEMA = table_schema(
    [
        ("failed_at", "timestamptz", True),
        ("stream", "string", True),
        ("entry_id", "string", True),
        ("agent", "string", True),
        ("error", "string", True),
        ("payload", "string", True),  # the entry's events as stored (NDJSON), or all its fields when unreadable
        ("received_at", "timestamptz", False),
    ]
)
SPEC = TableSpec(names.DEAD_LETTER_TABLE, SCHEMA, "failed_at")


class DeadLetters:
    """`events.dead_letter` for the sinks of one worker (blocking: call from a thread)."""

    def __init__(self, catalog: Catalog, *, keep_snapshots: int, target_file_bytes: int = SMALL_FILE_BYTES) -> None:
        self.catalog = catalog
        self.keep_snapshots = keep_snapshots
        self.upkeep = Upkeep(keep_snapshots, target_file_bytes)
        self._table: Table | None = None

    @property
    def table(self) -> Table:
        if self._table is None:
            self._table = ensure_table(self.catalog, SPEC)
        return self._table

    def write(self, letters: list[DeadEntry], stream_key: str, consumer: str, position: str) -> int:
        """Commit the letters after this table's position for (stream, consumer), and move it to
        `position`; returns how many were new."""
        key = names.position_property(stream_key, consumer)

        def attempt(table: Table) -> int:
            committed = table.properties.get(key)
            after = entry_id(committed) if committed else BEFORE_ALL
            new = _without_erased([d for d in letters if entry_id(d.entry_id) > after], erased.parse(table.properties))
            if not new:
                return 0
            now = datetime.now(UTC)
            rows = pa.Table.from_pylist(
                [
                    {
                        "failed_at": now,
                        "stream": stream_key,
                        "entry_id": d.entry_id,
                        "agent": consumer,
                        "error": d.error,
                        "payload": d.payload,
                        "received_at": None
                        if d.received_us is None
                        else datetime.fromtimestamp(d.received_us / 1e6, UTC),
                    }
                    for d in new
                ],
                schema=SCHEMA.as_arrow(),
            )
            with table.transaction() as tx:
                tx.append(rows)
                tx.set_properties({key: position})
                expire_old_snapshots(tx, self.keep_snapshots)
            return len(new)

        began = time.monotonic()
        written = commit_with_retry(self.table, attempt)
        if written:
            self.upkeep.after_write(self.table, snapshot_figure(self.table, "added-data-files"), began)
        for d in letters[max(0, len(letters) - written) :]:
            metrics.DEAD_LETTERS.labels(consumer).inc()
            log.error(
                "%s: entry %s of %s cannot become rows (%s); kept in %s",
                consumer,
                d.entry_id,
                stream_key,
                d.error,
                names.DEAD_LETTER_TABLE,
                extra={"agent": consumer, "stream": stream_key, "entry_id": d.entry_id},
            )
        return written


def _without_erased(letters: list[DeadEntry], erasures: erased.Erasures) -> list[DeadEntry]:
    """The letters without the events of users erased after they were received (see
    `streamapp.lake.erased`); a letter left with no event is dropped."""
    if not erasures:
        return letters
    kept = []
    for d in letters:
        received = d.received_us if d.received_us is not None else entry_id(d.entry_id)[0] * 1000

        def matches(user: object, received: int = received) -> bool:
            return erased.erased_before(erasures, user, received)

        payload, gone = erased.scrub_ndjson(d.payload, matches)
        if payload is not None:
            kept.append(d if not gone else dataclasses.replace(d, payload=payload))
    return kept
