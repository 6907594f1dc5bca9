"""OpenAI front end: ``POST /v1/chat/completions`` and ``GET /v1/models``.

The body is parsed once with orjson and checked only for what the gateway itself needs (an object,
``model``, ``messages``, ``stream``); everything else passes through untouched for the upstream to
judge. Every mistake becomes a 4xx in OpenAI's error shape, never a 500.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from gateway import errors
from gateway.access_log import log_refused
from gateway.api.route_headers import MAX_LATENCY_HEADER, parse_max_latency
from gateway.asgi import (
    ClientGone,
    DisconnectWatch,
    Receive,
    Scope,
    Send,
    check_json_content_type,
    header_map,
    new_request_id,
    read_body,
    send_error,
    send_json,
)
from gateway.auth import authenticate, bearer_token
from gateway.errors import GatewayError, invalid_request
from gateway.exchange import Exchange, Runtime
from gateway.metering.meter import Metered
from gateway.observability import REQUESTS, UNKNOWN, log
from gateway.pipeline import chat
from gateway.policy.store import KeyEntry

ROLES = frozenset(("system", "user", "assistant", "tool", "function", "developer"))


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


MAX_TAGS = 16


def parse_tags(value: bytes | None) -> dict[str, str]:
    """``x-gateway-tags: app=checkout,team=payments`` → a dict; 400 on a malformed header."""
    if not value:
        return {}
    tags: dict[str, str] = {}
    for item in value.decode("utf-8", "replace").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, val = item.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not key or len(key) > 64 or len(val) > 128:
            raise invalid_request(
                f"x-gateway-tags entry {item[:80]!r} must be key=value (key <= 64, value <= 128 characters).",
                param="x-gateway-tags",
                code="invalid_tags",
            )
        tags[key] = val
    if len(tags) > MAX_TAGS:
        raise invalid_request(f"x-gateway-tags has more than {MAX_TAGS} entries.", param="x-gateway-tags")
    return tags


def parse_chat_body(raw: bytes) -> dict[str, Any]:
    """The request as a dict, or a 400 naming the first problem."""
    if not raw:
        raise invalid_request("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid_request(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid_request(f"The request body must be a JSON object, got {_type_name(body)}.", code="invalid_body")
    model = body.get("model")
    if model is None:
        raise invalid_request("Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise invalid_request(
            f"'model' must be a non-empty string, got {_type_name(model)}.", param="model", code="invalid_type"
        )
    messages = body.get("messages")
    if messages is None:
        raise invalid_request(
            "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter"
        )
    if not isinstance(messages, list):
        raise invalid_request(
            f"'messages' must be an array, got {_type_name(messages)}.", param="messages", code="invalid_type"
        )
    if not messages:
        raise invalid_request("'messages' must contain at least one message.", param="messages", code="empty_array")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid_request(
                f"messages[{i}] must be an object, got {_type_name(message)}.",
                param=f"messages[{i}]",
                code="invalid_type",
            )
        role = message.get("role")
        if role not in ROLES:
            shown = "missing" if role is None else repr(role)
            raise invalid_request(
                f"messages[{i}].role is {shown}; expected one of {', '.join(sorted(ROLES))}.",
                param=f"messages[{i}].role",
                code="invalid_value",
            )
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise invalid_request(
            f"'stream' must be a boolean, got {_type_name(stream)}.", param="stream", code="invalid_type"
        )
    return body


def open_exchange(
    request_id: str,
    entry: KeyEntry,
    body: dict[str, Any],
    raw: bytes,
    headers: dict[bytes, bytes],
    started: float,
    endpoint: str = "chat/completions",
) -> Exchange:
    """The exchange of one parsed request (any front end; ``endpoint`` names the wire format the
    client spoke), metered under its key's app, its user and its tags; 404 when its tenant may not
    use the model. The app comes from the key, never from ``x-gateway-tags``: any client of the
    tenant can set a header, so a tag can label a row but cannot put spend under another app's cap."""
    tags = parse_tags(headers.get(b"x-gateway-tags"))
    user = body.get("user")
    stream = bool(body.get("stream"))
    metered = Metered(
        request_id,
        time.time(),
        entry.tenant,
        entry.key_id,
        body["model"],
        stream,
        body,
        app=entry.app,
        user=user if isinstance(user, str) else None,
        tags=tags,
        endpoint=endpoint,
    )
    ex = Exchange(request_id, entry.tenant, entry.key_id, body, raw, started, metered)
    ex.envelope = entry.tenant.envelope
    ex.stream = stream
    ex.builtin_tools = b'"builtin_function"' in raw
    if body["model"] not in entry.tenant.routes:
        raise errors.model_not_found(body["model"])
    ex.model = body["model"]
    return ex


async def read_metered_body(
    rt: Runtime,
    receive: Receive,
    headers: dict[bytes, bytes],
    limit: int,
    request_id: str,
    entry: KeyEntry,
    started: float,
    endpoint: str = "chat/completions",
) -> bytes:
    """The request body; a client that closes the connection before it is in still leaves its row
    (``client_closed``, nothing billed) before :class:`ClientGone` unwinds to the app's info line."""
    try:
        return await read_body(receive, headers, limit)
    except ClientGone:
        rt.meter.client_closed(request_id, entry.tenant, entry.key_id, endpoint, (time.perf_counter() - started) * 1000)
        raise


async def send_failure(
    send: Send,
    exc: Exception,
    request_id: str,
    tenant: str,
    model: str,
    ex: Exchange | None,
    headers: list[tuple[bytes, bytes]],
    started: float,
    endpoint: str = "chat/completions",
) -> None:
    """The OpenAI-shaped error (which the Responses API shares) for a request that failed before its
    answer started: the error's own status and message, or a 500 that names the request id (the
    traceback goes to the log). A routed request also says where it went and why; one refused before
    the pipeline (which writes the access-log line of every request it saw) gets its line here."""
    if isinstance(exc, GatewayError):
        error = exc
        if ex is not None and ex.candidate is not None:
            headers = [
                *headers,
                (b"x-gateway-upstream", ex.upstream_label.encode()),
                (b"x-gateway-route-reason", ex.route_reason.encode()),
            ]
    else:
        log.error("request %s failed inside the gateway", request_id, exc_info=exc)
        error = errors.internal_error(request_id)
    REQUESTS.labels(tenant, model, UNKNOWN, str(error.status)).inc()
    if ex is None:
        log_refused(request_id, endpoint, error.status, (time.perf_counter() - started) * 1000, tenant)
    await send_error(send, error, headers)


async def run_until_disconnect(rt: Runtime, ex: Exchange, send: Send, receive: Receive) -> None:
    """Run the pipeline for ``ex``. A client that goes away cancels it, and with it the upstream call,
    at once; the request then counts as status 499."""
    watch = DisconnectWatch(receive)
    try:
        await chat(rt, ex, send, watch)
    except asyncio.CancelledError:
        if not watch.disconnected:
            raise
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        REQUESTS.labels(ex.tenant.name, ex.model, ex.upstream_label, "499").inc()
        log.info("request %s: client disconnected; upstream call cancelled", ex.request_id)
    finally:
        watch.finish()


async def chat_completions(rt: Runtime, limit: int, scope: Scope, receive: Receive, send: Send) -> None:
    started = time.perf_counter()
    request_id = new_request_id()
    rid_header = [(b"x-request-id", request_id.encode())]
    ex: Exchange | None = None
    headers = header_map(scope)
    tenant_name, model = UNKNOWN, UNKNOWN
    try:
        entry = authenticate(rt.policies, bearer_token(headers.get(b"authorization")))
        tenant_name = entry.tenant.name
        check_json_content_type(headers)
        raw = await read_metered_body(rt, receive, headers, limit, request_id, entry, started)
        body = parse_chat_body(raw)
        max_latency_ms = parse_max_latency(headers.get(MAX_LATENCY_HEADER))
        ex = open_exchange(request_id, entry, body, raw, headers, started)
        ex.max_latency_ms = max_latency_ms
        model = ex.model
        await run_until_disconnect(rt, ex, send, receive)
    except Exception as exc:
        await send_failure(send, exc, request_id, tenant_name, model, ex, rid_header, started)


async def list_models(rt: Runtime, scope: Scope, send: Send) -> None:
    """The virtual models the caller's tenant may use, in OpenAI's list shape."""
    headers = header_map(scope)
    try:
        entry = authenticate(rt.policies, bearer_token(headers.get(b"authorization")))
    except GatewayError as error:
        await send_error(send, error)
        return
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "kimi-gateway"} for name in entry.tenant.routes]
    await send_json(send, 200, {"object": "list", "data": data})
