"""Linking a vehicle to the meter it charges on (SPEC §4, §5), and the sessions so made."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.requests import Request

from api.analytics import instant
from api.auth import require
from api.body import limit_param, problem, read_json
from api.database import control_connection
from api.responses import JSON, ApiError
from api.schemas import LinkRequest
from api.state import reads_of, runtime_of
from db.sessions import SessionRow, link, sessions_of, unlink
from ingest.readings import is_device_id

SESSIONS_DEFAULT_LIMIT = 50
SESSIONS_MAX_LIMIT = 1000
LINK_WAIT_S = 5.0  # for a connection of the control pool, then 503


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
    async with control_connection(runtime.control_pool, timeout_s=LINK_WAIT_S) as conn:
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
            "displaced": _session(result.displaced) if result.displaced else None,
        },
        status_code=201 if result.changed else 200,
    )


@require("ingest")
async def unlink_vehicle(request: Request) -> JSON:
    """The car left its charger: its open session ends now."""
    runtime = runtime_of(request)
    vehicle_id = request.path_params["vehicleId"]
    if not is_device_id(vehicle_id):  # (never stored: nothing to end)
        raise ApiError(404, f"vehicle {vehicle_id!r} has no open session")
    async with control_connection(runtime.control_pool, timeout_s=LINK_WAIT_S) as conn:
        ended = await unlink(conn, schema=runtime.settings.db_schema, vehicle_id=vehicle_id)
    if ended is None:
        raise ApiError(404, f"vehicle {vehicle_id!r} has no open session")
    return JSON({"ended": _session(ended)})


@require("operator")
async def list_links(request: Request) -> JSON:
    """One vehicle's or one meter's sessions, the newest first."""
    query = request.query_params
    vehicle_id, meter_id = query.get("vehicleId"), query.get("meterId")
    if (vehicle_id is None) == (meter_id is None):
        raise ApiError(400, [problem("vehicleId", "give vehicleId or meterId (one of them)")])
    limit = limit_param(
        query.get("limit"), default=SESSIONS_DEFAULT_LIMIT, maximum=SESSIONS_MAX_LIMIT
    )
    raw_before = query.get("startedBefore")
    before = instant(raw_before, "startedBefore") if raw_before else None
    device = vehicle_id if vehicle_id is not None else meter_id
    if device is None or not is_device_id(device):  # never stored: nothing to list
        return JSON({"links": [], "next": None})
    async with reads_of(request).connection(analytics=False) as conn:
        rows = await sessions_of(
            conn, vehicle_id=vehicle_id, meter_id=meter_id, started_before=before, limit=limit
        )
    items = [_session(row) for row in rows]
    return JSON({"links": items, "next": items[-1]["startedAt"] if len(rows) == limit else None})
