"""An OpenAI Responses request (``POST /v1/responses``) → a chat/completions body.

The pipeline and every upstream speak chat/completions, so the request is translated the way
``/v1/messages`` is, and the answer is rendered back by ``responses_response.py``. Field by field:

* ``input`` (a string or items, see ``responses_input.py``) after the stored conversation of
  ``previous_response_id``; ``instructions`` become the first (system) message;
* function tools (the flat Responses form) become chat tools; a ``namespace`` tool's members are
  flattened to function tools (their own name, or ``<namespace>__<name>`` when two share a name)
  and mapped back on the way out (``ResponseContext.names``); hosted tools (web search, file
  search, computer use, code interpreter, image generation, MCP, shells, custom tools...) are left
  out and named in ``x-gateway-omitted-tools``, or refused when the tenant's
  ``responses.hosted_tools`` is ``reject``;
* ``tool_choice`` (auto / none / required / a function / allowed_tools), ``parallel_tool_calls``,
  ``max_output_tokens`` → ``max_tokens``, ``temperature``, ``top_p``, ``text.format`` →
  ``response_format``, ``reasoning.effort`` → ``reasoning_effort`` (the upstream's shaping maps or
  removes it per model), ``user`` / ``safety_identifier`` → ``user``, ``prompt_cache_key`` (sent on:
  Moonshot reads it; the router uses it as an affinity hint), ``stream``;
* answered by the gateway itself: ``store``, ``include``, ``metadata``, ``previous_response_id``;
* ignored by rule (README "The Responses API"): ``truncation``, ``service_tier``,
  ``reasoning.summary``, ``text.verbosity``, ``max_tool_calls`` (it caps hosted tools, of which
  there are none), ``prompt_cache_retention``/``_options``, ``client_metadata``, ``stream_options``,
  ``image``, ``access_programs``; any other unknown field is ignored and named in
  ``x-gateway-ignored-fields``;
* refused with a 400 naming the field: ``background: true``, ``conversation``, ``prompt``
  templates, ``context_management``, ``moderation``, ``top_logprobs`` > 0 and ``include`` entries
  the gateway cannot produce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.translate.responses_input import InputContext, as_items, bad, input_messages, kind
from gateway.translate.responses_tools import chat_tool_choice, chat_tools
from gateway.translate.responses_types import ToolName

ENCRYPTED = "reasoning.encrypted_content"
# include values about hosted tools' output (never produced here): nothing to add, nothing lost
HARMLESS_INCLUDES = frozenset(
    (
        "file_search_call.results",
        "web_search_call.results",
        "web_search_call.action.sources",
        "computer_call_output.output.image_url",
        "code_interpreter_call.outputs",
        "message.input_image.image_url",
    )
)
KNOWN = frozenset(
    (
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "max_output_tokens",
        "temperature",
        "top_p",
        "text",
        "reasoning",
        "metadata",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "stream",
        "store",
        "include",
        "previous_response_id",
    )
)
IGNORED = frozenset(
    (
        "truncation",
        "service_tier",
        "max_tool_calls",
        "prompt_cache_retention",
        "prompt_cache_options",
        "client_metadata",
        "stream_options",
        "image",
        "access_programs",
        "background_options",
    )
)
# field -> why it is refused when set (to anything but null / false / empty)
REFUSED = {
    "background": "background responses are not supported: the gateway answers while the client waits",
    "conversation": "the Conversations API is not supported; send previous_response_id or the whole input",
    "prompt": "stored prompt templates are not supported; send the prompt as instructions and input",
    "context_management": "server-side compaction is not supported",
    "moderation": "moderation is not supported",
}


@dataclass(slots=True)
class ResponsesRequest:
    """A Responses request whose top-level fields are checked; the input is translated later, once
    the stored conversation and the sealing key (when needed) are at hand."""

    body: dict[str, Any]
    model: str
    items: list[Any]
    stream: bool = False
    store: bool = True
    include_encrypted: bool = False
    previous_response_id: str | None = None
    ignored: list[str] = field(default_factory=list)  # unknown fields, for x-gateway-ignored-fields

    def sealed_items(self) -> bool:
        """Whether any input item carries encrypted_content (the sealing key must be loaded)."""
        return any(isinstance(i, dict) and i.get("encrypted_content") is not None for i in self.items)

    def references(self) -> list[str]:
        return [
            i["id"]
            for i in self.items
            if isinstance(i, dict) and i.get("type") == "item_reference" and isinstance(i.get("id"), str)
        ]


@dataclass(slots=True)
class Translation:
    chat: dict[str, Any]
    echo: dict[str, Any]
    names: dict[str, ToolName]
    omitted_tools: list[str]
    omitted_items: list[str]


def _set(value: Any) -> bool:
    return value not in (None, False, {}, [], "")


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{key}' must be a boolean, got {kind(value)}.", key, "invalid_type")
    return value


def _number(body: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise bad(f"'{key}' must be a number between {low:g} and {high:g}, got {value!r}.", key)
    return value


def parse_request(body: Any) -> ResponsesRequest:
    """Check the top-level fields; a 400 naming the first problem."""
    if not isinstance(body, dict):
        raise bad(f"The request body must be a JSON object, got {kind(body)}.", "body", "invalid_body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        code = "missing_required_parameter" if model is None else "invalid_type"
        raise bad("'model' is required: a non-empty string.", "model", code)
    ignored: list[str] = []
    for key in body:  # one pass over the fields the gateway does not translate
        if key in KNOWN:
            continue
        if key in REFUSED:
            if _set(body[key]):
                raise bad(f"'{key}': {REFUSED[key]}.", key, "unsupported_parameter")
        elif key == "top_logprobs":
            if body[key] not in (None, 0):
                raise bad(
                    "'top_logprobs': log probabilities are not supported by this gateway.",
                    "top_logprobs",
                    "unsupported_parameter",
                )
        elif key not in IGNORED:
            ignored.append(key)
    if body.get("input") is None and not isinstance(body.get("previous_response_id"), str):
        raise bad("'input' is required (a string or an array of items).", "input", "missing_required_parameter")
    items = as_items(body["input"]) if body.get("input") is not None else []
    req = ResponsesRequest(body, model, items)
    req.stream = _bool(body, "stream", False)
    _bool(body, "parallel_tool_calls", True)
    req.store = _bool(body, "store", True)
    include = body.get("include") or []
    if not isinstance(include, list) or not all(isinstance(v, str) for v in include):
        raise bad("'include' must be an array of strings.", "include", "invalid_type")
    for i, value in enumerate(include):
        if value == ENCRYPTED:
            req.include_encrypted = True
        elif value not in HARMLESS_INCLUDES:
            raise bad(
                f"include[{i}]: {value!r} is not supported by this gateway.", f"include[{i}]", "unsupported_value"
            )
    previous = body.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous):
        raise bad("'previous_response_id' must be a non-empty string.", "previous_response_id", "invalid_type")
    req.previous_response_id = previous
    req.ignored = ignored
    return req


def _response_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad(f"'text' must be an object, got {kind(text)}.", "text", "invalid_type")
    fmt = text.get("format")
    if fmt is None:
        return None
    ftype = fmt.get("type") if isinstance(fmt, dict) else None
    if ftype == "text":
        return None
    if ftype == "json_object":
        return {"type": "json_object"}
    if ftype == "json_schema":
        assert isinstance(fmt, dict)
        name, schema = fmt.get("name"), fmt.get("schema")
        if not isinstance(name, str) or not name:
            raise bad("text.format.name is required for json_schema.", "text.format.name", "missing_required_parameter")
        if not isinstance(schema, dict):
            raise bad("text.format.schema must be a JSON Schema object.", "text.format.schema", "invalid_type")
        spec: dict[str, Any] = {"name": name, "schema": schema}
        for key in ("description", "strict"):
            if fmt.get(key) is not None:
                spec[key] = fmt[key]
        return {"type": "json_schema", "json_schema": spec}
    raise bad(f"text.format.type {ftype!r}: expected 'text', 'json_object' or 'json_schema'.", "text.format.type")


def _effort(reasoning: Any) -> str | None:
    if reasoning is None:
        return None
    if not isinstance(reasoning, dict):
        raise bad(f"'reasoning' must be an object, got {kind(reasoning)}.", "reasoning", "invalid_type")
    effort = reasoning.get("effort")
    if effort is not None and effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
        raise bad(
            f"reasoning.effort {effort!r}: expected none, minimal, low, medium, high or xhigh.", "reasoning.effort"
        )
    return effort


def _echo(body: dict[str, Any], req: ResponsesRequest) -> dict[str, Any]:
    """What the response objects echo: every key of ``default_echo``, in its order."""
    given = body.get("reasoning")
    reasoning: dict[str, Any] = given if isinstance(given, dict) else {}
    parallel = body.get("parallel_tool_calls")
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    return {
        "background": False,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"),
        "parallel_tool_calls": True if parallel is None else parallel,
        "previous_response_id": req.previous_response_id,
        "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "safety_identifier": body.get("safety_identifier"),
        "service_tier": "default",
        "store": req.store,
        "temperature": 1.0 if temperature is None else temperature,
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") or [],
        "top_logprobs": 0,
        "top_p": 1.0 if top_p is None else top_p,
        "truncation": body.get("truncation") or "disabled",
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def _check_metadata(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or len(value) > 16:
        raise bad("'metadata' must be an object of at most 16 string pairs.", "metadata", "invalid_type")
    for key, item in value.items():
        if len(key) > 64 or not isinstance(item, str) or len(item) > 512:
            raise bad(f"metadata[{key[:64]!r}]: keys up to 64 and string values up to 512 characters.", "metadata")


def translate(req: ResponsesRequest, ctx: InputContext, history: list[Any] | None = None) -> Translation:
    """The chat/completions body; ``history``: the stored conversation of ``previous_response_id``
    (items in Responses form), ``ctx.unseal``/``references``/``originals`` filled by the caller."""
    body = req.body
    tools = chat_tools(body.get("tools"), ctx.hosted)
    ctx.upstream_names = tools.upstream
    choice = chat_tool_choice(body.get("tool_choice"), tools)
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad("'instructions' must be a string.", "instructions", "invalid_type")
        if instructions:
            messages.append({"role": "system", "content": instructions})
    if history:
        messages += input_messages(history, ctx, "previous_response_id")
    messages += input_messages(req.items, ctx)
    if not messages:
        raise bad("'input' must contain at least one item.", "input", "empty_array")
    chat: dict[str, Any] = {"model": req.model, "messages": messages}
    if tools.chat:
        chat["tools"] = tools.chat
        if choice is not None:
            chat["tool_choice"] = choice
        if not _bool(body, "parallel_tool_calls", True):  # parallel calls are every upstream's default
            chat["parallel_tool_calls"] = False
    elif choice == "required":
        raise bad("tool_choice 'required' needs at least one function tool the gateway can serve.", "tool_choice")
    max_out = body.get("max_output_tokens")
    if max_out is not None:
        if not isinstance(max_out, int) or isinstance(max_out, bool) or max_out < 1:
            raise bad("'max_output_tokens' must be an integer >= 1.", "max_output_tokens")
        chat["max_tokens"] = max_out
    for key, high in (("temperature", 2.0), ("top_p", 1.0)):
        value = _number(body, key, 0.0, high)
        if value is not None:
            chat[key] = value
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    effort = _effort(body.get("reasoning"))
    if effort is not None:
        chat["reasoning_effort"] = effort
    _check_metadata(body.get("metadata"))
    user = body.get("user") if body.get("user") is not None else body.get("safety_identifier")
    if user is not None:
        if not isinstance(user, str):
            raise bad("'user' must be a string.", "user", "invalid_type")
        chat["user"] = user
    cache_key = body.get("prompt_cache_key")
    if cache_key is not None:
        if not isinstance(cache_key, str):
            raise bad("'prompt_cache_key' must be a string.", "prompt_cache_key", "invalid_type")
        chat["prompt_cache_key"] = cache_key
    if req.stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # response.completed carries the usage
    return Translation(chat, _echo(body, req), tools.names, tools.omitted, ctx.omitted)
