"""The readings of SPEC §2: their validation lives here once, for MQTT and HTTP alike.

A payload is decoded with orjson and each reading validated on its own, so one bad reading
in a gateway's array never sinks the good ones beside it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, ClassVar

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    TypeAdapter,
    ValidationError,
)

DEVICE_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)


def is_device_id(text: str) -> bool:
    # fullmatch: `$` alone would let a final newline through.
    return _DEVICE_ID.fullmatch(text) is not None


class Stream(StrEnum):
    METER = "meter"
    VEHICLE = "vehicle"


ISO_HINT = "must be an ISO 8601 string with an offset, e.g. 2026-01-01T00:00:00Z"
LEAP_SECOND_HINT = (
    "is a leap second (second 60): UTC as stored, as Python and PostgreSQL keep it, has no "
    "leap seconds; send 23:59:59.999999 or the next second instead"
)
_LEAP_SECOND = re.compile(r"T\d{2}:?\d{2}:?60(?![0-9])")
OUT_OF_CALENDAR = "is outside the calendar once converted to UTC (years 1 to 9999)"


def from_iso(text: str) -> datetime:
    """`datetime.fromisoformat` as RFC 3339 text needs it: a lower-case "z" taken (Python
    3.11 takes only "Z"), and text holding a NUL refused (Python 3.11 stops reading at it,
    ignoring what follows). ValueError when it is not a date and time."""
    if "\x00" in text:
        raise ValueError("a NUL in a timestamp")
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        if text[-1:] != "z":
            raise
    return datetime.fromisoformat(text[:-1] + "Z")  # (tried second: "Z" is the usual case)


def _timestamp_in_utc(value: object) -> object:
    """ISO 8601 text with an offset, held as a UTC datetime.

    Finer than a microsecond: the digits past the sixth are dropped (what PostgreSQL's
    timestamptz holds); two readings that differ only there are the same moment, and the
    conflict rule decides (`ingest.batches`): the same values are a duplicate, other values a
    conflict, recorded.

    Parsed here by `datetime.fromisoformat` (C) rather than by pydantic: pydantic would also
    take epoch numbers, which the contract does not, and its own offset type made every later
    comparison (the time window, asyncpg's encoder) ten times slower than UTC's; converting
    afterwards cost more than parsing (BENCHMARKS.md).
    """
    if isinstance(value, str):
        text = value
        try:
            value = from_iso(text)
        except ValueError:
            hint = LEAP_SECOND_HINT if _LEAP_SECOND.search(text) else ISO_HINT
            raise ValueError(hint) from None
    if not isinstance(value, datetime):
        raise ValueError(ISO_HINT)
    if value.tzinfo is None or value.tzinfo is UTC:
        return value  # (a naive one is refused next, by AwareDatetime)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # year 1 or 9999 with an offset that leaves the calendar in UTC
        raise ValueError(OUT_OF_CALENDAR) from None


DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN, strict=True)]
Timestamp = Annotated[AwareDatetime, BeforeValidator(_timestamp_in_utc)]
Kwh = Annotated[StrictFloat, Field(ge=0)]


class _Reading(BaseModel):
    model_config = ConfigDict(
        populate_by_name=True, allow_inf_nan=False, frozen=True, extra="ignore"
    )


class MeterReading(_Reading):
    """Grid side (AC): what a smart meter measured in one interval."""

    meter_id: DeviceId = Field(alias="meterId")
    kwh_consumed_ac: Kwh = Field(alias="kwhConsumedAc")
    voltage: StrictFloat = Field(ge=0, le=1000)
    timestamp: Timestamp

    stream: ClassVar[Stream] = Stream.METER
    kwh_field: ClassVar[str] = "kwhConsumedAc"

    @property
    def device_id(self) -> str:
        return self.meter_id

    @property
    def kwh(self) -> float:
        return self.kwh_consumed_ac


class VehicleReading(_Reading):
    """Battery side (DC): what a vehicle's charger delivered in one interval."""

    vehicle_id: DeviceId = Field(alias="vehicleId")
    soc: StrictFloat = Field(ge=0, le=100)
    kwh_delivered_dc: Kwh = Field(alias="kwhDeliveredDc")
    battery_temp: StrictFloat = Field(alias="batteryTemp", ge=-50, le=120)
    timestamp: Timestamp

    stream: ClassVar[Stream] = Stream.VEHICLE
    kwh_field: ClassVar[str] = "kwhDeliveredDc"

    @property
    def device_id(self) -> str:
        return self.vehicle_id

    @property
    def kwh(self) -> float:
        return self.kwh_delivered_dc


Reading = MeterReading | VehicleReading
# Each column of the history and the latest state (db/tables.py) → its JSON name (SPEC §2).
JSON_NAMES: dict[str, str] = {
    name: field.alias or name
    for model in (MeterReading, VehicleReading)
    for name, field in model.model_fields.items()
} | {"ts": "timestamp", "received_at": "receivedAt"}
MODELS: dict[Stream, type[MeterReading] | type[VehicleReading]] = {
    Stream.METER: MeterReading,
    Stream.VEHICLE: VehicleReading,
}
ID_FIELDS = {Stream.METER: "meterId", Stream.VEHICLE: "vehicleId"}
# A whole array in one call of pydantic's core (`validate_items`): 1.7 us a reading instead of
# 2.8 one `model_validate` at a time (arrays of 60; BENCHMARKS.md, mqtt-drain). It stops at
# the first item that is not a reading (`fail_fast`, pydantic 2.8): an array of bad items
# costs no more than before, and no error is built for each of them at once.
_ARRAYS: dict[Stream, TypeAdapter[Any]] = {
    stream: TypeAdapter(Annotated[list[model], Field(fail_fast=True)])  # type: ignore[valid-type, arg-type]
    for stream, model in MODELS.items()
}


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason a reading was refused: the field at fault (JSON name) and why."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


@dataclass(frozen=True, slots=True)
class Rejected:
    index: int | None
    problems: tuple[Problem, ...]

    @property
    def reason(self) -> str:
        where = f"reading {self.index}: " if self.index is not None else ""
        return where + "; ".join(str(p) for p in self.problems)


DEFAULT_MAX_KWH = 1000.0
DEFAULT_MAX_ITEMS = 10_000
# Rejected readings listed by name in the one rejection recorded for a message or request.
LISTED_REJECTIONS = 20


@dataclass(frozen=True, slots=True)
class Limits:
    """What a reading may carry beyond each field's own range (SPEC §2): a timestamp not older
    than the retention nor too far ahead, and no more energy than `max_kwh` in one reading
    (a meter or charger measuring a minute or an hour; 1.7e308 kWh is a fault, and summed
    it would overflow)."""

    retention: timedelta
    future_skew: timedelta
    max_kwh: float = DEFAULT_MAX_KWH
    # Readings in one MQTT array (MAX_BATCH_READINGS, as for an HTTP batch): a larger one is
    # refused whole before any is validated. Validating costs the event loop in proportion to
    # the items; 4 MiB of `{}` items held it for seconds.
    max_items: int = DEFAULT_MAX_ITEMS

    def problem(self, reading: Reading, now: datetime) -> Problem | None:
        ts = reading.timestamp
        if ts > now + self.future_skew:
            return Problem(
                "timestamp",
                f"is more than {int(self.future_skew.total_seconds())} s in the future",
            )
        if ts < now - self.retention:
            return Problem("timestamp", f"is older than the retention ({self.retention.days} days)")
        if reading.kwh > self.max_kwh:
            return Problem(
                reading.kwh_field,
                f"is more than {self.max_kwh:g} kWh in one reading (MAX_KWH_PER_READING)",
            )
        return None


def _problems(error: ValidationError) -> tuple[Problem, ...]:
    found = []
    for item in error.errors(include_url=False, include_input=False):
        loc = [str(part) for part in item["loc"]]
        # Our own checks' messages as written, without pydantic's "Value error, " before them.
        message = str(item["ctx"]["error"]) if item["type"] == "value_error" else item["msg"]
        found.append(Problem(".".join(loc), message))
    return tuple(found)


def validate_reading(
    stream: Stream,
    data: Any,
    *,
    now: datetime,
    limits: Limits,
    expected_id: str | None = None,
    index: int | None = None,
    explain: bool = True,
) -> Reading | Rejected:
    """Validate one decoded JSON value as a reading of `stream` (with `explain=False`, a
    rejection without its problems: one that will not be listed, told apart for less)."""
    if not isinstance(data, dict):
        return Rejected(index, (Problem("", "a reading must be a JSON object"),))
    try:
        reading = MODELS[stream].model_validate(data)
    except ValidationError as error:
        return Rejected(index, _problems(error) if explain else ())
    beyond = _beyond(reading, now=now, limits=limits, expected_id=expected_id)
    return reading if beyond is None else Rejected(index, (beyond,))


def _beyond(
    reading: Reading, *, now: datetime, limits: Limits, expected_id: str | None
) -> Problem | None:
    """What a well-formed reading breaks beyond its shape: the topic's device, the limits."""
    if expected_id is not None and reading.device_id != expected_id:
        field = ID_FIELDS[reading.stream]
        return Problem(field, f"{reading.device_id!r} does not match the topic's {expected_id!r}")
    return limits.problem(reading, now)


@dataclass(slots=True)
class ParsedPayload:
    """The valid readings of a payload, and what was wrong with the others: how many, and the
    first LISTED_REJECTIONS of them (a rejection costs in proportion to the bytes received,
    not to how many bad items they hold)."""

    readings: list[Reading] = dataclasses.field(default_factory=list)
    positions: list[int] = dataclasses.field(default_factory=list)  # each reading's item
    rejected: list[Rejected] = dataclasses.field(default_factory=list)
    rejected_count: int = 0
    items: int = 1  # readings the payload held; 1 for anything but an array
    keep_all: bool = False  # every rejection in `rejected` (an HTTP batch lists them all)

    def reject(self, rejected: Rejected) -> None:
        self.rejected_count += 1
        if self.keep_all or len(self.rejected) < LISTED_REJECTIONS:
            self.rejected.append(rejected)

    @property
    def reason(self) -> str:
        """One line for the rejection record of the whole payload."""
        shown = self.rejected[:LISTED_REJECTIONS]
        listed = "; ".join(r.reason for r in shown)
        if self.items == 1 and self.rejected_count == 1:
            return listed
        more = self.rejected_count - len(shown)
        return f"{self.rejected_count} of {self.items} readings rejected: {listed}" + (
            f"; and {more} more" if more else ""
        )


def whole_payload(problem: str) -> ParsedPayload:
    return whole_payload_of(Rejected(None, (Problem("", problem),)))


def whole_payload_of(rejected: Rejected) -> ParsedPayload:
    parsed = ParsedPayload()
    parsed.reject(rejected)
    return parsed


def parse_payload(
    stream: Stream,
    payload: bytes,
    *,
    now: datetime,
    limits: Limits,
    expected_id: str | None = None,
) -> ParsedPayload:
    """Decode an MQTT payload: one reading (object) or a gateway's array of readings."""
    try:
        decoded = orjson.loads(payload)
    except orjson.JSONDecodeError as error:
        return whole_payload(f"not valid JSON: {error}")
    if type(decoded) is dict:  # one reading, the common case: no loop, no positions to find
        result = validate_reading(stream, decoded, now=now, limits=limits, expected_id=expected_id)
        if isinstance(result, Rejected):
            return whole_payload_of(result)
        return ParsedPayload([result], [0])
    single = not isinstance(decoded, list)
    items: Sequence[Any] = [decoded] if single else decoded
    if not items:
        return whole_payload("empty array: no readings")
    if len(items) > limits.max_items:
        return whole_payload(
            f"{len(items)} readings in one array; at most {limits.max_items} (MAX_BATCH_READINGS)"
        )
    return validate_items(
        stream, items, now=now, limits=limits, expected_id=expected_id, indexed=not single
    )


def validate_items(
    stream: Stream,
    items: Sequence[Any],
    *,
    now: datetime,
    limits: Limits,
    expected_id: str | None = None,
    indexed: bool = True,
    keep_all: bool = False,
) -> ParsedPayload:
    """Validate each item as a reading of `stream` (MQTT's arrays, HTTP's batches): the valid
    ones with their positions, the others with their reasons (all of them with `keep_all`,
    else the first LISTED_REJECTIONS and a count)."""
    parsed = ParsedPayload(items=len(items), keep_all=keep_all)
    if len(items) > 1:
        try:
            readings: list[Reading] = _ARRAYS[stream].validate_python(items)
        except ValidationError:
            pass  # not all well-formed: each item on its own below, to say which and why
        else:
            for position, reading in enumerate(readings):
                beyond = _beyond(reading, now=now, limits=limits, expected_id=expected_id)
                if beyond is None:
                    parsed.readings.append(reading)
                    parsed.positions.append(position)
                else:
                    parsed.reject(Rejected(position if indexed else None, (beyond,)))
            return parsed
    for position, item in enumerate(items):
        if type(item) is not dict and not keep_all and len(parsed.rejected) >= LISTED_REJECTIONS:
            parsed.rejected_count += 1  # (not listed anyway: counted, at the cost of a check)
            continue
        result = validate_reading(
            stream,
            item,
            now=now,
            limits=limits,
            expected_id=expected_id,
            index=position if indexed else None,
            # (Past the listed ones a rejection is only counted: its problems, three
            # quarters of its cost, are not written out.)
            explain=keep_all or len(parsed.rejected) < LISTED_REJECTIONS,
        )
        if isinstance(result, Rejected):
            parsed.reject(result)
        else:
            parsed.readings.append(result)
            parsed.positions.append(position)
    return parsed
