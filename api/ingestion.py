"""Ingestion routes (SPEC §4), compatible with the firmware already in the field.

Every route goes through the same validation (`ingest.readings`) and the same buffer and
transactional flush as MQTT (`ingest.writer`); a 201 is sent only after the commit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request

from api.auth import require
from api.body import JsonBody, problem, read_json
from api.responses import JSON, ApiError, unavailable
from api.runtime import Runtime
from api.state import runtime_of
from db.writes import RejectionRow
from ingest.readings import (
    ID_FIELDS,
    Problem,
    Reading,
    Rejected,
    Stream,
    validate_items,
    validate_reading,
)
from ingest.writer import Outcome, Overloaded, Submission

RETRY_AFTER_S = 2


def _route(request: Request) -> str:
    return f"{request.method} {request.url.path}"


def _problems(rejected: Rejected) -> list[dict[str, str]]:
    return [problem(p.field, p.message) for p in rejected.problems]


def _rejection_row(runtime: Runtime, request: Request, body: JsonBody, reason: str) -> RejectionRow:
    """One record per request, with the body as received, however many readings it held."""
    return RejectionRow.of(
        body.raw,
        reason,
        received_at=datetime.now(UTC),
        source="http",
        origin=_route(request),
        max_bytes=runtime.settings.rejection_payload_max_bytes,
    )


def stream_of(item: Any) -> Stream | Rejected:
    """For the polymorphic routes: a meter reading carries meterId, a vehicle's vehicleId."""
    if isinstance(item, dict):
        kinds = [stream for stream, field in ID_FIELDS.items() if field in item]
        if len(kinds) == 1:
            return kinds[0]
    return Rejected(None, (Problem("", "a reading carries exactly one of meterId, vehicleId"),))


async def _commit(
    runtime: Runtime,
    request: Request,
    readings: Sequence[Reading],
    rejections: Sequence[RejectionRow],
) -> Outcome:
    try:
        return await runtime.writer.write(
            readings,
            rejections,
            transport="http",
            origin=_route(request),
            timeout_s=runtime.settings.http_commit_timeout_s,
        )
    except Overloaded as error:
        raise unavailable(f"not stored, try again: {error}", RETRY_AFTER_S) from None


def _record_rejection(runtime: Runtime, row: RejectionRow) -> None:
    """Keep the rejection for GET /v1/rejections without making the caller wait for it."""
    # Refused only while shutting down; the caller still gets its 422.
    with contextlib.suppress(Overloaded):
        runtime.writer.submit(
            Submission([], [row], lambda _: None, "http", origin=row.topic_or_route)
        )


async def _single(request: Request, stream: Stream | None) -> JSON:
    runtime = runtime_of(request)
    body = await read_json(request, max_bytes=runtime.settings.max_body_bytes)
    kind = stream if stream is not None else stream_of(body.data)
    result: Reading | Rejected = (
        kind
        if isinstance(kind, Rejected)
        else validate_reading(kind, body.data, now=datetime.now(UTC), limits=runtime.limits)
    )
    if isinstance(result, Rejected):
        runtime.writer.metrics.rejected(
            kind.value if isinstance(kind, Stream) else "unknown", "http"
        )
        _record_rejection(runtime, _rejection_row(runtime, request, body, result.reason))
        raise ApiError(422, _problems(result))
    outcome = await _commit(runtime, request, [result], [])
    if outcome.refused:
        reason = f"refused by the database: {outcome.refused[0][1]}"
        raise ApiError(422, [problem("", reason)])
    if outcome.conflicts:  # recorded; the first stored stands
        raise ApiError(409, [problem("timestamp", outcome.conflicts[0][1])])
    answer = {
        "status": "accepted" if outcome.accepted else "duplicate",
        "stream": result.stream.value,
        "deviceId": result.device_id,
        "timestamp": result.timestamp,
    }
    return JSON(answer, status_code=201)


async def _batch(request: Request, stream: Stream) -> JSON:
    runtime = runtime_of(request)
    body = await read_json(request, max_bytes=runtime.settings.max_body_bytes)
    items = body.data.get("readings") if isinstance(body.data, dict) else None
    if not isinstance(items, list):
        raise ApiError(422, [problem("readings", 'expected {"readings": [ ... ]}')])
    limit = runtime.settings.max_batch_readings
    if len(items) > limit:
        raise ApiError(
            413,
            [problem("readings", f"{len(items)} readings; at most {limit} (MAX_BATCH_READINGS)")],
        )
    # Every rejection kept, for the answer (there are at most MAX_BATCH_READINGS).
    parsed = validate_items(
        stream, items, now=datetime.now(UTC), limits=runtime.limits, keep_all=True
    )
    rejected, indices = parsed.rejected, parsed.positions
    rows = []
    if rejected:
        runtime.writer.metrics.rejected(stream.value, "http", len(rejected))
        rows.append(_rejection_row(runtime, request, body, parsed.reason))
    outcome = await _commit(runtime, request, parsed.readings, rows)
    listed: list[dict[str, Any]] = [{"index": r.index, "problems": _problems(r)} for r in rejected]
    for position, reason in outcome.refused:
        listed.append({"index": indices[position], "problems": [problem("", reason)]})
    for position, reason in outcome.conflicts:
        listed.append({"index": indices[position], "problems": [problem("timestamp", reason)]})
    listed.sort(key=lambda r: int(r["index"]))
    return JSON(
        {
            "accepted": outcome.accepted,
            "duplicates": outcome.duplicates,
            "conflicts": len(outcome.conflicts),
            "rejected": len(rejected) + len(outcome.refused),
            "rejections": listed,
        },
        status_code=201,
    )


@require("ingest")
async def meter_reading(request: Request) -> JSON:
    return await _single(request, Stream.METER)


@require("ingest")
async def vehicle_reading(request: Request) -> JSON:
    return await _single(request, Stream.VEHICLE)


@require("ingest")
async def any_reading(request: Request) -> JSON:
    return await _single(request, None)


@require("ingest")
async def meter_batch(request: Request) -> JSON:
    return await _batch(request, Stream.METER)


@require("ingest")
async def vehicle_batch(request: Request) -> JSON:
    return await _batch(request, Stream.VEHICLE)
