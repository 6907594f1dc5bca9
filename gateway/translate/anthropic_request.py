"""An Anthropic Messages request → a chat/completions body (protocols.md §6.4).

``system`` becomes the first message; ``tool_use`` blocks become ``tool_calls`` (input serialized),
``tool_result`` blocks become ``role: tool`` messages in order; assistant ``thinking`` blocks go out
as ``reasoning_content``, because K2 refuses a tool-call turn whose reasoning is missing (§2.1);
``tool_choice`` maps to OpenAI's; tools keep Anthropic's ``{name, description, input_schema}``,
which the tool step (``gateway/tools/schemas.py``) validates and turns into OpenAI tools. Mistakes
are 400s (the front end gives them Anthropic's error shape).
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import invalid_request


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _text_of(blocks: Any, where: str) -> str:
    """A string, or the text of a list of text blocks (what system prompts and tool results carry)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise invalid_request(f"{where} must be a string or an array of content blocks, got {_kind(blocks)}.")
    parts = []
    for j, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise invalid_request(f"{where}.{j} must be an object, got {_kind(block)}.")
        if block.get("type") == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise invalid_request(f"{where}.{j}.text must be a string.")
            parts.append(text)
        elif block.get("type") != "image":  # images in tool results: text-only upstreams cannot take them
            raise invalid_request(f"{where}.{j}.type {block.get('type')!r} is not supported here; expected 'text'.")
    return "\n".join(parts)


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise invalid_request(f"{where}.source must be a base64 or url image source.")
    return {"type": "image_url", "image_url": {"url": url}}


def _user(content: list[Any], where: str, out: list[dict[str, Any]]) -> None:
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content.{j}"
        if not isinstance(block, dict):
            raise invalid_request(f"{at} must be an object, got {_kind(block)}.")
        kind = block.get("type")
        if kind == "tool_result":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str) or not call_id:
                raise invalid_request(f"{at}.tool_use_id: Field required.")
            out.append({"role": "tool", "tool_call_id": call_id, "content": _text_of(block.get("content", ""), at)})
        elif kind == "text":
            if not isinstance(block.get("text"), str):
                raise invalid_request(f"{at}.text must be a string.")
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append(_image_part(block, at))
        else:
            raise invalid_request(f"{at}.type {kind!r} is not supported in a user message.")
    if not parts:
        return
    if all(p["type"] == "text" for p in parts):
        out.append({"role": "user", "content": "\n".join(p["text"] for p in parts)})
    else:
        out.append({"role": "user", "content": parts})


def _assistant(content: list[Any], where: str) -> dict[str, Any]:
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content.{j}"
        if not isinstance(block, dict):
            raise invalid_request(f"{at} must be an object, got {_kind(block)}.")
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "thinking":
            thinking.append(str(block.get("thinking", "")))
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            call_id, name = block.get("id"), block.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise invalid_request(f"{at}: a tool_use block needs a string id and name.")
            arguments = orjson.dumps(block.get("input") or {}).decode()
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        else:
            raise invalid_request(f"{at}.type {kind!r} is not supported in an assistant message.")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    if calls:
        message["tool_calls"] = calls
    return message


def _messages(messages: Any) -> list[dict[str, Any]]:
    if messages is None:
        raise invalid_request("messages: Field required.", param="messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_request("messages: must be a non-empty array.", param="messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise invalid_request(f"{where} must be an object, got {_kind(message)}.")
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant"):
            raise invalid_request(f"{where}.role must be 'user' or 'assistant', got {role!r}.")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise invalid_request(f"{where}.content must be a string or an array, got {_kind(content)}.")
        if role == "user":
            _user(content, where, out)
        else:
            out.append(_assistant(content, where))
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise invalid_request(f"tools must be an array, got {_kind(tools)}.", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise invalid_request(f"tools.{i} must be an object, got {_kind(tool)}.")
        if tool.get("type") not in (None, "custom") or "input_schema" not in tool:
            raise invalid_request(
                f"tools.{i}: only custom tools ({{name, description, input_schema}}) are supported, "
                f"not {tool.get('type') or 'a tool without input_schema'!r}.",
                param=f"tools.{i}",
            )
        # kept in Anthropic's form: the tool step validates it and names input_schema in its errors
        out.append({k: tool[k] for k in ("name", "description", "input_schema") if k in tool})
    return out


def _tool_choice(choice: Any) -> tuple[Any, bool]:
    """OpenAI's tool_choice and whether parallel calls were disabled."""
    if not isinstance(choice, dict):
        raise invalid_request('tool_choice must be an object such as {"type": "auto"}.', param="tool_choice")
    kind = choice.get("type")
    serial = bool(choice.get("disable_parallel_tool_use"))
    if kind == "auto":
        return "auto", serial
    if kind == "any":
        return "required", serial
    if kind == "none":
        return "none", serial
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, serial
    raise invalid_request(
        "tool_choice.type must be 'auto', 'any', 'tool' (with a name) or 'none'.", param="tool_choice"
    )


def to_chat_body(body: Any, *, counting: bool = False) -> dict[str, Any]:
    """The chat/completions body for an Anthropic Messages request; raises 400s for bad input.

    ``counting``: a ``count_tokens`` request, which carries no ``max_tokens``."""
    if not isinstance(body, dict):
        raise invalid_request(f"The request body must be a JSON object, got {_kind(body)}.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request("model: Field required (a non-empty string).", param="model")
    max_tokens = body.get("max_tokens", 1 if counting else None)
    if max_tokens is None:
        raise invalid_request("max_tokens: Field required.", param="max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise invalid_request("max_tokens: must be an integer >= 1.", param="max_tokens")
    messages = _messages(body.get("messages"))
    system = body.get("system")
    if system is not None:
        text = _text_of(system, "system")
        if text:
            messages.insert(0, {"role": "system", "content": text})
    out: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid_request("stream: must be a boolean.", param="stream")
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}  # message_delta carries the usage
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop_sequences")
    if stop:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise invalid_request("stop_sequences: must be an array of strings.", param="stop_sequences")
        out["stop"] = stop
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        out["tool_choice"], serial = _tool_choice(body["tool_choice"])
        if serial:
            out["parallel_tool_calls"] = False
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    return out
