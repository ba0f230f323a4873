"""Bodies the HTTP API takes and gives, as pydantic models: the OpenAPI document is generated
from these (and from the reading models of `ingest.readings`), never written by hand."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ingest.readings import DeviceId, MeterReading, VehicleReading


class _Body(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


class ProblemBody(_Body):
    field: str = Field(description="JSON name of the field at fault ('' for the whole body)")
    message: str


class ErrorBody(_Body):
    detail: str | list[ProblemBody]


class MeterBatch(_Body):
    readings: list[MeterReading]


class VehicleBatch(_Body):
    readings: list[VehicleReading]


class LinkRequest(_Body):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    vehicle_id: DeviceId = Field(alias="vehicleId")
    meter_id: DeviceId = Field(alias="meterId")


class StoredReading(_Body):
    status: str = Field(
        description="accepted, or duplicate when this reading (the same values at the same "
        "device and moment) was already stored"
    )
    stream: str
    device_id: str = Field(alias="deviceId")
    timestamp: datetime


class BatchRejection(_Body):
    index: int
    problems: list[ProblemBody]


class BatchResult(_Body):
    accepted: int
    duplicates: int = Field(description="readings already stored with the same values")
    conflicts: int = Field(
        description="readings of a device and moment already stored with other values: not "
        "stored (the first stored stands), recorded, listed in `rejections`"
    )
    rejected: int = Field(description="readings refused by validation or by the database")
    rejections: list[BatchRejection] = Field(description="each refused or conflicting reading")


class Session(_Body):
    vehicle_id: str = Field(alias="vehicleId")
    meter_id: str = Field(alias="meterId")
    started_at: datetime = Field(alias="startedAt")
    ended_at: datetime | None = Field(alias="endedAt")


class LinkResult(_Body):
    changed: bool = Field(description="false when the vehicle was already on this meter")
    session: Session
    previous: Session | None = Field(description="the vehicle's session this link ended, if any")
    displaced: Session | None = Field(
        description="another vehicle's session on this meter that this link ended (a meter "
        "charges one vehicle at a time), if any"
    )


class Unlinked(_Body):
    ended: Session = Field(description="the vehicle's session, ended now")


class Window(_Body):
    start_time: datetime = Field(alias="startTime")
    end_time: datetime = Field(alias="endTime")


Resolution = Literal["reading", "hour"]
RESOLUTION = (
    "reading: every figure summed from the readings themselves, exactly over the window; "
    "hour: the window starts before the raw history kept (RETENTION_DAYS), and its part "
    "before it is summed from the hourly roll-ups, rounded out to whole hours (README, "
    "Storage)"
)


class MeterShare(_Body):
    meter_id: str = Field(alias="meterId")
    ac_consumed_kwh: float = Field(alias="acConsumedKwh")
    readings: int


class ReadingCounts(_Body):
    meter: int
    vehicle: int


SILENT_METERS = (
    "meters it is charging on now (an open session) whose newest reading is older than "
    "SILENT_AFTER_S: its AC, and so its efficiency, is not to be trusted"
)


class SilentMeter(_Body):
    meter_id: str = Field(alias="meterId")
    last_reading_at: datetime = Field(alias="lastReadingAt")


class Performance(_Body):
    vehicle_id: str = Field(alias="vehicleId")
    window: Window
    resolution: Resolution = Field(description=RESOLUTION)
    total_ac_consumed_kwh: float = Field(alias="totalAcConsumedKwh")
    total_dc_delivered_kwh: float = Field(alias="totalDcDeliveredKwh")
    efficiency_ratio: float | None = Field(
        alias="efficiencyRatio", description="DC / AC; null when no AC energy was measured"
    )
    avg_battery_temp: float | None = Field(alias="avgBatteryTemp")
    readings: ReadingCounts
    meters: list[MeterShare]
    alert: bool = Field(description="efficiencyRatio is below alertThreshold")
    silent_meters: list[SilentMeter] = Field(alias="silentMeters", description=SILENT_METERS)
    alert_threshold: float = Field(alias="alertThreshold")


class MeterStatus(_Body):
    meter_id: str = Field(alias="meterId")
    timestamp: datetime
    kwh_consumed_ac: float = Field(alias="kwhConsumedAc")
    voltage: float
    received_at: datetime = Field(alias="receivedAt")


class VehicleStatus(_Body):
    vehicle_id: str = Field(alias="vehicleId")
    timestamp: datetime
    soc: float
    kwh_delivered_dc: float = Field(alias="kwhDeliveredDc")
    battery_temp: float = Field(alias="batteryTemp")
    received_at: datetime = Field(alias="receivedAt")


class RejectionItem(_Body):
    id: int
    received_at: datetime = Field(alias="receivedAt")
    source: str
    topic_or_route: str = Field(alias="topicOrRoute")
    payload: str
    reason: str


class RejectionPage(_Body):
    rejections: list[RejectionItem]
    next: int | None = Field(description="pass as `before` for the next (older) page")


class Check(_Body):
    ok: bool
    detail: str


class BufferState(_Body):
    depth: int
    max: int


class DatabaseCheck(Check):
    state: str = Field(
        description="up, busy (slow to answer: not unhealthy), down, read-only, or refusing "
        "writes (held readings, failing flushes)"
    )


class ReplicaCheck(DatabaseCheck):
    lag_seconds: float | None = Field(
        alias="lagSeconds", description="how far its replay is behind the primary"
    )


class Health(_Body):
    status: str
    database: DatabaseCheck
    replica: ReplicaCheck | None = Field(
        description="the streaming replica of DATABASE_READ_URL; null when reads go to the "
        "primary. Reported, not required for readiness"
    )
    broker: Check
    partitions: Check
    buffer: BufferState
    auth: str


class DevicesSeen(_Body):
    window_seconds: int = Field(alias="windowSeconds")
    meters: int | None = Field(description="meters whose newest reading arrived in the window")
    vehicles: int | None


class RecentRejections(_Body):
    window_seconds: int = Field(alias="windowSeconds")
    count: int | None
    at_least: bool = Field(alias="atLeast", description="true: counted up to a bound, maybe more")


class Rate(_Body):
    window_seconds: int = Field(alias="windowSeconds")
    value: float = Field(description="new readings committed per second over the window")
    scope: str


class SilentCounts(_Body):
    silent_after_seconds: int = Field(alias="silentAfterSeconds", description="SILENT_AFTER_S")
    meters: int | None = Field(description="meters whose newest reading is older than that")
    vehicles: int | None


class Overview(Health):
    at: datetime
    counts_detail: str = Field(
        alias="countsDetail", description="why the counts are null, when they are"
    )
    devices_seen: DevicesSeen = Field(alias="devicesSeen")
    silent_devices: SilentCounts = Field(alias="silentDevices")
    rejections: RecentRejections
    stored_per_second: Rate = Field(alias="storedPerSecond")
    alert_threshold: float = Field(alias="alertThreshold")


class LinkPage(_Body):
    links: list[Session] = Field(description="newest first")
    next: datetime | None = Field(description="pass as `startedBefore` for older sessions")


class FleetVehicle(_Body):
    vehicle_id: str = Field(alias="vehicleId")
    total_ac_consumed_kwh: float = Field(alias="totalAcConsumedKwh")
    total_dc_delivered_kwh: float = Field(alias="totalDcDeliveredKwh")
    efficiency_ratio: float | None = Field(alias="efficiencyRatio")
    avg_battery_temp: float | None = Field(alias="avgBatteryTemp")
    readings: ReadingCounts
    meters: list[MeterShare]
    alert: bool
    silent_meters: list[SilentMeter] = Field(alias="silentMeters", description=SILENT_METERS)


class SilentDevice(_Body):
    stream: str = Field(description="meter or vehicle")
    device_id: str = Field(alias="deviceId")
    last_reading_at: datetime = Field(
        alias="lastReadingAt", description="the timestamp of its newest stored reading"
    )
    received_at: datetime = Field(alias="receivedAt", description="when that reading arrived")
    vehicle_id: str | None = Field(
        alias="vehicleId", description="a meter's: the vehicle charging on it now (open session)"
    )
    silent_for_seconds: float = Field(alias="silentForSeconds")


class SilentDevicePage(_Body):
    silent_for_seconds: int = Field(alias="silentForSeconds")
    streams: list[str]
    at: datetime = Field(description="the database's clock, which the span is counted back from")
    total: int = Field(description="silent devices, over every page")
    devices: list[SilentDevice] = Field(description="longest silent first")
    next: str | None = Field(description="pass as `cursor` for the next page")


class FleetPage(_Body):
    window: Window
    resolution: Resolution = Field(description=RESOLUTION)
    alert_threshold: float = Field(alias="alertThreshold")
    alert_only: bool = Field(alias="alertOnly")
    total: int = Field(description="vehicles in the listing, over every page")
    vehicles: list[FleetVehicle] = Field(description="worst efficiency first; no AC last")
    next: str | None = Field(description="pass as `cursor` for the next page")


class SeriesBucket(_Body):
    start: datetime
    ac_kwh: float = Field(alias="acKwh")
    dc_kwh: float = Field(alias="dcKwh")
    efficiency_ratio: float | None = Field(alias="efficiencyRatio")
    avg_battery_temp: float | None = Field(alias="avgBatteryTemp")
    last_soc: float | None = Field(alias="lastSoc")
    readings: ReadingCounts


class Series(_Body):
    vehicle_id: str = Field(alias="vehicleId")
    window: Window
    resolution: Resolution = Field(
        description=RESOLUTION + "; 15m buckets are not answered before the raw history"
    )
    bucket: str
    series: list[SeriesBucket]
