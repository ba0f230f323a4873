"""How much of the event loop one read of MQTT messages may take (broker.connection): pure
logic on a real asyncio loop, no broker."""

from __future__ import annotations

import asyncio
import time

import mqtt5
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.connection import DELIVER_BUDGET_S, Connection, Delivery


class SlowOwner:
    """An intake whose every message costs `cost_s` of the loop's time (as an array of
    10,000 invalid objects costs about 60 ms)."""

    paused = False

    def __init__(self, cost_s: float) -> None:
        self.cost_s = cost_s
        self.delivered: list[str] = []
        self.turns: list[list[str]] = [[]]

    def on_delivery(self, delivery: Delivery) -> None:
        time.sleep(self.cost_s)
        self.delivered.append(delivery.topic)
        self.turns[-1].append(delivery.topic)

    def on_suback(self, *_: object) -> None: ...

    def on_server_disconnect(self, *_: object) -> None: ...

    def on_protocol_error(self, *_: object) -> None: ...


@settings(max_examples=15, deadline=None)
@given(count=st.integers(1, 60), cost_ms=st.sampled_from([0.0, 1.0, 4.0, 15.0]))
def test_a_read_of_costly_messages_is_handed_over_turn_by_turn_in_order(
    count: int, cost_ms: float
) -> None:
    """Every message of one read is handed over, in order; no turn of the loop hands over
    more than DELIVER_BUDGET_S of them past the first. A hundred costly arrays in one read
    once held the loop for 6 s."""

    async def run() -> SlowOwner:
        owner = SlowOwner(cost_ms / 1000)
        connection = Connection(owner, 1, max_packet_bytes=1 << 20)
        connection.connack.set_result(mqtt5.ConnAckPacket())  # (past the handshake)
        data = b"".join(
            mqtt5.PublishPacket(f"meters/M-{n}/telemetry", b"{}").write() for n in range(count)
        )
        connection.data_received(data)
        while len(owner.delivered) < count:
            owner.turns.append([])
            await asyncio.sleep(0)
        return owner

    owner = asyncio.run(run())
    assert owner.delivered == [f"meters/M-{n}/telemetry" for n in range(count)]
    longest = max(len(turn) for turn in owner.turns)
    allowed = 1 + int(DELIVER_BUDGET_S / (cost_ms / 1000)) if cost_ms else count
    assert longest <= allowed, (longest, allowed)
