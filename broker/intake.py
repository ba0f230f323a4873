"""From an MQTT delivery to the shared write path: topic and payload checks, then the buffer.

Valid readings are buffered; the message is acked once the transaction holding them commits.
Invalid ones are recorded in `rejections` (in the same kind of transaction) and acked too:
they will never become valid, and redelivering them forever would help nobody.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from broker.subscriber import Delivery
from broker.topics import parse_topic
from daemon.readings import ParsedPayload, Problem, Rejected, TimeWindow, parse_payload
from daemon.writer import Outcome, Overloaded, Submission, Writer
from db.writes import RejectionRow, truncate_payload

log = logging.getLogger(__name__)


class MqttIntake:
    def __init__(
        self,
        *,
        writer: Writer,
        ack: Callable[[Delivery], None],
        window: TimeWindow,
        payload_max_bytes: int,
    ) -> None:
        self._writer = writer
        self._ack = ack
        self._window = window
        self._payload_max_bytes = payload_max_bytes

    def __call__(self, delivery: Delivery) -> None:
        now = datetime.now(UTC)
        route = parse_topic(delivery.topic)
        if isinstance(route, str):
            stream_name = "unknown"
            parsed = ParsedPayload([], [Rejected(None, (Problem("topic", route),))])
        else:
            stream, device_id = route
            stream_name = stream.value
            parsed = parse_payload(
                stream, delivery.payload, now=now, window=self._window, expected_id=device_id
            )
        if parsed.rejected:
            self._writer.metrics.rejected(stream_name, "mqtt", len(parsed.rejected))
        rejections = [
            RejectionRow(
                received_at=now,
                source="mqtt",
                topic_or_route=delivery.topic,
                payload=truncate_payload(delivery.payload, self._payload_max_bytes),
                reason=rejected.reason,
            )
            for rejected in parsed.rejected
        ]
        submission = Submission(
            parsed.readings,
            rejections,
            on_committed=lambda outcome: self._committed(delivery, outcome),
            transport="mqtt",
            received_at=now,
            tag=delivery.generation if delivery.qos > 0 else None,
        )
        try:
            self._writer.submit(submission)
        except Overloaded:
            # Not acked: the broker keeps it and delivers it again after the restart.
            log.info("shutting down; %s left to the broker", delivery.topic)

    def _committed(self, delivery: Delivery, outcome: Outcome) -> None:
        self._ack(delivery)
