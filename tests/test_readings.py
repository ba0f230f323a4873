"""Validation of readings (SPEC §2): pure logic, no services."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from ingest.readings import (
    LISTED_REJECTIONS,
    Limits,
    MeterReading,
    Rejected,
    Stream,
    VehicleReading,
    parse_payload,
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
    payload = orjson.dumps([1] * 200_000 + [meter()])
    parsed = parse_payload(Stream.METER, payload, now=NOW, limits=WINDOW, expected_id="M-1")
    assert len(parsed.readings) == 1 and parsed.rejected_count == 200_000
    assert len(parsed.rejected) == LISTED_REJECTIONS  # the first ones, not all
    assert parsed.reason.startswith("200000 of 200001 readings rejected: reading 0: ")
    assert parsed.reason.endswith(f"and {200_000 - LISTED_REJECTIONS} more")
    assert len(parsed.reason) < 4096


def test_a_single_reading_payload_is_summarised_as_its_problems() -> None:
    parsed = parse_payload(Stream.METER, orjson.dumps(meter(voltage=5000)), now=NOW, limits=WINDOW)
    assert parsed.reason == "voltage: Input should be less than or equal to 1000"
