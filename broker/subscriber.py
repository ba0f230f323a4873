"""The daemon's MQTT session: connect, subscribe, stay connected, reconnect.

- **Persistent session.** A fixed client id, clean start off and a session expiry: the broker
  keeps the subscriptions and queues messages while the daemon is away. A reconnect that
  finds no session where one should be (`session present: false`) may have lost readings the
  broker had accepted; it is logged as a WARNING and counted.
- **Ready means subscribed.** The daemon is ready only once the SUBACK granted every topic
  filter at the QoS asked for. A refusal (an ACL change, say) or a lower QoS is an error in
  the log, a reason on /health and in the metrics, and the SUBSCRIBE is sent again with
  back-off.
- **Acknowledged after commit.** `Delivery.ack` is called once the transaction holding a
  message has committed; it answers on the connection that delivered the message only
  (after a reconnect the broker delivers the unacked ones again, and the (device,
  timestamp) identity absorbs the copy).
- **Back-off** is exponential with jitter, and starts again from the shortest only after a
  connection has stayed up: two clients taking one session from each other slow down
  instead of kicking each other off several times a second.
- **MQTT 5 only.** Shared subscriptions, Receive Maximum and session expiry need it; a broker
  that answers in MQTT 3.1.1 ends the daemon with an error that says so.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from dataclasses import dataclass
from typing import Protocol

import mqtt5

from broker.connection import BrokerTooOld, Connection, Delivery
from broker.reasons import in_words, label
from ingest.lifecycle import Component, Deadline
from ingest.metrics import Metrics

# Every line is about MQTT (its `transport` field with LOG_FORMAT=json).
log = logging.LoggerAdapter(logging.getLogger(__name__), {"transport": "mqtt"})

CONNECT_TIMEOUT_S = 10.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
# A connection that lived this long was a good one: the next back-off starts from the first.
STABLE_CONNECTION_S = 30.0
PUBACK_GRACE_S = 0.05  # for the last PUBACKs to reach the socket before DISCONNECT

__all__ = ["BrokerTooOld", "Delivery", "Intake", "MqttSubscriber", "SessionSettings"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionSettings:
    host: str
    port: int
    tls: ssl.SSLContext | None
    username: str | None
    password: str | None
    client_id: str
    topics: tuple[str, ...]
    qos: int
    session_expiry_s: int
    keepalive_s: int
    receive_maximum: int
    max_packet_bytes: int

    @property
    def endpoint(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def backoff_s(attempt: int) -> float:
    """Exponential, with half of it random ("equal jitter"): never a burst of retries."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0**attempt)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class Intake(Protocol):
    """Where the subscriber hands each message (broker.intake.MqttIntake)."""

    def __call__(self, delivery: Delivery) -> None: ...

    def has_room(self) -> bool: ...

    def forget(self, generation: int) -> None:
        """The connection `generation` (and every older one) is gone: the broker delivers
        again whatever of it is not acknowledged."""


class MqttSubscriber(Component):
    """Runs (as a `Component`) from `async with` on: connected, and reconnecting, until the
    block ends; then it disconnects cleanly, keeping the session."""

    name = "mqtt"

    def __init__(self, settings: SessionSettings, *, intake: Intake, metrics: Metrics) -> None:
        self.settings = settings
        self._intake = intake
        self._metrics = metrics
        self.generation = 0
        self.connected = False
        self.ready = False
        self.detail = "not connected yet"
        self.paused = False
        self._connection: Connection | None = None
        self._had_session = False
        self._subscribe_attempts = 0
        self._next_packet_id = 0
        self._keepalive_s = settings.keepalive_s
        metrics.broker_connected.set_function(lambda: 1 if self.connected else 0)
        metrics.broker_ready.set_function(lambda: 1 if self.ready else 0)

    # -- public -------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, and reconnect with back-off, until cancelled. Raises BrokerTooOld."""
        attempt = 0
        try:
            while True:
                try:
                    connection = await self._connect()
                except BrokerTooOld as error:
                    raise BrokerTooOld(
                        f"the broker at {self.settings.endpoint} speaks only MQTT 3.1.1 ({error}); "
                        "the daemon needs MQTT 5 (shared subscriptions, session expiry, "
                        "Receive Maximum): Mosquitto 1.6 or later, EMQX, HiveMQ, VerneMQ"
                    ) from None
                except (OSError, TimeoutError, ConnectionError) as error:
                    self._set_down(f"cannot connect to {self.settings.endpoint}: {_text(error)}")
                else:
                    up_since = time.monotonic()
                    await self._serve(connection)
                    if time.monotonic() - up_since >= STABLE_CONNECTION_S:
                        attempt = 0
                delay = backoff_s(attempt)
                attempt += 1
                log.warning("MQTT %s; reconnecting in %.1f s", self.detail, delay)
                await asyncio.sleep(delay)
        finally:
            self.connected = self.ready = False

    async def finish(self, deadline: Deadline) -> None:
        """The writer has committed what it could: its last PUBACKs go out, then (as the
        task is cancelled) a clean DISCONNECT that keeps the session."""
        await asyncio.sleep(min(PUBACK_GRACE_S, deadline.left()))

    def on_delivery(self, delivery: Delivery) -> None:
        self._intake(delivery)
        if not self._intake.has_room():
            self.pause()

    def pause(self) -> None:
        """Hand over no more messages (the daemon's buffer is full)."""
        self.paused = True

    def resume(self) -> None:
        if not self.paused:
            return
        self.paused = False
        if self._connection is not None:
            self._connection.hand_over_backlog()

    # -- what a connection reports ------------------------------------------------------

    def on_suback(self, connection: Connection, suback: mqtt5.SubAckPacket) -> None:
        if connection is not self._connection:
            return
        topics = self.settings.topics
        if len(suback.reason_codes) != len(topics):
            self.on_protocol_error(connection, "a SUBACK that does not match our SUBSCRIBE")
            connection.disconnect(mqtt5.DisconnectReasonCode.PROTOCOL_ERROR)
            return
        problems = []
        for topic, code in zip(topics, suback.reason_codes, strict=True):
            if code.value >= 0x80:
                problems.append(f"{topic} refused: {in_words(mqtt5.SubAckReasonCode, code)}")
                self._metrics.mqtt_subscription_refusals.labels(
                    label(mqtt5.SubAckReasonCode, code)
                ).inc()
            elif code.value < self.settings.qos:
                problems.append(f"{topic} granted at QoS {code.value}, not {self.settings.qos}")
                self._metrics.mqtt_subscription_refusals.labels("lower_qos").inc()
        if not problems:
            self.ready = True
            self.detail = ""
            self._subscribe_attempts = 0
            log.info("MQTT subscribed to %s at QoS %d", ", ".join(topics), self.settings.qos)
            return
        self.ready = False
        delay = backoff_s(self._subscribe_attempts)
        self._subscribe_attempts += 1
        self.detail = "subscription not granted: " + "; ".join(problems)
        log.error("MQTT %s; subscribing again in %.1f s", self.detail, delay)
        asyncio.get_running_loop().call_later(delay, self._subscribe, connection)

    def on_server_disconnect(self, connection: Connection, packet: mqtt5.DisconnectPacket) -> None:
        code = packet.reason_code
        words = in_words(mqtt5.DisconnectReasonCode, code)
        if packet.reason_str:
            words += f" ({packet.reason_str})"
        cause = label(mqtt5.DisconnectReasonCode, code)
        self._metrics.mqtt_disconnects.labels(cause).inc()
        self._set_down(f"the broker disconnected us: {words}")
        level = (
            logging.ERROR
            if code == mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER
            else (logging.WARNING)
        )
        log.logger.log(level, "MQTT %s", self.detail, extra={"transport": "mqtt", "cause": cause})

    def on_protocol_error(self, connection: Connection, problem: str) -> None:
        self._metrics.mqtt_disconnects.labels("protocol_error_by_broker").inc()
        self._set_down(f"the broker sent {problem}; reconnecting")
        log.error("MQTT %s", self.detail)

    # -- connection ---------------------------------------------------------------------

    async def _connect(self) -> Connection:
        s = self.settings
        loop = asyncio.get_running_loop()
        self.generation += 1
        generation = self.generation
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, connection = await loop.create_connection(
                lambda: Connection(self, generation, max_packet_bytes=s.max_packet_bytes),
                s.host,
                s.port,
                ssl=s.tls,
                server_hostname=s.host if s.tls is not None else None,
            )
        connection.send(
            mqtt5.ConnectPacket(
                s.client_id,
                username=s.username,
                password=s.password.encode() if s.password is not None else None,
                clean_start=False,
                keep_alive=s.keepalive_s,
                session_expiry_interval=s.session_expiry_s,
                # The broker never has more unacked QoS 1 messages out to us than this: the
                # bound on what a slow database can make us hold in memory.
                receive_max=s.receive_maximum,
                # Larger messages are not ours to read (the broker drops them for us).
                max_packet_size=s.max_packet_bytes,
            ).write()
        )
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                connack = await connection.connack
        except BaseException:
            connection.close()
            raise
        if connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            connection.close()
            words = in_words(mqtt5.ConnAckReasonCode, connack.reason_code)
            raise ConnectionError(f"the broker refused the connection: {words}")
        self._accept(connection, connack)
        return connection

    def _accept(self, connection: Connection, connack: mqtt5.ConnAckPacket) -> None:
        s = self.settings
        if connack.server_keep_alive is not None and connack.server_keep_alive != s.keepalive_s:
            log.info("MQTT: the broker sets keep-alive to %d s", connack.server_keep_alive)
        if connack.max_qos.value < s.qos:
            log.error(
                "MQTT: the broker allows QoS %d at most; asked %d", connack.max_qos.value, s.qos
            )
        if not connack.session_present and self._had_session and s.session_expiry_s > 0:
            self._metrics.mqtt_sessions_lost.inc()
            log.warning(
                "MQTT: the broker had no session for %r although this daemon had one: "
                "readings it queued for us while we were away may have been lost (a broker "
                "restarted without persistence, or the session expired)",
                s.client_id,
            )
        self._had_session = s.session_expiry_s > 0
        self._connection = connection
        self._keepalive_s = (
            connack.server_keep_alive if connack.server_keep_alive is not None else s.keepalive_s
        )
        self.connected = True
        self.ready = False
        self.detail = "connected; waiting for the broker to grant the subscriptions"
        log.info(
            "MQTT connected to %s as %r (session present: %s)",
            s.endpoint,
            s.client_id,
            connack.session_present,
        )
        # Not waiting for the SUBACK here: a stored session's messages may come first.
        self._subscribe(connection)
        if not self.paused:
            connection.hand_over_backlog()

    def _subscribe(self, connection: Connection) -> None:
        if connection is not self._connection or connection.closing:
            return
        self._next_packet_id = self._next_packet_id % 65535 + 1
        filters = [
            # Retained messages are not sent again at each subscribe: a retained reading
            # reaches the daemon once, when it is published (or queued in its session).
            mqtt5.TopicFilter(
                topic,
                max_qos=mqtt5.QoS(self.settings.qos),
                retain_handling=mqtt5.RetainHandling.SEND_NEVER,
            )
            for topic in self.settings.topics
        ]
        connection.send(mqtt5.SubscribePacket(self._next_packet_id, filters).write())

    async def _serve(self, connection: Connection) -> None:
        """Keep the connection alive until it closes; on cancel, disconnect cleanly."""
        try:
            while not connection.closed.done():
                interval = max(0.5, self._keepalive_s / 2) if self._keepalive_s else None
                await asyncio.wait({connection.closed}, timeout=interval)
                if connection.closed.done() or not self._keepalive_s:
                    continue
                if self._silent(connection):
                    self._metrics.mqtt_disconnects.labels("keep_alive_timeout").inc()
                    self._set_down(f"no answer from the broker for {self._keepalive_s} s")
                    connection.close()
                    await connection.closed
                    break
                connection.ping()
        except asyncio.CancelledError:
            # Stopping: the last PUBACKs, then a clean DISCONNECT (the session is kept).
            self.connected = self.ready = False
            connection.disconnect(mqtt5.DisconnectReasonCode.NORMAL_DISCONNECTION)
            log.info("MQTT disconnected from %s", self.settings.endpoint)
            raise
        self._connection = None
        error = connection.closed.result()
        if self.connected:  # nobody said why yet
            self._metrics.mqtt_disconnects.labels("connection_lost").inc()
            self._set_down(f"connection lost: {_text(error) if error else 'closed by the broker'}")
        self.connected = self.ready = False
        self._intake.forget(connection.generation)

    def _silent(self, connection: Connection) -> bool:
        """A PINGREQ unanswered, and nothing else heard, for a whole keep-alive. While the
        socket is paused (messages waiting here), silence means nothing."""
        if connection.ping_sent_at is None or connection.reading_paused:
            return False
        now = time.monotonic()
        return (
            now - connection.ping_sent_at > self._keepalive_s
            and now - connection.last_heard > self._keepalive_s
        )

    def _set_down(self, detail: str) -> None:
        self.connected = self.ready = False
        self.detail = detail


def _text(error: BaseException) -> str:
    return str(error) or error.__class__.__name__
