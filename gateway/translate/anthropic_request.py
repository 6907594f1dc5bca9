"""An Anthropic Messages request → a chat/completions body (protocols.md §6.4).

``system`` becomes the first message (with any leading ``role: "system"`` messages), without the
``x-anthropic-billing-header:`` text block Claude Code puts first: it is attribution for Anthropic's
billing, not instructions, and it names the previous message id, so sent upstream it would change
the first bytes of every turn's prompt and no turn would hit the provider's prefix cache. The messages,
tools and controls are translated by ``anthropic_blocks``, ``anthropic_tools`` and
``anthropic_controls``. ``tool_choice`` maps to OpenAI's, ``metadata.user_id`` to ``user`` (see
:func:`end_user`),
``output_config.format`` (a JSON schema) to ``response_format``.

The rule for the rest of the body: a field the gateway translates is translated; hints that mean
nothing to a chat/completions upstream (``cache_control``, ``service_tier``, ``inference_geo``,
``speed``, ``context_hint``, the rest of ``metadata``) are accepted silently; any other field —
one of a later API version, ``top_k``, ``mcp_servers``, ``container`` — is accepted, not sent
upstream, and named in the ``x-gateway-ignored`` response header. Mistakes in what the gateway
translates are 400s (the front end gives them Anthropic's error shape).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.errors import invalid_request
from gateway.translate.anthropic_blocks import Conversation
from gateway.translate.anthropic_controls import context_edits, effort_of, thinking_controls
from gateway.translate.anthropic_tools import ToolSet, tool_choice
from gateway.translate.anthropic_util import Notes, kind_of

TRANSLATED = frozenset(
    (
        "model",
        "messages",
        "system",
        "max_tokens",
        "stream",
        "temperature",
        "top_p",
        "stop_sequences",
        "tools",
        "tool_choice",
        "metadata",
        "thinking",
        "output_config",
        "context_management",
    )
)
HINTS = frozenset(("cache_control", "service_tier", "inference_geo", "speed", "context_hint"))
OUTPUT_CONFIG_KEYS = frozenset(("effort", "format"))
BILLING = "x-anthropic-billing-header:"


@dataclass(slots=True)
class Translation:
    """The chat/completions body and what the answer needs to know about the request."""

    body: dict[str, Any]
    notes: Notes
    display: str = "summarized"  # thinking blocks: summarized (K2's text), omitted (empty) or hidden
    applied_edits: list[dict[str, Any]] = field(default_factory=list)
    context_management: bool = False  # the request asked for edits: the answer reports them


def _output_config(config: Any, notes: Notes, out: dict[str, Any]) -> str | None:
    """The effort it asks for; ``format`` becomes ``response_format``."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise invalid_request(f"output_config must be an object, got {kind_of(config)}.", param="output_config")
    for key in config:
        if key not in OUTPUT_CONFIG_KEYS and config[key] is not None:
            notes.ignore(f"output_config.{key}")
    fmt = config.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise invalid_request(
                'output_config.format must be {"type": "json_schema", "schema": {...}}.', param="output_config.format"
            )
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    effort = config.get("effort")
    return None if effort is None else effort_of(effort, "output_config.effort")


def end_user(user_id: str) -> str:
    """``metadata.user_id`` as the ledger's user. Claude Code 2.1 sends a JSON object with its
    ``device_id``, ``account_uuid`` and ``session_id``: the account (else the device) is the user,
    so one person's sessions add up in spend reports instead of each being a user of its own."""
    if not user_id.startswith("{"):
        return user_id
    try:
        found = orjson.loads(user_id)
    except orjson.JSONDecodeError:
        return user_id
    if isinstance(found, dict):
        for key in ("account_uuid", "device_id"):
            if isinstance(found.get(key), str) and found[key]:
                return str(found[key])
    return user_id


def _max_tokens(body: dict[str, Any], counting: bool) -> int:
    max_tokens = body.get("max_tokens", 1 if counting else None)
    if max_tokens is None:
        raise invalid_request("max_tokens: Field required.", param="max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise invalid_request("max_tokens: must be an integer >= 1.", param="max_tokens")
    return max_tokens


def translate(body: Any, *, counting: bool = False) -> Translation:
    """The chat/completions translation of an Anthropic Messages request; raises 400s for bad input.

    ``counting``: a ``count_tokens`` request, which carries no ``max_tokens``."""
    if not isinstance(body, dict):
        raise invalid_request(f"The request body must be a JSON object, got {kind_of(body)}.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request("model: Field required (a non-empty string).", param="model")
    max_tokens = _max_tokens(body, counting)
    notes = Notes()
    tools = ToolSet(body.get("tools"), notes)
    talk = Conversation(tools, notes)
    talk.add(body.get("messages"))
    messages = talk.out
    system = body.get("system")
    if isinstance(system, list):  # Claude Code's attribution line changes every turn: not prompt
        system = [b for b in system if not (isinstance(b, dict) and str(b.get("text")).startswith(BILLING))]
    texts = [talk.text_of(system, "system")] if system is not None else []
    text = "\n\n".join(t for t in [*texts, *talk.system] if t)
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
    upstream_tools = tools.upstream()
    if upstream_tools:
        out["tools"] = upstream_tools
    if body.get("tool_choice") is not None:
        choice, serial = tool_choice(body["tool_choice"])
        if upstream_tools:  # a choice without tools (all deferred, say) is refused upstream
            out["tool_choice"] = choice
            if serial:
                out["parallel_tool_calls"] = False
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = end_user(metadata["user_id"])
    effort = _output_config(body.get("output_config"), notes, out)
    if talk.effort is not None:
        effort = effort_of(talk.effort, "output_config.effort")
    display = thinking_controls(body.get("thinking"), effort, out)
    config = body.get("context_management")
    applied = context_edits(config, messages, notes)
    for key in body:
        if key not in TRANSLATED and key not in HINTS:
            notes.ignore(key)
    return Translation(out, notes, display, applied, config is not None)


def to_chat_body(body: Any, *, counting: bool = False) -> dict[str, Any]:
    """Just the chat/completions body of :func:`translate`."""
    return translate(body, counting=counting).body
