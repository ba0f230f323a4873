"""Fleet analytics and series (SPEC §5, §6) against totals computed independently, by plain
SQL over the raw readings: duplicates, late readings, readings before and after a link, a
relink inside an hour, windows that cut hours. Readings go in through the daemon's own write
path (which keeps the hourly roll-ups); sessions are written straight into their table, to
place them in the past."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.config import Settings
from tests.figures import independent
from tests.helpers import iso
from tests.services import DaemonProcess
from tests.streams import assert_rollups_match_history

NOW = datetime.now(UTC).replace(second=0, microsecond=0)


@pytest.fixture
async def db(module_db: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(module_db)
    yield conn
    await conn.close()


def post_readings(
    daemon: DaemonProcess, stream: str, readings: list[dict[str, Any]], twice: bool = False
) -> None:
    for _ in range(2 if twice else 1):
        for start in range(0, len(readings), 500):
            response = httpx.post(
                f"{daemon.base_url}/v1/ingestion/{stream}/batch",
                json={"readings": readings[start : start + 500]},
                timeout=30,
            )
            assert response.status_code == 201, response.text
            assert response.json()["rejected"] == 0, response.text


def meter_reading(meter: str, at: datetime, kwh: float) -> dict[str, Any]:
    return {"meterId": meter, "kwhConsumedAc": kwh, "voltage": 230.0, "timestamp": iso(at)}


def vehicle_reading(
    vehicle: str, at: datetime, kwh: float, temp: float, soc: float
) -> dict[str, Any]:
    return {
        "vehicleId": vehicle,
        "soc": soc,
        "kwhDeliveredDc": kwh,
        "batteryTemp": temp,
        "timestamp": iso(at),
    }


def comparable(body: dict[str, Any]) -> dict[str, Any]:
    keys = ("totalAcConsumedKwh", "totalDcDeliveredKwh", "readings", "avgBatteryTemp")
    return {
        **{k: body[k] for k in keys},
        "meters": [(m["meterId"], m["readings"], m["acConsumedKwh"]) for m in body["meters"]],
        "efficiencyRatio": body["efficiencyRatio"],
    }


def window_params(start: datetime, end: datetime) -> dict[str, str]:
    return {"startTime": iso(start), "endTime": iso(end)}


def fleet_rows(daemon: DaemonProcess, start: datetime, end: datetime) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    params: dict[str, Any] = {**window_params(start, end), "limit": 10_000}
    while True:
        page = httpx.get(f"{daemon.base_url}/v1/analytics/fleet", params=params, timeout=30)
        assert page.status_code == 200, page.text
        body = page.json()
        for row in body["vehicles"]:
            assert row["vehicleId"] not in rows  # never twice across pages
            rows[row["vehicleId"]] = row
        if body["next"] is None:
            return rows
        params = {"cursor": body["next"], "limit": 10_000}


def one(daemon: DaemonProcess, vehicle: str, start: datetime, end: datetime) -> dict[str, Any]:
    response = httpx.get(
        f"{daemon.base_url}/v1/analytics/performance/{vehicle}",
        params=window_params(start, end),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def check(
    daemon: DaemonProcess, db: asyncpg.Connection, vehicle: str, start: datetime, end: datetime
) -> dict[str, Any]:
    """The vehicle's figures from the per-vehicle route and the fleet route, both against
    the raw readings."""
    expected = await independent(db, vehicle, start, end)
    alone = one(daemon, vehicle, start, end)
    assert comparable(alone) == expected, (start, end)
    fleet = await asyncio.to_thread(fleet_rows, daemon, start, end)
    if expected["readings"]["vehicle"] or expected["readings"]["meter"]:
        row = fleet[vehicle]
        assert comparable(row) == expected
        assert row["alert"] == alone["alert"]
    else:
        assert vehicle not in fleet
    return alone


async def test_duplicates_late_readings_links_and_a_relink_inside_an_hour(
    daemon: DaemonProcess, db: asyncpg.Connection
) -> None:
    tag = uuid.uuid4().hex[:6]
    vehicle, first, second = f"FV-{tag}", f"FM1-{tag}", f"FM2-{tag}"
    base = NOW - timedelta(hours=6)
    linked = base + timedelta(hours=1, minutes=17)  # inside an hour
    relinked = base + timedelta(hours=3, minutes=41)  # inside another
    await db.execute(
        "INSERT INTO charging_sessions (vehicle_id, meter_id, started_at, ended_at) "
        "VALUES ($1, $2, $3, $4), ($1, $5, $4, NULL)",
        vehicle,
        first,
        linked,
        relinked,
        second,
    )
    minutes = range(0, 6 * 60, 7)
    meters = [
        meter_reading(m, base + timedelta(minutes=t), 0.1 + t / 1000)
        for t in minutes
        for m in (first, second)
    ]
    vehicles = [
        vehicle_reading(vehicle, base + timedelta(minutes=t), 0.08 + t / 2000, 20 + t % 9, t % 100)
        for t in minutes
    ]
    newest, late = vehicles[-20:], vehicles[:-20]
    post_readings(daemon, "vehicle", newest)
    post_readings(daemon, "vehicle", late, twice=True)  # late, and each of them twice
    post_readings(daemon, "meter", meters, twice=True)
    windows = [
        (base - timedelta(hours=1), NOW + timedelta(minutes=5)),  # all of it
        (base + timedelta(minutes=23), base + timedelta(hours=4, minutes=47)),  # cuts hours
        (linked - timedelta(minutes=3), linked + timedelta(minutes=11)),  # within an hour
        (relinked, relinked + timedelta(hours=1)),
        (base - timedelta(hours=3), base),  # before anything
    ]
    for start, end in windows:
        await check(daemon, db, vehicle, start, end)
    whole = one(daemon, vehicle, *windows[0])
    assert [m["meterId"] for m in whole["meters"]] == [first, second]
    assert whole["readings"]["vehicle"] == len(vehicles)  # copies counted once
    await assert_rollups_match_history(db, [first, second], [vehicle])


moments = st.integers(min_value=0, max_value=5 * 60 * 60)  # seconds into the last 5 hours


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    readings=st.lists(st.tuples(moments, st.floats(0, 5), st.booleans()), min_size=1, max_size=40),
    sessions=st.lists(moments, min_size=1, max_size=3, unique=True),
    window=st.tuples(moments, st.integers(1, 6 * 60 * 60)),
)
def test_any_readings_sessions_and_window_agree_with_the_raw_rows(
    daemon: DaemonProcess,
    module_db: str,
    readings: list[tuple[int, float, bool]],
    sessions: list[int],
    window: tuple[int, int],
) -> None:
    tag = uuid.uuid4().hex[:8]
    vehicle = f"PV-{tag}"
    meters = [f"PM{n}-{tag}" for n in range(len(sessions))]
    base = NOW - timedelta(hours=5)
    at = {s: base + timedelta(seconds=s) for s, _, _ in readings}
    meter_rows, vehicle_rows = [], []
    for n, (second, kwh, twice) in enumerate(readings):
        for meter in meters:
            meter_rows.append(meter_reading(meter, at[second], round(kwh, 6)))
        vehicle_rows.append(
            vehicle_reading(vehicle, at[second], round(kwh * 0.9, 6), 20 + n % 7, 50)
        )
        if twice:
            meter_rows.append(meter_reading(meters[0], at[second], round(kwh, 6)))
    post_readings(daemon, "meter", meter_rows)
    post_readings(daemon, "vehicle", vehicle_rows)
    starts = sorted(base + timedelta(seconds=s) for s in sessions)
    start, length = window
    bounds = (base + timedelta(seconds=start), base + timedelta(seconds=start + length))

    async def run() -> None:
        db = await asyncpg.connect(module_db)
        try:
            for n, (meter, begins) in enumerate(zip(meters, starts, strict=True)):
                ends = starts[n + 1] if n + 1 < len(starts) else None
                await db.execute(
                    "INSERT INTO charging_sessions (vehicle_id, meter_id, started_at, ended_at) "
                    "VALUES ($1, $2, $3, $4)",
                    vehicle,
                    meter,
                    begins,
                    ends,
                )
            await check(daemon, db, vehicle, *bounds)
        finally:
            await db.close()

    asyncio.run(run())


async def test_series_buckets_agree_with_the_raw_rows(
    daemon: DaemonProcess, db: asyncpg.Connection
) -> None:
    tag = uuid.uuid4().hex[:6]
    vehicle, meter = f"SV-{tag}", f"SM-{tag}"
    base = NOW - timedelta(hours=30)
    await db.execute(
        "INSERT INTO charging_sessions (vehicle_id, meter_id, started_at) VALUES ($1, $2, $3)",
        vehicle,
        meter,
        base + timedelta(hours=2, minutes=33),
    )
    minutes = range(0, 30 * 60, 13)
    post_readings(
        daemon, "meter", [meter_reading(meter, base + timedelta(minutes=t), 0.2) for t in minutes]
    )
    post_readings(
        daemon,
        "vehicle",
        [
            vehicle_reading(vehicle, base + timedelta(minutes=t), 0.17, 25 + t % 5, t % 97)
            for t in minutes
        ],
    )
    start, end = base + timedelta(minutes=50), NOW - timedelta(minutes=20)
    for bucket, width in (
        ("15m", timedelta(minutes=15)),
        ("1h", timedelta(hours=1)),
        ("1d", timedelta(days=1)),
    ):
        body = httpx.get(
            f"{daemon.base_url}/v1/analytics/performance/{vehicle}/series",
            params={**window_params(start, end), "bucket": bucket},
            timeout=30,
        ).json()
        assert body["bucket"] == bucket
        for point in body["series"]:
            lo = datetime.fromisoformat(point["start"])
            b_lo, b_hi = max(lo, start), min(lo + width, end)
            expected = await independent(db, vehicle, b_lo, b_hi)
            assert point["acKwh"] == expected["totalAcConsumedKwh"], (bucket, lo)
            assert point["dcKwh"] == expected["totalDcDeliveredKwh"], (bucket, lo)
            assert point["readings"] == expected["readings"], (bucket, lo)
            assert point["efficiencyRatio"] == expected["efficiencyRatio"], (bucket, lo)
            last = await db.fetchval(
                "SELECT soc FROM vehicle_readings WHERE vehicle_id = $1 AND ts >= $2 AND ts < $3 "
                "ORDER BY ts DESC LIMIT 1",
                vehicle,
                b_lo,
                b_hi,
            )
            assert point["lastSoc"] == last, (bucket, lo)
        assert (
            sum(p["readings"]["vehicle"] for p in body["series"])
            == (await independent(db, vehicle, start, end))["readings"]["vehicle"]
        )


def test_pages_sorts_filters_and_csv_say_the_same(daemon: DaemonProcess) -> None:
    start, end = NOW - timedelta(hours=7), NOW + timedelta(minutes=1)
    everything = fleet_rows(daemon, start, end)
    rows: list[dict[str, Any]] = []
    params: dict[str, Any] = {**window_params(start, end), "limit": 3}
    while True:
        body = httpx.get(f"{daemon.base_url}/v1/analytics/fleet", params=params, timeout=30).json()
        rows += body["vehicles"]
        assert body["total"] == len(everything)
        if body["next"] is None:
            break
        params = {"cursor": body["next"], "limit": 3}
    # Worst first by the exact ratio (its rounding, shown, never goes down), no AC last.
    assert sorted(r["vehicleId"] for r in rows) == sorted(everything)
    shown = [(r["efficiencyRatio"] is None, r["efficiencyRatio"] or 0) for r in rows]
    assert shown == sorted(shown)
    alerts = httpx.get(
        f"{daemon.base_url}/v1/analytics/fleet",
        params={**window_params(start, end), "alert": "true", "limit": 10_000},
        timeout=30,
    ).json()["vehicles"]
    assert [r["vehicleId"] for r in alerts] == [r["vehicleId"] for r in rows if r["alert"]]
    csv = httpx.get(
        f"{daemon.base_url}/v1/analytics/fleet",
        params={**window_params(start, end), "limit": 10_000},
        headers={"Accept": "text/csv"},
        timeout=30,
    )
    assert csv.headers["content-type"].startswith("text/csv")
    lines = csv.text.strip().split("\r\n")
    assert lines[0].startswith("vehicleId,efficiencyRatio,alert,")
    assert [line.split(",")[0] for line in lines[1:]] == [r["vehicleId"] for r in rows]
    bad = httpx.get(
        f"{daemon.base_url}/v1/analytics/fleet", params={"cursor": "garbage"}, timeout=10
    )
    assert bad.status_code == 400 and bad.json()["detail"][0]["field"] == "cursor"


MAX_WINDOW_DAYS = Settings.model_fields["analytics_max_window_days"].default


def _cursor(state: dict[str, Any]) -> str:
    # (json, not orjson: a client's integers can pass 64 bits)
    return base64.urlsafe_b64encode(json.dumps(state).encode()).decode().rstrip("=")


moments = st.one_of(
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()),
    st.sampled_from(
        ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "2026-01-01T00:00:00"]
    ),
    st.text(max_size=12),
)
json_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    start=moments,
    end=moments,
    alert=json_values,
    after=st.lists(json_values, max_size=4),
)
def test_a_made_up_cursor_is_refused_in_words_or_keeps_the_window_rules(
    daemon: DaemonProcess, start: str, end: str, alert: Any, after: list[Any]
) -> None:
    """A cursor is the client's to send back: whatever one holds, the answer is a page of
    a window that keeps the rules of startTime/endTime (in the calendar, start before end, at
    most ANALYTICS_MAX_WINDOW_DAYS), or 400 naming the cursor; never a 5xx."""
    state = {"start": start, "end": end, "alert": alert, "after": after}
    response = httpx.get(
        f"{daemon.base_url}/v1/analytics/fleet", params={"cursor": _cursor(state)}, timeout=30
    )
    if response.status_code == 400:
        assert response.json()["detail"][0]["field"] == "cursor"
        return
    assert response.status_code == 200, response.text
    window = response.json()["window"]
    first = datetime.fromisoformat(window["startTime"])
    last = datetime.fromisoformat(window["endTime"])
    assert first < last <= first + timedelta(days=MAX_WINDOW_DAYS)
