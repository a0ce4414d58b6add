"""The orphan cleanup on an S3 warehouse (moto_server on loopback): listed through the FileIO's
pyarrow filesystem, deleted through the FileIO; what the table references stays, it reads whole."""

from __future__ import annotations

import time

from models.click import ClickEvent
from streamapp.lake.catalog import ensure_table, open_catalog
from streamapp.lake.orphans import clean, location_key, referenced
from streamapp.lake.sink import TableSink
from streamapp.lake.upkeep import compact
from tests.conftest import s3_settings
from tests.test_orphans import HOUR, _window


def test_orphans_on_s3(settings, s3_server, s3_bucket, tmp_path):
    s3 = s3_settings(settings, s3_server, s3_bucket, tmp_path / "state")
    catalog = open_catalog(s3)
    ensure_table(catalog, ClickEvent)
    sink = TableSink(catalog, "events.clicks", keep_snapshots=2)
    for n in range(8):
        sink.write(_window(n))
    replaced = {location_key(t.file.file_path) for t in sink.table.scan().plan_files()}
    assert compact(sink.table, keep_snapshots=2) == 16
    for n in range(8, 10):
        sink.write(_window(n))
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="lake/events/clicks/data/stray.parquet", Body=b"PAR1")

    def keys() -> set[str]:
        return {f"{s3_bucket}/{k}" for k in s3_server.keys(s3_bucket)}

    before = keys()
    table = catalog.load_table("events.clicks")
    assert replaced <= before and location_key(table.location()).startswith(f"{s3_bucket}/lake/")

    young = clean(table, keep_metadata=3, min_age=HOUR)  # everything was just written
    assert young.removed == 0 and young.young > 16 and keys() == before

    done = clean(table, keep_metadata=3, min_age=HOUR, now=time.time() + 2 * HOUR)
    after = keys()
    assert done.removed == len(before - after) > 16 and done.files == len(before)
    assert replaced <= before - after and f"{s3_bucket}/lake/events/clicks/data/stray.parquet" not in after
    assert after <= referenced(catalog.load_table("events.clicks"), 3)  # what is left is what the table uses
    assert not [k for k in after if k.endswith("/")]  # no directory markers left by the deletes
    assert catalog.load_table("events.clicks").scan().to_arrow().num_rows == 40
