"""The daemon's log on stderr: plain text (the default), or with LOG_FORMAT=json one JSON
object a line, for log pipelines.

A JSON line has `time` (RFC 3339, UTC), `level`, `logger` and `event` (the message), always;
the fields of `CONTEXT` when the log call gives them (`log.warning(..., extra={"sqlstate":
...})`); and a traceback under `exc`. uvicorn's loggers are sent through the same handler.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What a log line may say it is about: a stream (meter, vehicle), a device id, a transport
# (mqtt, http), the SQLSTATE of a database error, and its cause (the SQLSTATE, or the kind of
# error when there is none: as the `cause` label of energy_ingest_flush_failures_total).
CONTEXT = ("stream", "device", "transport", "sqlstate", "cause")
# uvicorn's loggers: their own handlers removed, so that they reach the root's.
UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def _scalar(value: Any) -> str | int | float | bool:
    """A JSON scalar for a context value: strings, integers, booleans and finite numbers as
    they are, anything else as its `str`."""
    if isinstance(value, str | bool | int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object a line (`json.dumps` of a dict: escapes every line break)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key in CONTEXT:
            value = record.__dict__.get(key)
            if value is not None and value != "":
                entry[key] = _scalar(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ASCII only: no character can end the line or fail to encode on the way out.
        return json.dumps(entry, ensure_ascii=True)


def configure_logging(level: str, log_format: str) -> None:
    """The root logger writes to stderr in `log_format` ("text" or "json"), at `level`."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN:
        logger = logging.getLogger(name)
        for old in logger.handlers[:]:
            logger.removeHandler(old)
        logger.propagate = True
    logging.captureWarnings(True)  # Python's warnings, as log lines too
