"""Anthropic front end: ``POST /v1/messages``.

The Messages request is translated into a chat/completions body and served by the same pipeline as
``/v1/chat/completions`` (same tenants, routing, budgets, metering and response transforms);
upstreams stay chat/completions. A ``send`` wrapper turns the pipeline's answer into Anthropic's
message or SSE event sequence, and every error into Anthropic's shape
``{"type": "error", "error": {"type", "message"}}`` with the same status. Keys come as
``x-api-key`` (Anthropic's SDK) or ``Authorization: Bearer`` (Claude Code's
``ANTHROPIC_AUTH_TOKEN``). The ``?beta=true`` query and the ``anthropic-beta`` and
``anthropic-version`` headers are accepted and need nothing: the translation reads the body, and
what it left out of the upstream request is named in ``x-gateway-ignored`` on the answer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from gateway import errors
from gateway.access_log import log_refused
from gateway.api.openai import open_exchange, read_metered_body, run_until_disconnect
from gateway.api.route_headers import MAX_LATENCY_HEADER, parse_max_latency
from gateway.asgi import (
    CT_JSON,
    Message,
    Receive,
    Scope,
    Send,
    check_json_content_type,
    header_map,
    new_request_id,
    read_body,
    send_bytes,
    send_json,
)
from gateway.auth import authenticate, bearer_token
from gateway.errors import GatewayError
from gateway.exchange import Exchange, Runtime
from gateway.metering.tokens import count_prompt
from gateway.observability import REQUESTS, UNKNOWN, log
from gateway.translate.anthropic_request import Translation, translate
from gateway.translate.anthropic_response import AnthropicStream, error_body, to_message


async def send_anthropic_error(send: Send, error: GatewayError, headers: list[tuple[bytes, bytes]]) -> None:
    body = orjson.dumps(error_body(error.status, error.message))
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [CT_JSON, (b"content-length", str(len(body)).encode()), *headers, *error.headers],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class AnthropicSend:
    """Wraps the ASGI ``send`` the pipeline writes chat/completions to; writes Anthropic instead."""

    __slots__ = (
        "_body",
        "_context",
        "_display",
        "_extra",
        "_headers",
        "_message_id",
        "_send",
        "_status",
        "_stream",
        "model",
        "stream",
    )

    def __init__(
        self, send: Send, model: str, message_id: str, stream: bool, request: Translation | None = None
    ) -> None:
        self._send = send
        self.model = model
        self.stream = stream
        self._display = request.display if request is not None else "summarized"
        self._context = (
            {"applied_edits": request.applied_edits} if request is not None and request.context_management else None
        )
        found = request.notes.header() if request is not None else None
        self._extra = [found] if found is not None else []
        self._stream = AnthropicStream(model, message_id, self._display, self._context) if stream else None
        self._status = 200
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._message_id = message_id

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._status = message["status"]
            self._headers = [h for h in message.get("headers", []) if h[0] not in (b"content-length", b"content-type")]
            self._headers += self._extra
            if self._stream is not None:
                await self._send({**message, "headers": [*message.get("headers", []), *self._extra]})
            return
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        body: bytes = message.get("body", b"")
        more = bool(message.get("more_body"))
        if self._stream is not None:
            out = self._stream.feed(body)
            if not more:
                out += self._stream.close()
            await self._send({"type": "http.response.body", "body": out, "more_body": more})
            return
        self._body.append(body)
        if more:
            return
        payload = b"".join(self._body)
        out = self._convert(payload)
        await send_bytes(self._send, self._status, out, self._headers)

    def _convert(self, payload: bytes) -> bytes:
        try:
            parsed: Any = orjson.loads(payload)
        except orjson.JSONDecodeError:
            parsed = None
        if self._status >= 400 or not isinstance(parsed, dict):
            message = parsed.get("error", {}).get("message") if isinstance(parsed, dict) else None
            return orjson.dumps(error_body(self._status, str(message or payload[:500].decode("utf-8", "replace"))))
        return orjson.dumps(to_message(parsed, self.model, self._message_id, self._display, self._context))


def api_key(headers: dict[bytes, bytes]) -> str | None:
    key = headers.get(b"x-api-key")
    if key:
        return key.decode("latin-1").strip() or None
    return bearer_token(headers.get(b"authorization"))


def parse_messages_body(raw: bytes, *, counting: bool = False) -> tuple[dict[str, Any], Translation]:
    """(the Anthropic request, its chat/completions translation), or a 400."""
    if not raw:
        raise errors.invalid_request("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.invalid_request(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    return body, translate(body, counting=counting)


async def messages(rt: Runtime, limit: int, scope: Scope, receive: Receive, send: Send) -> None:
    started = time.perf_counter()
    request_id = new_request_id()
    rid_header = [(b"x-request-id", request_id.encode())]
    headers = header_map(scope)
    tenant_name, model = UNKNOWN, UNKNOWN
    ex: Exchange | None = None
    try:
        entry = authenticate(rt.policies, api_key(headers))
        tenant_name = entry.tenant.name
        check_json_content_type(headers)
        raw = await read_metered_body(rt, receive, headers, limit, request_id, entry, started, "messages")
        original, request = parse_messages_body(raw)
        max_latency_ms = parse_max_latency(headers.get(MAX_LATENCY_HEADER))
        body = request.body
        ex = open_exchange(request_id, entry, body, orjson.dumps(body), headers, started, endpoint="messages")
        ex.max_latency_ms = max_latency_ms
        model = ex.model
        out = AnthropicSend(send, original["model"], "msg_" + request_id, ex.stream, request)
        await run_until_disconnect(rt, ex, out, receive)
    except GatewayError as error:
        REQUESTS.labels(tenant_name, model, UNKNOWN, str(error.status)).inc()
        if ex is None:  # refused before the pipeline, which logs every request it saw
            log_refused(request_id, "messages", error.status, (time.perf_counter() - started) * 1000, tenant_name)
        await send_anthropic_error(send, error, rid_header)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("request %s failed inside the gateway", request_id)
        REQUESTS.labels(tenant_name, model, UNKNOWN, "500").inc()
        if ex is None:
            log_refused(request_id, "messages", 500, (time.perf_counter() - started) * 1000, tenant_name)
        await send_anthropic_error(send, errors.internal_error(request_id), rid_header)


async def count_tokens(rt: Runtime, limit: int, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/messages/count_tokens``: the prompt's tokens by the gateway's offline tokenizer
    (an estimate: K2's own tokenizer is not shipped), without calling an upstream."""
    request_id = new_request_id()
    rid_header = [(b"x-request-id", request_id.encode())]
    headers = header_map(scope)
    try:
        entry = authenticate(rt.policies, api_key(headers))
        check_json_content_type(headers)
        raw = await read_body(receive, headers, limit)
        _, request = parse_messages_body(raw, counting=True)
        body = request.body
        if body["model"] not in entry.tenant.routes:
            raise errors.model_not_found(body["model"])
        tokens = await asyncio.to_thread(count_prompt, body)
    except GatewayError as error:
        await send_anthropic_error(send, error, rid_header)
        return
    await send_json(send, 200, {"input_tokens": tokens}, rid_header)
