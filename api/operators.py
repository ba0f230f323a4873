"""Operator routes: health, latest status (hot store), recent rejections."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request

from api.responses import JSON, ApiError, unavailable
from daemon.runtime import Runtime
from db import reads

HEALTH_DB_TIMEOUT_S = 2.0
REJECTIONS_DEFAULT_LIMIT = 100
REJECTIONS_MAX_LIMIT = 1000

# Column names in the hot tables → the JSON names of SPEC §2.
_JSON_NAMES = {
    "meter_id": "meterId",
    "vehicle_id": "vehicleId",
    "ts": "timestamp",
    "kwh_consumed_ac": "kwhConsumedAc",
    "voltage": "voltage",
    "soc": "soc",
    "kwh_delivered_dc": "kwhDeliveredDc",
    "battery_temp": "batteryTemp",
    "received_at": "receivedAt",
}


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def health(request: Request) -> JSON:
    runtime = runtime_of(request)
    database = await _database_check(runtime)
    broker = runtime.broker_status()
    ready = database["ok"] and broker.connected
    body = {
        "status": "ok" if ready else "unavailable",
        "database": database,
        "broker": {"ok": broker.connected, "detail": broker.detail},
        "buffer": {
            "depth": runtime.writer.depth,
            "max": runtime.settings.buffer_max_readings,
        },
    }
    return JSON(body, status_code=200 if ready else 503)


async def _database_check(runtime: Runtime) -> dict[str, Any]:
    try:
        async with asyncio.timeout(HEALTH_DB_TIMEOUT_S):
            async with runtime.pool.acquire() as conn:
                await reads.server_time(conn)
    except Exception as error:  # any failure here means "not ready", with the reason
        return {"ok": False, "detail": f"{error.__class__.__name__}: {error}"}
    return {"ok": True, "detail": ""}


async def meter_status(request: Request) -> JSON:
    return await _status(request, "meter")


async def vehicle_status(request: Request) -> JSON:
    return await _status(request, "vehicle")


async def _status(request: Request, stream: str) -> JSON:
    device_id = request.path_params["device_id"]
    runtime = runtime_of(request)
    try:
        async with runtime.pool.acquire() as conn:
            row = await reads.latest_state(conn, stream, device_id)
    except Exception as error:
        raise unavailable(f"database unavailable: {error.__class__.__name__}") from error
    if row is None:
        raise ApiError(404, f"no {stream} {device_id!r} has reported yet")
    return JSON({_JSON_NAMES[column]: value for column, value in row.items()})


async def rejections(request: Request) -> JSON:
    query = request.query_params
    limit = _int_param(query.get("limit"), "limit", REJECTIONS_DEFAULT_LIMIT)
    if not 1 <= limit <= REJECTIONS_MAX_LIMIT:
        raise ApiError(400, [{"field": "limit", "message": f"must be 1..{REJECTIONS_MAX_LIMIT}"}])
    before = _int_param(query.get("before"), "before", None)
    source = query.get("source")
    if source not in (None, "mqtt", "http"):
        raise ApiError(400, [{"field": "source", "message": "must be mqtt or http"}])
    runtime = runtime_of(request)
    try:
        async with runtime.pool.acquire() as conn:
            rows = await reads.recent_rejections(conn, source=source, before_id=before, limit=limit)
    except Exception as error:
        raise unavailable(f"database unavailable: {error.__class__.__name__}") from error
    items = [
        {
            "id": r["id"],
            "receivedAt": r["received_at"],
            "source": r["source"],
            "topicOrRoute": r["topic_or_route"],
            "payload": r["payload"],
            "reason": r["reason"],
        }
        for r in rows
    ]
    next_before = items[-1]["id"] if len(items) == limit else None
    return JSON({"rejections": items, "next": next_before})


def _int_param(raw: str | None, name: str, default: int | None) -> Any:
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, [{"field": name, "message": "must be an integer"}]) from None
