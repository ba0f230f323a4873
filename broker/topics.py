"""Telemetry topics (SPEC §3): `meters/{meterId}/telemetry`, `vehicles/{vehicleId}/telemetry`."""

from __future__ import annotations

from ingest.readings import DEVICE_ID_PATTERN, Stream, is_device_id

TOPIC_FILTERS = {Stream.METER: "meters/+/telemetry", Stream.VEHICLE: "vehicles/+/telemetry"}
_PREFIXES = {"meters": Stream.METER, "vehicles": Stream.VEHICLE}


def subscriptions(shared_group: str) -> list[str]:
    """Topic filters to subscribe, through `$share/<group>/` when several daemons share load."""
    prefix = f"$share/{shared_group}/" if shared_group else ""
    return [prefix + topic for topic in TOPIC_FILTERS.values()]


def parse_topic(topic: str) -> tuple[Stream, str] | str:
    """(stream, device id) for a telemetry topic, or the reason it is not one."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] not in _PREFIXES or parts[2] != "telemetry":
        return "topic is not meters/{meterId}/telemetry or vehicles/{vehicleId}/telemetry"
    if not is_device_id(parts[1]):
        return f"device id in the topic must match {DEVICE_ID_PATTERN}"
    return _PREFIXES[parts[0]], parts[1]
