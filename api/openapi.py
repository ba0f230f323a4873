"""The OpenAPI document, generated from the route table (`api.routes`) and the pydantic
models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api.routes import ENDPOINTS, Endpoint
from api.schemas import ErrorBody

API_VERSION = "1.0.0"
REF = "#/components/schemas/{model}"

ERROR_TEXT = {
    400: "malformed request (JSON, parameters)",
    401: "missing or unknown API key",
    403: "the API key lacks the role",
    404: "not found",
    409: "a conflict: another reading of this device at this moment is stored (with other "
    "values: the first stored stands; recorded)",
    413: "body or batch too large",
    415: "a Content-Encoding other than gzip",
    422: "a field is invalid; each problem names its field",
    503: "overloaded or database unavailable; retry after Retry-After seconds",
}


ALSO_TEXT = {
    200: "unchanged (the vehicle was already on this meter)",
    503: "not ready: the parts say why",
}


def _components() -> dict[str, Any]:
    models: set[type[BaseModel]] = {ErrorBody}
    for endpoint in ENDPOINTS:
        models.update(endpoint.body)
        if endpoint.ok[1] is not None:
            models.add(endpoint.ok[1])
    _, schema = models_json_schema(
        [(model, "validation") for model in sorted(models, key=lambda m: m.__name__)],
        by_alias=True,
        ref_template=REF,
    )
    defs: dict[str, Any] = schema.get("$defs", {})
    return defs


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _operation(endpoint: Endpoint, secured: bool) -> dict[str, Any]:
    role = getattr(endpoint.handler, "required_role", None)
    operation: dict[str, Any] = {
        "summary": endpoint.summary,
        "tags": [endpoint.tag],
        "operationId": f"{endpoint.method.lower()}{endpoint.path.replace('/', '_')}".replace(
            "{", ""
        ).replace("}", ""),
    }
    params = _parameters(endpoint)
    if params:
        operation["parameters"] = params
    if endpoint.body:
        schema_of_body = (
            _ref(endpoint.body[0])
            if len(endpoint.body) == 1
            else {"oneOf": [_ref(m) for m in endpoint.body]}
        )
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema_of_body}},
        }
    errors = set(endpoint.errors)
    if role is not None and secured:
        errors |= {401, 403}
        operation["security"] = [{"bearer": []}]
        operation["description"] = f"Needs an API key with the `{role}` role when keys are set."
    operation["responses"] = _responses(endpoint, errors)
    return operation


def _parameters(endpoint: Endpoint) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": name[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
        for name in endpoint.path.split("/")
        if name.startswith("{")
    ]
    for q in endpoint.query:
        schema: dict[str, str] = {"type": q.type}
        if q.format:
            schema["format"] = q.format
        params.append(
            {
                "name": q.name,
                "in": "query",
                "required": False,
                "description": q.description,
                "schema": schema,
            }
        )
    return params


def _responses(endpoint: Endpoint, errors: set[int]) -> dict[str, Any]:
    code, model = endpoint.ok
    ok: dict[str, Any] = {"description": "OK" if code == 200 else "Stored (committed)"}
    if model is not None:
        ok["content"] = {"application/json": {"schema": _ref(model)}}
        if endpoint.csv:
            ok["content"]["text/csv"] = {"schema": {"type": "string"}}
    else:
        ok["content"] = {endpoint.media_type: {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {str(code): ok}
    for status in endpoint.also:
        responses[str(status)] = {**ok, "description": ALSO_TEXT.get(status, "OK")}
    for status in sorted(errors):
        responses[str(status)] = {
            "description": ERROR_TEXT[status],
            "content": {"application/json": {"schema": _ref(ErrorBody)}},
        }
    return responses


def openapi_document(*, secured: bool) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in ENDPOINTS:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint, secured)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Energy Ingestion Engine",
            "version": API_VERSION,
            "description": "Telemetry ingestion for smart meters and EV chargers, and "
            "charging-efficiency analytics.",
        },
        "paths": paths,
        "components": {"schemas": _components()},
    }
    if secured:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return document
