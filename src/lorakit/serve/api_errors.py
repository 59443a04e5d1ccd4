"""Errors of lorakit's OpenAI-compatible server, in OpenAI's shape, and the readers of one field of a request body
that answer a bad value with a 400 naming it.

An error's body is ``{"error": {"message", "type", "param", "code"}}``, with the HTTP status set.
"""

from __future__ import annotations

from typing import Any

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered as HTTP `status` with an OpenAI-shaped JSON body."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_request") -> APIError:
    """A 400 (invalid_request_error) naming the field `param`."""
    return APIError(400, message, code, param)


def boolean(body: dict[str, Any], key: str, prefix: str = "") -> bool:
    """A JSON boolean (missing or null: false); 400 for anything else ("false" as a string is truthy in Python)."""
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{prefix}{key}' must be a boolean (true or false), got {value!r}", prefix + key)
    return value


def integer(
    body: dict[str, Any], key: str, *, default: int | None, low: int, high: int | None = None
) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or high is not None
        and value > high
    ):
        within = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise bad(f"{key!r} must be an integer {within}, got {value!r}", key)
    return value


def number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise bad(f"{key!r} must be a number in [{low}, {high}], got {value!r}", key)
    return float(value)
