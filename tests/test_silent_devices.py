"""Silent devices (issue 17): `GET /v1/devices?silentFor=`, the overview's count, the census
gauges in `/metrics`, and vehicles charging on a silent meter flagged in analytics.

The span's parser and the cursor are checked over their whole input space (hypothesis); the
rest against a real daemon, PostgreSQL and Mosquitto, with devices that stop reporting and
start again."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from api import cursors
from api.devices import MAX_SPAN_S, UNITS_S, decode_cursor, encode_cursor, span_s
from api.responses import ApiError
from daemon.services import EmbeddedMosquitto
from simulator.benchkit import parse_metrics
from tests.helpers import iso
from tests.services import DaemonProcess, wait_until

SILENT_AFTER_S = 600  # (the listing's own spans are given in each query)
SHORT_S = 2
# A first page's cursor of `silentFor=5m&stream=meter` (after a device of long ago).
CURSOR_5M_METERS = cursors.encode(
    {"silentFor": 300, "streams": ["meter"], "after": ["2000-01-01T00:00:00+00:00", "meter", "M"]}
)


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(sorted(UNITS_S)))
def test_a_span_is_a_number_and_a_unit_within_ten_years(number: int, unit: str) -> None:
    seconds = number * UNITS_S[unit]
    if 1 <= seconds <= MAX_SPAN_S:
        assert span_s(f"{number}{unit}") == seconds
    else:
        with pytest.raises(ApiError) as refused:
            span_s(f"{number}{unit}")
        assert refused.value.status_code == 400


@given(st.text())
def test_any_other_span_is_a_400_naming_the_parameter(raw: str) -> None:
    try:
        seconds = span_s(raw)
    except ApiError as error:
        assert error.status_code == 400 and error.detail[0]["field"] == "silentFor"
    else:
        assert 1 <= seconds <= MAX_SPAN_S and raw[-1] in UNITS_S and raw[:-1].isdigit()


device_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,20}", fullmatch=True)
instants = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


@given(
    st.integers(min_value=1, max_value=MAX_SPAN_S),
    st.sampled_from([("meter",), ("vehicle",), ("meter", "vehicle")]),
    instants,
    device_ids,
    st.data(),
)
def test_a_cursor_gives_back_what_it_was_made_of(
    seconds: int, streams: tuple[str, ...], at: datetime, device: str, data: st.DataObject
) -> None:
    stream = data.draw(st.sampled_from(streams))
    cursor = encode_cursor(seconds, streams, (at, stream, device))
    assert decode_cursor(cursor) == (seconds, streams, (at, stream, device))


@given(st.text() | st.binary().map(lambda b: b.hex()))
def test_a_made_up_cursor_is_a_400(raw: str) -> None:
    try:
        decode_cursor(raw)
    except ApiError as error:
        assert error.status_code == 400 and error.detail[0]["field"] == "cursor"


@given(
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),
    st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1),
)
def test_a_cursor_of_any_instant_and_offset_is_read_in_utc_or_refused(
    naive: datetime, offset_min: int
) -> None:
    """Past the calendar's ends once in UTC (0001-01-01 at +14:00, say) is a forged cursor,
    not a value the database refuses."""
    at = naive.replace(tzinfo=timezone(timedelta(minutes=offset_min))).isoformat()
    state = {"silentFor": 60, "streams": ["meter"], "after": [at, "meter", "M-1"]}
    try:
        _, _, (ts, _, _) = decode_cursor(cursors.encode(state))
    except ApiError as error:
        assert error.status_code == 400 and error.detail[0]["field"] == "cursor"
    else:
        assert ts.utcoffset() == timedelta(0)
        assert ts == naive.replace(tzinfo=timezone(timedelta(minutes=offset_min)))


# Against the real daemon: its own database, a short SILENT_AFTER_S, a census every 0.2 s.


@pytest.fixture(scope="module")
def silent_daemon(module_db: str, mosquitto: EmbeddedMosquitto) -> Iterator[DaemonProcess]:
    process = DaemonProcess(
        database_url=module_db,
        mqtt_url=mosquitto.url,
        silent_after_s=SILENT_AFTER_S,
        census_interval_s=0.2,
    ).start()
    yield process
    assert process.stop() == 0, process.log()


def meter(meter_id: str, at: datetime, kwh: float = 1.0) -> dict[str, Any]:
    return {"meterId": meter_id, "kwhConsumedAc": kwh, "voltage": 230.0, "timestamp": iso(at)}


def vehicle(vehicle_id: str, at: datetime, kwh: float = 0.5) -> dict[str, Any]:
    return {
        "vehicleId": vehicle_id,
        "soc": 50.0,
        "kwhDeliveredDc": kwh,
        "batteryTemp": 25.0,
        "timestamp": iso(at),
    }


def post(daemon: DaemonProcess, stream: str, *readings: dict[str, Any]) -> None:
    response = httpx.post(
        f"{daemon.base_url}/v1/ingestion/{stream}/batch",
        json={"readings": list(readings)},
        timeout=10,
    )
    assert response.status_code in (200, 201), response.text


def silent(daemon: DaemonProcess, **params: Any) -> list[dict[str, Any]]:
    """Every silent device, page after page (checking that the pages agree)."""
    found: list[dict[str, Any]] = []
    response = daemon.get("/v1/devices", **params)
    while True:
        assert response.status_code == 200, response.text
        body = response.json()
        found += body["devices"]
        if body["next"] is None:
            break
        response = daemon.get("/v1/devices", cursor=body["next"], limit=params.get("limit", 100))
    assert len({(d["stream"], d["deviceId"]) for d in found}) == len(found)  # none twice
    return found


def ids(devices: list[dict[str, Any]]) -> list[str]:
    return [d["deviceId"] for d in devices]


def test_devices_appear_as_they_stop_and_leave_as_they_resume(silent_daemon: DaemonProcess) -> None:
    tag = uuid.uuid4().hex[:6]
    now = datetime.now(UTC)
    # Silent for an hour, ten minutes, and one that reports now.
    post(silent_daemon, "meter", meter(f"M-hour-{tag}", now - timedelta(hours=1)))
    post(silent_daemon, "meter", meter(f"M-ten-{tag}", now - timedelta(minutes=10)))
    post(silent_daemon, "vehicle", vehicle(f"V-ten-{tag}", now - timedelta(minutes=10)))
    post(silent_daemon, "meter", meter(f"M-live-{tag}", now))

    mine = [d for d in silent(silent_daemon, silentFor="5m") if tag in d["deviceId"]]
    assert ids(mine) == [f"M-hour-{tag}", f"M-ten-{tag}", f"V-ten-{tag}"]  # longest first
    last = datetime.fromisoformat(mine[0]["lastReadingAt"].replace("Z", "+00:00"))
    assert abs(last - (now - timedelta(hours=1))) < timedelta(milliseconds=1)
    assert 3590 < mine[0]["silentForSeconds"] < 3700
    only_meters = silent(silent_daemon, silentFor="5m", stream="meter")
    assert {d["stream"] for d in only_meters} == {"meter"}
    assert f"V-ten-{tag}" not in ids(only_meters)
    assert ids([d for d in silent(silent_daemon, silentFor="30m") if tag in d["deviceId"]]) == [
        f"M-hour-{tag}"
    ]

    # The live one stops: past the span it is listed...
    time.sleep(SHORT_S + 0.5)
    assert f"M-live-{tag}" in ids(silent(silent_daemon, silentFor=f"{SHORT_S}s"))
    # ... and a reading of the hour-long silent one makes it leave the listing.
    post(silent_daemon, "meter", meter(f"M-hour-{tag}", datetime.now(UTC)))
    assert f"M-hour-{tag}" not in ids(silent(silent_daemon, silentFor="5m"))
    # An older reading arriving late does not make a device less silent.
    post(silent_daemon, "vehicle", vehicle(f"V-ten-{tag}", now - timedelta(minutes=20)))
    assert f"V-ten-{tag}" in ids(silent(silent_daemon, silentFor="5m"))


def test_pages_cover_the_listing_once_in_order(silent_daemon: DaemonProcess) -> None:
    tag = uuid.uuid4().hex[:6]
    now = datetime.now(UTC)
    # Ties on the timestamp across streams and ids: the key orders them all the same.
    post(
        silent_daemon,
        "meter",
        *(meter(f"P{n:02}-{tag}", now - timedelta(days=2)) for n in range(7)),
    )
    post(
        silent_daemon,
        "vehicle",
        *(vehicle(f"P{n:02}-{tag}", now - timedelta(days=2, minutes=n % 3)) for n in range(6)),
    )
    whole = silent(silent_daemon, silentFor="1d")
    paged = silent(silent_daemon, silentFor="1d", limit=2)
    assert ids(paged) == ids(whole)
    keys = [(d["lastReadingAt"], d["stream"], d["deviceId"]) for d in whole]
    assert [k[0] for k in keys] == sorted(k[0] for k in keys)
    assert sum(tag in d["deviceId"] for d in whole) == 13
    first = silent_daemon.get("/v1/devices", silentFor="1d", limit=2).json()
    assert first["total"] == len(whole) and first["silentForSeconds"] == 86400


def test_a_cursor_may_be_given_with_its_own_query(silent_daemon: DaemonProcess) -> None:
    for params in ({}, {"silentFor": "5m"}, {"stream": "meter"}, {"silentFor": "300s"}):
        response = silent_daemon.get("/v1/devices", cursor=CURSOR_5M_METERS, **params)
        assert response.status_code == 200, response.text
        assert response.json()["silentForSeconds"] == 300


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"silentFor": "15"}, "silentFor"),
        ({"silentFor": "15 m"}, "silentFor"),
        ({"silentFor": "0s"}, "silentFor"),
        ({"silentFor": "3651d"}, "silentFor"),
        ({"silentFor": "-5m"}, "silentFor"),
        ({"stream": "charger"}, "stream"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"cursor": "eyJzaWxlbnRGb3IiOjB9"}, "cursor"),
        ({"stream": ["meter", "vehicle"]}, "stream"),
        ({"silentFor": ["5m", "5m"]}, "silentFor"),
        ({"cursor": CURSOR_5M_METERS, "silentFor": "6m"}, "silentFor"),
        ({"cursor": CURSOR_5M_METERS, "stream": "vehicle"}, "stream"),
        ({"cursor": CURSOR_5M_METERS, "stream": ""}, "stream"),
    ],
)
def test_bad_queries_name_the_parameter(
    silent_daemon: DaemonProcess, params: dict[str, str], field: str
) -> None:
    response = silent_daemon.get("/v1/devices", **params)
    assert response.status_code == 400
    assert response.json()["detail"][0]["field"] == field


def census(daemon: DaemonProcess) -> dict[str, float]:
    return parse_metrics(daemon.get("/metrics").text)


def test_the_gauges_and_the_overview_count_silent_devices(silent_daemon: DaemonProcess) -> None:
    span = f"{SILENT_AFTER_S}s"

    def agreed() -> tuple[dict[str, float], list[dict[str, Any]]] | None:
        """The gauges once they agree with the listing (the census runs every 0.2 s)."""
        metrics, listed = census(silent_daemon), silent(silent_daemon, silentFor=span)
        for stream in ("meter", "vehicle"):
            counted = metrics.get(f'energy_ingest_silent_devices{{stream="{stream}"}}')
            if counted != sum(d["stream"] == stream for d in listed):
                return None
        return metrics, listed

    _, before = wait_until(agreed, timeout_s=10)
    tag = uuid.uuid4().hex[:6]
    post(silent_daemon, "meter", meter(f"G-{tag}", datetime.now(UTC) - timedelta(hours=3)))
    wait_until(lambda: f"G-{tag}" in ids(silent(silent_daemon, silentFor=span)), timeout_s=5)
    metrics, listed = wait_until(agreed, timeout_s=10)
    assert len(listed) == len(before) + 1
    assert (
        metrics['energy_ingest_devices{stream="meter"}']
        >= metrics['energy_ingest_silent_devices{stream="meter"}']
    )
    assert metrics["energy_ingest_census_last_success_unixtime"] > time.time() - 10
    overview = silent_daemon.get("/v1/overview").json()["silentDevices"]
    assert overview == {
        "silentAfterSeconds": SILENT_AFTER_S,
        "meters": sum(d["stream"] == "meter" for d in listed),
        "vehicles": sum(d["stream"] == "vehicle" for d in listed),
    }

    # It reports again: it leaves the listing, and the gauge follows.
    post(silent_daemon, "meter", meter(f"G-{tag}", datetime.now(UTC)))
    metrics, listed = wait_until(
        lambda: (found := agreed()) and len(found[1]) == len(before) and found, timeout_s=10
    )
    assert f"G-{tag}" not in ids(listed)


def test_a_vehicle_charging_on_a_silent_meter_is_flagged(silent_daemon: DaemonProcess) -> None:
    tag = uuid.uuid4().hex[:6]
    car, charger, other = f"EV-{tag}", f"CH-{tag}", f"EV2-{tag}"
    link = httpx.put(
        f"{silent_daemon.base_url}/v1/links", json={"vehicleId": car, "meterId": charger}
    )
    assert link.status_code == 201, link.text
    now = datetime.now(UTC)
    # Its meter's last reading: 30 minutes ago (silent); the vehicle reports now.
    post(silent_daemon, "meter", meter(charger, now - timedelta(minutes=30), kwh=1.0))
    post(silent_daemon, "vehicle", vehicle(car, now, kwh=0.5), vehicle(other, now, kwh=0.5))

    performance = silent_daemon.get(f"/v1/analytics/performance/{car}").json()
    assert [m["meterId"] for m in performance["silentMeters"]] == [charger]
    fleet = silent_daemon.get("/v1/analytics/fleet", limit=10000).json()["vehicles"]
    rows = {v["vehicleId"]: v for v in fleet}
    assert [m["meterId"] for m in rows[car]["silentMeters"]] == [charger]
    assert rows[other]["silentMeters"] == []
    csv = silent_daemon.get("/v1/analytics/fleet", limit=10000, format="csv").text
    assert any(line.startswith(car + ",") and line.endswith(charger) for line in csv.splitlines())

    # The meter reports again (within the session): no longer flagged; and with 0.5 kWh into
    # the battery for 1.0 from the grid, the vehicle is below the threshold: counted.
    post(silent_daemon, "meter", meter(charger, datetime.now(UTC), kwh=1.0))
    performance = silent_daemon.get(f"/v1/analytics/performance/{car}").json()
    assert performance["silentMeters"] == []
    assert performance["efficiencyRatio"] == 0.5
    wait_until(
        lambda: census(silent_daemon)["energy_ingest_vehicles_below_efficiency"] >= 1 or None,
        timeout_s=10,
    )
