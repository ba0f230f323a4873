"""The archive's whole cycle through the daemon: history for some days; a daemon whose
retention leaves the oldest days behind exports them to Parquet, verifies and drops them; the
files hold exactly what the partitions held (read with DuckDB); analytics over those days,
now answered from the roll-ups at hour resolution, give the figures they gave before the
drop. And a failing export keeps its partition, is counted, and succeeds when retried."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import duckdb
import httpx

from daemon.services import EmbeddedMosquitto
from db.parquet import MANIFEST, sha256_of
from db.partitions import partition_name
from db.rollup import fold
from db.tables import METER, VEHICLE
from db.windows import ceil_hour, floor_hour
from db.writes import FlushBatch, flush_batch
from tests.helpers import eventually, iso
from tests.services import DaemonProcess


def duck(sql: str) -> list[tuple[Any, ...]]:
    """A query's rows, as DuckDB answers it."""
    relation = duckdb.sql(sql)
    assert relation is not None
    return [tuple(r) for r in relation.fetchall()]


TODAY = datetime.now(UTC).date()
D1, D2 = TODAY - timedelta(days=4), TODAY - timedelta(days=3)  # archived at RETENTION_DAYS=2
RECENT = TODAY - timedelta(days=1)  # still raw
OLDEST = datetime(2000, 1, 1, tzinfo=UTC)
RELINK = datetime(D1.year, D1.month, D1.day, 12, 30, tzinfo=UTC)  # V-2: M-C, then M-D


def at(day: date, hours: float) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(hours=hours)


async def load(conn: asyncpg.Connection) -> None:
    """Two meters and a vehicle, a reading every 7 minutes (seconds and microseconds off the
    hour), over D1, D2 and yesterday. V-1 charges on M-A, then on M-B from D1 noon; V-2 on
    M-C, then on M-D from D1 12:30 (inside an hour)."""
    now = datetime.now(UTC)
    batch = FlushBatch()
    for day in (D1, D2, RECENT):
        for n in range(24 * 60 // 7):
            ts = at(day, 0) + timedelta(minutes=7 * n, seconds=13, microseconds=n * 17)
            for meter, share in (("M-A", 1.0), ("M-B", 1.3), ("M-C", 0.7), ("M-D", 0.9)):
                batch.rows["meter"].append((meter, ts, 0.011 * (n % 9 + 1) * share, 229.5, now))
            batch.rows["vehicle"].append(
                ("V-1", ts, float(n % 100), 0.0093 * (n % 9 + 1), 20.0 + n % 7, now)
            )
    await flush_batch(conn, batch)
    await fold(conn, schema="public", oldest_hour=OLDEST)
    await conn.execute(
        "INSERT INTO charging_sessions (vehicle_id, meter_id, started_at, ended_at) VALUES "
        "('V-1', 'M-A', $1, $2), ('V-1', 'M-B', $2, NULL), "
        "('V-2', 'M-C', $1, $3), ('V-2', 'M-D', $3, NULL)",
        at(D1, -24),
        at(D1, 12),
        RELINK,
    )


def get(daemon: DaemonProcess, path: str, start: datetime, end: datetime, **more: Any) -> Any:
    params = {"startTime": iso(start), "endTime": iso(end), **more}
    response = httpx.get(daemon.base_url + path, params=params, timeout=30)
    return response


def figures(body: dict[str, Any]) -> dict[str, Any]:
    keys = ("totalAcConsumedKwh", "totalDcDeliveredKwh", "efficiencyRatio", "avgBatteryTemp")
    return {**{k: body[k] for k in keys}, "readings": body["readings"], "meters": body["meters"]}


def analytics(
    daemon: DaemonProcess, start: datetime, end: datetime, vehicle: str = "V-1"
) -> dict[str, Any]:
    response = get(daemon, f"/v1/analytics/performance/{vehicle}", start, end)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def fleet_row(daemon: DaemonProcess, start: datetime, end: datetime) -> tuple[str, Any]:
    response = get(daemon, "/v1/analytics/fleet", start, end)
    assert response.status_code == 200, response.text
    body = response.json()
    (row,) = [v for v in body["vehicles"] if v["vehicleId"] == "V-1"]
    return body["resolution"], figures(row)


def series(daemon: DaemonProcess, start: datetime, end: datetime) -> tuple[str, Any]:
    response = get(daemon, "/v1/analytics/performance/V-1/series", start, end, bucket="1h")
    assert response.status_code == 200, response.text
    body = response.json()
    return body["resolution"], body["series"]


def metric(daemon: DaemonProcess, name: str) -> float:
    text = daemon.get("/metrics").text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found[1]) if found else 0.0


async def exists(conn: asyncpg.Connection, name: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name))


async def raw_day(conn: asyncpg.Connection, table: str, day: date) -> list[tuple[Any, ...]]:
    t = METER if table == METER.history else VEHICLE
    rows = await conn.fetch(
        f"SELECT {t.id_column}, (extract(epoch FROM ts) * 1000000)::bigint, "
        f'{", ".join(t.value_columns)} FROM "{partition_name(table, day)}" '
        f"ORDER BY {t.id_column}, ts"
    )
    return [tuple(r) for r in rows]


# Windows: over the archived days, whole hours; cutting hours; and across the raw history's start.
ALIGNED = (at(D1, 0), at(D2, 0))
CUT = (at(D1, 6) + timedelta(minutes=20), at(D2, 13) + timedelta(minutes=50))
ACROSS = (at(D2, 20) + timedelta(minutes=30), at(RECENT, 3) + timedelta(minutes=15))


async def test_archived_days_read_from_parquet_and_roll_ups_as_before_the_drop(
    db_url: str, mosquitto: EmbeddedMosquitto, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await load(conn)
        raw = {
            (t.stream, day): await raw_day(conn, t.history, day)
            for t in (METER, VEHICLE)
            for day in (D1, D2)
        }
        # Before: a daemon keeping 30 days answers from the readings; the windows that cut
        # hours as they will be read once the raw days are gone (rounded out to whole hours).
        keeping = DaemonProcess(database_url=db_url, mqtt_url=mosquitto.url).start()
        try:
            before: dict[str, Any] = {
                "aligned": analytics(keeping, *ALIGNED),
                "cut": analytics(keeping, floor_hour(CUT[0]), ceil_hour(CUT[1])),
                "across": analytics(keeping, floor_hour(ACROSS[0]), ACROSS[1]),
                "fleet": fleet_row(keeping, *ALIGNED),
                "series": series(keeping, floor_hour(CUT[0]), ceil_hour(CUT[1])),
                "cut exactly": analytics(keeping, *CUT),
            }
        finally:
            assert keeping.stop() == 0
        assert {before[k]["resolution"] for k in ("aligned", "cut", "across")} == {"reading"}
        assert before["aligned"]["readings"]["meter"] > 0 and before["aligned"]["meters"]

        archive = tmp_path / "archive"
        daemon = DaemonProcess(
            database_url=db_url, mqtt_url=mosquitto.url, retention_days=2, archive_dir=archive
        ).start()
        try:

            async def archived() -> bool:
                return not any(
                    [await exists(conn, partition_name(t.history, D1)) for t in (METER, VEHICLE)]
                    + [await exists(conn, partition_name(t.history, D2)) for t in (METER, VEHICLE)]
                )

            await eventually(archived, timeout_s=60)
            assert metric(daemon, 'energy_ingest_archived_partitions_total{stream="meter"}') >= 2
            assert metric(daemon, "energy_ingest_archive_failures_total") == 0
            after: dict[str, Any] = {
                "aligned": analytics(daemon, *ALIGNED),
                "cut": analytics(daemon, *CUT),
                "across": analytics(daemon, *ACROSS),
                "fleet": await asyncio.to_thread(fleet_row, daemon, *ALIGNED),
                "series": await asyncio.to_thread(series, daemon, *CUT),
            }
            fine = get(daemon, "/v1/analytics/performance/V-1/series", *CUT, bucket="15m")
            recent = analytics(daemon, at(RECENT, 1), at(RECENT, 2) + timedelta(minutes=5))
            relinked = analytics(daemon, *ALIGNED, vehicle="V-2")
        finally:
            assert daemon.stop() == 0, daemon.log()

        for key in ("aligned", "cut", "across"):
            assert after[key]["resolution"] == "hour", key
            assert figures(after[key]) == figures(before[key]), key
        assert after["fleet"] == ("hour", before["fleet"][1])
        assert after["series"] == ("hour", before["series"][1])
        assert fine.status_code == 400 and fine.json()["detail"][0]["field"] == "bucket"
        assert recent["resolution"] == "reading"
        # A relink inside an hour before the raw history: each meter's hour goes to the
        # session holding the hour's start (12:00-13:00 to M-C's), never to both.
        assert relinked["meters"] == [
            meter_share(raw, "M-C", at(D1, 0), at(D1, 13)),
            meter_share(raw, "M-D", at(D1, 13), at(D2, 0)),
        ]
        # The rounding did change something: the windows that cut hours, read exactly.
        assert before["cut exactly"]["readings"] != before["cut"]["readings"]

        # The files: exactly the rows and kWh the partitions held, as DuckDB reads them.
        manifest = json.loads((archive / MANIFEST).read_text())
        for t in (METER, VEHICLE):
            for day in (D1, D2):
                relative = f"{t.stream}/{day.isoformat()}.parquet"
                path = archive / relative
                rows = duck(
                    f"SELECT {t.id_column}, epoch_us(ts), {', '.join(t.value_columns)} "
                    f"FROM '{path}' ORDER BY {t.id_column}, ts"
                )
                assert rows == raw[(t.stream, day)]
                entry = manifest["files"][relative]
                assert entry["rows"] == len(rows) > 0
                assert entry["sha256"] == sha256_of(path)
            energy = "kwh_consumed_ac" if t is METER else "kwh_delivered_dc"
            ((total,),) = duck(f"SELECT sum({energy}) FROM '{archive}/{t.stream}/*.parquet'")
            column = t.value_columns.index(energy) + 2
            expected = sum(r[column] for day in (D1, D2) for r in raw[(t.stream, day)])
            assert abs(total - expected) <= 1e-9 * expected
    finally:
        await conn.close()


def meter_share(
    raw: dict[tuple[str, date], Any], meter: str, start: datetime, end: datetime
) -> dict[str, Any]:
    """A meter's readings in [start, end), from the rows the partitions held."""
    lo, hi = (int(moment.timestamp()) * 1_000_000 for moment in (start, end))
    rows = [r for day in (D1, D2) for r in raw[("meter", day)] if r[0] == meter and lo <= r[1] < hi]
    return {
        "meterId": meter,
        "acConsumedKwh": round(sum(r[2] for r in rows), 6),
        "readings": len(rows),
    }


async def test_a_failing_export_keeps_its_partition_counts_and_is_tried_again(
    db_url: str, mosquitto: EmbeddedMosquitto, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await load(conn)
        archive = tmp_path / "archive"
        archive.mkdir()
        blocker = archive / "vehicle"
        blocker.write_text("a file where the vehicles' folder should be")  # (root writes anywhere)
        daemon = DaemonProcess(
            database_url=db_url,
            mqtt_url=mosquitto.url,
            retention_days=2,
            archive_dir=archive,
            upkeep_interval_s=2,
        ).start()
        try:
            vehicle_d1 = partition_name(VEHICLE.history, D1)

            async def meters_done() -> bool:
                return not await exists(conn, partition_name(METER.history, D1))

            await eventually(meters_done, timeout_s=60)
            assert metric(daemon, "energy_ingest_archive_failures_total") >= 1
            assert await exists(conn, vehicle_d1)
            assert await conn.fetchval(f'SELECT count(*) FROM "{vehicle_d1}"') > 0
            assert "archiving vehicle_readings_p" in daemon.log()
            assert not (archive / "vehicle").is_dir()

            blocker.unlink()  # the way cleared: the next upkeep archives them

            async def vehicles_done() -> bool:
                return not await exists(conn, vehicle_d1)

            await eventually(vehicles_done, timeout_s=60)
            assert (archive / "vehicle" / f"{D1.isoformat()}.parquet").is_file()
            assert metric(daemon, 'energy_ingest_archived_partitions_total{stream="vehicle"}') >= 2
        finally:
            assert daemon.stop() == 0, daemon.log()
    finally:
        await conn.close()
