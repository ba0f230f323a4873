"""The one place that knows the table and column names of the readings (SPEC §7)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StreamTables:
    stream: str
    history: str
    latest: str
    hourly: str  # the roll-ups (one row per device and hour)
    deltas: str  # what flushes added since the last fold into the roll-ups
    hourly_all: str  # a view: both, for reading (sum per device and hour)
    id_column: str
    value_columns: tuple[str, ...]
    value_types: tuple[str, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        """Row order used everywhere: id, ts, values..., received_at."""
        return (self.id_column, "ts", *self.value_columns, "received_at")

    @property
    def types(self) -> tuple[str, ...]:
        return ("text", "timestamptz", *self.value_types, "timestamptz")


METER = StreamTables(
    stream="meter",
    history="meter_readings",
    latest="meter_latest",
    hourly="meter_hourly",
    deltas="meter_hour_deltas",
    hourly_all="meter_hourly_all",
    id_column="meter_id",
    value_columns=("kwh_consumed_ac", "voltage"),
    value_types=("float8", "float8"),
)
VEHICLE = StreamTables(
    stream="vehicle",
    history="vehicle_readings",
    latest="vehicle_latest",
    hourly="vehicle_hourly",
    deltas="vehicle_hour_deltas",
    hourly_all="vehicle_hourly_all",
    id_column="vehicle_id",
    value_columns=("soc", "kwh_delivered_dc", "battery_temp"),
    value_types=("float8", "float8", "float8"),
)
STREAMS: dict[str, StreamTables] = {"meter": METER, "vehicle": VEHICLE}
# Day partitions on their time column, and what each is created with (the roll-ups are
# rewritten in place all day: room on each page keeps those updates HOT).
PARTITIONED = {
    METER.history: "",
    VEHICLE.history: "",
    METER.hourly: " WITH (fillfactor = 70)",
    VEHICLE.hourly: " WITH (fillfactor = 70)",
}
HISTORIES = (METER.history, VEHICLE.history)  # the raw day partitions (the rest: roll-ups)
REJECTIONS = "rejections"
MIGRATIONS = "schema_migrations"  # the ledger of applied migrations (db/migrate.py)
SESSIONS = "charging_sessions"
