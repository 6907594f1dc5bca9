"""Parsing and validation of a chat/completions request, per upstream dialect.

The checks mirror what the real upstreams reject (protocols.md §1.2, §1.8, §2.1-2.3 for Moonshot,
§4.4-4.5 for vLLM), with the same HTTP status, error type and, where known, the same message text, so a
gateway's error mapping and request rewriting can be tested against the simulator.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import RequestError
from .faults import Fault
from .profiles import Profile

TOOL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9-_]{2,63}$")
MAX_TOOLS = 128
MAX_N = 5
ROLES = frozenset(("system", "user", "assistant", "tool", "developer"))
# in 2026 only K3 accepts tool_choice "required"/named on Moonshot; K2.x thinking models take auto/none
FORCED_TOOL_CHOICE_MODELS = ("kimi-k3",)
SIM_INT_KEYS = ("tool_calls", "reasoning_chunks", "content_chunks")
SIM_MAX = 100_000


@dataclass(slots=True)
class SimOptions:
    """The per-request ``"sim"`` field: simulator controls a test can send through a gateway."""

    tool_calls: int | None = None
    reasoning_chunks: int | None = None
    content_chunks: int | None = None
    fault: Fault | None = None


@dataclass(slots=True)
class ChatRequest:
    """What the engine needs from a validated request."""

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    n: int
    thinking: bool  # the model reasons (always for K2 Thinking)
    show_reasoning: bool  # vLLM include_reasoning=false drops reasoning from the output
    tool_choice: Any
    forced_tool: str | None
    skip_special_tokens: bool | None
    sim: SimOptions


def _bad(message: str) -> RequestError:
    return RequestError(400, message)


def parse_sim(value: Any) -> SimOptions:
    """Validate the ``sim`` field (a typo there should fail loudly, not be ignored)."""
    if value is None:
        return SimOptions()
    if not isinstance(value, dict):
        raise _bad("Invalid request: sim must be an object")
    opts = SimOptions()
    for key, item in value.items():
        if key in SIM_INT_KEYS:
            if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item <= SIM_MAX:
                raise _bad(f"Invalid request: sim.{key} must be an integer between 0 and {SIM_MAX}")
            setattr(opts, key, item)
        elif key == "fault":
            try:
                opts.fault = Fault.from_dict(item)
            except (TypeError, ValueError) as exc:
                raise _bad(f"Invalid request: sim.fault: {exc}") from None
        else:
            raise _bad(f"Invalid request: unknown sim option {key!r}; known: {', '.join((*SIM_INT_KEYS, 'fault'))}")
    return opts


def _int_param(req: dict[str, Any], name: str, minimum: int) -> int | None:
    value = req.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _bad(f"Invalid request: {name} must be an integer >= {minimum}")
    return value


def _check_common(req: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool, bool]:
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("Invalid request: messages must be a non-empty array")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _bad(f"Invalid request: messages[{i}] must be an object")
        if msg.get("role") not in ROLES:
            raise _bad(f"Invalid request: messages[{i}].role must be one of {', '.join(sorted(ROLES))}")
    tools = req.get("tools")
    if tools is None:
        tools = []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _bad("Invalid request: tools must be an array of objects")
    stream = req.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("Invalid request: stream must be a boolean")
    options = req.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("Invalid request: stream_options must be an object")
    include_usage = bool(stream and options and options.get("include_usage") is True)
    return messages, tools, stream, include_usage


def _check_model(req: dict[str, Any], profile: Profile) -> str:
    model = req.get("model")
    if model is None and profile.dialect == "vllm":
        return profile.models[0]  # vLLM falls back to its served model
    if not isinstance(model, str) or not model:
        raise _bad("Invalid request: model is required")
    return model


def _check_served(model: str, profile: Profile) -> None:
    if model in profile.retired or model not in profile.models:
        if profile.dialect == "vllm":
            raise RequestError(404, f"The model `{model}` does not exist.")
        raise RequestError(404, f"Not found the model {model} or Permission denied")


def _tool_function(tool: dict[str, Any], index: int) -> dict[str, Any]:
    function = tool.get("function")
    if not isinstance(function, dict):
        raise _bad(f"Invalid request: tools[{index}].function must be an object")
    return function


def _check_moonshot_tools(req: dict[str, Any], model: str, tools: list[dict[str, Any]]) -> str | None:
    if req.get("functions") is not None:
        raise _bad("Invalid request: functions is not supported, use tools instead")
    if len(tools) > MAX_TOOLS:
        raise _bad(f"Invalid request: too many tools: {len(tools)}, at most {MAX_TOOLS} are allowed")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        kind = tool.get("type", "function")
        function = _tool_function(tool, i)
        name = function.get("name")
        if kind == "builtin_function":
            if not isinstance(name, str) or not name.startswith("$"):
                raise _bad(f"Invalid request: tools[{i}] builtin_function name must start with '$'")
        elif kind == "function":
            if not isinstance(name, str) or not TOOL_NAME_RE.match(name):
                raise _bad(
                    f"Invalid request: tools[{i}].function.name {name!r} is invalid, it must match "
                    f"{TOOL_NAME_RE.pattern}"
                )
            params = function.get("parameters")
            if not isinstance(params, dict) or params.get("type") != "object":
                raise _bad(
                    f"Invalid request: tools[{i}].function.parameters must be a JSON schema whose root type is object"
                )
        else:
            raise _bad(f"Invalid request: tools[{i}].type must be function or builtin_function")
        if name in seen:
            raise _bad(f"Invalid request: duplicate tool name {name!r}")
        seen.add(name)
    return _check_tool_choice(req.get("tool_choice"), model, seen, forcing_ok=model in FORCED_TOOL_CHOICE_MODELS)


def _check_tool_choice(choice: Any, model: str, names: set[str], *, forcing_ok: bool) -> str | None:
    """Return the forced tool name (or "" for required), None when the model chooses freely."""
    if choice is None or choice in ("auto", "none"):
        return None
    if choice == "required":
        if not forcing_ok:
            raise _bad(
                f"Invalid request: tool_choice 'required' is not supported by {model}; "
                f"use 'auto' or 'none' (ask for a tool in a user message instead)"
            )
        return ""
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise _bad("Invalid request: tool_choice must be 'auto', 'none', 'required' or a named function")
        if not forcing_ok:
            raise _bad(f"Invalid request: a named tool_choice is not supported by {model}; use 'auto' or 'none'")
        if name not in names:
            raise _bad(f"Invalid request: tool_choice names an unknown tool {name!r}")
        return name
    raise _bad("Invalid request: tool_choice must be 'auto', 'none', 'required' or a named function")


def _check_moonshot_history(messages: list[dict[str, Any]], thinking: bool) -> None:
    """K2 Thinking rules for tool loops: reasoning echoed back, every call answered (§2.1)."""
    pending: dict[str, int] = {}  # tool_call id -> index of the assistant message that made it
    for i, msg in enumerate(messages):
        role = msg["role"]
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if call_id not in pending:
                raise _bad(f"Invalid request: tool_call_id {call_id} is not found (tool message at index {i})")
            del pending[call_id]
            continue
        if pending:
            call_id, owner = next(iter(pending.items()))
            raise _bad(
                f"Invalid request: tool_call_id {call_id} is not found: the assistant tool call message "
                f"at index {owner} has no matching tool message"
            )
        if role != "assistant":
            continue
        calls = msg.get("tool_calls")
        if not calls:
            continue
        if not isinstance(calls, list):
            raise _bad(f"Invalid request: messages[{i}].tool_calls must be an array")
        reasoning = msg.get("reasoning_content")
        if thinking and (not isinstance(reasoning, str) or not reasoning):  # "" is refused too, " " passes
            raise _bad(
                f"thinking is enabled but reasoning_content is missing in assistant tool call message at index {i}"
            )
        for call in calls:
            call_id = call.get("id") if isinstance(call, dict) else None
            if not isinstance(call_id, str):
                raise _bad(f"Invalid request: messages[{i}].tool_calls[].id must be a string")
            pending[call_id] = i
    if pending:
        call_id, owner = next(iter(pending.items()))
        raise _bad(
            f"Invalid request: tool_call_id {call_id} is not found: the assistant tool call message "
            f"at index {owner} has no matching tool message"
        )


def _check_vllm_tools(req: dict[str, Any], model: str, tools: list[dict[str, Any]]) -> str | None:
    names: set[str] = set()
    for i, tool in enumerate(tools):
        if tool.get("type", "function") != "function":
            raise _bad(f"1 validation error: tools[{i}].type: Input should be 'function'")
        name = _tool_function(tool, i).get("name")
        if not isinstance(name, str):
            raise _bad(f"1 validation error: tools[{i}].function.name: Field required")
        names.add(name)
    return _check_tool_choice(req.get("tool_choice"), model, names, forcing_ok=True)


def parse_request(req: dict[str, Any], profile: Profile, sim: SimOptions) -> ChatRequest:
    """Validate a decoded request body for the profile's dialect; raises RequestError.

    Order as on the real upstream: shape errors, then the model lookup (404), then parameters.
    """
    model = _check_model(req, profile)
    messages, tools, stream, include_usage = _check_common(req)
    _check_served(model, profile)
    max_tokens = _int_param(req, "max_completion_tokens", 1)
    legacy_max = _int_param(req, "max_tokens", 1)
    if max_tokens is None:
        max_tokens = legacy_max
    n = _int_param(req, "n", 1) or 1
    temperature = req.get("temperature")
    if temperature is not None and (
        not isinstance(temperature, int | float) or isinstance(temperature, bool) or math.isnan(temperature)
    ):
        raise _bad("Invalid request: temperature must be a number")
    thinking = True
    show_reasoning = True
    skip_special: bool | None = None
    if profile.dialect == "moonshot":
        thinking_param = req.get("thinking")
        if thinking_param is not None and not isinstance(thinking_param, dict):
            raise _bad('Invalid request: thinking must be an object such as {"type": "enabled"}')
        if isinstance(thinking_param, dict) and thinking_param.get("type") == "disabled":
            # kimi-k2-thinking* and kimi-k3 always reason; K2.5/K2.6 can switch it off
            thinking = "thinking" in model or model.startswith("kimi-k3")
        if temperature is not None and not 0 <= temperature <= 1:
            raise _bad(f"Invalid request: temperature {temperature} is out of range, it must be in [0, 1]")
        if n > MAX_N:
            raise _bad(f"Invalid request: n must be at most {MAX_N}, got {n}")
        forced = _check_moonshot_tools(req, model, tools)
        _check_moonshot_history(messages, thinking)
    else:
        if temperature is not None and temperature < 0:
            raise _bad(f"temperature must be non-negative, got {temperature}.")
        if req.get("stream_options") is not None and not stream:
            raise _bad("Stream options can only be defined when `stream=True`.")
        forced = _check_vllm_tools(req, model, tools)
        kwargs = req.get("chat_template_kwargs")
        if isinstance(kwargs, dict) and kwargs.get("thinking") is False:
            thinking = False
        show_reasoning = req.get("include_reasoning", True) is not False
        value = req.get("skip_special_tokens")
        skip_special = value if isinstance(value, bool) else None
    return ChatRequest(
        model=model,
        messages=messages,
        tools=tools,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        n=n,
        thinking=thinking,
        show_reasoning=show_reasoning,
        tool_choice=req.get("tool_choice"),
        forced_tool=forced,
        skip_special_tokens=skip_special,
        sim=sim,
    )


def check_context(profile: Profile, prompt_tokens: int, max_tokens: int | None) -> int:
    """Reject prompts that do not fit; return the output budget (explicit, default, or what fits)."""
    context = profile.context_tokens
    if profile.dialect == "moonshot":
        budget = max_tokens or profile.default_max_tokens or max(1, context - prompt_tokens)
        if prompt_tokens + budget > context:
            raise _bad(f"Your request exceeded model token limit: {context}")
        return budget
    if max_tokens is None:
        if prompt_tokens >= context:
            raise _bad(
                f"This model's maximum context length is {context} tokens. However, your request has "
                f"{prompt_tokens} input tokens. Please reduce the length of the input messages."
            )
        return profile.default_max_tokens or context - prompt_tokens
    if prompt_tokens + max_tokens > context:
        raise _bad(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
            f"completion). Please reduce the length of the messages or completion."
        )
    return max_tokens
