"""Responses ``tools`` and ``tool_choice`` → chat/completions tools (see ``responses_request.py``).

Function tools in the flat Responses form become OpenAI chat tools (the tool step then validates
them and aliases names Moonshot refuses); a ``namespace`` tool's members are flattened to function
tools under their own name, or ``<namespace>__<name>`` when two share one, and the map back goes to
``ResponseContext.names``; every other tool type is hosted (the provider runs it), which no
upstream here can do: left out and named, or refused, by the tenant's ``responses.hosted_tools``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.translate.responses_input import bad, kind
from gateway.translate.responses_types import ToolName


def _function(tool: dict[str, Any], where: str) -> dict[str, Any]:
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise bad(f"{where}.name: a non-empty string is required.", f"{where}.name", "missing_required_parameter")
    fn: dict[str, Any] = {"name": name}
    description = tool.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise bad(f"{where}.description must be a string.", f"{where}.description", "invalid_type")
        fn["description"] = description
    params = tool.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise bad(f"{where}.parameters must be a JSON Schema object.", f"{where}.parameters", "invalid_type")
    fn["parameters"] = params
    if isinstance(tool.get("strict"), bool):
        fn["strict"] = tool["strict"]
    return {"type": "function", "function": fn}


def _hosted_label(tool: dict[str, Any]) -> str:
    ttype = str(tool.get("type"))
    label = tool.get("server_label") if ttype == "mcp" else tool.get("name") if ttype == "custom" else None
    return f"{ttype}:{label}" if isinstance(label, str) else ttype


@dataclass(slots=True)
class Tools:
    chat: list[dict[str, Any]] = field(default_factory=list)
    names: dict[str, ToolName] = field(default_factory=dict)  # upstream name -> the client's
    upstream: dict[tuple[str | None, str], str] = field(default_factory=dict)  # the client's -> upstream
    omitted: list[str] = field(default_factory=list)


def chat_tools(tools: Any, hosted: str) -> Tools:
    out = Tools()
    if tools is None:
        return out
    if not isinstance(tools, list):
        raise bad(f"'tools' must be an array, got {kind(tools)}.", "tools", "invalid_type")
    members: list[tuple[str | None, dict[str, Any]]] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad(f"{where} must be an object, got {kind(tool)}.", where, "invalid_type")
        ttype = tool.get("type")
        if ttype == "function":
            members.append((None, _function(tool, where)))
        elif ttype == "namespace":
            ns = tool.get("name")
            inner = tool.get("tools")
            if not isinstance(ns, str) or not ns or not isinstance(inner, list):
                raise bad(f"{where}: a namespace tool needs a name and an array of tools.", where)
            for j, member in enumerate(inner):
                at = f"{where}.tools[{j}]"
                if not isinstance(member, dict):
                    raise bad(f"{at} must be an object.", at, "invalid_type")
                if member.get("type") == "function":
                    members.append((ns, _function(member, at)))
                elif hosted == "reject":
                    raise bad(f"{at}: {member.get('type')!r} tools cannot be served by this gateway.", f"{at}.type")
                else:
                    out.omitted.append(f"{ns}.{_hosted_label(member)}")
        elif hosted == "reject":
            raise bad(
                f"{where}: the hosted tool {ttype!r} cannot be served by this gateway's upstreams (the tenant "
                "refuses hosted tools instead of leaving them out).",
                f"{where}.type" if ttype is not None else where,
                "unsupported_tool",
            )
        else:
            out.omitted.append(_hosted_label(tool))
    count: dict[str, int] = {}
    for _, tool in members:
        count[tool["function"]["name"]] = count.get(tool["function"]["name"], 0) + 1
    taken = set(count)
    for ns, tool in members:
        name = tool["function"]["name"]
        flat = name
        if ns is not None and count[name] > 1:
            flat = f"{ns}__{name}"
            n = 2
            while flat in taken:
                flat, n = f"{ns}__{name}_{n}", n + 1
            taken.add(flat)
            tool["function"]["name"] = flat
        if ns is not None:
            out.names[flat] = ToolName(name, ns)
        out.upstream[(ns, name)] = flat
        out.chat.append(tool)
    return out


def chat_tool_choice(choice: Any, tools: Tools) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if not isinstance(choice, dict):
        raise bad("'tool_choice' must be 'auto', 'none', 'required' or an object.", "tool_choice")
    ctype = choice.get("type")
    if ctype == "function":
        name = choice.get("name")
        flat = tools.upstream.get((choice.get("namespace"), name)) if isinstance(name, str) else None
        if flat is None:
            raise bad(f"tool_choice names the function {name!r}, which is not among the tools.", "tool_choice.name")
        return {"type": "function", "function": {"name": flat}}
    if ctype == "allowed_tools":
        mode, allowed = choice.get("mode", "auto"), choice.get("tools")
        if mode not in ("auto", "required") or not isinstance(allowed, list):
            raise bad("tool_choice allowed_tools needs mode 'auto' or 'required' and an array of tools.", "tool_choice")
        keep = set()
        for j, entry in enumerate(allowed):
            name = entry.get("name") if isinstance(entry, dict) else None
            flat = tools.upstream.get((entry.get("namespace"), name)) if isinstance(name, str) else None
            if flat is None or entry.get("type") != "function":
                raise bad(
                    f"tool_choice.tools[{j}] must name a function among the tools (hosted tools are not served).",
                    f"tool_choice.tools[{j}]",
                )
            keep.add(flat)
        tools.chat = [t for t in tools.chat if t["function"]["name"] in keep]
        return mode
    raise bad(
        f"tool_choice type {ctype!r} cannot be honoured: hosted tools are not served by this gateway.",
        "tool_choice",
        "unsupported_value",
    )
