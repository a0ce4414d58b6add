"""Every table the product creates turns pyiceberg's own commit retry off, on SQLite and on
PostgreSQL: that retry re-applies an append onto whatever another writer committed meanwhile,
without our stream-position check, and would double the rows. A table an older version made
without it gets it when a worker starts."""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from pyiceberg.table import TableProperties

from models.click import ClickEvent
from streamapp import app as default_app
from streamapp import names
from streamapp.lake.catalog import all_tables, open_catalog
from streamapp.rejected import Rejected
from tests.conftest import wait_until
from tests.helpers import wait_rows

STREAM = names.stream("click")


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_settings(request, settings):
    if request.param == "postgresql":
        return dataclasses.replace(settings, catalog_uri=request.getfixturevalue("pg_uri"))
    return settings


def click_an_hour_ago(event_id: str) -> bytes:
    """Its aggregate window closes as soon as the grace period has passed."""
    minute = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1)
    when = (minute + timedelta(seconds=59.9)).isoformat()
    return json.dumps({"type": "click", "event_id": event_id, "x": 1, "y": 2, "timestamp": when}).encode()


async def test_every_table_the_product_creates_has_pyiceberg_retries_off(catalog_settings, redis_server, spawn):
    settings = dataclasses.replace(catalog_settings, grace_seconds=0.5)
    # events.clicks as a version before the setting made it: pyiceberg's default retries.
    catalog = open_catalog(settings)
    catalog.create_namespace_if_not_exists("events")
    catalog.create_table(ClickEvent.table, schema=ClickEvent.iceberg_schema(), properties={})
    assert TableProperties.COMMIT_NUM_RETRIES not in catalog.load_table(ClickEvent.table).properties
    # A click (rows in events.clicks, a window of events.clicks_per_minute) and an entry no agent
    # can read (events.dead_letter): every kind of table is made.
    r = redis_server.client()
    r.xadd(STREAM, {"e": click_an_hour_ago("c1"), "n": "1", "r": str(int(time.time() * 1e6))})
    r.xadd(STREAM, {"garbage": b"\xff not an entry"})
    spawn("worker", settings)
    await wait_rows(settings, ClickEvent.table, 1)
    readers = sorted(name for name, agent in default_app.discover_agents().items() if agent.stream.key == STREAM)
    assert len(readers) >= 2  # the raw sink and the aggregate
    await wait_rows(settings, names.DEAD_LETTER_TABLE, len(readers))

    def every_reader_committed() -> list:
        tables = all_tables(open_catalog(settings))
        held = {p for t in tables for p in t.properties}
        return tables if all(names.position_property(STREAM, a) in held for a in readers) else []

    # Each reader's sink committed its position: its tables (an aggregate's included) are made.
    tables = wait_until(every_reader_committed, 30, 0.2, "a committed position for every agent of the click stream")
    made = {".".join(t.name()) for t in tables}
    declared = {m.table for m in default_app.discover_models().values()} | {Rejected.table}
    assert declared | {names.LATE_TABLE, names.DEAD_LETTER_TABLE} <= made
    assert len(made) > len(declared) + 2  # an aggregate's table too
    retries = {".".join(t.name()): t.properties.get(TableProperties.COMMIT_NUM_RETRIES) for t in tables}
    assert retries == dict.fromkeys(made, "0")
