"""The simulated fleet: plausible readings, faulty chargers below the alert threshold."""

from __future__ import annotations

import argparse
from collections import Counter
from datetime import UTC, datetime

import orjson

from ingest.readings import MeterReading, VehicleReading
from simulator.fleet import FAULTY_LOSS, HEALTHY_LOSS, Fleet
from simulator.simulate import add_arguments, messages

AT = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


def test_every_reading_is_valid_and_ac_covers_dc_with_a_plausible_loss() -> None:
    fleet = Fleet(meters=20, vehicles=20, faulty_share=0.2)
    ac: dict[str, float] = {}
    dc: dict[str, float] = {}
    for topic, payload in fleet.minute(AT):
        body = orjson.loads(payload)
        if topic.startswith("meters/"):
            reading = MeterReading.model_validate(body)
            ac[reading.meter_id] = reading.kwh_consumed_ac
        else:
            vehicle_reading = VehicleReading.model_validate(body)
            dc[vehicle_reading.vehicle_id] = vehicle_reading.kwh_delivered_dc
    assert len(ac) == 20 and len(dc) == 20
    for vehicle in fleet.vehicles:
        ratio = dc[vehicle.vehicle_id] / ac[vehicle.meter_id]
        loss = FAULTY_LOSS if vehicle.meter_id in fleet.faulty else HEALTHY_LOSS
        assert 1 - loss[1] - 1e-3 <= ratio <= 1 - loss[0] + 1e-3
    assert len(fleet.faulty) == 4
    assert all(1 - FAULTY_LOSS[0] < 0.85 for _ in fleet.faulty)


def test_simulation_adds_late_and_duplicate_messages() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--meters",
            "10",
            "--vehicles",
            "10",
            "--minutes",
            "30",
            "--late-share",
            "0.1",
            "--duplicate-share",
            "0.1",
        ]
    )
    fleet = Fleet(meters=10, vehicles=10)
    sent = messages(args, fleet)
    copies = sum(n - 1 for n in Counter(sent).values())
    assert 20 < copies < 120  # about 10 % of 600
    times = [orjson.loads(p)["timestamp"] for t, p in sent if t == sent[-1][0]]
    assert times != sorted(times)  # some arrive after newer ones


def test_gateway_arrays_group_readings_of_one_device() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--meters",
            "2",
            "--vehicles",
            "2",
            "--minutes",
            "120",
            "--array",
            "60",
            "--late-share",
            "0",
            "--duplicate-share",
            "0",
        ]
    )
    sent = messages(args, Fleet(meters=2, vehicles=2))
    assert len(sent) == 8
    for topic, payload in sent:
        items = orjson.loads(payload)
        assert len(items) == 60
        device = topic.split("/")[1]
        assert all(device in (i.get("meterId"), i.get("vehicleId")) for i in items)
