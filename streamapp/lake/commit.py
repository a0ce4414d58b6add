"""Committing to an Iceberg table with conflict retry: the one loop every sink commits through.

A commit conflicts when another writer committed to the table since it was read. pyiceberg can
retry by itself, but it re-applies the same changes without looking at what the other commit did
(and so double-commits an append under contention): streamapp turns that off
(`commit.retry.num-retries=0`, see `streamapp.lake.catalog`) and retries here instead. Every
attempt starts from a refreshed table, so the caller's `attempt` re-reads the stream position and
drops what is already committed before it writes.

A commit that moves a stream position must also be conditional on the table state the position
was read from: pyiceberg applies a transaction's updates onto the catalog's latest metadata and
checks only the transaction's requirements, and only a snapshot (an append, a delete) brings one,
`AssertRefSnapshotId(main, <snapshot read>)`. A commit that only sets properties asserts nothing
and would overwrite a position another writer committed after the check: such a commit adds an
empty snapshot (`assert_snapshot_read`).

Every commit a process makes through here holds its table's gate (`committing`), which the orphan
cleanup of that table waits out and holds itself (`quiet`, see `streamapp.lake.orphans`).
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from pyiceberg.exceptions import CommitFailedException
from pyiceberg.table import Table, Transaction

from streamapp import metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_ATTEMPTS = 20

# Per table name: commits in progress in this process, and the tables being cleaned of orphans.
_gate = threading.Condition()
_committing: collections.Counter[str] = collections.Counter()
_cleaning: set[str] = set()


@contextmanager
def committing(name: str) -> Iterator[None]:
    """Held by a commit (all its attempts) to table `name`: waits while its orphans are being
    removed, and keeps their removal from starting until it ends. Commits do not wait for each
    other. Blocking: call from a thread."""
    with _gate:
        _gate.wait_for(lambda: name not in _cleaning)
        _committing[name] += 1
    try:
        yield
    finally:
        with _gate:
            _committing[name] -= 1
            if not _committing[name]:
                del _committing[name]
            _gate.notify_all()


@contextmanager
def quiet(name: str, timeout: float) -> Iterator[bool]:
    """Wait up to `timeout` seconds for table `name` to have no commit in progress in this
    process, and hold new ones off while inside; yields False (and holds nothing) on time-out."""
    with _gate:
        ok = _gate.wait_for(lambda: not _committing[name] and name not in _cleaning, timeout)
        if ok:
            _cleaning.add(name)
    try:
        yield ok
    finally:
        if ok:
            with _gate:
                _cleaning.discard(name)
                _gate.notify_all()


def table_name(table: Table) -> str:
    """ "namespace.table", as the metrics and logs name it."""
    return ".".join(table.name())


def backoff_seconds(attempt: int) -> float:
    """Exponential from 0.1 s, capped at 2 s, jittered so that writers that collided spread out."""
    return min(2.0, 0.05 * 2.0**attempt) * random.uniform(0.5, 1.0)


def assert_snapshot_read(tx: Transaction) -> None:
    """Make `tx`, which writes no rows, fail if the table gained a snapshot since it was read: an
    empty append (no files) is a snapshot, and with it comes that requirement. Only for a
    transaction that makes no other snapshot (it would make two)."""
    with tx.update_snapshot().fast_append():
        pass


def commit_with_retry(table: Table, attempt: Callable[[Table], T]) -> T:
    """Refresh `table` and run `attempt(table)` (which reads what it needs and commits one
    transaction) until it does not conflict; returns what `attempt` returned. Each conflict is
    counted in `streamapp_commit_conflicts`, logged, and waited out (blocking: call this from a
    thread). Raises CommitFailedException after MAX_ATTEMPTS conflicts in a row."""
    name = table_name(table)
    with committing(name):
        for n in range(1, MAX_ATTEMPTS + 1):
            table.refresh()  # also the cure for a table object left stale by a failed commit
            try:
                return attempt(table)
            except CommitFailedException as e:
                metrics.COMMIT_CONFLICTS.labels(name).inc()
                delay = backoff_seconds(n)
                log.warning("commit to %s conflicted (%s), attempt %d; retrying in %.2fs", name, e, n, delay)
                time.sleep(delay)
    raise CommitFailedException(f"{name}: {MAX_ATTEMPTS} commit attempts conflicted")
