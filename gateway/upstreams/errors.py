"""Upstream HTTP errors → the client's OpenAI-shaped error.

Rules: a 4xx keeps its status, type and message (it is about the request); a 401/403 is about the
gateway's own upstream key, never the client's, so it becomes a 502; a 5xx becomes a 502 naming the
upstream's status; a 429 keeps Retry-After. A 404 for the model (Moonshot answers so for retired ids)
marks the candidate dead; the request moves on to the next candidate, and only when none is left is
the 404 reported as the upstream's, clearly.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import GatewayError
from gateway.policy.store import Candidate

_MAX_TEXT = 300


def _parse(payload: bytes) -> tuple[str | None, str | None, str | None, Any]:
    """message, type, code, param from any of the error shapes upstreams use."""
    try:
        data = orjson.loads(payload) if payload else None
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        text = payload.decode("utf-8", "replace").strip()
        return (text[:_MAX_TEXT] or None), None, None, None
    err = data.get("error", data)
    if isinstance(err, str):  # {"error": "text"}
        return err[:_MAX_TEXT], None, None, None
    if not isinstance(err, dict):
        return None, None, None, None
    message = err.get("message") or err.get("detail") or data.get("message")
    kind = err.get("type")
    code = err.get("code")
    return (
        str(message) if message is not None else None,
        str(kind) if kind is not None else None,
        str(code) if code is not None else None,
        err.get("param"),
    )


def _looks_like_model_404(message: str | None, kind: str | None) -> bool:
    text = (message or "").lower()
    return kind in ("resource_not_found_error", "NotFoundError", "model_not_found") or "model" in text


def upstream_error(candidate: Candidate, status: int, payload: bytes, retry_after: str | None) -> GatewayError:
    message, kind, code, param = _parse(payload)
    where = f"upstream '{candidate.upstream}' (model '{candidate.upstream_model}')"
    detail = message or "no error message"
    headers = [(b"retry-after", retry_after.encode("latin-1"))] if retry_after else []
    if status == 404 and _looks_like_model_404(message, kind):
        return GatewayError(
            404,
            f"{where} answered 404 {kind or 'not found'}: {detail}. The model id may be retired at this "
            "upstream; update the upstream's model map in the gateway config.",
            type=kind or "not_found_error",
            param="model",
            code="upstream_model_not_found",
        )
    if status in (401, 403):
        return GatewayError(
            502,
            f"{where} refused the gateway's own credentials ({status} {kind or ''}: {detail}); "
            "the gateway operator must fix this upstream's API key.",
            type="upstream_error",
            code="upstream_auth_failed",
        )
    if status == 429:
        return GatewayError(
            429,
            f"{where} is rate limiting ({kind or 'rate_limit'}): {detail}",
            type=kind or "rate_limit_error",
            code=code or "upstream_rate_limited",
            headers=headers,
        )
    if status >= 500:
        return GatewayError(
            502,
            f"{where} failed with HTTP {status}: {detail}",
            type="upstream_error",
            code=f"upstream_{status}",
            headers=headers,
        )
    return GatewayError(
        status,
        f"{where}: {detail}",
        type=kind or "invalid_request_error",
        param=param if isinstance(param, str) else None,
        code=code,
        headers=headers,
    )
