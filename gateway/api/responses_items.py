"""Stored responses over HTTP: ``GET`` / ``DELETE /v1/responses/{id}``, ``GET
/v1/responses/{id}/input_items`` and ``POST /v1/responses/{id}/cancel``.

Every call is the tenant's own: the store is keyed by tenant, so another tenant's id answers 404
like an id that never existed (nothing says it exists elsewhere). Errors have OpenAI's shape.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from gateway import errors
from gateway.api.responses import ResponsesService
from gateway.asgi import Receive, Scope, Send, header_map, new_request_id, send_error, send_json
from gateway.auth import authenticate, bearer_token
from gateway.errors import GatewayError, invalid_request
from gateway.responses.store import not_found

PREFIX = "/v1/responses/"


def split_path(path: str) -> tuple[str, str] | None:
    """``/v1/responses/{id}[/input_items|/cancel]`` → (id, sub-resource), None when not one."""
    rest = path[len(PREFIX) :].rstrip("/") if path.startswith(PREFIX) else ""
    response_id, _, sub = rest.partition("/")
    if not response_id or sub not in ("", "input_items", "cancel"):
        return None
    return response_id, sub


def _query(scope: Scope) -> dict[str, list[str]]:
    raw = scope.get("query_string", b"")
    return parse_qs(raw.decode("latin-1")) if raw else {}


def _page(items: list[dict[str, Any]], query: dict[str, list[str]]) -> dict[str, Any]:
    order = query.get("order", ["desc"])[-1]
    if order not in ("asc", "desc"):
        raise invalid_request("order must be 'asc' or 'desc'.", param="order", code="invalid_value")
    try:
        limit = int(query.get("limit", ["20"])[-1])
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise invalid_request("limit must be an integer between 1 and 100.", param="limit", code="invalid_value")
    ordered = items if order == "asc" else items[::-1]
    after = query.get("after", [None])[-1]
    if after is not None:
        ids = [i.get("id") for i in ordered]
        if after not in ids:
            raise invalid_request(f"after: no input item with id {after!r}.", param="after", code="invalid_value")
        ordered = ordered[ids.index(after) + 1 :]
    page = ordered[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0].get("id") if page else None,
        "last_id": page[-1].get("id") if page else None,
        "has_more": len(ordered) > limit,
    }


async def handle(svc: ResponsesService, scope: Scope, receive: Receive, send: Send, response_id: str, sub: str) -> None:
    rid_header = [(b"x-request-id", new_request_id().encode())]
    headers = header_map(scope)
    method = scope["method"]
    allowed = {"": ("GET", "DELETE"), "input_items": ("GET",), "cancel": ("POST",)}[sub]
    try:
        if method not in allowed:
            error = errors.method_not_allowed(method, scope["path"])
            error.headers.append((b"allow", ", ".join(allowed).encode()))
            raise error
        entry = authenticate(svc.rt.policies, bearer_token(headers.get(b"authorization")))
        tenant = entry.tenant.name
        if method == "DELETE":
            if not await svc.store.delete(tenant, response_id):
                raise not_found(response_id)
            await send_json(send, 200, {"id": response_id, "object": "response", "deleted": True}, rid_header)
            return
        record = await svc.store.load(tenant, response_id)
        if record is None:
            raise not_found(response_id)
        if sub == "cancel":
            raise invalid_request(
                "Only background responses can be cancelled, and this gateway runs none.",
                param="response_id",
                code="not_cancellable",
            )
        query = _query(scope)
        if sub == "input_items":
            await send_json(send, 200, _page(record.input, query), rid_header)
            return
        if query.get("stream", ["false"])[-1] == "true":
            raise invalid_request(
                "Streaming a stored response again is not supported; GET it without stream.",
                param="stream",
                code="unsupported_parameter",
            )
        await send_json(send, 200, record.response, rid_header)
    except GatewayError as error:
        await send_error(send, error, rid_header)
