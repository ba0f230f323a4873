"""MQTT 5 reason codes in words, for the log, /health and the metrics' labels.

The codes and their names come from the codec (`mqtt5`); what an operator should do about
the few that need action is added here. (mqtt5's reason codes compare equal to ints but are
not hashable and do not order against ints: they are handled here by their `.value`.)
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from mqtt5 import ConnAckReasonCode, DisconnectReasonCode, SubAckReasonCode

_HINT_TEXTS: list[tuple[Any, str]] = [
    (
        DisconnectReasonCode.SESSION_TAKEN_OVER,
        "another client connected with this client id; every daemon replica needs an MQTT "
        "identity of its own (MQTT_CLIENT_ID, and its own user where the broker ties client "
        "ids to user names)",
    ),
    (DisconnectReasonCode.SERVER_SHUTTING_DOWN, "the broker is shutting down"),
    (
        DisconnectReasonCode.NOT_AUTHORIZED,
        "the broker no longer authorises this user; check its password and ACL",
    ),
    (
        ConnAckReasonCode.BAD_USER_NAME_OR_PASSWORD,
        "check the user name and password in MQTT_URL (`energy-ingest provision daemon NAME`)",
    ),
    (
        ConnAckReasonCode.NOT_AUTHORIZED,
        "the broker does not let this user connect; check its password file and ACL",
    ),
    (SubAckReasonCode.NOT_AUTHORIZED, "the broker's ACL does not let this user read the topic"),
    (
        SubAckReasonCode.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
        "the broker has no shared subscriptions; unset MQTT_SHARED_GROUP or use a broker "
        "that has them",
    ),
]
_HINTS = {(type(code).__name__, code.value): text for code, text in _HINT_TEXTS}


def in_words(kind: type[IntEnum], code: int) -> str:
    """`not authorized (0x87)`, with what to do about it where that helps."""
    value = int(code)
    words = f"{label(kind, value).replace('_', ' ')} (0x{value:02x})"
    hint = _HINTS.get((kind.__name__, value))
    return f"{words}: {hint}" if hint else words


def label(kind: type[IntEnum], code: int) -> str:
    """A short, bounded label for a metric: the code's name alone."""
    try:
        return kind(int(code)).name.lower()
    except ValueError:
        return "unknown"
