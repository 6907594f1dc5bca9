"""Responses ``input`` items → chat/completions ``messages``.

The Responses API splits one assistant turn into items (``reasoning``, ``message``, one
``function_call`` per call); chat/completions keeps it as one message. Items are folded back the way
the upstream produced them, so the history K2 sees (and the gateway's prefix hashes and reasoning
store see) is the same whichever API the client spoke:

* a ``reasoning`` item starts an assistant turn; its text (the sealed original when it carries
  ``encrypted_content``, else its ``content`` reasoning text, else its summary) goes on the next
  assistant message as ``reasoning_content``;
* an assistant ``message`` and the ``function_call`` items right after it become one assistant
  message with ``content`` and ``tool_calls``; consecutive ``function_call`` items are one message;
* ``function_call_output`` becomes a ``role: tool`` message; ``system`` and ``developer`` messages
  become ``role: system`` (upstreams do not all know ``developer``);
* items of tools no upstream serves (web search, computer use, shell, MCP, custom tools...) are
  left out, or refused, by the tenant's ``responses.hosted_tools``.

Every mistake is a 400 whose ``param`` names the item (``input[3].call_id``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.errors import GatewayError, invalid_request

TEXT_PARTS = frozenset(("input_text", "output_text", "text"))
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
# items only a hosted (provider-side) tool produces or consumes
HOSTED_ITEMS = frozenset(
    (
        "web_search_call",
        "file_search_call",
        "computer_call",
        "computer_call_output",
        "code_interpreter_call",
        "image_generation_call",
        "local_shell_call",
        "local_shell_call_output",
        "shell_call",
        "shell_call_output",
        "apply_patch_call",
        "apply_patch_call_output",
        "mcp_list_tools",
        "mcp_approval_request",
        "mcp_approval_response",
        "mcp_call",
        "custom_tool_call",
        "custom_tool_call_output",
        "tool_search_call",
        "tool_search_output",
        "additional_tools",
        "compaction",
        "compaction_trigger",
    )
)


def kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def bad(message: str, param: str, code: str = "invalid_value") -> GatewayError:
    return invalid_request(message, param=param, code=code)


# (reasoning text, or None when the blob does not open) for an item's encrypted_content
Unseal = Callable[[str], str | None]


@dataclass(slots=True)
class InputContext:
    """What folding the items needs besides the items."""

    # (namespace or None, client name) -> the name sent upstream
    upstream_names: dict[tuple[str | None, str], str] = field(default_factory=dict)
    hosted: str = "omit"  # the tenant's responses.hosted_tools: omit | reject
    unseal: Unseal | None = None
    # item id -> the item, for ``item_reference`` (filled from the response store)
    references: dict[str, dict[str, Any]] = field(default_factory=dict)
    # reasoning item id -> its original text (stored turns whose reasoning the client never saw whole)
    originals: dict[str, str] = field(default_factory=dict)
    omitted: list[str] = field(default_factory=list)  # item types left out (for a response header)


def _text_parts(content: list[Any], where: str, role: str) -> str | list[dict[str, Any]]:
    texts: list[str] = []
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise bad(f"{at} must be an object, got {kind(part)}.", at, "invalid_type")
        ptype = part.get("type")
        if ptype in TEXT_PARTS or ptype == "refusal":
            key = "refusal" if ptype == "refusal" else "text"
            text = part.get(key)
            if not isinstance(text, str):
                raise bad(f"{at}.{key} must be a string, got {kind(text)}.", f"{at}.{key}", "invalid_type")
            texts.append(text)
            parts.append({"type": "text", "text": text})
        elif ptype == "input_image" and role == "user":
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise bad(
                    f"{at}: only images given by image_url (a URL or a data: URL) are supported; this gateway "
                    "has no Files API for file_id.",
                    f"{at}.image_url",
                    "unsupported_value",
                )
            image: dict[str, Any] = {"url": url}
            if isinstance(part.get("detail"), str) and part["detail"] != "auto":
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise bad(
                f"{at}.type {ptype!r} is not supported in a {role} message (text parts"
                f"{', input_image' if role == 'user' else ''} only; no files or audio).",
                f"{at}.type",
                "unsupported_value",
            )
    if len(texts) == len(parts):
        return ("" if role == "assistant" else "\n").join(texts)
    return parts


def _content(item: dict[str, Any], where: str, role: str) -> str | list[dict[str, Any]]:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or an array, got {kind(content)}.", f"{where}.content")
    return _text_parts(content, where, role)


def _reasoning_text(item: dict[str, Any], where: str, ctx: InputContext) -> str:
    sealed = item.get("encrypted_content")
    if sealed is not None:
        if not isinstance(sealed, str) or ctx.unseal is None:
            raise bad(f"{where}.encrypted_content must be a string.", f"{where}.encrypted_content", "invalid_type")
        text = ctx.unseal(sealed)
        if text is None:
            raise bad(
                f"{where}.encrypted_content was not sealed by this gateway for this tenant, or was changed "
                "(or the gateway's sealing key changed since). Send the reasoning items back exactly as they "
                "were received, or leave encrypted_content out.",
                f"{where}.encrypted_content",
                "invalid_encrypted_content",
            )
        return text
    item_id = item.get("id")
    if isinstance(item_id, str) and item_id in ctx.originals:
        return ctx.originals[item_id]
    for key, ptype in (("content", "reasoning_text"), ("summary", "summary_text")):
        parts = item.get(key)
        if parts is None:
            continue
        if not isinstance(parts, list):
            raise bad(f"{where}.{key} must be an array, got {kind(parts)}.", f"{where}.{key}", "invalid_type")
        texts = []
        for j, part in enumerate(parts):
            if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                raise bad(f'{where}.{key}[{j}] must be {{"type": "{ptype}", "text": ...}}.', f"{where}.{key}[{j}]")
            texts.append(part["text"])
        if texts:
            return ("" if key == "content" else "\n\n").join(texts)
    return ""


def _arguments(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return orjson.dumps(value).decode()
    raise bad(f"{where}.arguments must be a JSON string, got {kind(value)}.", f"{where}.arguments", "invalid_type")


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise bad(
            f"{where}.{key}: a non-empty string is required, got {kind(value)}.",
            f"{where}.{key}",
            "missing_required_parameter" if value is None else "invalid_type",
        )
    return value


def _tool_output(item: dict[str, Any], where: str) -> str:
    output = item.get("output")
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        texts = []
        for j, part in enumerate(output):
            at = f"{where}.output[{j}]"
            if (
                not isinstance(part, dict)
                or part.get("type") not in TEXT_PARTS
                or not isinstance(part.get("text"), str)
            ):
                raise bad(
                    f"{at}: only text parts are supported in a function_call_output (upstreams take text tool "
                    "results).",
                    at,
                    "unsupported_value",
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad(f"{where}.output must be a string or an array, got {kind(output)}.", f"{where}.output", "invalid_type")


class _Folder:
    """Folds items into messages (see the module docstring)."""

    def __init__(self, ctx: InputContext) -> None:
        self.ctx = ctx
        self.messages: list[dict[str, Any]] = []
        self.turn: dict[str, Any] | None = None  # the assistant message being assembled
        self.reasoning: str | None = None  # from a reasoning item, for the next assistant message

    def flush(self) -> None:
        if self.turn is not None:
            self.messages.append(self.turn)
            self.turn = None
        self.reasoning = None  # reasoning with no assistant output after it has nothing to attach to

    def _open_turn(self, content: Any, item: dict[str, Any]) -> dict[str, Any]:
        turn: dict[str, Any] = {"role": "assistant", "content": content}
        # a turn shown without a reasoning item (a strip tenant's) is keyed by its first item's id
        reasoning = self.reasoning or self.ctx.originals.get(item.get("id"))  # type: ignore[arg-type]
        if reasoning:
            turn["reasoning_content"] = reasoning
        self.reasoning = None
        self.turn = turn
        return turn

    def add(self, item: Any, where: str) -> None:
        if not isinstance(item, dict):
            raise bad(f"{where} must be an object, got {kind(item)}.", where, "invalid_type")
        itype = item.get("type")
        if itype is None and "role" in item:
            itype = "message"
        if itype == "message":
            self._message(item, where)
        elif itype == "function_call":
            self._call(item, where)
        elif itype == "function_call_output":
            self.flush()
            call_id = _string(item, "call_id", where)
            self.messages.append({"role": "tool", "tool_call_id": call_id, "content": _tool_output(item, where)})
        elif itype == "reasoning":
            if self.turn is not None:
                self.flush()
            text = _reasoning_text(item, where, self.ctx)
            self.reasoning = (self.reasoning or "") + text if text else self.reasoning
        elif itype == "item_reference":
            ref = _string(item, "id", where)
            target = self.ctx.references.get(ref)
            if target is None or target.get("type") == "item_reference":
                raise bad(
                    f"{where}: no stored item with id {ref!r} for this tenant (stored responses expire, and "
                    "store: false responses are never stored).",
                    f"{where}.id",
                    "item_not_found",
                )
            self.add(target, where)
        elif itype in HOSTED_ITEMS:
            if self.ctx.hosted == "reject":
                raise bad(
                    f"{where}: {itype} items belong to a hosted tool this gateway's upstreams cannot run.",
                    f"{where}.type",
                    "unsupported_value",
                )
            if itype not in self.ctx.omitted:
                self.ctx.omitted.append(itype)
        else:
            raise bad(f"{where}.type {itype!r} is not a known input item type.", f"{where}.type")

    def _message(self, item: dict[str, Any], where: str) -> None:
        role = item.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role is {role!r}; expected one of user, assistant, system, developer.", f"{where}.role")
        content = _content(item, where, role)
        if role == "assistant":
            if self.turn is not None:
                self.flush()
            self._open_turn(content, item)
            return
        self.flush()
        self.messages.append({"role": ROLES[role], "content": content})

    def _call(self, item: dict[str, Any], where: str) -> None:
        name = _string(item, "name", where)
        namespace = item.get("namespace")
        if namespace is not None and not isinstance(namespace, str):
            raise bad(f"{where}.namespace must be a string.", f"{where}.namespace", "invalid_type")
        names = self.ctx.upstream_names
        # a name this request does not declare (tools changed mid-conversation) goes as it was called
        upstream = names.get((namespace, name)) or names.get((None, name)) or name
        call = {
            "id": _string(item, "call_id", where),
            "type": "function",
            "function": {"name": upstream, "arguments": _arguments(item.get("arguments", "{}"), where)},
        }
        turn = self.turn if self.turn is not None else self._open_turn("", item)
        turn.setdefault("tool_calls", []).append(call)


def input_messages(items: list[Any], ctx: InputContext, base: str = "input") -> list[dict[str, Any]]:
    """The chat messages for ``items`` (``base`` names them in errors)."""
    folder = _Folder(ctx)
    for i, item in enumerate(items):
        folder.add(item, f"{base}[{i}]")
    folder.flush()
    return folder.messages


def as_items(value: Any) -> list[Any]:
    """``input`` as a list of items: a string is one user message."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    if isinstance(value, list):
        return value
    raise bad(f"'input' must be a string or an array of items, got {kind(value)}.", "input", "invalid_type")
