"""Responses front end: ``POST /v1/responses`` (OpenAI's Responses API).

The request is translated into a chat/completions body (``translate/responses_request.py``) and
served by the same pipeline as ``/v1/chat/completions``: same tenants, routing, budgets, rate
limits, tool normalization, reasoning modes, capture and metering (the ledger names the endpoint
``responses``). A ``send`` wrapper renders the pipeline's answer as the Responses object or event
stream (``translate/responses_response.py``) and, for ``store: true``, keeps the finished response
before its last byte leaves, so a ``previous_response_id`` sent right after finds it. Errors have
OpenAI's shape, which the Responses API shares; everything a client can get wrong is a 400 before
any upstream call and before any spend. ``GET``/``DELETE`` of stored responses: ``responses_items.py``.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from gateway import errors
from gateway.api.openai import open_exchange, read_metered_body, run_until_disconnect, send_failure
from gateway.api.route_headers import MAX_LATENCY_HEADER, parse_max_latency
from gateway.asgi import (
    Message,
    Receive,
    Scope,
    Send,
    check_json_content_type,
    header_map,
    new_request_id,
    send_bytes,
)
from gateway.auth import authenticate, bearer_token
from gateway.exchange import Exchange, Runtime
from gateway.metering.meter import Metered
from gateway.observability import UNKNOWN
from gateway.policy.store import Tenant
from gateway.reasoning.inbound import recorder_of
from gateway.responses.seal import Sealer, SealKeys
from gateway.responses.store import ResponseStore, Stored, new_id, with_ids
from gateway.translate.responses_input import InputContext
from gateway.translate.responses_request import ResponsesRequest, Translation, parse_request, translate
from gateway.translate.responses_types import ResponseContext


class ResponsesService:
    """What the Responses endpoints share in one process: the response store and the sealing key."""

    def __init__(self, rt: Runtime, seal_secret: str | None) -> None:
        self.rt = rt
        self.store = ResponseStore(rt.kv)
        self.keys = SealKeys(rt.kv, seal_secret)


def _header(name: bytes, values: list[str]) -> list[tuple[bytes, bytes]]:
    return [(name, ", ".join(values).encode("latin-1", "replace"))] if values else []


class ResponsesSend:
    """Wraps the ASGI ``send`` the pipeline writes chat/completions to; writes the Responses API."""

    __slots__ = ("_body", "_ctx", "_extra", "_final", "_meter", "_save", "_send", "_status", "_stream")

    def __init__(
        self,
        send: Send,
        ctx: ResponseContext,
        stream: bool,
        extra: list[tuple[bytes, bytes]],
        save: Any,
        metered: Metered | None = None,
    ):
        self._send = send
        self._meter = metered  # the request's metering: the answer's usage, read once by the relay
        self._ctx = ctx
        self._stream: Any = None
        if stream:
            from gateway.translate.responses_stream import ResponsesStream  # the answer side, stream

            self._stream = ResponsesStream(ctx)
        self._extra = extra
        self._save = save  # async (final response object) -> None, or None for store: false
        self._final: dict[str, Any] | None = None
        self._status = 200
        self._body: list[bytes] = []
        ctx.on_done = self._done

    def _done(self, response: dict[str, Any]) -> None:
        self._final = response

    async def _keep(self) -> None:
        if self._final is not None and self._save is not None:
            final, self._final = self._final, None
            await self._save(final)

    async def __call__(self, message: Message) -> None:
        stream = self._stream
        if stream is not None and message["type"] == "http.response.body":  # the hot path: per block
            more = bool(message.get("more_body"))
            out = stream.feed(message.get("body", b""))
            if not more:
                out += stream.close()
            if self._final is not None:
                await self._keep()
            if out or not more:  # a block that ended inside an event has nothing to send yet
                await self._send({"type": "http.response.body", "body": out, "more_body": more})
            return
        if message["type"] == "http.response.start":
            self._status = message["status"]
            headers = [h for h in message.get("headers", []) if h[0] != b"content-length"]
            if self._stream is not None:
                await self._send({**message, "headers": [*headers, *self._extra]})
            else:
                self._extra = [h for h in headers if h[0] != b"content-type"] + self._extra
            return
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        body: bytes = message.get("body", b"")
        more = bool(message.get("more_body"))
        self._body.append(body)
        if more:
            return
        out = self._convert(b"".join(self._body))
        await self._keep()
        await send_bytes(self._send, self._status, out, self._extra)

    def _convert(self, payload: bytes) -> bytes:
        from gateway.translate.responses_response import to_response

        try:
            parsed: Any = orjson.loads(payload)
        except orjson.JSONDecodeError:
            parsed = None
        if self._status >= 400 or not isinstance(parsed, dict):
            return payload  # OpenAI's error shape is the Responses API's
        response = to_response(parsed, self._ctx, self._meter.usage if self._meter is not None else None)
        if self._final is None:
            self._final = response
        return orjson.dumps(response)


def parse_body(raw: bytes) -> ResponsesRequest:
    if not raw:
        raise errors.invalid_request("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.invalid_request(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    return parse_request(body)


# output items a turn's original reasoning is kept under (the first of them in the turn)
KEYED = frozenset(("reasoning", "message", "function_call"))


def _keyed(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and item.get("type") in KEYED
        and (item["type"] != "message" or item.get("role") == "assistant")
        and item.get("encrypted_content") is None
        and isinstance(item.get("id"), str)
    )


async def prepare(
    svc: ResponsesService, tenant: Tenant, req: ResponsesRequest
) -> tuple[Translation, list[str], Sealer | None]:
    """Everything before the pipeline: the stored conversation, referenced items, the sealing key;
    then the translation. Returns it, the earlier response ids, and the sealer (when one is used)."""
    ctx = InputContext(hosted=tenant.responses.hosted_tools)
    history: list[Any] = []
    ancestors: list[str] = []
    ttl = tenant.responses.store_ttl_s
    if req.previous_response_id is not None:
        conversation = await svc.store.conversation(tenant.name, req.previous_response_id, ttl)
        history, ancestors = conversation.items, conversation.ancestors
        ctx.originals.update(conversation.originals)
    references = req.references()
    reasoning: list[str] = []
    if tenant.reasoning.mode != "pass":  # their clients hold no usable copy: find the originals by item id
        reasoning = [i["id"] for i in req.items if _keyed(i) and i["id"] not in ctx.originals]
    if references or reasoning:
        ctx.references, originals = await svc.store.referenced(tenant.name, references, reasoning, history)
        ctx.originals.update(originals)
    sealer = await svc.keys.sealer() if req.include_encrypted or req.sealed_items() else None
    if sealer is not None:
        name = tenant.name
        opened = sealer  # bound for the closure

        def unseal(blob: str) -> str | None:
            return opened.unseal(name, blob)

        ctx.unseal = unseal
    return translate(req, ctx, history), ancestors, sealer


def _original_reasoning(ex: Exchange) -> Any:
    def original() -> str | None:
        recorder = recorder_of(ex)
        record = recorder.turn.choices.get(0) if recorder is not None else None
        return "".join(record.reasoning) if record is not None and record.reasoning else None

    return original


def _saver(svc: ResponsesService, ex: Exchange, req: ResponsesRequest, ancestors: list[str]) -> Any:
    tenant = ex.tenant
    original = _original_reasoning(ex)

    async def save(response: dict[str, Any]) -> None:
        originals: dict[str, str] = {}
        text = original()
        output = [i for i in response.get("output") or () if isinstance(i, dict) and isinstance(i.get("id"), str)]
        if text and output:
            # under the reasoning item's id, or the turn's first item's when no reasoning item was shown
            first = next((i for i in output if i.get("type") == "reasoning"), output[0])
            originals[first["id"]] = text
        record = Stored(response, with_ids(req.items), ancestors, originals, time.time())
        await svc.store.save(tenant.name, record, tenant.responses.store_ttl_s)

    return save


async def create(svc: ResponsesService, limit: int, scope: Scope, receive: Receive, send: Send) -> None:
    rt = svc.rt
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
        raw = await read_metered_body(rt, receive, headers, limit, request_id, entry, started, "responses")
        req = parse_body(raw)
        max_latency_ms = parse_max_latency(headers.get(MAX_LATENCY_HEADER))
        if req.model not in entry.tenant.routes:  # before the store or the key are read
            raise errors.model_not_found(req.model)
        translation, ancestors, sealer = await prepare(svc, entry.tenant, req)
        extra = (
            _header(b"x-gateway-omitted-tools", translation.omitted_tools)
            + _header(b"x-gateway-omitted-items", translation.omitted_items)
            + _header(b"x-gateway-ignored-fields", req.ignored)
        )
        rid_header += extra
        chat = translation.chat
        ex = open_exchange(request_id, entry, chat, orjson.dumps(chat), headers, started, endpoint="responses")
        ex.max_latency_ms = max_latency_ms
        ex.envelope = "raw"  # the Responses object and events are rendered whole from the chat answer
        model = ex.model
        ctx = ResponseContext(new_id("resp_"), req.model, int(time.time()), translation.echo, translation.names)
        if req.include_encrypted and sealer is not None:
            tenant, sealing = entry.tenant.name, sealer

            def seal(text: str) -> str:
                return sealing.seal(tenant, text)

            ctx.seal = seal
        ctx.original_reasoning = _original_reasoning(ex)
        save = _saver(svc, ex, req, ancestors) if req.store else None
        out = ResponsesSend(send, ctx, ex.stream, extra, save, ex.metered)
        await run_until_disconnect(rt, ex, out, receive)
    except Exception as exc:
        await send_failure(send, exc, request_id, tenant_name, model, ex, rid_header, started, "responses")
