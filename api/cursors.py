"""Page cursors: the state a listing needs for its next page (its question and the last
row's key), as compact JSON in URL-safe base64 without padding. Opaque to clients; each
route checks every field of a cursor it is given, since one can be made up."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson

from api.body import problem
from api.responses import ApiError

# What reading a made-up cursor can raise, from its base64 to its fields' checks.
FORGED = (binascii.Error, orjson.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError)


def encode(state: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(state)).decode().rstrip("=")


def decode(raw: str) -> Any:
    """The state a cursor carries, not yet checked; raises one of FORGED."""
    return orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))


REFUSAL = "not a cursor this route gave (use `next` as it came)"


def refused() -> ApiError:
    return ApiError(400, [problem("cursor", REFUSAL)])
