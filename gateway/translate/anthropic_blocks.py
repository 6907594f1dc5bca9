"""Anthropic ``messages`` → chat/completions messages (protocols.md §6.4).

``tool_use`` blocks become ``tool_calls`` (input serialized), ``tool_result`` blocks ``role: tool``
messages in order; assistant ``thinking`` blocks go out as ``reasoning_content``, because K2 refuses
a tool-call turn whose reasoning is missing (§2.1). An empty thinking block (what a client gets
back with ``display: "omitted"``) carries no reasoning, so the reasoning step can put the kept one
back.

``role: "system"`` messages inside ``messages`` (Claude Code sends its environment and reminders
so) are folded in order: before the first user or assistant message they join the system prompt;
later, their text goes into the user turn they follow, wrapped in ``<system-reminder>`` tags (the
convention Claude Code's own prompt teaches for system-added text in user turns), or into a new
user message when they follow an assistant turn or tool results. Chat/completions upstreams do not
agree on system messages after the first (K2's template renders them, many vLLM templates refuse
them), and a conversation that ends in a system turn is not one K2 was trained to answer; a user
turn is accepted everywhere and keeps the order. ``clear_at: "next_user_message"`` drops a system
message once a later user turn exists (a user message that is not only tool results: the tool loop
of the turn it belongs to keeps it), and its ``output_config.effort`` sets the effort of that turn;
its ``tool_addition``/``tool_removal`` blocks change the tool set (``anthropic_tools.py``).

Block types no chat/completions upstream can take (PDF documents, server-tool results, ...) are
left out and named in ``x-gateway-ignored``; malformed known blocks are 400s.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import invalid_request
from gateway.translate.anthropic_tools import ToolSet
from gateway.translate.anthropic_util import Notes, kind_of

REMINDER = "<system-reminder>\n{}\n</system-reminder>"


class Conversation:
    """Translates one request's messages; ``system`` collects leading system messages' text."""

    __slots__ = ("effort", "notes", "out", "system", "tools")

    def __init__(self, tools: ToolSet, notes: Notes) -> None:
        self.tools = tools
        self.notes = notes
        self.out: list[dict[str, Any]] = []
        self.system: list[str] = []
        self.effort: Any = None  # output_config.effort of the last system message that set one

    # -- text-bearing blocks --------------------------------------------------------------------

    def _document(self, block: dict[str, Any], where: str) -> str | None:
        source = block.get("source")
        if isinstance(source, dict) and source.get("type") == "text" and isinstance(source.get("data"), str):
            text = source["data"]
        elif isinstance(source, dict) and source.get("type") == "content":
            text = self.text_of(source.get("content", ""), f"{where}.source.content")
        else:
            kind = source.get("media_type") or source.get("type") if isinstance(source, dict) else None
            self.notes.ignore(where, f"document {kind}")
            return None
        title = block.get("title")
        return f"{title}\n{text}" if isinstance(title, str) and title else text

    def _search_result(self, block: dict[str, Any], where: str) -> str:
        body = self.text_of(block.get("content", ""), f"{where}.content")
        head = [str(block[k]) for k in ("title", "source") if isinstance(block.get(k), str) and block[k]]
        return "\n".join([*head, body])

    def text_of(self, blocks: Any, where: str) -> str:
        """A string, or the text of a list of blocks (system prompts, tool results, documents)."""
        if isinstance(blocks, str):
            return blocks
        if not isinstance(blocks, list):
            raise invalid_request(f"{where} must be a string or an array of content blocks, got {kind_of(blocks)}.")
        parts = [self._block_text(block, f"{where}.{j}") for j, block in enumerate(blocks)]
        return "\n".join(p for p in parts if p is not None)

    def _block_text(self, block: Any, at: str) -> str | None:
        """One block's text; None for a block that carries none (noted when it is left out)."""
        if not isinstance(block, dict):
            raise invalid_request(f"{at} must be an object, got {kind_of(block)}.")
        kind = block.get("type")
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise invalid_request(f"{at}.text must be a string.")
            return str(block["text"])
        if kind == "tool_reference" and isinstance(block.get("tool_name"), str):
            self.tools.load(block["tool_name"])  # a tool search result: the tool is callable now
            return f"Tool available: {block['tool_name']}"
        if kind == "document":
            return self._document(block, at)
        if kind == "search_result":
            return self._search_result(block, at)
        if kind != "image":  # images in tool results: text-only upstreams cannot take them
            self.notes.ignore(at, str(kind))
        return None

    # -- messages ---------------------------------------------------------------------------------

    def _user(self, content: list[Any], where: str) -> None:
        parts: list[dict[str, Any]] = []
        for j, block in enumerate(content):
            at = f"{where}.content.{j}"
            if not isinstance(block, dict):
                raise invalid_request(f"{at} must be an object, got {kind_of(block)}.")
            kind = block.get("type")
            if kind == "tool_result":
                call_id = block.get("tool_use_id")
                if not isinstance(call_id, str) or not call_id:
                    raise invalid_request(f"{at}.tool_use_id: Field required.")
                text = self.text_of(block.get("content") or "", f"{at}.content")
                self.out.append({"role": "tool", "tool_call_id": call_id, "content": text})
            elif kind == "text":
                if not isinstance(block.get("text"), str):
                    raise invalid_request(f"{at}.text must be a string.")
                parts.append({"type": "text", "text": block["text"]})
            elif kind == "image":
                parts.append(_image_part(block, at))
            elif kind in ("document", "search_result"):
                found = self._block_text(block, at)
                if found:
                    parts.append({"type": "text", "text": found})
            else:
                self.notes.ignore(at, str(kind))
        if not parts:
            return
        if all(p["type"] == "text" for p in parts):
            self.out.append({"role": "user", "content": "\n".join(p["text"] for p in parts)})
        else:
            self.out.append({"role": "user", "content": parts})

    def _assistant(self, content: list[Any], where: str) -> None:
        texts: list[str] = []
        thinking: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(content):
            at = f"{where}.content.{j}"
            if not isinstance(block, dict):
                raise invalid_request(f"{at} must be an object, got {kind_of(block)}.")
            kind = block.get("type")
            if kind == "text":
                texts.append(str(block.get("text", "")))
            elif kind == "thinking":
                thinking.append(str(block.get("thinking") or ""))
            elif kind == "redacted_thinking":
                continue
            elif kind == "tool_use":
                call_id, name = block.get("id"), block.get("name")
                if not isinstance(call_id, str) or not isinstance(name, str):
                    raise invalid_request(f"{at}: a tool_use block needs a string id and name.")
                self.tools.load(name)
                arguments = orjson.dumps(block.get("input") or {}).decode()
                calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
            else:  # server_tool_use, *_tool_result, ...: Anthropic-served, nothing upstream made them
                self.notes.ignore(at, str(kind))
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        reasoning = "".join(thinking)
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
        self.out.append(message)

    def _system(self, message: dict[str, Any], where: str, later_user: bool) -> None:
        config = message.get("output_config")
        if isinstance(config, dict) and config.get("effort") is not None and not later_user:
            self.effort = config["effort"]
        if message.get("clear_at") == "next_user_message" and later_user:
            return
        content = message.get("content")
        if content is None:
            return
        if isinstance(content, list):
            texts: list[str] = []
            for j, block in enumerate(content):
                at = f"{where}.content.{j}"
                if isinstance(block, dict) and block.get("type") in ("tool_addition", "tool_removal"):
                    self.tools.change(block, at)
                else:
                    found = self._block_text(block, at)
                    if found:
                        texts.append(found)
            text = "\n".join(texts)
        else:
            text = self.text_of(content, f"{where}.content")
        if not text:
            return
        if not self.out:
            self.system.append(text)
            return
        wrapped = REMINDER.format(text)
        last = self.out[-1]
        if last["role"] != "user":
            self.out.append({"role": "user", "content": wrapped})
        elif isinstance(last["content"], str):
            last["content"] = f"{last['content']}\n\n{wrapped}"
        else:
            last["content"].append({"type": "text", "text": wrapped})

    def add(self, messages: Any) -> None:
        if messages is None:
            raise invalid_request("messages: Field required.", param="messages")
        if not isinstance(messages, list) or not messages:
            raise invalid_request("messages: must be a non-empty array.", param="messages")
        last_turn = max((i for i, m in enumerate(messages) if _starts_turn(m)), default=-1)
        for i, message in enumerate(messages):
            where = f"messages.{i}"
            if not isinstance(message, dict):
                raise invalid_request(f"{where} must be an object, got {kind_of(message)}.")
            role, content = message.get("role"), message.get("content")
            if role == "system":
                self._system(message, where, later_user=i < last_turn)
                continue
            if role not in ("user", "assistant"):
                raise invalid_request(f"{where}.role must be 'user', 'assistant' or 'system', got {role!r}.")
            if isinstance(content, str):
                self.out.append({"role": role, "content": content})
                continue
            if not isinstance(content, list):
                raise invalid_request(f"{where}.content must be a string or an array, got {kind_of(content)}.")
            if role == "user":
                self._user(content, where)
            else:
                self._assistant(content, where)


def _starts_turn(message: Any) -> bool:
    """A user message that is not only tool results: the start of a new user turn."""
    if not isinstance(message, dict) or message.get("role") != "user":
        return False
    content = message.get("content")
    if not isinstance(content, list):
        return True
    return any(not isinstance(b, dict) or b.get("type") != "tool_result" for b in content)


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise invalid_request(f"{where}.source must be a base64 or url image source.")
    return {"type": "image_url", "image_url": {"url": url}}
