"""Per-upstream request shaping: adapt a request to what the chosen upstream model accepts.

Declared per upstream model in the config (``upstreams.<name>.shaping.<model>``). Edits are made in
place on the parsed body, replacing values or removing keys, so the order of every other key and
every unknown field stays as the client sent them. ``tool_choice: "required"`` (and a named tool
choice) is rejected by K2 models; ``emulate`` removes it and appends the user message Moonshot's
migration guide recommends, ``reject`` answers 400 before any upstream is called.
"""

from __future__ import annotations

from typing import Any

from gateway.config import ModelShaping
from gateway.errors import invalid_request

TOOL_NUDGE = "Please select a tool to handle the current issue."
# OpenAI reasoning_effort values -> K3's levels (low | high | max)
_K3_EFFORT = {
    "none": "low",
    "minimal": "low",
    "low": "low",
    "medium": "high",
    "high": "high",
    "xhigh": "max",
    "max": "max",
}
_OFF = frozenset(("none", "minimal", "disabled"))


def _has_max_tokens(body: dict[str, Any]) -> bool:
    return any(
        isinstance(body.get(k), int) and not isinstance(body.get(k), bool)
        for k in ("max_tokens", "max_completion_tokens")
    )


def _forces_tool(choice: Any) -> bool:
    return choice == "required" or (isinstance(choice, dict) and choice.get("type") == "function")


def shape(body: dict[str, Any], rules: ModelShaping, default_max_tokens: int) -> bool:
    """Apply ``rules`` to ``body`` in place; returns whether anything changed. Raises 400 on ``reject``."""
    changed = False
    temp = body.get("temperature")
    if rules.temperature is not None and isinstance(temp, int | float) and not isinstance(temp, bool):
        low, high = rules.temperature
        clamped = min(max(temp, low), high)
        if clamped != temp:
            body["temperature"] = clamped
            changed = True
    if rules.thinking is not None:
        changed |= _reasoning_form(body, rules.thinking)
    if rules.default_max_tokens and not _has_max_tokens(body):
        body["max_tokens"] = default_max_tokens
        changed = True
    if rules.tool_choice_required != "pass" and _forces_tool(body.get("tool_choice")):
        if rules.tool_choice_required == "reject":
            raise invalid_request(
                "This model's upstream does not support tool_choice 'required' or a named tool; send "
                "tool_choice 'auto' (or 'none'), or ask the gateway operator to set "
                "tool_choice_required: emulate for it.",
                param="tool_choice",
                code="unsupported_tool_choice",
            )
        del body["tool_choice"]
        messages = body.get("messages")
        if isinstance(messages, list):
            body["messages"] = [*messages, {"role": "user", "content": TOOL_NUDGE}]
        changed = True
    return changed


def _reasoning_form(body: dict[str, Any], form: str) -> bool:
    thinking = body.get("thinking")
    effort = body.get("reasoning_effort")
    if thinking is None and effort is None:
        return False
    if form == "none":  # K2 Thinking always reasons and takes neither field
        body.pop("thinking", None)
        body.pop("reasoning_effort", None)
        return True
    if form == "type":  # K2.5/K2.6: thinking: {type: enabled|disabled}
        if isinstance(thinking, dict) and effort is None:
            return False
        if thinking is None or isinstance(thinking, bool):
            on = thinking if isinstance(thinking, bool) else str(effort) not in _OFF
            body.pop("reasoning_effort", None)
            body["thinking"] = {"type": "enabled" if on else "disabled"}
            return True
        body.pop("reasoning_effort", None)
        return True
    # K3: reasoning_effort low | high | max; it always reasons, so thinking is dropped
    if effort is not None:
        mapped = _K3_EFFORT.get(str(effort), "high")
        body.pop("thinking", None)
        if mapped != effort:
            body["reasoning_effort"] = mapped
        return True
    body.pop("thinking", None)
    off = thinking is False or (isinstance(thinking, dict) and thinking.get("type") == "disabled")
    body["reasoning_effort"] = "low" if off else "high"
    return True
