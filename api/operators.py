"""Operator routes: health, the fleet's overview, latest status (hot store), recent
rejections."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from api.auth import OPEN_NOTICE, require
from api.body import int_param, limit_param
from api.responses import JSON, ApiError
from api.runtime import Runtime
from api.state import reads_of, runtime_of
from db import reads
from db.probe import DatabaseStatus
from ingest.readings import JSON_NAMES, is_device_id
from ingest.writer import WriterStatus

REJECTIONS_DEFAULT_LIMIT = 100
REJECTIONS_MAX_LIMIT = 1000
MAX_ID = 2**63 - 1  # ids are PostgreSQL bigints
SEEN_WINDOW_S = 300
REJECTIONS_WINDOW_S = 3600
REJECTIONS_COUNTED_MAX = 100_000


async def health(request: Request) -> JSON:
    """Readiness in parts, from what the daemon already knows: never a query of its own, so
    that /health answers at once however busy the database is (`db.probe` asks it, on a
    connection of its own, every second)."""
    body = _state(runtime_of(request))
    return JSON(body, status_code=200 if body["status"] == "ok" else 503)


def _state(runtime: Runtime) -> dict[str, Any]:
    """Each part with its reason when it is not ok. Ready means: the database takes writes
    (up or only busy), every subscription is granted and partition upkeep works. The
    replica, when reads go to one, is reported, not required: without it operators' reads
    fail, ingestion does not."""
    writer = runtime.writer.status()
    database = _writes_check(writer) or _check(runtime.database_status())
    broker = runtime.broker_status()
    upkeep = runtime.upkeep_status()
    ready = database["ok"] and broker.ready and upkeep.ok
    replica = runtime.replica_status()
    return {
        "status": "ok" if ready else "unavailable",
        "database": database,
        "replica": None if replica is None else _check(replica, lag=True),
        "broker": {"ok": broker.ready, "detail": broker.detail},
        "partitions": {"ok": upkeep.ok, "detail": upkeep.detail},
        "buffer": {
            "depth": writer.depth,
            "max": runtime.settings.buffer_max_readings,
        },
        "auth": "api keys required" if runtime.settings.api_keys else OPEN_NOTICE,
    }


def _check(status: DatabaseStatus, *, lag: bool = False) -> dict[str, Any]:
    part: dict[str, Any] = {"ok": status.ok, "state": status.state, "detail": status.detail}
    if lag:
        part["lagSeconds"] = None if status.lag_s is None else round(status.lag_s, 3)
    return part


async def _fleet_counts(conn: asyncpg.Connection, silent_s: int) -> dict[str, Any]:
    return await reads.overview(
        conn,
        seen_s=SEEN_WINDOW_S,
        rejections_s=REJECTIONS_WINDOW_S,
        rejections_max=REJECTIONS_COUNTED_MAX,
        silent_s=silent_s,
    )


@require("operator")
async def overview(request: Request) -> JSON:
    """The dashboard's summary: /health's parts, this daemon's rate, and the fleet's counts
    (from the replica when reads go to one; null, with the reason in `countsDetail`, when
    they cannot be read)."""
    runtime = runtime_of(request)
    body = _state(runtime)
    counts: dict[str, Any] = {"at": datetime.now(UTC)}
    try:
        async with reads_of(request).connection(analytics=False) as conn:
            counts = await _fleet_counts(conn, runtime.settings.silent_after_s)
        detail = ""
    except ApiError as error:
        detail = str(error.detail)
    body.update(
        at=counts["at"],
        countsDetail=detail,
        devicesSeen={
            "windowSeconds": SEEN_WINDOW_S,
            "meters": counts.get("meters"),
            "vehicles": counts.get("vehicles"),
        },
        silentDevices={
            "silentAfterSeconds": runtime.settings.silent_after_s,
            "meters": counts.get("silent_meters"),
            "vehicles": counts.get("silent_vehicles"),
        },
        rejections={
            "windowSeconds": REJECTIONS_WINDOW_S,
            "count": counts.get("rejections"),
            "atLeast": counts.get("rejections") == REJECTIONS_COUNTED_MAX,
        },
        storedPerSecond={
            "windowSeconds": runtime.writer.metrics.stored_rate.span_s,
            "value": round(runtime.writer.metrics.stored_rate.per_second(), 1),
            "scope": "this daemon",
        },
        alertThreshold=runtime.settings.alert_efficiency_threshold,
    )
    return JSON(body)


def _writes_check(writer: WriterStatus) -> dict[str, Any] | None:
    """Why the last writes failed, while they do: PostgreSQL may answer a query and still
    refuse every write (a missing partition, permissions, a full disk, a read-only node)."""
    cause = writer.failure or "?"
    if writer.held_readings and writer.held_since is not None:
        since = datetime.fromtimestamp(writer.held_since, UTC).isoformat(timespec="seconds")
        detail = f"{writer.held_readings} readings held back since {since}: {cause}"
        return {"ok": False, "state": "refusing writes", "detail": detail}
    if not writer.database_ok:
        return {"ok": False, "state": "refusing writes", "detail": f"writes failing: {cause}"}
    return None


async def metrics(request: Request) -> Response:
    registry = runtime_of(request).writer.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@require("operator")
async def meter_status(request: Request) -> JSON:
    return await _status(request, "meter")


@require("operator")
async def vehicle_status(request: Request) -> JSON:
    return await _status(request, "vehicle")


async def _status(request: Request, stream: str) -> JSON:
    device_id = request.path_params[f"{stream}Id"]
    if not is_device_id(device_id):  # (never stored: no need to ask the database)
        raise ApiError(404, f"no {stream} {device_id!r} has reported yet")
    async with reads_of(request).connection(analytics=False) as conn:
        row = await reads.latest_state(conn, stream, device_id)
    if row is None:
        raise ApiError(404, f"no {stream} {device_id!r} has reported yet")
    return JSON({JSON_NAMES[column]: value for column, value in row.items()})


@require("operator")
async def rejections(request: Request) -> JSON:
    query = request.query_params
    limit = limit_param(
        query.get("limit"), default=REJECTIONS_DEFAULT_LIMIT, maximum=REJECTIONS_MAX_LIMIT
    )
    before = int_param(query.get("before"), "before", maximum=MAX_ID)
    source = query.get("source")
    if source not in (None, "mqtt", "http"):
        raise ApiError(400, [{"field": "source", "message": "must be mqtt or http"}])
    async with reads_of(request).connection(analytics=False) as conn:
        rows = await reads.recent_rejections(conn, source=source, before_id=before, limit=limit)
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
