"""A meter charges one vehicle at a time (SPEC §5): linking a vehicle to a meter ends the
session of whichever vehicle was on it; a session ends when the car leaves (DELETE
/v1/links/{vehicleId}); the table refuses two sessions of one meter that overlap; the
migration that brought the rule closes the overlaps stored before it, and says so. For any
sequence of links, ends and readings, no kWh a meter measured is counted for two vehicles,
and the fleet, vehicle and series routes agree."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.services import EmbeddedPostgres
from db.analytics import _args, vehicle_sql
from db.migrate import available_migrations, migrate
from db.windows import pieces
from tests.conftest import fresh_database
from tests.helpers import iso
from tests.services import DaemonProcess


def call(daemon: DaemonProcess, method: str, path: str, body: Any = None) -> httpx.Response:
    return httpx.request(method, daemon.base_url + path, json=body, timeout=15)


def link(daemon: DaemonProcess, vehicle: str, meter: str) -> dict[str, Any]:
    answer = call(daemon, "PUT", "/v1/links", {"vehicleId": vehicle, "meterId": meter})
    assert answer.status_code in (200, 201), answer.text
    body: dict[str, Any] = answer.json()
    return body


def meter_reading(daemon: DaemonProcess, meter: str, kwh: float) -> None:
    body = {
        "meterId": meter,
        "kwhConsumedAc": kwh,
        "voltage": 230.0,
        "timestamp": iso(datetime.now(UTC)),
    }
    assert call(daemon, "POST", "/v1/ingestion/meter", body).status_code == 201


def vehicle_reading(daemon: DaemonProcess, vehicle: str, kwh: float) -> None:
    body = {
        "vehicleId": vehicle,
        "soc": 50.0,
        "kwhDeliveredDc": kwh,
        "batteryTemp": 25.0,
        "timestamp": iso(datetime.now(UTC)),
    }
    assert call(daemon, "POST", "/v1/ingestion/vehicle", body).status_code == 201


def test_the_next_car_on_a_meter_ends_the_previous_ones_session(daemon: DaemonProcess) -> None:
    tag = uuid.uuid4().hex[:6]
    first, second, meter = f"SV1-{tag}", f"SV2-{tag}", f"SM-{tag}"
    opened = link(daemon, first, meter)
    assert opened["displaced"] is None
    taken = link(daemon, second, meter)
    displaced = taken["displaced"]
    assert displaced["vehicleId"] == first and displaced["endedAt"] == taken["session"]["startedAt"]
    sessions = call(daemon, "GET", f"/v1/links?meterId={meter}").json()["links"]
    assert [s["vehicleId"] for s in sessions] == [second, first]
    assert sessions[1]["endedAt"] is not None and sessions[0]["endedAt"] is None


def test_a_car_leaving_ends_its_session_and_only_once(daemon: DaemonProcess) -> None:
    tag = uuid.uuid4().hex[:6]
    vehicle, meter = f"LV-{tag}", f"LM-{tag}"
    started = link(daemon, vehicle, meter)["session"]["startedAt"]
    ended = call(daemon, "DELETE", f"/v1/links/{vehicle}")
    assert ended.status_code == 200, ended.text
    session = ended.json()["ended"]
    assert session["startedAt"] == started and session["endedAt"] > started
    again = call(daemon, "DELETE", f"/v1/links/{vehicle}")
    assert again.status_code == 404 and "no open session" in again.json()["detail"]
    assert call(daemon, "DELETE", "/v1/links/never-seen").status_code == 404


async def test_the_table_refuses_two_sessions_of_one_meter_that_overlap(
    conn: asyncpg.Connection,
) -> None:
    now = datetime.now(UTC)
    await conn.execute(
        "INSERT INTO charging_sessions (vehicle_id, meter_id, started_at, ended_at) "
        "VALUES ('A', 'M', $1, $2)",
        now - timedelta(hours=2),
        now,
    )
    with pytest.raises(asyncpg.ExclusionViolationError):
        await conn.execute(
            "INSERT INTO charging_sessions (vehicle_id, meter_id, started_at) "
            "VALUES ('B', 'M', $1)",
            now - timedelta(hours=1),
        )
    # Two open ones on a meter (whichever of the two rules says so first):
    with pytest.raises((asyncpg.UniqueViolationError, asyncpg.ExclusionViolationError)):
        await conn.execute(
            "INSERT INTO charging_sessions (vehicle_id, meter_id, started_at) VALUES "
            "('C', 'N', $1), ('D', 'N', $2)",
            now,
            now + timedelta(hours=1),
        )


async def test_the_migration_closes_overlaps_stored_before_it_and_says_so(
    postgres: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    conn = await asyncpg.connect(await fresh_database(postgres, migrated=False))
    try:
        before = [m for m in available_migrations() if m.version < 5]
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
            "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in before:
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations VALUES ($1, $2)", migration.version, migration.name
            )
        t = datetime(2026, 11, 1, tzinfo=UTC)
        hour = timedelta(hours=1)
        await conn.execute(
            "INSERT INTO charging_sessions (vehicle_id, meter_id, started_at, ended_at) VALUES "
            "('V1', 'M', $1, NULL), ('V2', 'M', $2, $4), ('V3', 'M', $3, NULL), "
            "('V4', 'M2', $1, $2), ('V5', 'M2', $1, NULL)",
            t,
            t + hour,
            t + 2 * hour,
            t + 3 * hour,
        )
        with caplog.at_level(logging.WARNING, logger="db.migrate"):
            await migrate(conn, schema="public")
        said = " ".join(r.getMessage() for r in caplog.records)
        assert "now end where it begins" in said, said
        rows = await conn.fetch(
            "SELECT vehicle_id, started_at, ended_at FROM charging_sessions ORDER BY vehicle_id"
        )
        ends = {r["vehicle_id"]: r["ended_at"] for r in rows}
        assert ends["V1"] == t + hour  # open, overlapped by V2: ends where V2 begins
        assert ends["V2"] == t + 2 * hour  # overlapped V3
        assert ends["V3"] is None
        assert "V4" not in ends or "V5" not in ends  # one of two at the same instant removed
        listed = await conn.fetchval("SELECT count(*) FROM charging_sessions_closed_by_migration")
        assert listed == 3
    finally:
        await conn.close()


operations = st.lists(
    st.one_of(
        st.tuples(st.just("link"), st.integers(0, 2), st.integers(0, 1)),
        st.tuples(st.just("leave"), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("meter"), st.integers(0, 1), st.integers(1, 9)),
        st.tuples(st.just("vehicle"), st.integers(0, 2), st.integers(1, 9)),
    ),
    min_size=1,
    max_size=14,
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=operations)
def test_no_kwh_of_a_meter_counts_for_two_vehicles_and_the_routes_agree(
    daemon: DaemonProcess, module_db: str, steps: list[tuple[str, int, int]]
) -> None:
    tag = uuid.uuid4().hex[:6]
    vehicles = [f"PV{n}-{tag}" for n in range(3)]
    meters = [f"PM{n}-{tag}" for n in range(2)]
    start = datetime.now(UTC) - timedelta(seconds=1)
    for kind, who, what in steps:
        if kind == "link":
            link(daemon, vehicles[who], meters[what])
        elif kind == "leave":
            call(daemon, "DELETE", f"/v1/links/{vehicles[who]}")
        elif kind == "meter":
            meter_reading(daemon, meters[who], what / 10)
        else:
            vehicle_reading(daemon, vehicles[who], what / 10)
        time.sleep(0.002)  # (each reading's own moment)
    end = datetime.now(UTC) + timedelta(seconds=1)
    window = {"startTime": iso(start), "endTime": iso(end)}
    fleet = {
        row["vehicleId"]: row
        for row in call(daemon, "GET", "/v1/analytics/fleet?limit=10000&" + _query(window)).json()[
            "vehicles"
        ]
    }
    measured = asyncio.run(_measured(module_db, meters, start, end))
    for meter in meters:  # what the vehicles got of each meter, at most what it measured
        counted = sum(
            m["acConsumedKwh"]
            for row in fleet.values()
            for m in row["meters"]
            if m["meterId"] == meter
        )
        assert counted <= measured[meter] + 1e-6, (meter, counted, measured[meter], steps)
    for vehicle in vehicles:
        alone = call(daemon, "GET", f"/v1/analytics/performance/{vehicle}?" + _query(window))
        if alone.status_code == 404:
            assert vehicle not in fleet
            continue
        body = alone.json()
        if vehicle in fleet:
            row = fleet[vehicle]
            for key in ("totalAcConsumedKwh", "totalDcDeliveredKwh", "readings", "meters"):
                assert row[key] == body[key], (key, row[key], body[key])
        series = call(
            daemon,
            "GET",
            f"/v1/analytics/performance/{vehicle}/series?bucket=15m&" + _query(window),
        ).json()["series"]
        assert round(sum(b["acKwh"] for b in series), 6) == pytest.approx(
            body["totalAcConsumedKwh"], abs=1e-6
        )
        assert sum(b["readings"]["meter"] for b in series) == body["readings"]["meter"]


def _query(params: dict[str, str]) -> str:
    return "&".join(f"{k}={v.replace('+', '%2B')}" for k, v in params.items())


async def _measured(
    url: str, meters: list[str], start: datetime, end: datetime
) -> dict[str, float]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT meter_id, sum(kwh_consumed_ac) AS kwh FROM meter_readings "
            "WHERE meter_id = ANY($1) AND ts >= $2 AND ts < $3 GROUP BY meter_id",
            meters,
            start,
            end,
        )
        found = {r["meter_id"]: float(r["kwh"]) for r in rows}
        return {m: found.get(m, 0.0) for m in meters}
    finally:
        await conn.close()


async def test_a_vehicle_with_thousands_of_past_sessions_costs_what_its_window_holds(
    conn: asyncpg.Connection,
) -> None:
    """The statement reads the sessions of the window (through the exclusion constraint's
    index), not all of a vehicle's past: the buffers it touches do not grow with them."""
    now = datetime.now(UTC).replace(microsecond=0)
    window = (now - timedelta(hours=6), now)
    split = pieces(*window, now=now)

    async def buffers(vehicle: str) -> int:
        sql = vehicle_sql(split)
        raw = await conn.fetchval(
            f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}",
            *_args(split, *window),
            vehicle,
            900.0,
        )
        plan = json.loads(raw)[0]["Plan"]
        return int(plan["Shared Hit Blocks"] + plan["Shared Read Blocks"])

    for vehicle, past in (("FEW", 1), ("MANY", 5000)):
        await conn.execute(
            "INSERT INTO charging_sessions (vehicle_id, meter_id, started_at, ended_at) "
            "SELECT $1, $1 || '-M' || n, $2::timestamptz - (n + 1) * interval '10 minutes', "
            "       $2::timestamptz - n * interval '10 minutes' - interval '1 second' "
            "FROM generate_series(1, $3) n",
            vehicle,
            window[0] - timedelta(days=1),
            past,
        )
        await conn.execute(
            "INSERT INTO charging_sessions (vehicle_id, meter_id, started_at) VALUES ($1, $2, $3)",
            vehicle,
            f"{vehicle}-NOW",
            window[0] - timedelta(hours=1),
        )
    await conn.execute("ANALYZE charging_sessions")
    few, many = await buffers("FEW"), await buffers("MANY")
    assert many <= few + 8, (few, many)
