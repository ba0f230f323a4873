"""Telemetry topics and subscriptions (SPEC §3)."""

from __future__ import annotations

import pytest

from broker.topics import parse_topic, subscriptions
from ingest.readings import Stream


def test_topics_name_stream_and_device() -> None:
    assert parse_topic("meters/M-1/telemetry") == (Stream.METER, "M-1")
    assert parse_topic("vehicles/V:7/telemetry") == (Stream.VEHICLE, "V:7")


@pytest.mark.parametrize(
    "topic", ["meters/M-1", "meters/M-1/status", "cars/V/telemetry", "meters/a b/telemetry"]
)
def test_other_topics_are_refused_with_a_reason(topic: str) -> None:
    assert isinstance(parse_topic(topic), str)


def test_shared_group_prefixes_every_filter() -> None:
    assert subscriptions("") == ["meters/+/telemetry", "vehicles/+/telemetry"]
    assert subscriptions("ingest") == [
        "$share/ingest/meters/+/telemetry",
        "$share/ingest/vehicles/+/telemetry",
    ]
