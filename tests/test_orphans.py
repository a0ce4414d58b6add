"""Orphan files and old metadata on a real SQLite catalog and real files: old orphans go, young
ones and every referenced file stay, a commit that straddles a cleanup keeps its files, and the
worker and `python -m streamapp maintain` run it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.click import ClickEvent
from streamapp.lake.catalog import ensure_table, open_catalog
from streamapp.lake.commit import committing
from streamapp.lake.orphans import clean, location_key, referenced
from streamapp.lake.sink import TableSink
from streamapp.lake.upkeep import compact
from streamapp.settings import Settings
from tests.conftest import ROOT, clean_env, wait_until
from tests.test_maintenance import DAY1, _window

HOUR = 3600


@pytest.fixture
def lake(tmp_path):
    """A clicks table after 8 commits, a compaction that replaced their 16 files and 2 more commits
    (keeping 2 snapshots: the replaced files are referenced no more), with every file made 2 hours
    old. Also returns the replaced files."""
    settings = Settings(warehouse=tmp_path / "wh", keep_snapshots=2)
    catalog = open_catalog(settings)
    ensure_table(catalog, ClickEvent)
    sink = TableSink(catalog, "events.clicks", keep_snapshots=2)
    for n in range(8):
        sink.write(_window(n))
    replaced = {Path(location_key(t.file.file_path)) for t in sink.table.scan().plan_files()}
    assert compact(sink.table, keep_snapshots=2) == len(replaced) == 16
    for n in range(8, 10):
        sink.write(_window(n))
    _age(_root(sink.table), 2 * HOUR)
    return settings, catalog, replaced


def _root(table) -> Path:
    return Path(location_key(table.location()))


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _age(root: Path, seconds: float) -> None:
    then = time.time() - seconds
    for p in _files(root):
        os.utime(p, (then, then))


def _stray(root: Path, name: str) -> Path:
    """A Parquet file no snapshot references: what a killed commit leaves."""
    path = root / "data" / "event_time_day=2026-11-26" / name
    pq.write_table(pa.table({"x": [1]}), path)
    return path


def _metadata_files(root: Path) -> set[Path]:
    return set((root / "metadata").glob("*.metadata.json"))


def test_old_orphans_go_young_ones_and_referenced_files_stay(lake):
    settings, catalog, replaced = lake
    table = catalog.load_table("events.clicks")
    root = _root(table)
    rows, previous = table.scan().to_arrow().num_rows, table.metadata.snapshots[0].snapshot_id
    needed = referenced(table, keep_metadata=3)
    old_stray = _stray(root, "old.parquet")
    _age(old_stray.parent, 2 * HOUR)
    young_stray = _stray(root, "young.parquet")
    before = _files(root)
    sizes = {p: p.stat().st_size for p in before}
    assert len(_metadata_files(root)) > 4  # creation, 10 commits and the compaction: 12 (pyiceberg keeps 20)

    done = clean(table, keep_metadata=3, min_age=HOUR)

    after = _files(root)
    gone = before - after
    assert done.removed == done.orphans == len(gone) > 16  # the 16 replaced data files, and more
    assert done.young == 1 and done.files == len(before) and done.referenced == len(after) - 1
    assert done.freed == sum(sizes[p] for p in gone) and done.bytes == sum(sizes.values())
    assert old_stray in gone and young_stray in after and replaced <= gone
    assert {location_key(str(p)) for p in gone}.isdisjoint(needed)
    # the current metadata and 3 previous ones; the table, and its previous snapshot, read whole
    assert len(_metadata_files(root)) == 4 and Path(location_key(table.metadata_location)).exists()
    fresh = open_catalog(settings).load_table("events.clicks")
    assert fresh.scan().to_arrow().num_rows == rows == 40
    assert fresh.scan(snapshot_id=previous).to_arrow().num_rows == 36
    # a second run finds nothing more
    assert clean(fresh, keep_metadata=3, min_age=HOUR).removed == 0


def test_dry_run_deletes_nothing(lake):
    _, catalog, _ = lake
    table = catalog.load_table("events.clicks")
    before = _files(_root(table))
    done = clean(table, keep_metadata=3, min_age=HOUR, dry_run=True)
    assert done.orphans == done.removed > 16 and done.dry_run
    assert _files(_root(table)) == before


def test_a_commit_that_straddles_a_cleanup_keeps_its_files(lake):
    settings, catalog, replaced = lake
    writer = catalog.load_table("events.clicks")
    rows = writer.scan().to_arrow().num_rows
    extra = pa.Table.from_pylist(
        [{"event_id": "late-commit", "event_time": DAY1, "received_at": DAY1, "x": 1, "y": 2, "button": 0}],
        schema=writer.schema().as_arrow(),
    )
    before = _files(_root(writer))
    with writer.transaction() as tx:
        tx.append(extra)  # its data file, manifest and manifest list are written, not committed
        staged = _files(_root(writer)) - before
        # another process cleans meanwhile: the staged files are unreferenced but young
        done = clean(open_catalog(settings).load_table("events.clicks"), keep_metadata=3, min_age=HOUR)
        assert done.removed > 16 and done.young == len(staged) >= 3
        assert staged <= _files(_root(writer)) and not replaced & _files(_root(writer))
    table = open_catalog(settings).load_table("events.clicks")
    ids = table.scan().to_arrow().column("event_id").to_pylist()
    assert len(ids) == rows + 1 and "late-commit" in ids


def test_no_cleanup_while_this_process_commits_to_the_table(lake):
    _, catalog, _ = lake
    table = catalog.load_table("events.clicks")
    before = _files(_root(table))
    with committing("events.clicks"):
        done = clean(table, keep_metadata=3, min_age=HOUR, wait=0.1)
    assert done.skipped and done.removed == 0 and _files(_root(table)) == before


def test_min_age_below_a_minute_is_refused():  # the setting's own check: tests/test_settings.py
    with pytest.raises(ValueError, match="below 60s"):
        clean(None, keep_metadata=3, min_age=59)  # type: ignore[arg-type]


def _maintain(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**clean_env(), "STREAMAPP_WAREHOUSE": str(settings.warehouse), "STREAMAPP_LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", "streamapp", "maintain", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_maintain_command(lake):
    settings, catalog, replaced = lake
    root = _root(catalog.load_table("events.clicks"))
    before = _files(root)
    dry = _maintain(settings, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert _files(root) == before
    run = _maintain(settings, "events.clicks")
    assert run.returncode == 0, run.stderr
    gone = len(before - _files(root))
    assert replaced <= before - _files(root)
    assert (
        f"events.clicks: {len(before)} files" in run.stdout and f"orphans: {gone} found, removed {gone} " in run.stdout
    )
    assert f"would remove {gone} " in dry.stdout and "dry run: nothing deleted" in dry.stdout
    unknown = _maintain(settings, "events.nope")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "streamapp: no table named 'events.nope'; the tables are: events.clicks"


def test_the_worker_removes_orphans_as_it_runs(settings, spawn):
    table = ensure_table(open_catalog(settings), ClickEvent)
    root = _root(table)
    (root / "data" / "event_time_day=2026-11-26").mkdir(parents=True)
    old, young = _stray(root, "old.parquet"), _stray(root, "young.parquet")
    _age(old.parent, 2 * HOUR)
    os.utime(young)
    worker = spawn("worker", settings, STREAMAPP_ORPHAN_INTERVAL_SECONDS="0.5")
    wait_until(lambda: not old.exists(), timeout=30, what="the worker removing the orphan")
    time.sleep(1)  # another run or two
    assert young.exists()
    assert "removed orphan files of events.clicks: 1 " in worker.output()
