"""Errors in OpenAI's wire shape.

Every failure a client can see goes through :class:`GatewayError`, so that each one carries an HTTP
status and the body OpenAI's SDKs parse: ``{"error": {"message", "type", "param", "code"}}``. The
SDKs turn that body into typed exceptions (``BadRequestError``, ``RateLimitError``...), which is
what a drop-in gateway owes its clients.
"""

from __future__ import annotations

from typing import Any

import orjson


class GatewayError(Exception):
    """An error answered to the client with ``status`` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or []

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return orjson.dumps(self.payload())

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.type!r}, {self.message!r})"


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, type="invalid_request_error", param=param, code=code)


def authentication_error(message: str) -> GatewayError:
    return GatewayError(401, message, type="authentication_error", code="invalid_api_key")


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        type="invalid_request_error",
        param="model",
        code="model_not_found",
    )


def not_found(path: str) -> GatewayError:
    return GatewayError(404, f"Unknown path '{path}'.", type="invalid_request_error", code="unknown_url")


def method_not_allowed(method: str, path: str) -> GatewayError:
    return GatewayError(
        405, f"Method {method} is not allowed on '{path}'.", type="invalid_request_error", code="method_not_allowed"
    )


def payload_too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"Request body is larger than this gateway accepts ({limit} bytes).",
        type="invalid_request_error",
        code="request_too_large",
    )


def unsupported_media_type(content_type: str) -> GatewayError:
    return GatewayError(
        415,
        f"Content-Type must be application/json, got '{content_type}'.",
        type="invalid_request_error",
        code="unsupported_media_type",
    )


def bad_gateway(message: str, *, code: str = "upstream_error") -> GatewayError:
    return GatewayError(502, message, type="upstream_error", code=code)


def gateway_timeout(message: str) -> GatewayError:
    return GatewayError(504, message, type="timeout_error", code="upstream_timeout")


def service_unavailable(message: str, *, code: str = "unavailable") -> GatewayError:
    return GatewayError(503, message, type="service_unavailable", code=code)


def internal_error(request_id: str) -> GatewayError:
    return GatewayError(
        500,
        f"The gateway failed while handling this request (request id {request_id}); see its logs.",
        type="server_error",
        code="internal_error",
    )
