"""The pieces of a Responses object, shared by the non-stream answer (``responses_response.py``) and
the stream (``responses_stream.py``) so that both give a client the same object for the same answer.

* item ids derive from the response id and the item's ``output_index`` (``rs_``/``msg_``/``fc_``),
  so a stored response, its stream and its ``GET`` agree, and are unique per response;
* a ``reasoning`` item carries K2's reasoning as the tenant's mode left it in the answer (as
  ``summary_text``) and, when the request asked for it, ``encrypted_content`` sealing the original
  reasoning, so the next stateless turn gives K2 back its own text;
* ``function_call`` names go back through :attr:`ResponseContext.names` (a flattened ``namespace``
  member becomes ``{name, namespace}``);
* ``usage`` in the Responses shape from any upstream's dialect (``upstreams/usage.py``): integers
  only, never null (Codex refuses a null count);
* the request's fields echoed from :attr:`ResponseContext.echo` (the API's defaults for the rest).
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.translate.responses_types import ResponseContext
from gateway.upstreams.usage import Usage

# what a chat finish_reason makes of the response: (status, incomplete_details.reason)
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def envelope(
    ctx: ResponseContext,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    *,
    error: dict[str, Any] | None = None,
    incomplete: str | None = None,
) -> dict[str, Any]:
    """A whole response object: the answer's own fields around the request's echoed ones."""
    obj: dict[str, Any] = {
        "id": ctx.response_id,
        "object": "response",
        "created_at": ctx.created_at,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "model": ctx.model,
        "output": output,
    }
    obj.update(ctx.echo)
    obj["usage"] = usage
    return obj


def status_of(finish: Any) -> tuple[str, str | None]:
    """``(status, incomplete reason)`` for a chat ``finish_reason``."""
    reason = _INCOMPLETE.get(finish) if isinstance(finish, str) else None
    return ("incomplete", reason) if reason else ("completed", None)


def responses_usage(usage: Usage | None) -> dict[str, Any]:
    """Usage in the Responses shape (``input_tokens`` include the cached ones, as OpenAI counts)."""
    u = usage or Usage()
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.total_tokens,
    }


def item_id(ctx: ResponseContext, prefix: str, output_index: int) -> str:
    """``rs_``/``msg_``/``fc_`` + the response id's own part + the item's place in ``output``."""
    rid = ctx.response_id
    return f"{prefix}_{rid[5:] if rid.startswith('resp_') else rid}_{output_index}"


def shown_reasoning(holder: dict[str, Any]) -> str:
    """The reasoning the client may see, from either field name (Moonshot's or vLLM's)."""
    for key in ("reasoning_content", "reasoning"):
        value = holder.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def sealed(ctx: ResponseContext, shown: str) -> str | None:
    """``encrypted_content`` for this turn's reasoning (the original when the mode changed it), or
    None when the request did not ask for it or there is no reasoning to carry."""
    if ctx.seal is None:
        return None
    original = ctx.original_reasoning() if ctx.original_reasoning is not None else None
    text = original or shown
    return ctx.seal(text) if text else None


def reasoning_item(rid: str, shown: str, blob: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": rid,
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": shown}] if shown else [],
    }
    if blob is not None:
        item["encrypted_content"] = blob
    return item


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def message_item(mid: str, text: str | None, status: str) -> dict[str, Any]:
    """A message item; ``text`` None while its content part is not open yet (stream)."""
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [] if text is None else [output_text(text)],
    }


def call_item(ctx: ResponseContext, fid: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    """A function_call item, the upstream's (flattened) name mapped back to the client's."""
    item: dict[str, Any] = {"id": fid, "type": "function_call", "status": status, "arguments": arguments}
    item["call_id"] = call_id
    name_call(ctx, item, name)
    return item


def name_call(ctx: ResponseContext, item: dict[str, Any], name: str) -> None:
    """Set a function_call item's ``name`` (and ``namespace``) from the upstream's name."""
    mapped = ctx.names.get(name)
    if mapped is None:
        item["name"] = name
        return
    item["name"] = mapped.name
    if mapped.namespace is not None:
        item["namespace"] = mapped.namespace


def arguments_text(arguments: Any) -> str:
    """A tool call's arguments as the JSON string the Responses API carries."""
    if isinstance(arguments, str):
        return arguments
    return "" if arguments is None else orjson.dumps(arguments).decode()


# ResponseError.code takes a closed set of values; an upstream failure is one of these two
def failure(error: Any) -> dict[str, Any]:
    """The ``error`` of a failed response from a chat stream's error event payload."""
    if isinstance(error, dict):
        message = error.get("message")
        hint = f"{error.get('type') or ''} {error.get('code') or ''}"
    else:
        message, hint = error, ""
    code = "rate_limit_exceeded" if "rate_limit" in hint or "429" in hint else "server_error"
    return {"code": code, "message": str(message or "the upstream failed while answering")}
