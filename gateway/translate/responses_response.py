"""chat/completions answers → OpenAI Responses objects (``POST /v1/responses``), and Responses errors.

The pipeline answers every front end in chat/completions; :func:`to_response` renders one whole
answer as the Responses API's ``response`` object: ``output`` in order — a ``reasoning`` item (when
the answer shows reasoning or the request asked for it sealed), a ``message`` item (``output_text``;
an empty one for an empty answer), one ``function_call`` item per tool call (``call_id`` = the chat
tool call id) — ``status`` ``completed``, or ``incomplete`` with ``incomplete_details.reason`` when
the answer hit ``max_tokens`` (``max_output_tokens``) or a content filter (the item being written
then is ``incomplete`` too), usage and the echoed request fields (see ``responses_output.py``).
The stream of the same answer is :class:`ResponsesStream` (``responses_stream.py``, re-exported).
"""

from __future__ import annotations

from typing import Any

from gateway.translate.responses_output import (
    arguments_text,
    call_item,
    envelope,
    item_id,
    message_item,
    reasoning_item,
    responses_usage,
    sealed,
    shown_reasoning,
    status_of,
)
from gateway.translate.responses_stream import ResponsesStream
from gateway.translate.responses_types import ResponseContext
from gateway.upstreams.usage import Usage, usage_of_response

__all__ = ["ResponsesStream", "error_body", "to_response"]


def to_response(chat: dict[str, Any], ctx: ResponseContext, usage: Usage | None = None) -> dict[str, Any]:
    """A whole chat.completion → the Responses object (``ctx.on_done`` is called with it once);
    ``usage``: the answer's, when the caller has it already (the meter read it), else read here."""
    choices = chat.get("choices") or []
    choice: dict[str, Any] = choices[0] if choices and isinstance(choices[0], dict) else {}
    found = choice.get("message")
    message: dict[str, Any] = found if isinstance(found, dict) else {}
    status, reason = status_of(choice.get("finish_reason"))
    output: list[dict[str, Any]] = []
    shown = shown_reasoning(message)
    blob = sealed(ctx, shown)
    if shown or blob is not None:
        output.append(reasoning_item(item_id(ctx, "rs", 0), shown, blob))
    text = message.get("content")
    text = text if isinstance(text, str) else ""
    calls = [c for c in message.get("tool_calls") or () if isinstance(c, dict)]
    if text or (not calls and status == "completed"):
        output.append(message_item(item_id(ctx, "msg", len(output)), text, "completed"))
    for call in calls:
        fn = call.get("function")
        function: dict[str, Any] = fn if isinstance(fn, dict) else {}
        at = len(output)
        output.append(
            call_item(
                ctx,
                item_id(ctx, "fc", at),
                str(call.get("id") or item_id(ctx, "call", at)),
                str(function.get("name") or ""),
                arguments_text(function.get("arguments")),
                "completed",
            )
        )
    if status != "completed" and output and "status" in output[-1]:
        output[-1]["status"] = status  # the item being written when the answer was cut
    if usage is None:
        usage = usage_of_response(chat)
    response = envelope(ctx, status, output, responses_usage(usage), incomplete=reason)
    if ctx.on_done is not None:
        ctx.on_done(response)
    return response


# -- errors

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(
    status: int, message: str, code: str | None = None, param: str | None = None, *, kind: str | None = None
) -> dict[str, Any]:
    """A Responses error body (OpenAI's shape: the SDKs raise it as a typed exception by status);
    ``kind``: the error's ``type`` when the caller knows it (a GatewayError's), else by status."""
    if kind is None:
        kind = _ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
