"""Upstream HTTP errors → the client's OpenAI-shaped error.

Rules: a 4xx keeps its status, type and message (it is about the request); a 401/403 is about the
gateway's own upstream key, never the client's, so it becomes a 502 that names the upstream and
quotes nothing of its answer (providers put key prefixes and account ids there); a 5xx becomes a
502 naming the upstream's status; a 429 keeps Retry-After. A 404 for the model (Moonshot answers so
for retired ids) marks the candidate dead; the request moves on to the next candidate, and only when
none is left is the 404 reported as the upstream's, clearly.

Whatever upstream text does reach a tenant is bounded (``_MAX_TEXT`` characters) and has anything
shaped like a credential or an account id replaced by ``[redacted]``; :func:`log_text` gives the
operator's log the same answer, bounded and redacted too.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from gateway.errors import GatewayError
from gateway.policy.store import Candidate

_MAX_TEXT = 300
_LOG_TEXT = 2000
# API keys (sk-..., Bearer tokens, key=...), account / organization / project ids, and any long
# token-like run of letters and digits (hex digests, base64 secrets): never repeated to a tenant
_SECRET = re.compile(
    r"(?i)bearer\s+\S+"
    r"|(?:api[_-]?key|key|token|secret|password)\s*[=:]\s*\S+"
    r"|\b(?:sk|pk|rk|org|acct|proj|user|key)[-_][A-Za-z0-9_\-*.]{4,}"
    r"|\b[A-Za-z0-9+/_\-]{32,}={0,2}"
)


def _clean(text: str, limit: int = _MAX_TEXT) -> str:
    """``text`` on one line, credentials redacted, at most ``limit`` characters."""
    text = _SECRET.sub("[redacted]", " ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def log_text(payload: bytes) -> str:
    """An upstream's error body for the operator's log: one line, redacted, bounded."""
    return _clean(payload.decode("utf-8", "replace"), _LOG_TEXT) or "(empty body)"


def _parse(payload: bytes) -> tuple[str | None, str | None, str | None, Any]:
    """message, type, code, param from any of the error shapes upstreams use."""
    try:
        data = orjson.loads(payload) if payload else None
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        return (_clean(payload.decode("utf-8", "replace")) or None), None, None, None
    err = data.get("error", data)
    if isinstance(err, str):  # {"error": "text"}
        return _clean(err), None, None, None
    if not isinstance(err, dict):
        return None, None, None, None
    message = err.get("message") or err.get("detail") or data.get("message")
    kind = err.get("type")
    code = err.get("code")
    return (
        _clean(str(message)) if message is not None else None,
        _clean(str(kind), 64) if kind is not None else None,
        _clean(str(code), 64) if code is not None else None,
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
            f"{where} refused the gateway's own credentials (HTTP {status}); the gateway operator must "
            "fix this upstream's API key (the upstream's answer is in the gateway's log).",
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
