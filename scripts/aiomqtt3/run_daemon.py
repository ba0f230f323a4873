"""The daemon with its MQTT session on aiomqtt 3 instead of our own (broker.subscriber), for
measuring the two side by side in `energy-ingest bench mqtt-drain` (BENCHMARKS.md).

An experiment, not part of the product: it runs in a virtual environment of its own, made by
`scripts/aiomqtt3/measure.sh`, because aiomqtt 3.0.0a1 declares mqtt5~=0.5.0 (no wheel for
this machine; 0.6.0, with the same API, is used) and the daemon needs mqtt5 0.8.

Everything but the session is the daemon's own: intake, validation, buffer, flush, acks after
commit. Acknowledgements go through aiomqtt's public `puback`, one per message.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import aiomqtt  # type: ignore[import-not-found]
import mqtt5
import uvloop

from broker.connection import Delivery
from broker.subscriber import Intake, MqttSubscriber, SessionSettings
from daemon.app import serve
from daemon.cli import tune_gc
from ingest.config import Settings
from ingest.metrics import Metrics


class Aiomqtt3Subscriber(MqttSubscriber):
    """broker.subscriber.MqttSubscriber with its session on aiomqtt: given to the daemon as
    its subscriber factory (`serve(..., subscriber_factory=...)`)."""

    def __init__(self, settings: SessionSettings, *, intake: Intake, metrics: Metrics) -> None:
        super().__init__(settings, intake=intake, metrics=metrics)
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._acks: list[int] = []
        self._acking: asyncio.Task[None] | None = None
        self._client: Any = None

    async def run(self) -> None:
        s = self.settings
        client = aiomqtt.Client(
            hostname=s.host,
            port=s.port,
            identifier=s.client_id,
            username=s.username,
            password=s.password.encode() if s.password else None,
            clean_start=False,
            session_expiry_interval=s.session_expiry_s,
            keep_alive=s.keepalive_s,
            receive_max=s.receive_maximum,
            max_packet_size=s.max_packet_bytes,
        )
        async with client:
            self._client = client
            self.connected = True
            for topic in s.topics:
                await client.subscribe(topic, max_qos=mqtt5.QoS.AT_LEAST_ONCE)
            self.ready, self.detail = True, ""
            async for message in client.messages():
                if not self._resumed.is_set():
                    await self._resumed.wait()
                if isinstance(message, mqtt5.PublishPacket):
                    delivery = Delivery(
                        message.topic,
                        message.payload,
                        message.qos.value,
                        message.packet_id or 0,
                        1,
                        self,
                    )
                    self.on_delivery(delivery)

    def acknowledge(self, delivery: Delivery) -> None:
        if delivery.qos:
            self._acks.append(delivery.packet_id)
            if self._acking is None or self._acking.done():
                self._acking = asyncio.create_task(self._send_acks())

    async def _send_acks(self) -> None:
        while self._acks:
            acks, self._acks = self._acks, []
            for packet_id in acks:
                await self._client.puback(packet_id)

    def pause(self) -> None:
        self.paused = True
        self._resumed.clear()

    def resume(self) -> None:
        self.paused = False
        self._resumed.set()


if __name__ == "__main__":
    if sys.argv[1:] != ["run"]:
        sys.exit("usage: run_daemon.py run")
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper())
    tune_gc()
    if not uvloop.run(serve(settings, subscriber_factory=Aiomqtt3Subscriber)):
        sys.exit(1)
