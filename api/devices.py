"""Silent devices: `GET /v1/devices?silentFor=15m&stream=meter|vehicle`, longest silent first.

A device is silent when its newest stored reading is older than the span (its own
timestamp, as the latest state holds it). Only devices that have reported are known: a
device that never sent a reading is not listed. Pages follow a cursor that carries the span,
the stream and the last device's key, so that every page asks the same question; each page
counts the span back from the database's clock at the time it is read.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request

from api import cursors
from api.auth import require
from api.body import limit_param, problem
from api.responses import JSON, ApiError
from api.state import reads_of, runtime_of
from db import devices
from ingest.readings import is_device_id

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
QUERY = ("silentFor", "stream", "limit", "cursor")  # (each once at most)
STREAMS = ("meter", "vehicle")
CHOICES = (("meter",), ("vehicle",), STREAMS)  # one stream, or both
UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_SPAN_S = 3650 * 86400  # ten years
SPAN = re.compile(r"([0-9]{1,9})([smhd])")
SPAN_RULE = "a whole number and a unit (s, m, h or d), from 1s to 3650d, e.g. 15m"


def _bad(field: str, message: str) -> ApiError:
    return ApiError(400, [problem(field, message)])


def span_s(raw: str) -> int:
    """`15m` → 900: seconds, from 1 s to ten years, else 400."""
    match = SPAN.fullmatch(raw)
    seconds = int(match[1]) * UNITS_S[match[2]] if match else 0
    if not 1 <= seconds <= MAX_SPAN_S:
        raise _bad("silentFor", f"must be {SPAN_RULE}")
    return seconds


def _streams(raw: str | None) -> tuple[str, ...]:
    if raw is None or raw == "":
        return STREAMS
    if raw not in STREAMS:
        raise _bad("stream", "must be meter or vehicle (or absent: both)")
    return (raw,)


def encode_cursor(seconds: int, streams: tuple[str, ...], after: devices.SilentKey) -> str:
    ts, stream, device_id = after
    state = {"silentFor": seconds, "streams": streams, "after": [ts.isoformat(), stream, device_id]}
    return cursors.encode(state)


def decode_cursor(raw: str) -> tuple[int, tuple[str, ...], devices.SilentKey]:
    try:
        state = cursors.decode(raw)
        seconds, streams = state["silentFor"], tuple(state["streams"])
        ts_text, stream, device_id = state["after"]
        ts = datetime.fromisoformat(ts_text)
        if ts.tzinfo is None:
            raise ValueError("a time without its offset")
        ts = ts.astimezone(UTC)  # (OverflowError past the calendar's ends)
        if (
            type(seconds) is not int
            or not 1 <= seconds <= MAX_SPAN_S
            or streams not in CHOICES
            or stream not in streams
            or not isinstance(device_id, str)
            or not is_device_id(device_id)
        ):
            raise ValueError("cursor fields")
    except cursors.FORGED:
        raise cursors.refused() from None
    return seconds, streams, (ts, stream, device_id)


@require("operator")
async def silent(request: Request) -> JSON:
    settings = runtime_of(request).settings
    query = request.query_params
    limit = limit_param(query.get("limit"), default=DEFAULT_LIMIT, maximum=MAX_LIMIT)
    for name in QUERY:
        if len(query.getlist(name)) > 1:
            raise _bad(name, "given more than once")
    raw = query.get("silentFor")
    seconds = settings.silent_after_s if raw is None else span_s(raw)
    streams = _streams(query.get("stream"))
    after: devices.SilentKey | None = None
    if query.get("cursor"):
        asked = (seconds, streams)
        seconds, streams, after = decode_cursor(query["cursor"])
        for name, was, now in zip(("silentFor", "stream"), (seconds, streams), asked, strict=True):
            if name in query and was != now:
                raise _bad(name, "is not the cursor's: give it as on the first page, or not at all")
    async with reads_of(request).connection(analytics=False) as conn:
        page = await devices.silent_page(
            conn, streams=streams, silent_for_s=seconds, after=after, limit=limit
        )
    items: list[dict[str, Any]] = [
        {
            "stream": d.stream,
            "deviceId": d.device_id,
            "lastReadingAt": d.last_reading_at,
            "receivedAt": d.received_at,
            "vehicleId": d.vehicle_id,
            "silentForSeconds": round((page.at - d.last_reading_at).total_seconds(), 3),
        }
        for d in page.devices
    ]
    return JSON(
        {
            "silentForSeconds": seconds,
            "streams": list(streams),
            "at": page.at,
            "total": page.total,
            "devices": items,
            "next": encode_cursor(seconds, streams, page.devices[-1].key) if page.more else None,
        }
    )
