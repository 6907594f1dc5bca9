"""Anthropic's reasoning and context controls → what a chat/completions upstream understands.

``thinking`` and ``output_config.effort`` become the OpenAI form, which the per-upstream shaping
step (``gateway/upstreams/shaping.py``) turns into each model's own (K2 Thinking: removed, it always
reasons; K2.6: ``thinking: {type}``; K3: ``reasoning_effort: low|high|max``):

* ``output_config.effort`` ``low|medium|high|xhigh|max`` → ``reasoning_effort`` (``max`` → ``xhigh``,
  OpenAI's top level, which shaping maps to K3's ``max``);
* ``thinking: enabled`` with ``budget_tokens`` and no effort → ``reasoning_effort`` by budget
  (≤ 4096 low, ≤ 16384 medium, above high); ``adaptive`` leaves the effort to ``output_config``;
* ``thinking: disabled`` (and ``between_tools``) → ``thinking: {"type": "disabled"}`` (Moonshot's
  switch); reasoning models that cannot turn it off still reason, and the answer carries no
  thinking blocks;
* ``display``: ``summarized`` (or ``updates``) returns K2's reasoning as thinking blocks, ``omitted``
  returns them empty (the reasoning stays with the gateway for the tool loop).

``context_management.edits`` are applied to the upstream request where they mean something there:

* ``clear_thinking_20251015`` drops the reasoning of assistant turns older than ``keep`` (default
  the last one; ``"all"`` keeps everything), except on tool-call turns: K2 refuses those without
  their reasoning (protocols.md §2.1), and the reasoning step would put it back anyway;
* ``clear_tool_uses_20250919`` replaces the results of the oldest tool calls with a short note
  once the prompt passes ``trigger`` (default 100,000 input tokens, estimated at 4 bytes a token, or
  a count of tool uses), keeping the last ``keep`` (default 3) and ``exclude_tools``, and only when
  at least ``clear_at_least`` tokens go; ``clear_tool_inputs`` is not applied (the calls are what
  the gateway finds their reasoning by) and is named in ``x-gateway-ignored``.

Other edit types are named there too. What was applied comes back as Anthropic's
``context_management.applied_edits``.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import invalid_request
from gateway.translate.anthropic_util import Notes, kind_of

EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh", "max": "xhigh"}
THINKING_TYPES = ("enabled", "adaptive", "disabled", "between_tools")
DISPLAYS = ("summarized", "omitted", "updates")
CLEARED = "[tool result cleared to save context]"
DEFAULT_TRIGGER_TOKENS = 100_000
DEFAULT_KEEP_TOOL_USES = 3
BYTES_PER_TOKEN = 4


def _budget_effort(budget: int) -> str:
    return "low" if budget <= 4096 else "medium" if budget <= 16384 else "high"


def effort_of(value: Any, where: str) -> str:
    if value not in EFFORTS:
        raise invalid_request(f"{where} must be one of {', '.join(EFFORTS)}, got {value!r}.", param=where)
    return EFFORTS[value]


def thinking_controls(thinking: Any, effort: str | None, out: dict[str, Any]) -> str:
    """Set ``out``'s reasoning fields; returns the display: summarized, omitted or hidden."""
    display = "summarized"
    off = False
    if thinking is not None:
        if not isinstance(thinking, dict):
            raise invalid_request(f"thinking must be an object, got {kind_of(thinking)}.", param="thinking")
        kind = thinking.get("type")
        if kind not in THINKING_TYPES:
            raise invalid_request(
                f"thinking.type must be one of {', '.join(THINKING_TYPES)}, got {kind!r}.", param="thinking.type"
            )
        shown = thinking.get("display")
        if shown is not None and shown not in DISPLAYS:
            raise invalid_request(
                f"thinking.display must be one of {', '.join(DISPLAYS)}, got {shown!r}.", param="thinking.display"
            )
        if shown == "omitted":
            display = "omitted"
        budget = thinking.get("budget_tokens")
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
            raise invalid_request("thinking.budget_tokens must be a positive integer.", param="thinking.budget_tokens")
        if kind in ("disabled", "between_tools"):
            off, display = True, "hidden"
        elif kind == "enabled" and effort is None and budget is not None:
            effort = _budget_effort(budget)
    if off:
        out["thinking"] = {"type": "disabled"}
    elif effort is not None:
        out["reasoning_effort"] = effort
    return display


def _estimate(value: Any) -> int:
    return len(orjson.dumps(value)) // BYTES_PER_TOKEN


def _amount(value: Any, where: str, default: int) -> tuple[str | None, int]:
    """A ``{type, value}`` threshold (``trigger``, ``keep``, ``clear_at_least``)."""
    if value is None:
        return None, default
    if not isinstance(value, dict) or not isinstance(value.get("value"), int) or value["value"] < 0:
        raise invalid_request(f"{where} must be an object such as {{type, value}} with a value >= 0.", param=where)
    return value.get("type"), value["value"]


def _clear_thinking(edit: dict[str, Any], messages: list[dict[str, Any]], where: str) -> dict[str, Any] | None:
    keep = edit.get("keep")
    if keep == "all" or (isinstance(keep, dict) and keep.get("type") == "all"):
        return None
    _, turns = _amount(keep, f"{where}.keep", 1)
    assistants = [m for m in messages if m["role"] == "assistant"]
    older = assistants[: max(0, len(assistants) - turns)]
    cleared = tokens = 0
    for msg in older:
        if msg.get("tool_calls") or not msg.get("reasoning_content"):
            continue  # K2 needs the reasoning of tool-call turns
        tokens += _estimate(msg.pop("reasoning_content"))
        cleared += 1
    if not cleared:
        return None
    return {"type": edit["type"], "cleared_thinking_turns": cleared, "cleared_input_tokens": tokens}


def _clear_tool_uses(
    edit: dict[str, Any], messages: list[dict[str, Any]], where: str, notes: Notes
) -> dict[str, Any] | None:
    if edit.get("clear_tool_inputs"):
        notes.ignore(f"{where}.clear_tool_inputs")
    trigger_kind, trigger = _amount(edit.get("trigger"), f"{where}.trigger", DEFAULT_TRIGGER_TOKENS)
    _, keep = _amount(edit.get("keep"), f"{where}.keep", DEFAULT_KEEP_TOOL_USES)
    _, at_least = _amount(edit.get("clear_at_least"), f"{where}.clear_at_least", 0)
    excluded = edit.get("exclude_tools") or []
    if not isinstance(excluded, list):
        raise invalid_request(f"{where}.exclude_tools must be an array of tool names.", param=f"{where}.exclude_tools")
    names: dict[str, str] = {}
    for msg in messages:
        for call in msg.get("tool_calls") or ():
            names[call["id"]] = call["function"]["name"]
    results = [m for m in messages if m["role"] == "tool"]
    size = len(results) if trigger_kind == "tool_uses" else _estimate(messages)
    if size <= trigger:
        return None
    clearable = [m for m in results[: max(0, len(results) - keep)] if names.get(m["tool_call_id"]) not in excluded]
    clearable = [m for m in clearable if m["content"] != CLEARED]
    tokens = sum(_estimate(m["content"]) for m in clearable)
    if not clearable or tokens < at_least:
        return None
    for msg in clearable:
        msg["content"] = CLEARED
    return {"type": edit["type"], "cleared_tool_uses": len(clearable), "cleared_input_tokens": tokens}


def context_edits(config: Any, messages: list[dict[str, Any]], notes: Notes) -> list[dict[str, Any]]:
    """Apply ``context_management.edits`` to the translated messages; the applied edits."""
    if config is None:
        return []
    if not isinstance(config, dict):
        raise invalid_request("context_management must be an object.", param="context_management")
    edits = config.get("edits") or []
    if not isinstance(edits, list):
        raise invalid_request("context_management.edits must be an array.", param="context_management.edits")
    applied: list[dict[str, Any]] = []
    for i, edit in enumerate(edits):
        where = f"context_management.edits.{i}"
        if not isinstance(edit, dict) or not isinstance(edit.get("type"), str):
            raise invalid_request(f"{where} must be an object with a type.", param=where)
        kind = edit["type"]
        if kind.startswith("clear_thinking_"):
            done = _clear_thinking(edit, messages, where)
        elif kind.startswith("clear_tool_uses_"):
            done = _clear_tool_uses(edit, messages, where, notes)
        else:
            notes.ignore(where, kind)
            continue
        if done is not None:
            applied.append(done)
    return applied
