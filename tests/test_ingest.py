"""Body parsing and validation without I/O: formats, limits, normalisation, error descriptions."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from streamapp.engine.app import App
from streamapp.web.ingest import JSON, NDJSON, Ingest, InvalidBody, TooManyEvents, uuid7
from streamapp.web.wire import BodyError, body_kind

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ingest() -> Ingest:
    return Ingest(App().discover_models(), max_events=500, max_event_bytes=32 * 1024)


def test_uuid7_is_a_valid_time_ordered_uuid():
    ids = []
    for _ in range(3):
        ids.append(uuid7())
        time.sleep(0.002)
    for value in ids:
        u = uuid.UUID(value)
        assert u.version == 7 and u.variant == uuid.RFC_4122
        assert abs((u.int >> 80) - time.time_ns() // 1_000_000) < 5_000
    assert ids == sorted(ids)
    assert len({uuid7() for _ in range(10_000)}) == 10_000


@pytest.mark.parametrize(
    ("header", "kind"),
    [
        ("", JSON),
        ("application/json", JSON),
        ("Application/JSON; charset=utf-8", JSON),
        ("text/plain;charset=UTF-8", JSON),
        ("application/x-ndjson", NDJSON),
        ("application/jsonl", NDJSON),
    ],
)
def test_content_types(header, kind):
    assert body_kind(header) == kind


@pytest.mark.parametrize("header", ["text/html", "multipart/form-data; boundary=x", "application/json; charset=utf-16"])
def test_other_content_types_are_415(header):
    with pytest.raises(BodyError) as e:
        body_kind(header)
    assert e.value.status == 415


def test_fast_and_slow_paths_normalise_alike(ingest):
    good = {"type": "click", "x": 1, "y": 2, "event_id": "a", "timestamp": 1_700_000_000_000}
    fast = ingest.parse(json.dumps([good]).encode(), JSON, NOW)
    slow = ingest.parse(json.dumps([good, {"type": "nope"}]).encode(), JSON, NOW)
    assert fast.accepted[0].payload == slow.accepted[0].payload
    stored = msgspec.json.decode(fast.accepted[0].payload)
    assert stored["timestamp"] == "2023-11-14T22:13:20Z" and stored["type"] == "click"


def test_missing_timestamp_is_the_receive_time(ingest):
    [a] = ingest.parse(b'{"type":"keydown","key":"x"}', JSON, NOW).accepted
    assert msgspec.json.decode(a.payload)["timestamp"] == "2026-11-27T12:00:00Z"


def test_ndjson_counts_lines_against_the_limit(ingest):
    body = b"\n".join([b'{"type":"click","x":1,"y":1}'] * 501)
    with pytest.raises(TooManyEvents):
        ingest.parse(body, NDJSON, NOW)


def test_top_level_scalar_is_one_rejected_event(ingest):
    batch = ingest.parse(b'"hello"', JSON, NOW)
    assert batch.accepted == [] and batch.errors[0].message.startswith("an event must be a JSON object")
    assert batch.rejected[0].raw == '"hello"'


def test_event_id_with_control_characters_is_rejected(ingest):
    batch = ingest.parse(b'{"type":"click","x":1,"y":1,"event_id":"a\\u0000b"}', JSON, NOW)
    assert batch.errors[0].field == "event_id"
    batch = ingest.parse(json.dumps({"type": "click", "x": 1, "y": 1, "event_id": "x" * 129}).encode(), JSON, NOW)
    assert batch.errors[0].field == "event_id" and "128" in batch.errors[0].message


@pytest.mark.parametrize("kind", [["click"], {"a": 1}, 5, True, ""])
def test_type_of_any_json_kind_is_a_clear_rejection(ingest, kind):
    batch = ingest.parse(json.dumps({"type": kind, "x": 1, "y": 1}).encode(), JSON, NOW)
    assert batch.accepted == [] and batch.errors[0].field == "type"
    assert batch.errors[0].message.startswith("unknown event type") and "click, keydown" in batch.errors[0].message


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_field = st.sampled_from(
    ["type", "x", "y", "button", "key", "code", "alt", "event_id", "timestamp", "properties", "user_id", "extra"]
)
_eventish = st.dictionaries(_field, st.sampled_from(["click", "keydown"]) | _json, max_size=8)


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(_eventish | _json, min_size=1, max_size=6))
def test_any_json_batch_is_answered_event_by_event(ingest, items):
    """Whatever the JSON, every item is either accepted or has one error; nothing else escapes."""
    batch = ingest.parse(json.dumps(items).encode(), JSON, NOW)
    assert batch.accepted_events + len(batch.errors) == len(items)
    assert sorted([i for a in batch.accepted for i in a.indexes] + [e.index for e in batch.errors]) == list(
        range(len(items))
    )
    assert len(batch.rejected) == len(batch.errors)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(min_size=1, max_size=200), kind=st.sampled_from([JSON, NDJSON]))
def test_any_bytes_get_a_batch_or_a_body_error(ingest, body, kind):
    try:
        ingest.parse(body, kind, NOW)
    except InvalidBody as e:  # TooManyEvents included
        assert e.message


def test_an_array_of_mixed_types_is_one_group_per_type_in_request_order(ingest):
    events = [
        {"type": "click", "x": 1, "y": 1, "event_id": "c1"},
        {"type": "keydown", "key": "a", "event_id": "k1"},
        {"type": "click", "x": 2, "y": 2, "event_id": "c2"},
    ]
    for body, kind in ((json.dumps(events), JSON), ("\n".join(map(json.dumps, events)), NDJSON)):
        clicks, keydowns = ingest.parse(body.encode(), kind, NOW).accepted
        assert (clicks.event_type, list(clicks.indexes), clicks.ids) == ("click", [0, 2], ["c1", "c2"])
        assert (keydowns.event_type, list(keydowns.indexes), keydowns.ids) == ("keydown", [1], ["k1"])
        assert [json.loads(line)["x"] for line in clicks.payload.split(b"\n")] == [1, 2]


def test_the_size_limit_is_per_event_not_per_group():
    small = Ingest(App().discover_models(), max_events=500, max_event_bytes=400)
    fits = {"type": "click", "x": 1, "y": 1, "properties": {"pad": "x" * 100}}
    batch = small.parse(json.dumps([fits] * 5).encode(), JSON, NOW)
    assert batch.accepted_events == 5 and len(batch.accepted[0].payload) > 400
    batch = small.parse(json.dumps([fits, {**fits, "properties": {"pad": "x" * 400}}, fits]).encode(), JSON, NOW)
    assert list(batch.accepted[0].indexes) == [0, 2] and [e.index for e in batch.errors] == [1]
    assert "the limit is 400" in batch.errors[0].message


@pytest.mark.parametrize("kind", [JSON, NDJSON])
def test_one_bad_event_id_in_a_batch_is_refused_alone(ingest, kind):
    events = [{"type": "click", "x": 1, "y": 1, "event_id": f"ok{i}"} for i in range(3)]
    events[1]["event_id"] = "tab\there"
    body = json.dumps(events) if kind == JSON else "\n".join(map(json.dumps, events))
    batch = ingest.parse(body.encode(), kind, NOW)
    assert batch.accepted[0].ids == ["ok0", "ok2"]
    [error] = batch.errors
    assert (error.index, error.event_id, error.field) == (1, "tab\there", "event_id")
    assert error.message == "contains a control character (U+0000 to U+001F or U+007F)"
    assert json.loads(batch.rejected[0].raw)["event_id"] == "tab\there"  # kept as sent


# The first and last days a datetime can hold, and every offset RFC 3339 allows (-23:59 to +23:59).
_LIMIT_DAYS = ("0001-01-01", "9999-12-31")
_OFFSETS = ["Z"] + [f"{'+' if m >= 0 else '-'}{abs(m) // 60:02d}:{abs(m) % 60:02d}" for m in range(-1439, 1440)]
FAR_FUTURE = 10**12  # STREAMAPP_MAX_FUTURE_SECONDS past year 9999: conversion to UTC is the last check


def _offset(suffix: str) -> int:
    """The offset of an RFC 3339 suffix, in minutes."""
    return 0 if suffix == "Z" else (1 if suffix[0] == "+" else -1) * (int(suffix[1:3]) * 60 + int(suffix[4:6]))


@pytest.mark.parametrize("max_future", [86_400, FAR_FUTURE])
@pytest.mark.parametrize("kind", [JSON, NDJSON])
def test_every_offset_on_the_first_and_last_days_is_accepted_or_refused_by_name(kind, max_future):
    """Converting these to UTC overflows (9999-12-31 west of UTC, 0001-01-01 east of it): each is
    refused on its own, naming `timestamp`, beside a good event, on the fast and slow paths alike;
    with a limit far enough ahead, the ones that stay within year 9999 in UTC are stored in UTC."""
    ingest = Ingest(App().discover_models(), max_events=500, max_event_bytes=32 * 1024, max_future_seconds=max_future)
    times = [f"{day}T{clock}{o}" for day in _LIMIT_DAYS for clock in ("00:00:00", "23:59:59.999999") for o in _OFFSETS]
    good = {"type": "click", "x": 1, "y": 1, "event_id": "good"}
    for start in range(0, len(times), 499):
        chunk = times[start : start + 499]
        events = [good] + [{"type": "click", "x": 1, "y": 1, "event_id": t, "timestamp": t} for t in chunk]
        body = json.dumps(events) if kind == JSON else "\n".join(map(json.dumps, events))
        batch = ingest.parse(body.encode(), kind, NOW)
        stored = {
            e["event_id"]: e["timestamp"]
            for e in map(json.loads, b"\n".join(a.payload for a in batch.accepted).split(b"\n"))
        }
        refused = {e.event_id: (e.field, e.message) for e in batch.errors}
        assert len(stored) + len(refused) == len(events) and "good" in stored
        for t in chunk:
            if t.startswith("0001"):
                assert refused[t] == ("timestamp", "is before 2000-01-01"), t
            elif max_future == 86_400:
                assert refused[t][0] == "timestamp" and "ahead of the server's clock" in refused[t][1], t
            elif t[11:19] == "23:59:59" and _offset(t[26:]) < 0:  # past the year 9999 in UTC
                assert refused[t] == (
                    "timestamp",
                    "is after 9999-12-31T23:59:59.999999Z, the latest time streamapp can store",
                ), t
            else:
                utc = datetime.fromisoformat(t).astimezone(UTC)
                assert stored[t] == utc.isoformat().replace("+00:00", "Z"), t


_MAX_MS = 253_402_300_799_999  # the model's bound: 9999-12-31T23:59:59.999Z
NEAR_LIMITS = st.one_of(
    st.builds(
        "{}T{:02d}:{:02d}:{:02d}{}{}".format,
        st.sampled_from(["0001-01-01", "0001-01-02", "9999-12-30", "9999-12-31"]),
        st.integers(0, 23),
        st.integers(0, 59),
        st.integers(0, 59),
        st.sampled_from(["", ".999999", ".000001", ".5"]),
        st.sampled_from(_OFFSETS),
    ),
    st.integers(_MAX_MS - 10**8, _MAX_MS + 10**8),  # epoch ms at and beyond the model's bound
    st.integers(-(10**3), 10**3),
    st.integers(-(2**70), 2**70),
)


@hsettings(max_examples=500, deadline=None)
@given(
    times=st.lists(NEAR_LIMITS, min_size=1, max_size=5),
    kind=st.sampled_from([JSON, NDJSON]),
    max_future=st.sampled_from([86_400, FAR_FUTURE]),
)
def test_timestamps_near_the_datetime_limits_are_accepted_or_refused_by_name(times, kind, max_future):
    ingest = Ingest(App().discover_models(), max_events=500, max_event_bytes=32 * 1024, max_future_seconds=max_future)
    events = [{"type": "click", "x": 1, "y": 1, "event_id": f"e{i}", "timestamp": t} for i, t in enumerate(times)]
    events.append({"type": "click", "x": 1, "y": 1, "event_id": "good"})
    body = json.dumps(events) if kind == JSON else "\n".join(map(json.dumps, events))
    batch = ingest.parse(body.encode(), kind, NOW)
    assert batch.accepted_events + len(batch.errors) == len(events)
    assert {e.field for e in batch.errors} <= {"timestamp"} and "good" in batch.accepted[0].ids
    for line in b"\n".join(a.payload for a in batch.accepted).split(b"\n"):
        assert json.loads(line)["timestamp"].endswith("Z")  # stored in UTC
