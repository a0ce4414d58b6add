"""Orphan files and old metadata: what snapshot expiry leaves on disk, removed.

Expiry drops snapshots from the metadata but leaves their files: every replaced data file, every
manifest and manifest list, the metadata JSON of a commit that lost a race. `clean` lists every
file under the table's location and removes those that nothing the table keeps references (its
snapshots' manifest lists, manifests and data and delete files, the current metadata and the newest
`keep_metadata` previous ones, statistics files, and any file a table property names, such as an
aggregate's session snapshot), **only when older than `min_age`**: a commit in progress, here or in
another process, has written files that no snapshot references yet, and they are younger than the
longest a commit can take. Within this process, a table is also never cleaned while one of its
commits is in progress (`streamapp.lake.commit.quiet`).

Pure Python over the table's own FileIO and location, so the same code cleans a local warehouse
and an S3 one: files are listed with pyarrow's filesystem (the FileIO's own, with its credentials
and endpoint) and deleted through the FileIO. Locations are compared without their scheme
(`file:///w/x` is `/w/x`, `s3://b/k` is `b/k`), as pyarrow lists them without one.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlparse

from pyarrow import fs as pafs
from pyiceberg.io.pyarrow import PyArrowFileIO
from pyiceberg.manifest import ManifestFile
from pyiceberg.table import Table

from streamapp.lake.commit import quiet, table_name

log = logging.getLogger(__name__)

MIN_AGE_FLOOR_SECONDS = 60  # below this, a slow commit's files could be taken for orphans
QUIET_WAIT_SECONDS = 60.0  # how long a cleanup waits for this process's commits to the table to end
DELETE_BATCH = 500  # files deleted between two looks for this process's commits (~0.4 s locally)


@dataclass(frozen=True)
class Cleanup:
    """What one cleanup of one table found and did. `files`, `bytes`: what was under the table's
    location; `orphans`: unreferenced files older than the min age (`removed` of them were, or
    with a dry run would be, deleted, freeing `freed` bytes); `young`: unreferenced files kept
    because they are younger (a commit in progress may be about to reference them)."""

    table: str
    files: int = 0
    bytes: int = 0
    referenced: int = 0
    orphans: int = 0
    young: int = 0
    removed: int = 0
    freed: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    skipped: str = ""  # why the table was left alone

    def line(self) -> str:
        """The one line `python -m streamapp maintain` prints for the table."""
        if self.skipped and not self.files:
            return f"{self.table}: skipped ({self.skipped})"
        did = (
            f"would remove {self.removed:,} ({_mb(self.freed)})"
            if self.dry_run
            else f"removed {self.removed:,} ({_mb(self.freed)} freed)"
        )
        return (
            f"{self.table}: {self.files:,} files ({_mb(self.bytes)}) on storage, {self.referenced:,} referenced; "
            f"orphans: {self.orphans:,} found, {did}; "
            f"{self.young:,} unreferenced but too young, kept; {self.seconds:.2f}s"
            + (f" (stopped: {self.skipped})" if self.skipped else "")
        )


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def location_key(location: str) -> str:
    """A file's location as it is compared: no scheme, `file:///w/x` -> `/w/x`, `s3://b/k` -> `b/k`."""
    uri = urlparse(location)
    if uri.scheme in ("", "file") or len(uri.scheme) == 1:  # a plain path (a Windows drive letter too)
        return posixpath.normpath(uri.path if uri.scheme == "file" else location)
    return posixpath.normpath(f"{uri.netloc}{uri.path}")


def referenced(table: Table, keep_metadata: int) -> set[str]:
    """The keys (`location_key`) of every file `table` references: see the module docstring."""
    md = table.metadata
    found: set[str] = set()
    if table.metadata_location:
        found.add(table.metadata_location)
    if keep_metadata > 0:
        found.update(entry.metadata_file for entry in md.metadata_log[-keep_metadata:])
    found.update(s.statistics_path for s in md.statistics)
    found.update(s.statistics_path for s in md.partition_statistics)
    # Values that are not file locations match no file: keeping them costs nothing.
    found.update(v for v in md.properties.values() if "/" in v)
    manifests: dict[str, ManifestFile] = {}
    for snapshot in md.snapshots:
        if snapshot.manifest_list:
            found.add(snapshot.manifest_list)
        for manifest in snapshot.manifests(table.io):
            manifests.setdefault(manifest.manifest_path, manifest)
    for path, manifest in manifests.items():
        found.add(path)
        # A DELETED entry's file left the table in that snapshot; a kept older snapshot that
        # still has it lists it as added or existing, so it is found there.
        found.update(e.data_file.file_path for e in manifest.fetch_manifest_entry(table.io, discard_deleted=True))
    return {location_key(f) for f in found}


@dataclass(frozen=True)
class StoredFile:
    """A file under a table's location, as the storage lists it."""

    uri: str  # as the FileIO takes it
    key: str
    size: int
    mtime: float | None  # epoch seconds; None when the storage did not say (kept)


def stored_files(table: Table) -> list[StoredFile]:
    """Every file under the table's location (directories are not files: an S3 "directory" is a
    prefix, a local one is left in place, empty)."""
    location = table.location()
    io = table.io
    if isinstance(io, PyArrowFileIO):  # its filesystem, with the catalog's credentials and endpoint
        scheme, netloc, base = io.parse_location(location, io.properties)
        filesystem = io.fs_by_scheme(scheme, netloc)
    else:
        filesystem, base = pafs.FileSystem.from_uri(location)
        scheme = urlparse(location).scheme or "file"
    selector = pafs.FileSelector(base.rstrip("/"), recursive=True, allow_not_found=True)
    found = []
    for info in filesystem.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        uri = info.path if scheme == "file" else f"{scheme}://{info.path}"
        mtime = info.mtime_ns / 1e9 if info.mtime_ns is not None else None
        found.append(StoredFile(uri, location_key(uri), info.size or 0, mtime))
    return found


def clean(
    table: Table,
    *,
    keep_metadata: int,
    min_age: float,
    dry_run: bool = False,
    exclude: Iterable[str] = (),
    now: float | None = None,
    wait: float = QUIET_WAIT_SECONDS,
) -> Cleanup:
    """Remove `table`'s orphan files older than `min_age` seconds and its metadata files beyond the
    current one and the newest `keep_metadata` previous ones. `exclude`: locations under the
    table's own that belong to other tables (never touched). `dry_run`: count, delete nothing.
    Blocking (storage and catalog I/O): call from a thread."""
    if min_age < MIN_AGE_FLOOR_SECONDS:
        raise ValueError(
            f"an orphan min age of {min_age:g}s is below {MIN_AGE_FLOOR_SECONDS}s: "
            "a commit in progress could lose its files"
        )
    name = table_name(table)
    started = time.perf_counter()
    others = [location_key(x).rstrip("/") + "/" for x in exclude]
    files = [f for f in stored_files(table) if not any(f.key.startswith(o) for o in others)]
    with quiet(name, wait) as ok:
        if not ok:
            return Cleanup(name, skipped=f"a commit to it was in progress for {wait:g}s")
        table.refresh()  # what is referenced now, after the listing: a newer file is young
        keep = referenced(table, keep_metadata)
    limit = (time.time() if now is None else now) - min_age
    unreferenced = [f for f in files if f.key not in keep]
    old = [f for f in unreferenced if f.mtime is not None and f.mtime < limit]
    removed, freed, skipped = 0, 0, ""
    # An old unreferenced file stays so: a commit references only files of the current snapshot
    # and files it wrote itself (young). Deleting in batches lets this process's commits to the
    # table in between (a first run may have 20,000 files to delete: ~15 s).
    for i in range(0, len(old), DELETE_BATCH):
        with quiet(name, wait) as ok:
            if not ok:
                skipped = f"a commit to it was in progress for {wait:g}s; the rest is for the next run"
                break
            for f in old[i : i + DELETE_BATCH]:
                if not dry_run:
                    try:
                        table.io.delete(f.uri)
                    except FileNotFoundError:  # another process's cleanup got there first
                        continue
                removed, freed = removed + 1, freed + f.size
    done = Cleanup(
        name,
        files=len(files),
        bytes=sum(f.size for f in files),
        referenced=len(files) - len(unreferenced),
        orphans=len(old),
        young=len(unreferenced) - len(old),
        removed=removed,
        freed=freed,
        seconds=time.perf_counter() - started,
        dry_run=dry_run,
        skipped=skipped,
    )
    if done.orphans:
        log.info(
            "%s orphan files of %s: %d (%d bytes) of %d; %d unreferenced but younger than %gs kept",
            "found" if dry_run else "removed",
            name,
            done.removed,
            done.freed,
            done.files,
            done.young,
            min_age,
            extra={"table": name, "files": done.removed, "bytes": done.freed},
        )
    return done
