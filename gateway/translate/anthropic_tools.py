"""Which of an Anthropic request's tools go upstream, and in what form.

Custom tools (``{name, description, input_schema}``, ``type`` absent or ``"custom"``) keep
Anthropic's form: the tool step (``gateway/tools/schemas.py``) validates them and names
``input_schema`` in its errors. Their Anthropic-only fields (``cache_control``, ``strict``,
``eager_input_streaming``, ``input_examples``, ``allowed_callers``, ...) are accepted and not sent:
a chat/completions upstream has nothing to do with them.

The set the upstream sees is the set the model may call at the end of the conversation:

* ``defer_loading: true`` (tool search): left out until a ``tool_reference`` block in a tool result
  (or a ``tool_addition`` that references it, or an assistant ``tool_use`` of it) loads it;
* ``tool_addition`` / ``tool_removal`` blocks in ``role: "system"`` messages (mid-conversation tool
  changes) add a definition or a declared tool, or withdraw one, in conversation order;
* typed tools (Anthropic's server and built-in tools: ``web_search_*``, ``web_fetch_*``,
  ``code_execution_*``, ``tool_search_tool_*``, ``bash_*``, ``text_editor_*``, ``computer_*``,
  ``memory_*``, ``mcp_toolset``, ``advisor_*``, ...) are run or defined by Anthropic's servers, which
  no chat/completions upstream is: they are left out and named in ``x-gateway-ignored``.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import invalid_request
from gateway.translate.anthropic_util import Notes, kind_of

CUSTOM_TYPES = (None, "custom")
SENT_KEYS = ("name", "description", "input_schema")


class ToolSet:
    """The request's tools, as the conversation changes them; :meth:`upstream` is the final set."""

    __slots__ = ("_active", "_deferred", "_defs", "notes")

    def __init__(self, tools: Any, notes: Notes) -> None:
        self.notes = notes
        # (name, the form sent upstream), in declaration order; a duplicate name stays a duplicate
        # (the tool step refuses it, as Anthropic does)
        self._defs: list[tuple[str, dict[str, Any]]] = []
        self._deferred: set[str] = set()
        self._active: set[str] = set()
        if tools is None:
            return
        if not isinstance(tools, list):
            raise invalid_request(f"tools must be an array, got {kind_of(tools)}.", param="tools")
        for i, tool in enumerate(tools):
            name = self._define(tool, f"tools.{i}")
            if name is None:
                continue
            if tool.get("defer_loading") is True:
                self._deferred.add(name)
            else:
                self._active.add(name)

    def _define(self, tool: Any, where: str, replace: bool = False) -> str | None:
        """Record a custom tool's definition (its name), or note a typed tool as left out (None)."""
        if not isinstance(tool, dict):
            raise invalid_request(f"{where} must be an object, got {kind_of(tool)}.", param=where)
        kind = tool.get("type")
        if kind not in CUSTOM_TYPES:
            self.notes.ignore(where, str(kind))
            return None
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            name = f"#{where}"  # kept: the tool step names the missing name in its 400
        if "input_schema" not in tool:
            raise invalid_request(f"{where} ({tool.get('name')!r}).input_schema: Field required.", param=where)
        sent = {k: tool[k] for k in SENT_KEYS if k in tool}
        if replace:  # a tool_addition that defines a tool again replaces it
            self._defs = [(n, d) for n, d in self._defs if n != name]
        self._defs.append((name, sent))
        return name

    def load(self, name: str) -> None:
        """A ``tool_reference`` (tool search result) or a call of the tool: it is available now."""
        if any(n == name for n, _ in self._defs):
            self._active.add(name)

    def change(self, block: dict[str, Any], where: str) -> None:
        """A ``tool_addition`` or ``tool_removal`` block of a system message."""
        ref = block.get("tool")
        if not isinstance(ref, dict):
            raise invalid_request(f"{where}.tool: Field required (an object).", param=where)
        kind = ref.get("type")
        adding = block.get("type") == "tool_addition"
        if kind == "tool_reference" and isinstance(ref.get("name"), str):
            name = ref["name"]
            if adding:
                self.load(name)
            else:
                self._active.discard(name)
            return
        if adding and kind == "tool_definition":
            name = self._define(ref.get("definition"), f"{where}.tool.definition", replace=True)
            if name is not None:
                self._active.add(name)
            return
        self.notes.ignore(where, f"{block.get('type')} {kind}")

    def upstream(self) -> list[dict[str, Any]]:
        return [sent for name, sent in self._defs if name in self._active]


def tool_choice(choice: Any) -> tuple[Any, bool]:
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
