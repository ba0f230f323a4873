"""From an MQTT delivery to the shared write path: topic and payload checks, then the buffer.

Valid readings are buffered; the message is acked once the transaction holding them commits.
Invalid ones are recorded in `rejections` (in the same kind of transaction) and acked too:
they will never become valid, and redelivering them forever would help nobody.

Nothing one message contains may stop the intake: whatever goes wrong while handling a
message, a bug of ours included, becomes a rejection of that message (recorded, acked), and
the next message is handled as usual. Redelivering it would only fail again, and keep every
other device's readings waiting behind it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from broker.connection import Delivery
from broker.topics import parse_topic
from db.writes import RejectionRow
from ingest.readings import Limits, ParsedPayload, Reading, parse_payload, whole_payload
from ingest.writer import Overloaded, Submission, Writer

log = logging.getLogger(__name__)
MQTT = {"transport": "mqtt"}  # what its log lines are about (LOG_FORMAT=json)


class MqttIntake:
    def __init__(
        self,
        *,
        writer: Writer,
        limits: Limits,
        payload_max_bytes: int,
    ) -> None:
        self._writer = writer
        self._limits = limits
        self._payload_max_bytes = payload_max_bytes
        self._failures_logged: set[type[BaseException]] = set()
        self._left_to_broker = 0

    def __call__(self, delivery: Delivery) -> None:
        now = datetime.now(UTC)
        try:
            submission = self._submission(delivery, now)
        except Exception as error:  # a bug of ours must not hold up every other message
            submission = self._failure(delivery, now, error)
        try:
            self._writer.submit(submission)
        except Overloaded:
            # Not acked: the broker keeps it and delivers it again after the restart.
            self._left_to_broker += 1
            if self._left_to_broker == 1:  # (once, not a line a message)
                log.info("shutting down: messages arriving now are left to the broker", extra=MQTT)

    def has_room(self) -> bool:
        return not self._writer.full

    def forget(self, generation: int) -> None:
        """The broker delivers again every unacked QoS 1 message of that connection: drop
        the copies still waiting here rather than hold them twice."""

        def stale(s: Submission) -> bool:
            return isinstance(s.tag, int) and s.tag <= generation

        dropped = self._writer.drop_pending(stale)
        if dropped:
            log.info(
                "dropped %d unflushed MQTT messages; the broker redelivers them",
                dropped,
                extra=MQTT,
            )

    def _submission(self, delivery: Delivery, now: datetime) -> Submission:
        route = parse_topic(delivery.topic)
        parsed: ParsedPayload
        if isinstance(route, str):
            stream_name = "unknown"
            parsed = whole_payload(f"topic: {route}")
        else:
            stream, device_id = route
            stream_name = stream.value
            parsed = parse_payload(
                stream, delivery.payload, now=now, limits=self._limits, expected_id=device_id
            )
        if not parsed.rejected_count:
            return self._submit(delivery, now, parsed.readings, [])
        self._writer.metrics.rejected(stream_name, "mqtt", parsed.rejected_count)
        # One record per message, however many bad readings it held.
        rejection = self._rejection(delivery, now, parsed.reason)
        return self._submit(delivery, now, parsed.readings, [rejection])

    def _failure(self, delivery: Delivery, now: datetime, error: Exception) -> Submission:
        self._writer.metrics.mqtt_intake_failures.inc()
        if type(error) not in self._failures_logged:  # the traceback once per kind of failure
            self._failures_logged.add(type(error))
            log.exception(
                "MQTT: a message on %r could not be handled", delivery.topic, extra=about(delivery)
            )
        reason = f"could not be handled (internal error {type(error).__name__}: {error})"
        return self._submit(delivery, now, [], [self._rejection(delivery, now, reason)])

    def _rejection(self, delivery: Delivery, now: datetime, reason: str) -> RejectionRow:
        return RejectionRow.of(
            delivery.payload,
            reason,
            received_at=now,
            source="mqtt",
            origin=delivery.topic,
            max_bytes=self._payload_max_bytes,
        )

    def _submit(
        self,
        delivery: Delivery,
        now: datetime,
        readings: Sequence[Reading],
        rejections: Sequence[RejectionRow],
    ) -> Submission:
        return Submission(
            readings,
            rejections,
            on_settled=lambda _: delivery.ack(),
            transport="mqtt",
            received_at=now,
            tag=delivery.generation if delivery.qos > 0 else None,
            origin=delivery.topic,
        )


def about(delivery: Delivery) -> dict[str, str]:
    """What a log line about this message is about (LOG_FORMAT=json): MQTT, and the stream
    and device its topic names, if it names them."""
    topic = parse_topic(delivery.topic)
    if isinstance(topic, str):
        return {"transport": "mqtt"}
    stream, device = topic
    return {"transport": "mqtt", "stream": stream.value, "device": device}
