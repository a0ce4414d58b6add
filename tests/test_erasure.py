"""`python -m streamapp forget --user-id U`: the user's rows leave every table, including the
events of theirs still in Redis when it ran; other users' rows stay, exactly once; a report and an
audit row. Real valkey, real worker, real SQLite catalog on disk."""

from __future__ import annotations

import asyncio
import dataclasses
import json

from streamapp import names
from streamapp.lake import erased
from streamapp.lake.catalog import open_catalog
from tests.conftest import table_rows, wait_until
from tests.helpers import assert_exactly_once, wait_committed_to_end, wait_rows
from tests.test_dead_letter import STREAM, add, click

VICTIM = "victim"


# One minute, an hour ago, for every click: its window closes at once, and the clicks sent after
# it is committed are late (click() alone picks the minute when called: it may move on meanwhile).
WHEN = json.loads(click("-"))["timestamp"]


def ev(event_id: str, user: str, **fields) -> bytes:
    return click(event_id, user_id=user, timestamp=WHEN, **fields)


def bad(event_id: str, user: str) -> bytes:
    return ev(event_id, user, x="abc")  # refused by the table: a dead letter


async def post_rejected(http, web, tag: str, *users: str) -> None:
    """Events the web refuses (key must be a string): they land in events.rejected, raw JSON and all."""
    body = "\n".join(json.dumps({"type": "keydown", "key": 5, "user_id": u, "event_id": tag + u}) for u in users)
    # the victim's id escaped in the raw JSON too: a substring match would miss it
    body += f'\n{{"type":"keydown","key":5,"user_id":"vic\\u0074im","event_id":"{tag}esc"}}' if VICTIM in users else ""
    async with http.post(web + "/api/events", data=body, headers={"Content-Type": "application/x-ndjson"}) as r:
        assert r.status == 422, await r.text()


def positions(settings) -> dict[str, dict[str, str]]:
    catalog = open_catalog(settings)
    return {
        t: {k: v for k, v in catalog.load_table(t).properties.items() if k.startswith("streamapp.position")}
        for t in ("events.clicks", "events.rejected", "events.clicks_per_minute", names.DEAD_LETTER_TABLE)
    }


def victims(settings) -> dict[str, int]:
    """Rows anywhere that hold the victim's id, per table."""
    found = {}
    for table in ("events.clicks", "events.rejected", names.LATE_TABLE, names.DEAD_LETTER_TABLE):
        rows = table_rows(settings, table)
        found[table] = sum(
            row.get("user_id") == VICTIM
            or any(
                erased.json_user(line) == VICTIM
                for line in (row.get("raw") or row.get("event") or row.get("payload") or "").split("\n")
            )
            for row in rows
        )
    return found


async def test_erase_while_the_users_events_are_in_flight(web, http, settings, redis_server, spawn):
    fast = dataclasses.replace(settings, grace_seconds=0.5)
    r = redis_server.client()
    # Committed before the erasure: clicks, a late click (in events.clicks too), rejected events, dead letters.
    add(r, *(ev(f"v{i}", VICTIM) for i in range(5)), *(ev(f"o{i}", "other") for i in range(5)))
    add(r, ev("v2-0", "victim2"))  # "victim" is a substring of its id: kept
    add(r, bad("dv0", VICTIM))  # a dead letter of the victim's only
    add(r, bad("dv1", VICTIM), bad("do1", "other"))  # a dead letter of both: the other's event stays
    await post_rejected(http, web, "a", VICTIM, "victim2")
    worker = spawn("worker", fast)
    await wait_rows(settings, "events.clicks", 11)
    await wait_rows(settings, "events.rejected", 3)
    await wait_rows(settings, "events.clicks_per_minute", 1)
    add(r, ev("lv0", VICTIM), ev("lo0", "other"))  # its window is committed: late
    await wait_rows(settings, names.LATE_TABLE, 2)
    await wait_rows(settings, names.DEAD_LETTER_TABLE, 4)  # 2 entries x 2 consumers
    worker.stop()

    # In flight: in Redis, no worker running, when the erasure runs.
    add(r, *(ev(f"w{i}", VICTIM) for i in range(3)), *(ev(f"p{i}", "other") for i in range(3)))
    add(r, bad("dv2", VICTIM))
    add(r, ev("lv1", VICTIM))  # late too
    await post_rejected(http, web, "b", VICTIM)
    before = positions(settings)
    forget = spawn(f"forget --user-id {VICTIM}", settings)
    assert await asyncio.to_thread(forget.wait, 60) == 0, forget.output()
    out = forget.output()
    assert "events.clicks: 6 rows removed" in out, out
    assert "events.rejected: 2 rows removed" in out, out
    assert "events.late: 1 rows removed" in out, out
    assert "events.dead_letter: 2 rows removed, 2 rows rewritten without its events" in out, out
    assert "events.clicks_per_minute: no user ids (counts only), untouched" in out, out
    assert "11 rows removed; audit row in events.erasures" in out, out
    assert positions(settings) == before  # the stream positions survived the deletes
    assert victims(settings) == dict.fromkeys(victims(settings), 0)

    # After the erasure: the user comes back (new consent), and the worker reads what was in flight.
    add(r, ev("c0", VICTIM), ev("q0", "other"))
    spawn("worker", fast)
    expected = {f"o{i}" for i in range(5)} | {f"p{i}" for i in range(3)} | {"v2-0", "lo0", "c0", "q0"}
    await wait_rows(settings, "events.clicks", len(expected))
    catalog = open_catalog(settings)
    await wait_committed_to_end(catalog, r, STREAM, "clicks_per_minute", "events.clicks_per_minute", timeout=20)
    await asyncio.sleep(0.5)
    rows = table_rows(settings, "events.clicks")
    assert_exactly_once(rows, expected)
    assert [row["event_id"] for row in rows if row["user_id"] == VICTIM] == ["c0"]
    found = victims(settings)
    # c0 (received after the erasure) is in events.clicks, and in events.late: its minute was committed
    assert found == {"events.clicks": 1, "events.rejected": 0, names.LATE_TABLE: 1, names.DEAD_LETTER_TABLE: 0}
    rejected = table_rows(settings, "events.rejected")
    assert [row["user_id"] for row in rejected] == ["victim2"]
    letters = table_rows(settings, names.DEAD_LETTER_TABLE)
    assert sorted(json.loads(row["payload"])["event_id"] for row in letters) == ["do1", "do1"]
    late = sorted(json.loads(row["event"])["event_id"] for row in table_rows(settings, names.LATE_TABLE))
    # every click after the first commit is late (same minute): the victim's in flight (w*, lv1) never landed
    assert late == ["c0", "lo0", "p0", "p1", "p2", "q0"]

    [audit] = table_rows(settings, names.ERASURES_TABLE)
    assert audit["user_hash"] == erased.user_hash(VICTIM) and VICTIM not in json.dumps(audit, default=str)
    assert audit["rows_removed"] == 11 and json.loads(audit["tables"])["events.clicks"] == 6
    assert audit["command"] == "python -m streamapp forget --user-id"


async def test_erase_while_a_worker_appends_the_users_events(settings, redis_server, spawn, caplog):
    """forget races a worker committing both users' events: its commits conflict and are retried,
    never lost. Afterwards the victim's events received before the erasure are nowhere, those
    received after it are kept, and the other user's are there exactly once."""
    from streamapp.lake.erasure import forget

    r = redis_server.client()
    worker = spawn("worker", dataclasses.replace(settings, window_count=10, window_seconds=0.05))
    await asyncio.to_thread(wait_until, lambda: "ready" in worker.output(), 20, 0.1, "the worker's tables")
    catalog = open_catalog(settings)
    received: dict[str, tuple[str, int]] = {}  # event id -> (user, received at, epoch us)
    report = None

    async def produce(batches: int, tag: str) -> None:
        for b in range(batches):
            events = [ev(f"{tag}{b}-{i}", VICTIM if i % 2 else "other") for i in range(6)]
            entry = add(r, *events)
            at = int(r.xrange(STREAM, entry, entry)[0][1][b"r"])
            received.update({f"{tag}{b}-{i}": (VICTIM if i % 2 else "other", at) for i in range(6)})
            await asyncio.sleep(0.03)

    await produce(20, "a")
    feeding = asyncio.create_task(produce(40, "b"))
    await asyncio.sleep(0.3)
    report = await asyncio.to_thread(forget, catalog, VICTIM, command="test", requested_by=None, keep_snapshots=10)
    await feeding
    await wait_committed_to_end(catalog, r, STREAM, "clicks", "events.clicks")
    erased_us = int(report.erased_at.timestamp() * 1e6)
    kept = {e for e, (user, at) in received.items() if user == "other" or at >= erased_us}
    assert any(user == VICTIM and at >= erased_us for user, at in received.values())  # some came after
    assert_exactly_once(table_rows(settings, "events.clicks"), kept)
    assert report.removed["events.clicks"] > 0
    assert "conflicted" in caplog.text  # the race was real: forget's commit lost to the worker's and retried


def test_an_erasure_record_goes_once_every_position_is_past_it(settings):
    """The sinks need a record only while events received before it may still be in Redis: once
    every stream position in the table is past it (and a day has gone), a later forget prunes it."""
    from datetime import UTC, datetime, timedelta

    from models.click import ClickEvent
    from streamapp.lake.catalog import ensure_table
    from streamapp.lake.erasure import forget

    catalog = open_catalog(settings)
    table = ensure_table(catalog, ClickEvent)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    position = names.position_property(STREAM, "clicks")

    def at(t: datetime) -> None:
        with table.transaction() as tx:
            tx.set_properties({position: f"{int(t.timestamp() * 1000)}-0"})

    at(t0 - timedelta(minutes=1))
    forget(catalog, "u1", command="test", requested_by=None, keep_snapshots=10, now=t0)
    forget(catalog, "u2", command="test", requested_by=None, keep_snapshots=10, now=t0 + timedelta(days=2))
    table.refresh()
    assert set(erased.parse(table.properties)) == {erased.user_hash("u1"), erased.user_hash("u2")}  # not past u1
    at(t0 + timedelta(days=1))  # past u1, not u2
    forget(catalog, "u3", command="test", requested_by=None, keep_snapshots=10, now=t0 + timedelta(days=4))
    table.refresh()
    assert set(erased.parse(table.properties)) == {erased.user_hash("u2"), erased.user_hash("u3")}
    assert table.properties[position] == f"{int((t0 + timedelta(days=1)).timestamp() * 1000)}-0"
    assert len(table_rows(settings, names.ERASURES_TABLE)) == 3
