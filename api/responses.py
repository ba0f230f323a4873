"""JSON responses (orjson) and the few errors routes raise."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse


class JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


class ApiError(Exception):
    """An error with the status code and the JSON detail the caller gets."""

    def __init__(
        self, status_code: int, detail: Any, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(str(detail))
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


def unavailable(detail: str, retry_after_s: int = 1) -> ApiError:
    return ApiError(503, detail, {"Retry-After": str(retry_after_s)})
