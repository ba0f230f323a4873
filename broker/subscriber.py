"""The MQTT subscriber: paho-mqtt 2 driven by the asyncio event loop, with manual PUBACK.

Why paho and not aiomqtt: acknowledging a QoS 1 message only after the transaction that
holds it has committed needs manual acknowledgement, which paho-mqtt 2 has
(`manual_ack=True`, `Client.ack`) and aiomqtt does not expose. paho's socket callbacks let
the asyncio loop do its I/O, so there is no second thread and no hand-over per message.

Each connection has a generation number. An ack is sent only on the connection that
delivered the message: after a reconnect the broker redelivers whatever was not acked, and
the (device, ts) identity absorbs the copy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

log = logging.getLogger(__name__)

RECONNECT_FIRST_S = 0.2
RECONNECT_MAX_S = 10.0
MISC_INTERVAL_S = 1.0
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Delivery:
    topic: str
    payload: bytes
    qos: int
    mid: int
    generation: int


class MqttSubscriber:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str | None,
        password: str | None,
        client_id: str,
        topics: list[str],
        qos: int,
        session_expiry_s: int,
        keepalive_s: int,
        receive_maximum: int,
        on_delivery: Callable[[Delivery], None],
        on_connection_lost: Callable[[int], None] = lambda generation: None,
    ) -> None:
        self._host, self._port = host, port
        self._topics, self._qos = topics, qos
        self._session_expiry_s = session_expiry_s
        self._keepalive_s = keepalive_s
        self._receive_maximum = receive_maximum
        self._on_delivery = on_delivery
        self._on_connection_lost = on_connection_lost
        self.generation = 0
        self.connected = False
        self.last_error = "not connected yet"
        self._paused = False
        self.connected_once_this_round = False
        self._closing = False
        self._sock: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lost = asyncio.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        self._client.connect_timeout = CONNECT_TIMEOUT_S
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_socket_open = self._socket_open
        self._client.on_socket_close = self._socket_close
        self._client.on_socket_register_write = self._register_write
        self._client.on_socket_unregister_write = self._unregister_write

    # -- public -------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, and reconnect with back-off, until cancelled."""
        self._loop = asyncio.get_running_loop()
        misc = asyncio.create_task(self._misc_loop())
        backoff = RECONNECT_FIRST_S
        try:
            while True:
                self._lost.clear()
                try:
                    await self._connect()
                except OSError as error:
                    self.last_error = f"cannot reach {self._host}:{self._port}: {error}"
                    log.warning("MQTT %s; retrying in %.1f s", self.last_error, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RECONNECT_MAX_S)
                    continue
                await self._lost.wait()
                if self.connected_once_this_round:
                    backoff = RECONNECT_FIRST_S
                else:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RECONNECT_MAX_S)
        finally:
            misc.cancel()
            if self.connected:
                # A clean DISCONNECT keeps the session (clean start off, expiry set).
                self._closing = True
                self._client.disconnect()
                self._client.loop_write()
            self._drop_socket()

    def ack(self, delivery: Delivery) -> None:
        """PUBACK a QoS 1 message, if the connection that delivered it is still up."""
        if delivery.qos > 0 and delivery.generation == self.generation and self.connected:
            self._client.ack(delivery.mid, delivery.qos)

    def pause(self) -> None:
        """Stop reading from the broker (backpressure: the buffer is full)."""
        if not self._paused and self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock)
        self._paused = True

    def resume(self) -> None:
        if self._paused and self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock, self._read)
        self._paused = False

    # -- connection ---------------------------------------------------------------------

    async def _connect(self) -> None:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self._session_expiry_s
        # The broker never has more unacked QoS 1 messages out to us than this: the bound
        # on what a slow database can make us hold in memory.
        properties.ReceiveMaximum = self._receive_maximum
        self.connected_once_this_round = False
        # paho's connect() is a blocking TCP connect; a thread keeps the loop free.
        await asyncio.to_thread(
            self._client.connect,
            self._host,
            self._port,
            keepalive=self._keepalive_s,
            clean_start=False,
            properties=properties,
        )
        assert self._loop is not None
        sock = self._client.socket()
        if sock is None:
            raise OSError("connection closed during connect")
        self._sock = sock
        if not self._paused:
            self._loop.add_reader(sock, self._read)
        self._loop.add_writer(sock, self._write)

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            self.last_error = f"broker refused the connection: {reason}"
            log.error("MQTT %s", self.last_error)
            return
        self.generation += 1
        self.connected = True
        self.connected_once_this_round = True
        self.last_error = ""
        options = SubscribeOptions(qos=self._qos)
        client.subscribe([(topic, options) for topic in self._topics])
        log.info(
            "MQTT connected to %s:%d (session present: %s), subscribing to %s",
            self._host,
            self._port,
            flags.session_present,
            self._topics,
        )

    def _handle_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        for topic, reason in zip(self._topics, reasons, strict=False):
            if reason.is_failure:
                log.error("MQTT subscription to %s refused: %s", topic, reason)

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        was_connected = self.connected
        self.connected = False
        if was_connected:
            self.last_error = f"disconnected: {reason}"
            log.log(logging.INFO if self._closing else logging.WARNING, "MQTT %s", self.last_error)
            self._on_connection_lost(self.generation)
        self._lost.set()

    def _handle_message(
        self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage
    ) -> None:
        self._on_delivery(
            Delivery(
                message.topic, bytes(message.payload), message.qos, message.mid, self.generation
            )
        )

    # -- socket plumbing for the asyncio loop -------------------------------------------

    def _read(self) -> None:
        # paho reads one packet per call; a few in a row save trips through the selector.
        for _ in range(64):
            if self._paused or self._client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                break
            if self._sock is None:
                break

    def _write(self) -> None:
        self._client.loop_write()

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(MISC_INTERVAL_S)
            self._client.loop_misc()

    def _socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._sock = sock

    def _socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._drop_socket()
        self._lost.set()

    def _drop_socket(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock)
            self._loop.remove_writer(self._sock)
        self._sock = None

    def _register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._add_writer, sock)

    def _add_writer(self, sock: Any) -> None:
        if self._loop is not None and sock is self._sock:
            self._loop.add_writer(sock, self._write)

    def _unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._remove_writer, sock)

    def _remove_writer(self, sock: Any) -> None:
        if self._loop is not None and sock is self._sock:
            self._loop.remove_writer(sock)
