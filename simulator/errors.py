"""Error bodies in each upstream dialect.

Moonshot answers `{"error": {"message", "type"}}` with no code field (protocols.md §1.8); vLLM answers
its flat `ErrorResponse`: `{"object": "error", "message", "type", "param", "code"}` where type is a
class-like name such as "BadRequestError".  A gateway in front has to parse both, so the simulator
reproduces both exactly.
"""

from __future__ import annotations

from http import HTTPStatus

import orjson

MOONSHOT_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "invalid_authentication_error",
    403: "permission_denied_error",
    404: "resource_not_found_error",
    429: "rate_limit_reached_error",
}

VLLM_TYPES: dict[int, str] = {
    400: "BadRequestError",
    401: "Unauthorized",
    404: "NotFoundError",
    500: "InternalServerError",
}

DEFAULT_MESSAGES: dict[int, str] = {
    400: "Invalid request",
    401: "Invalid Authentication",
    403: "The API you are accessing is not open",
    404: "Not found the model or Permission denied",
    429: "Your account org-simulator request reached organization max RPM: 3, please try again after {retry} seconds",
    500: "Internal server error (simulated)",
    502: "Bad gateway (simulated)",
    503: "The engine is currently overloaded, please try again later (simulated)",
    504: "Upstream timed out (simulated)",
}


class RequestError(Exception):
    """A request the simulated upstream rejects; becomes an error body in the profile's dialect."""

    def __init__(self, status: int, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type


def error_type_for(dialect: str, status: int) -> str:
    """The provider's error `type` for an HTTP status."""
    if dialect == "vllm":
        known = VLLM_TYPES.get(status)
        if known:
            return known
        try:
            return HTTPStatus(status).phrase.replace(" ", "").replace("-", "") + "Error"
        except ValueError:
            return "Error"
    if status >= 500:
        return "server_error"
    return MOONSHOT_TYPES.get(status, "invalid_request_error")


def default_message(status: int, retry_after: float | None = None) -> str:
    """A provider-like message for a fault status (the 429 one names the retry delay, like Moonshot)."""
    template = DEFAULT_MESSAGES.get(status) or f"Simulated error {status}"
    retry = retry_after if retry_after is not None else 1
    return template.replace("{retry}", f"{retry:g}")


def error_body(dialect: str, status: int, message: str, error_type: str | None = None) -> bytes:
    """Serialize an error in the dialect's shape."""
    kind = error_type or error_type_for(dialect, status)
    if dialect == "vllm":
        return orjson.dumps({"object": "error", "message": message, "type": kind, "param": None, "code": status})
    return orjson.dumps({"error": {"message": message, "type": kind}})
