"""Ingestion POSTs go straight to their handlers, past Starlette's middleware and router
(api/app.py, a step taken for speed): every ingestion route must answer byte for byte the
same through that direct path and through the Starlette application, errors included."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import orjson
import pytest

from api.app import App, create_app
from api.routes import ENDPOINTS
from api.runtime import BrokerStatus, Runtime
from db.pool import create_pool
from db.probe import DatabaseStatus
from ingest.config import Settings
from ingest.flushing import PoolFlush
from ingest.housekeeping import UpkeepStatus
from ingest.readings import Limits
from ingest.writer import Writer
from tests.helpers import meter_json, minutes_ago, vehicle_json

ROUTES = [(e.path, e.handler) for e in ENDPOINTS if e.method == "POST" and e.tag == "ingestion"]
Message = dict[str, Any]


async def call(app: Any, path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> list[Any]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-length", str(len(body)).encode()), *headers],
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
    }
    incoming: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return [(m["type"], m.get("status"), sorted(m.get("headers", [])), m.get("body")) for m in sent]


@pytest.fixture(params=["open", "keys"])
async def app(request: pytest.FixtureRequest, db_url: str) -> AsyncIterator[App]:
    keyed = request.param == "keys"
    settings = Settings(
        database_url=db_url,
        max_body_bytes=2048,
        max_batch_readings=3,
        ingest_api_keys="in-key" if keyed else "",
        operator_api_keys="op-key" if keyed else "",
    )
    pool = await create_pool(db_url, schema="public", max_size=2)
    writer = Writer(
        PoolFlush(pool), flush_max_readings=100, flush_interval_s=0.002, buffer_max_readings=100
    )
    task = asyncio.create_task(writer.run())
    runtime = Runtime(
        settings=settings,
        writer=writer,
        limits=Limits(retention=timedelta(days=30), future_skew=timedelta(minutes=5)),
        read_pool=pool,
        control_pool=pool,
        broker_status=lambda: BrokerStatus(True, ""),
        upkeep_status=UpkeepStatus,
        database_status=lambda: DatabaseStatus("up", ""),
    )
    yield create_app(runtime)
    writer.stop()
    await task
    await pool.close()


def bodies_for(path: str) -> list[bytes]:
    meter, vehicle = meter_json("DD-M", minutes_ago(1)), vehicle_json("DD-V", minutes_ago(1))
    reading = vehicle if "vehicle" in path else meter
    stream_reading = orjson.loads(reading)
    return [
        reading,  # stored by the first call, a duplicate for both compared calls
        orjson.dumps({"readings": [stream_reading, {"x": 1}]}),
        orjson.dumps({"readings": [stream_reading] * 4}),  # over MAX_BATCH_READINGS
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"[1, 2, 3]",
        b'{"meterId": "M", "vehicleId": "V"}',
        orjson.dumps({**stream_reading, "timestamp": "9999-12-31T23:59:59-01:00"}),
        b'{"readings": "x"}',
        b" " * 4096,  # over MAX_BODY_BYTES
        orjson.dumps({"vehicleId": "DD-V", "meterId": "DD-M"}),
    ]


@pytest.mark.parametrize(("path", "handler"), ROUTES, ids=[p for p, _ in ROUTES])
async def test_direct_and_starlette_paths_answer_byte_for_byte_alike(
    app: App, path: str, handler: Any
) -> None:
    header_sets: list[list[tuple[bytes, bytes]]] = [[]]
    if app.starlette.state.runtime.settings.api_keys:
        header_sets = [
            [(b"authorization", b"Bearer in-key")],
            [(b"authorization", b"Bearer op-key")],  # 403: wrong role
            [(b"authorization", b"Bearer nope")],  # 401
        ]
    for headers in header_sets:
        for body in bodies_for(path):
            await call(app, path, body, headers)  # stores what can be stored: then duplicates
            direct = await call(app, path, body, headers)
            through_starlette = await call(app.starlette, path, body, headers)
            assert direct == through_starlette, (path, body[:60], headers)
            status = direct[0][1]
            assert status in (200, 201, 400, 401, 403, 413, 422), (path, body[:60], direct)
