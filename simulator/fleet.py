"""A simulated fleet: vehicles charging on chargers, each charger behind a smart meter.

A charger loses 8 to 15 % between the grid (AC, what its meter measures) and the battery
(DC, what the vehicle reports); a share of chargers is faulty and loses 20 to 30 %, which puts
their vehicles below the default alert threshold of 0.85.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson

HEALTHY_LOSS = (0.08, 0.15)
FAULTY_LOSS = (0.20, 0.30)
DC_KWH_PER_MINUTE = (0.05, 0.12)  # 3 to 7 kW


@dataclass(frozen=True, slots=True)
class Vehicle:
    vehicle_id: str
    meter_id: str


def iso_ms(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Fleet:
    def __init__(
        self,
        *,
        meters: int,
        vehicles: int,
        faulty_share: float = 0.1,
        seed: int = 7,
        prefix: str = "",
    ) -> None:
        rng = random.Random(seed)
        self.meters = [f"{prefix}M-{n:05d}" for n in range(meters)]
        faulty = set(rng.sample(self.meters, int(meters * faulty_share)))
        self.loss = {
            m: rng.uniform(*(FAULTY_LOSS if m in faulty else HEALTHY_LOSS)) for m in self.meters
        }
        self.faulty = faulty
        self.vehicles = [
            Vehicle(f"{prefix}V-{n:05d}", self.meters[n % meters]) for n in range(vehicles)
        ]
        self._rng = rng

    def links(self) -> list[dict[str, str]]:
        return [{"vehicleId": v.vehicle_id, "meterId": v.meter_id} for v in self.vehicles]

    def minute(self, at: datetime, *, share_of_minute: float = 1.0) -> list[tuple[str, bytes]]:
        """One heartbeat of every device at `at`: (topic, JSON payload), vehicles then meters;
        the energy of `share_of_minute` of a minute of charging (live heartbeats come every
        few seconds)."""
        stamp = iso_ms(at)
        ac: dict[str, float] = dict.fromkeys(self.meters, 0.0)
        out: list[tuple[str, bytes]] = []
        day_share = (at.hour * 60 + at.minute) / 1440
        for n, vehicle in enumerate(self.vehicles):
            dc = self._rng.uniform(*DC_KWH_PER_MINUTE) * share_of_minute
            ac[vehicle.meter_id] += dc / (1 - self.loss[vehicle.meter_id])
            body = {
                "vehicleId": vehicle.vehicle_id,
                "soc": round(20 + 75 * ((day_share + n / len(self.vehicles)) % 1), 2),
                "kwhDeliveredDc": round(dc, 6),
                "batteryTemp": round(self._rng.uniform(18, 38), 1),
                "timestamp": stamp,
            }
            out.append((f"vehicles/{vehicle.vehicle_id}/telemetry", orjson.dumps(body)))
        for meter, kwh in ac.items():
            body = {
                "meterId": meter,
                "kwhConsumedAc": round(kwh, 6),
                "voltage": round(self._rng.gauss(230, 3), 1),
                "timestamp": stamp,
            }
            out.append((f"meters/{meter}/telemetry", orjson.dumps(body)))
        return out


def spoiled(message: tuple[str, bytes], rng: random.Random) -> tuple[str, bytes]:
    """The message as a faulty device might send it: cut short, with a negative energy, or
    dated a day ahead. The daemon rejects each, with its reason, and stores the rest."""
    topic, payload = message
    body = orjson.loads(payload)
    kind = rng.randrange(3)
    if kind == 0:
        return topic, payload[: len(payload) // 2]
    if kind == 1:
        field = "kwhConsumedAc" if "meterId" in body else "kwhDeliveredDc"
        body[field] = -abs(body[field]) - 1
    else:
        ahead = datetime.fromisoformat(body["timestamp"]) + timedelta(days=1)
        body["timestamp"] = iso_ms(ahead)
    return topic, orjson.dumps(body)


def as_arrays(messages: list[tuple[str, bytes]], size: int) -> list[tuple[str, bytes]]:
    """Messages regrouped as a gateway sends a backlog: JSON arrays of up to `size` readings
    of one device, in the order they came; `size` 1 leaves them as they are."""
    if size <= 1:
        return list(messages)
    grouped: dict[str, list[bytes]] = {}
    for topic, payload in messages:
        grouped.setdefault(topic, []).append(payload)
    return [
        (topic, b"[" + b",".join(payloads[at : at + size]) + b"]")
        for topic, payloads in grouped.items()
        for at in range(0, len(payloads), size)
    ]
