"""Tool names the upstream refuses, forwarded under an alias and mapped back in every answer.

Moonshot takes function names matching ``^[a-zA-Z_][a-zA-Z0-9-_]{2,63}$`` only (protocols.md §2.3),
while clients declare what OpenAI or Anthropic allow: Claude Code's ``LS`` (two characters), MCP
tools such as ``mcp__server__tool.name``, names longer than 64 characters. K2 also writes tool-call
ids as ``functions.NAME:IDX``, so a ``.`` or ``:`` inside a name would make the id ambiguous on a
vLLM too. Such a name goes to every upstream as an alias::

    <the name, other characters as '_', at most 53 of them>_<first 8 hex digits of sha256(name)>

(``_`` in front when the name starts with a digit or ``-``). The alias depends on the name only, so
a conversation sends the same bytes every turn and the provider's prompt cache keeps hitting; when
it would collide with another tool's name in the same request, more digits of the hash are used.
Names that already pass go unchanged, so requests with valid names keep their bytes.

The request's tools, ``tool_choice`` and history (assistant ``tool_calls``, which Anthropic
``tool_use`` blocks become, and the ``name`` of tool results) are rewritten; :class:`ClientToolNames`
maps the aliases back in the answer, stream and non-stream, so the client only sees its own names.
Tool-call ids are never rewritten (K2 is trained on them, §2.2): an id may carry the alias, which is
just an opaque id to the client and comes back unchanged in the next turn.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, ClassVar

from gateway.transforms.base import Chunk
from gateway.transforms.order import CLIENT_NAMES

NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9\-_]{2,63}$")
_OTHER = re.compile(r"[^a-zA-Z0-9_-]")
MAX_NAME = 64
HASH_DIGITS = 8


def acceptable(name: str) -> bool:
    """Whether the upstream takes ``name`` as it is (provider builtins such as ``$web_search`` pass)."""
    return name.startswith("$") or NAME_RE.match(name) is not None


def alias_of(name: str, digits: int = HASH_DIGITS) -> str:
    """The alias of a name the upstream refuses (see the module docstring)."""
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:digits]
    base = _OTHER.sub("_", name)
    if not base or not (base[0].isalpha() or base[0] == "_"):
        base = "_" + base
    base = base[: MAX_NAME - 1 - digits]
    return f"{base}_{digest}"


def plan_aliases(names: list[str]) -> dict[str, str]:
    """Client name -> alias for the names of one request's tools that the upstream refuses."""
    taken = {n for n in names if acceptable(n)}
    aliases: dict[str, str] = {}
    for name in names:
        if acceptable(name) or name in aliases:
            continue
        digits = HASH_DIGITS
        alias = alias_of(name, digits)
        while alias in taken and digits < 64:  # another tool is really called that: longer hash
            digits += 4
            alias = alias_of(name, digits)
        taken.add(alias)
        aliases[name] = alias
    return aliases


def _upstream_name(name: Any, aliases: dict[str, str]) -> Any:
    if not isinstance(name, str) or not name or acceptable(name):
        return name
    return aliases.get(name) or alias_of(name)  # a tool of an earlier turn no longer declared


def alias_history(messages: Any, aliases: dict[str, str]) -> bool:
    """Rewrite refused names in the conversation in place; whether anything changed.

    Names of tools an earlier turn declared but this one does not are aliased too (by name alone),
    so the history keeps the bytes it had when they were declared."""
    changed = False
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        if message.get("role") == "assistant":
            for call in message.get("tool_calls") or ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    name = function.get("name")
                    new = _upstream_name(name, aliases)
                    if new != name:
                        function["name"] = new
                        changed = True
        elif message.get("role") == "tool" and "name" in message:
            new = _upstream_name(message["name"], aliases)
            if new != message["name"]:
                message["name"] = new
                changed = True
    return changed


class ClientToolNames:
    """Response transform: aliases in tool calls (and legacy ``function_call``) back to the client's
    names. Runs after the reasoning store has recorded the turn under the names the upstream saw."""

    stage: ClassVar[int] = CLIENT_NAMES

    __slots__ = ("_names",)

    def __init__(self, aliases: dict[str, str]) -> None:
        self._names = {alias: name for name, alias in aliases.items()}

    def _rename(self, function: Any) -> None:
        if isinstance(function, dict):
            name = function.get("name")
            if isinstance(name, str) and name in self._names:
                function["name"] = self._names[name]

    def _holder(self, holder: Any) -> None:
        if not isinstance(holder, dict):
            return
        for call in holder.get("tool_calls") or ():
            if isinstance(call, dict):
                self._rename(call.get("function"))
        self._rename(holder.get("function_call"))

    def whole(self, response: dict[str, Any]) -> None:
        for choice in response.get("choices") or ():
            if isinstance(choice, dict):
                self._holder(choice.get("message"))

    def chunk(self, chunk: Chunk) -> list[Chunk]:
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict):
                self._holder(choice.get("delta"))
        return [chunk]

    def finish(self) -> list[Chunk]:
        return []
