"""Linking a vehicle to the meter it charges on (SPEC §4, §5)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.requests import Request

from api.auth import require
from api.body import problem, read_json
from api.database import connection
from api.responses import JSON, ApiError
from api.schemas import LinkRequest
from api.state import runtime_of
from db.sessions import SessionRow, link


def _session(row: SessionRow) -> dict[str, Any]:
    return {
        "vehicleId": row.vehicle_id,
        "meterId": row.meter_id,
        "startedAt": row.started_at,
        "endedAt": row.ended_at,
    }


@require("ingest")
async def link_vehicle(request: Request) -> JSON:
    """Open a session from now; the vehicle's previous session ends at the same instant."""
    runtime = runtime_of(request)
    body = await read_json(request, max_bytes=runtime.settings.max_body_bytes)
    try:
        wanted = LinkRequest.model_validate(body.data)
    except ValidationError as error:
        raise ApiError(
            422,
            [problem(".".join(str(p) for p in e["loc"]), e["msg"]) for e in error.errors()],
        ) from None
    async with connection(runtime) as conn:
        result = await link(
            conn,
            schema=runtime.settings.db_schema,
            vehicle_id=wanted.vehicle_id,
            meter_id=wanted.meter_id,
        )
    return JSON(
        {
            "changed": result.changed,
            "session": _session(result.session),
            "previous": _session(result.previous) if result.previous else None,
        },
        status_code=201 if result.changed else 200,
    )
