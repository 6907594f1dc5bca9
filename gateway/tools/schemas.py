"""Tool schemas in: every dialect clients send, normalized to OpenAI ``tools`` and validated.

Accepted shapes (protocols.md §6.1): OpenAI ``{"type": "function", "function": {...}}``, the same
without ``type``, the flat Responses-API form ``{"type": "function", "name", "parameters"}``, the
Anthropic form ``{"name", "description", "input_schema"}`` (the Kimi K2 Thinking guide sends it to
chat/completions), and legacy ``functions`` + ``function_call``. Provider builtins
(``{"type": "builtin_function", "function": {"name": "$web_search"}}``) pass as they are.

Names are non-empty strings, at most 128 tools, no duplicates, and ``parameters`` is a JSON
Schema object: a bad tool is a 400 naming it before anything is spent. A name Moonshot's rule
(``^[a-zA-Z_][a-zA-Z0-9-_]{2,63}$``) refuses goes upstream under an alias (``aliases.py``).
Canonical tools with acceptable names are left alone, so their bytes reach the upstream unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.errors import GatewayError, invalid_request
from gateway.tools.aliases import alias_history, plan_aliases

MAX_TOOLS = 128
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(slots=True)
class ToolRequest:
    """What the response side needs to know about the tools of a request."""

    has_tools: bool = False
    legacy: bool = False  # the client sent ``functions``: answer with ``function_call``
    changed: bool = False
    aliases: dict[str, str] = field(default_factory=dict)  # client name -> name sent upstream


def _bad(index: int, name: Any, problem: str, param: str | None = None) -> GatewayError:
    shown = f" ({name!r})" if isinstance(name, str) and name else ""
    return invalid_request(f"tools[{index}]{shown}: {problem}", param=param or f"tools[{index}]", code="invalid_tool")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _check_parameters(index: int, name: str, function: dict[str, Any], key: str) -> bool:
    """Validate (and default) ``function['parameters']``; True when it was changed."""
    if "parameters" not in function or function["parameters"] is None:
        function["parameters"] = dict(EMPTY_PARAMETERS)  # Moonshot requires parameters
        return True
    params = function["parameters"]
    if not isinstance(params, dict):
        raise _bad(index, name, f"{key} must be a JSON Schema object, got {_kind(params)}.", f"tools[{index}].{key}")
    if not params:
        function["parameters"] = dict(EMPTY_PARAMETERS)
        return True
    kind = params.get("type", "object" if "properties" in params else None)
    if kind != "object":
        raise _bad(
            index,
            name,
            f'{key} must be a JSON Schema whose root has "type": "object", got type {params.get("type")!r}.',
            f"tools[{index}].{key}",
        )
    if "type" not in params:
        params["type"] = "object"
        return True
    props = params.get("properties")
    if props is not None and not isinstance(props, dict):
        raise _bad(index, name, f"{key}.properties must be an object, got {_kind(props)}.", f"tools[{index}].{key}")
    return False


def _check_function(index: int, function: dict[str, Any], key: str = "parameters") -> tuple[str, bool]:
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(index, None, "the function has no name (a non-empty string is required).", f"tools[{index}].name")
    if name.startswith("$"):
        raise _bad(
            index,
            name,
            "names starting with '$' are provider builtins; declare them as "
            '{"type": "builtin_function", "function": {"name": ...}}.',
            f"tools[{index}].name",
        )
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise _bad(index, name, f"description must be a string, got {_kind(description)}.")
    return name, _check_parameters(index, name, function, key)


def _normalize_tool(index: int, tool: Any) -> tuple[dict[str, Any], str, bool]:
    """The tool in OpenAI's shape, its name, and whether anything changed."""
    if not isinstance(tool, dict):
        raise _bad(index, None, f"a tool must be an object, got {_kind(tool)}.")
    kind = tool.get("type")
    function = tool.get("function")
    if kind == "builtin_function":
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name.startswith("$"):
            raise _bad(index, name, "a builtin_function tool needs function.name starting with '$' (e.g. $web_search).")
        return tool, name, False
    if kind not in (None, "function"):
        raise _bad(
            index, tool.get("name"), f"unsupported tool type {kind!r}; expected 'function'.", f"tools[{index}].type"
        )
    if isinstance(function, dict):  # OpenAI, with or without "type"
        name, changed = _check_function(index, function)
        if kind is None:
            _put_first(tool, "type", "function")
            changed = True
        return tool, name, changed
    if function is not None:
        raise _bad(index, None, f"function must be an object, got {_kind(function)}.", f"tools[{index}].function")
    if "input_schema" in tool:  # Anthropic: {name, description, input_schema}
        fn = {k: v for k, v in tool.items() if k not in ("type", "input_schema", "cache_control")}
        fn["parameters"] = tool["input_schema"]
        name, _ = _check_function(index, fn, "input_schema")
        return {"type": "function", "function": fn}, name, True
    if "name" in tool:  # flat Responses-API style: {type: function, name, description, parameters}
        fn = {k: v for k, v in tool.items() if k != "type"}
        name, _ = _check_function(index, fn)
        return {"type": "function", "function": fn}, name, True
    raise _bad(index, None, 'not a recognised tool: expected {"type": "function", "function": {...}}.')


def _put_first(d: dict[str, Any], key: str, value: Any) -> None:
    """Insert ``key`` at the front of ``d`` in place (the order OpenAI's own tools use)."""
    items = list(d.items())
    d.clear()
    d[key] = value
    d.update(items)


def _legacy_choice(value: Any) -> Any:
    if isinstance(value, dict):
        name = value.get("name")
        if not isinstance(name, str) or not name:
            raise invalid_request(
                "function_call must be 'auto', 'none' or {\"name\": ...}.", param="function_call", code="invalid_value"
            )
        return {"type": "function", "function": {"name": name}}
    if value in ("auto", "none"):
        return value
    raise invalid_request(
        "function_call must be 'auto', 'none' or {\"name\": ...}.", param="function_call", code="invalid_value"
    )


def _replace_keys(body: dict[str, Any], replacements: dict[str, tuple[str, Any]]) -> None:
    """Rename keys in place, each new key taking the old one's position."""
    items = [(replacements.get(k, (k, v))) for k, v in body.items()]
    body.clear()
    body.update(items)


def _legacy_history(messages: list[Any]) -> bool:
    """Assistant ``function_call`` turns and ``role: function`` results become tool calls and tool
    messages (upstreams such as Moonshot refuse the legacy shapes)."""
    changed = False
    counter = 0
    last_id: dict[str, str] = {}
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        call = message.get("function_call")
        if message.get("role") == "assistant" and isinstance(call, dict) and "tool_calls" not in message:
            raw_name = call.get("name")
            name = raw_name if isinstance(raw_name, str) else "function"
            call_id = f"functions.{name}:{counter}"
            counter += 1
            last_id[name] = call_id
            arguments = call.get("arguments")
            entry = {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments if isinstance(arguments, str) else "{}"},
            }
            _replace_keys(message, {"function_call": ("tool_calls", [entry])})
            changed = True
        elif message.get("role") == "function":
            result_name = message.get("name")
            call_id = (
                last_id.get(result_name, f"functions.{result_name}:{counter}")
                if isinstance(result_name, str)
                else f"call:{i}"
            )
            new = {"role": "tool", "tool_call_id": call_id}
            new.update((k, v) for k, v in message.items() if k != "role")
            messages[i] = new
            changed = True
    return changed


def normalize_tools(body: dict[str, Any]) -> ToolRequest:
    """Normalize and validate the request's tools in place; raises a 400 :class:`GatewayError`."""
    info = ToolRequest()
    tools = body.get("tools")
    functions = body.get("functions")
    if functions is not None:
        if tools is not None:
            raise invalid_request(
                "Send either 'tools' or the legacy 'functions', not both.", param="functions", code="invalid_value"
            )
        if not isinstance(functions, list):
            raise invalid_request(f"'functions' must be an array, got {_kind(functions)}.", param="functions")
        tools = [{"type": "function", "function": f} if isinstance(f, dict) else f for f in functions]
        replacements: dict[str, tuple[str, Any]] = {"functions": ("tools", tools)}
        if "function_call" in body:
            replacements["function_call"] = ("tool_choice", _legacy_choice(body["function_call"]))
        _replace_keys(body, replacements)
        info.legacy = info.changed = True
        messages = body.get("messages")
        if isinstance(messages, list):
            _legacy_history(messages)
    if tools is None:
        return info
    if not isinstance(tools, list):
        raise invalid_request(f"'tools' must be an array, got {_kind(tools)}.", param="tools", code="invalid_type")
    if len(tools) > MAX_TOOLS:
        raise invalid_request(
            f"Too many tools: {len(tools)}; at most {MAX_TOOLS} are allowed.", param="tools", code="too_many_tools"
        )
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        normalized, name, changed = _normalize_tool(i, tool)
        if name in seen:
            raise _bad(i, name, f"duplicate tool name (tools[{seen[name]}] has the same name).")
        seen[name] = i
        if normalized is not tool:
            tools[i] = normalized
        info.changed = info.changed or changed
    choice = body.get("tool_choice")
    fn = choice.get("function") if isinstance(choice, dict) else None
    named = fn.get("name") if isinstance(fn, dict) else None
    if isinstance(named, str) and named not in seen:
        raise invalid_request(
            f"tool_choice names the function {named!r}, which is not among the request's tools.",
            param="tool_choice",
            code="invalid_value",
        )
    info.aliases = plan_aliases(list(seen))
    if info.aliases:
        _apply_aliases(body, tools, info.aliases)
        info.changed = True
    info.has_tools = bool(tools)
    return info


def _apply_aliases(body: dict[str, Any], tools: list[Any], aliases: dict[str, str]) -> None:
    """Refused names in the tools, a named tool_choice and the history become their aliases."""
    for tool in tools:
        function = tool.get("function")
        name = function.get("name")
        if name in aliases:
            function["name"] = aliases[name]
    choice = body.get("tool_choice")
    fn = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(fn, dict) and fn.get("name") in aliases:
        fn["name"] = aliases[fn["name"]]
    alias_history(body.get("messages"), aliases)
