"""Validation of readings (SPEC §2): pure logic, no services."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.readings import (
    LISTED_REJECTIONS,
    Limits,
    MeterReading,
    Rejected,
    Stream,
    VehicleReading,
    parse_payload,
    validate_items,
    validate_reading,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
WINDOW = Limits(retention=timedelta(days=30), future_skew=timedelta(minutes=5))


def meter(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "meterId": "M-1",
        "kwhConsumedAc": 1.25,
        "voltage": 231.5,
        "timestamp": "2026-11-25T11:59:00Z",
    }
    body.update(changes)
    return body


def vehicle(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "vehicleId": "V-1",
        "soc": 55,
        "kwhDeliveredDc": 1.1,
        "batteryTemp": 31.5,
        "timestamp": "2026-11-25T13:59:00+02:00",
    }
    body.update(changes)
    return body


def check(stream: Stream, body: object, **kwargs: object) -> object:
    return validate_reading(stream, body, now=NOW, limits=WINDOW, **kwargs)  # type: ignore[arg-type]


def fields_at_fault(result: object) -> set[str]:
    assert isinstance(result, Rejected), result
    return {problem.field for problem in result.problems}


def test_valid_meter_reading_keeps_its_values() -> None:
    reading = check(Stream.METER, meter())
    assert isinstance(reading, MeterReading)
    assert (reading.meter_id, reading.kwh_consumed_ac, reading.voltage) == ("M-1", 1.25, 231.5)
    assert reading.timestamp == datetime(2026, 11, 25, 11, 59, tzinfo=UTC)
    assert reading.timestamp.tzinfo is UTC  # whatever offset it came with


def test_valid_vehicle_reading_with_offset_timestamp() -> None:
    reading = check(Stream.VEHICLE, vehicle())
    assert isinstance(reading, VehicleReading)
    assert reading.timestamp == datetime(2026, 11, 25, 11, 59, tzinfo=UTC)
    assert reading.soc == 55.0


@pytest.mark.parametrize(
    "timestamp",
    ["2026-11-25T11:59:00Z\x00<script>", "2026-11-25T11:59:00\x00Z", "\x002026-11-25T11:59:00Z"],
)
def test_a_timestamp_holding_a_nul_is_refused_not_read_up_to_it(timestamp: str) -> None:
    """Python 3.11's fromisoformat stops reading at a NUL: what followed was ignored."""
    assert fields_at_fault(check(Stream.METER, meter(timestamp=timestamp))) == {"timestamp"}


@pytest.mark.parametrize(
    "timestamp",
    ["2026-11-25t11:59:00z", "2026-11-25T11:59:00z", "2026-11-25t11:59:00Z", "2026-11-25T11:59Z"],
)
def test_rfc_3339_lower_case_t_and_z_are_the_same_moment(timestamp: str) -> None:
    reading = check(Stream.METER, meter(timestamp=timestamp))
    assert isinstance(reading, MeterReading), reading
    assert reading.timestamp == datetime(2026, 11, 25, 11, 59, tzinfo=UTC)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"kwhConsumedAc": -0.1}, "kwhConsumedAc"),
        ({"voltage": 1000.5}, "voltage"),
        ({"voltage": "230"}, "voltage"),
        ({"voltage": True}, "voltage"),
        ({"meterId": ""}, "meterId"),
        ({"meterId": "has space"}, "meterId"),
        ({"meterId": "x" * 65}, "meterId"),
        ({"meterId": 17}, "meterId"),
        ({"timestamp": "2026-11-25T11:59:00"}, "timestamp"),
        ({"timestamp": 1764071940}, "timestamp"),
        ({"timestamp": "yesterday"}, "timestamp"),
    ],
)
def test_bad_meter_field_is_named(changes: dict[str, object], field: str) -> None:
    assert field in fields_at_fault(check(Stream.METER, meter(**changes)))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"soc": 100.01}, "soc"),
        ({"soc": -1}, "soc"),
        ({"batteryTemp": -50.5}, "batteryTemp"),
        ({"batteryTemp": 121}, "batteryTemp"),
        ({"kwhDeliveredDc": -1}, "kwhDeliveredDc"),
    ],
)
def test_bad_vehicle_field_is_named(changes: dict[str, object], field: str) -> None:
    assert field in fields_at_fault(check(Stream.VEHICLE, vehicle(**changes)))


def test_missing_fields_are_each_named() -> None:
    assert fields_at_fault(check(Stream.METER, {"meterId": "M-1"})) == {
        "kwhConsumedAc",
        "voltage",
        "timestamp",
    }


def test_reading_too_far_in_the_future_is_rejected() -> None:
    ahead = (NOW + timedelta(minutes=6)).isoformat()
    assert fields_at_fault(check(Stream.METER, meter(timestamp=ahead))) == {"timestamp"}
    within = (NOW + timedelta(minutes=4)).isoformat()
    assert isinstance(check(Stream.METER, meter(timestamp=within)), MeterReading)


def test_reading_older_than_retention_is_rejected() -> None:
    old = (NOW - timedelta(days=30, seconds=1)).isoformat()
    assert fields_at_fault(check(Stream.METER, meter(timestamp=old))) == {"timestamp"}


def test_payload_id_must_match_the_topic() -> None:
    result = check(Stream.METER, meter(meterId="M-2"), expected_id="M-1")
    assert fields_at_fault(result) == {"meterId"}
    assert isinstance(result, Rejected) and "M-1" in result.reason


def test_array_payload_keeps_good_readings_beside_a_bad_one() -> None:
    payload = orjson.dumps([meter(), meter(voltage=5000), meter(timestamp="2026-11-25T11:58:00Z")])
    parsed = parse_payload(Stream.METER, payload, now=NOW, limits=WINDOW, expected_id="M-1")
    assert len(parsed.readings) == 2
    assert [r.index for r in parsed.rejected] == [1]
    assert parsed.rejected[0].reason.startswith("reading 1: voltage")


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "empty array"),
        (b"42", "JSON object"),
        (b'{"meterId": "M-1", "voltage": NaN}', "not valid JSON"),
    ],
)
def test_unusable_payloads_say_why(payload: bytes, words: str) -> None:
    parsed = parse_payload(Stream.METER, payload, now=NOW, limits=WINDOW)
    assert parsed.readings == []
    assert words in parsed.rejected[0].reason


@pytest.mark.parametrize("timestamp", ["yesterday", 1764071940, None])
def test_a_timestamp_that_is_not_iso_text_says_what_is_expected(timestamp: object) -> None:
    result = check(Stream.METER, meter(timestamp=timestamp))
    assert isinstance(result, Rejected)
    assert [str(p) for p in result.problems] == [
        "timestamp: must be an ISO 8601 string with an offset, e.g. 2026-01-01T00:00:00Z"
    ]


def test_energy_above_the_maximum_per_reading_is_rejected() -> None:
    result = check(Stream.METER, meter(kwhConsumedAc=1.7e308))
    assert fields_at_fault(result) == {"kwhConsumedAc"}
    assert isinstance(result, Rejected) and "MAX_KWH_PER_READING" in result.reason
    assert not isinstance(check(Stream.METER, meter(kwhConsumedAc=1000.0)), Rejected)


@pytest.mark.parametrize("timestamp", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"])
def test_a_timestamp_past_the_calendar_in_utc_is_rejected_not_raised(timestamp: str) -> None:
    result = check(Stream.METER, meter(timestamp=timestamp))
    assert isinstance(result, Rejected)
    assert "outside the calendar" in result.reason


def test_one_summary_for_a_payload_whatever_it_holds() -> None:
    payload = orjson.dumps([1] * 9_999 + [meter()])
    parsed = parse_payload(Stream.METER, payload, now=NOW, limits=WINDOW, expected_id="M-1")
    assert len(parsed.readings) == 1 and parsed.rejected_count == 9_999
    assert len(parsed.rejected) == LISTED_REJECTIONS  # the first ones, not all
    assert parsed.reason.startswith("9999 of 10000 readings rejected: reading 0: ")
    assert parsed.reason.endswith(f"and {9_999 - LISTED_REJECTIONS} more")
    assert len(parsed.reason) < 4096


def test_a_single_reading_payload_is_summarised_as_its_problems() -> None:
    parsed = parse_payload(Stream.METER, orjson.dumps(meter(voltage=5000)), now=NOW, limits=WINDOW)
    assert parsed.reason == "voltage: Input should be less than or equal to 1000"


# Values a field may be sent with: good ones, wrong types, out of range, out of the window.
_ANY_VALUE: st.SearchStrategy[object] = st.one_of(
    st.sampled_from(
        [1.25, 0.0, -1.0, 5000.0, 1e9, 55, True, None, "1.25", [], {}, "M-1", "M-2", "V-1"]
    ),
    st.sampled_from(
        [
            "2026-11-25T11:59:00Z",
            "2026-11-25T13:59:00+02:00",
            "2026-11-25T12:30:00Z",  # beyond the future skew
            "2026-09-01T00:00:00Z",  # older than the retention
            "2026-11-25T11:59:00",  # no offset
            "2026-11-25T23:59:60Z",
            "yesterday",
        ]
    ),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)


@st.composite
def _items(draw: st.DrawFn, stream: Stream) -> list[object]:
    base = meter if stream is Stream.METER else vehicle
    fields = list(base())
    items: list[object] = []
    for _ in range(draw(st.integers(min_value=1, max_value=12))):
        kind = draw(st.sampled_from(["good", "changed", "missing", "extra", "not an object"]))
        body = base()
        if kind == "changed":
            body[draw(st.sampled_from(fields))] = draw(_ANY_VALUE)
        elif kind == "missing":
            del body[draw(st.sampled_from(fields))]
        elif kind == "extra":
            body["other"] = draw(_ANY_VALUE)
        items.append(body if kind != "not an object" else draw(_ANY_VALUE))
    return items


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    stream=st.sampled_from(list(Stream)),
    expected=st.sampled_from([None, "M-1", "V-1"]),
    keep_all=st.booleans(),
)
def test_an_array_is_judged_as_its_items_one_by_one(
    data: st.DataObject, stream: Stream, expected: str | None, keep_all: bool
) -> None:
    """Arrays are validated in one call when every item is well formed: the outcome (readings,
    their positions, rejections and their reasons) is the same as validating each item alone."""
    items = data.draw(_items(stream))
    parsed = validate_items(
        stream, items, now=NOW, limits=WINDOW, expected_id=expected, keep_all=keep_all
    )
    alone = [
        validate_reading(stream, item, now=NOW, limits=WINDOW, expected_id=expected, index=i)
        for i, item in enumerate(items)
    ]
    assert parsed.readings == [r for r in alone if not isinstance(r, Rejected)]
    assert parsed.positions == [i for i, r in enumerate(alone) if not isinstance(r, Rejected)]
    rejected = [r for r in alone if isinstance(r, Rejected)]
    assert parsed.rejected_count == len(rejected)
    listed = rejected if keep_all else rejected[:LISTED_REJECTIONS]
    assert [(r.index, r.reason) for r in parsed.rejected] == [(r.index, r.reason) for r in listed]


@settings(max_examples=50, deadline=None)
@given(cap=st.integers(min_value=1, max_value=30), extra=st.integers(min_value=-3, max_value=30))
def test_an_array_over_the_cap_is_refused_whole_before_validation(cap: int, extra: int) -> None:
    """At most `max_items` readings in one array (MAX_BATCH_READINGS): a larger one, even of
    valid readings, is refused whole with its count; up to the cap each item is judged."""
    count = max(1, cap + extra)
    minutes = [f"2026-11-25T{10 + m // 60:02d}:{m % 60:02d}:00Z" for m in range(count)]
    payload = orjson.dumps([meter(timestamp=ts) for ts in minutes])
    limits = Limits(retention=WINDOW.retention, future_skew=WINDOW.future_skew, max_items=cap)
    parsed = parse_payload(Stream.METER, payload, now=NOW, limits=limits, expected_id="M-1")
    if count <= cap:
        assert len(parsed.readings) == count and parsed.rejected_count == 0
    else:
        assert parsed.readings == [] and parsed.rejected_count == 1
        assert parsed.reason == (
            f"{count} readings in one array; at most {cap} (MAX_BATCH_READINGS)"
        )
