"""Request side of the reasoning modes, run once a candidate is chosen (its upstream decides the
reasoning field) and before the budget reservation (restored reasoning is prompt the budget pays).

* Reasoning a client sends back goes upstream in the field that upstream reads (Moonshot
  ``reasoning_content``, vLLM >= 0.16 ``reasoning``), for every tenant.
* For every tenant (pass included, unless ``keep_for_tool_loops: false``), each assistant
  tool-call message that arrives without reasoning gets back the reasoning the gateway served with
  those tool calls (``restore.py``; which source wins is decided there), and what it cannot give
  back is decided per upstream (``fallback.py``): the placeholder, nothing, or a 400 for a tenant
  with ``when_missing: reject``, raised here, before any reservation or upstream call.
* The response transforms for the tenant's mode are set on the exchange; a pass tenant whose clients
  read the upstream's own field name (and without full capture) gets none for requests without
  tools: their bytes are relayed. A request with tools has the tool step's transforms already, and
  gets the recorder that keeps the reasoning of the tool calls it answers with.
  On an upstream with ``think_in_content`` (a vLLM without a reasoning parser) a pass tenant gets
  the reasoning moved out of the content into its field, as strip/redact tenants get it removed:
  what it echoes back then reaches the upstream in the reasoning field, not inside the content.

Reasoning of older, completed turns is not dropped to save tokens, for three reasons. Moonshot
checks every assistant tool-call message of the history, not only the current loop's (protocols.md
§2.1), so "dropping" could only mean swapping it for the placeholder. K2's chat template already
renders those turns with empty think blocks, so on vLLM (billed on the rendered prompt) there is
nothing to save; whether Moonshot bills the reasoning it discards is not settled (§8), and the
simulator counts request bytes, so it cannot measure it either. And rewriting older messages changes
bytes the provider's prompt cache already holds. Without a measurement that shows a saving, the
gateway sends the history as the conversation had it.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.exchange import Exchange, Runtime
from gateway.reasoning.fallback import missing_reasoning, requires_reasoning
from gateway.reasoning.modes import ReasoningTransform, Turn
from gateway.reasoning.record import TurnRecorder
from gateway.reasoning.redact import redactor_for
from gateway.reasoning.restore import Restoration, client_reasoning, put_reasoning, restore_history, tool_turns
from gateway.reasoning.store import ReasoningStore
from gateway.tools.aliases import alias_history
from gateway.transforms.order import add_transform

__all__ = ["prepare_reasoning", "put_reasoning", "recorder_of"]

OTHER_FIELD = {"reasoning_content": b'"reasoning"', "reasoning": b'"reasoning_content"'}


def _rename_sent(messages: list[Any], name: str) -> bool:
    changed = False
    for msg in messages:
        if isinstance(msg, dict) and msg.get("role") == "assistant":
            text = client_reasoning(msg)
            if text is not None:
                changed = put_reasoning(msg, name, text) or changed
    return changed


async def _restore(rt: Runtime, ex: Exchange, messages: list[Any], store: ReasoningStore | None) -> Restoration:
    """Reasoning into the tool-call turns of the history (or the reject 400)."""
    assert ex.candidate is not None
    turns = tool_turns(messages)  # the body is parsed already: a walk over its messages
    if not turns:
        return Restoration()  # the common first turn: no tool-call history
    tenant = ex.tenant
    policy = tenant.reasoning
    upstream = rt.upstreams[ex.candidate.upstream]
    # a turn without tools skipped the tool step: its history still names tools the way they went
    # upstream (and were kept) in the turns that declared them; a pass tenant's history that carries
    # all its reasoning is left as the client sent it
    sent = {i: client_reasoning(messages[i]) for i in turns}
    looks_up = policy.mode != "pass" or None in sent.values()
    aliased = looks_up and "tools" not in ex.body and alias_history(messages, {})
    result = await restore_history(
        store,
        tenant.name,
        policy.mode,
        messages,
        upstream.reasoning_field,
        required=requires_reasoning(upstream),
        reject=policy.when_missing == "reject",
        turns=turns,
        sent=sent,
    )
    if result.missing is not None:
        shown = None if policy.mode == "strip" else policy.field
        raise missing_reasoning(result.missing, ex.model, ex.candidate.label, shown)
    result.changed = result.changed or aliased
    return result


async def prepare_reasoning(rt: Runtime, ex: Exchange) -> None:
    """See the module docstring; edits ``ex.body`` in place and sets ``ex.transforms``."""
    assert ex.candidate is not None
    tenant = ex.tenant
    policy = tenant.reasoning
    upstream = rt.upstreams[ex.candidate.upstream]
    up_field = upstream.reasoning_field
    messages = ex.body.get("messages")
    if not isinstance(messages, list):
        return
    full_capture = tenant.capture.mode == "full"
    config = getattr(upstream, "config", None)
    think_in_content = bool(config is not None and config.think_in_content)
    store = ReasoningStore(rt.kv) if policy.keep_for_tool_loops else None
    # the common case costs one substring search over the request bytes
    other = OTHER_FIELD.get(up_field)
    renamed = other is not None and other in ex.raw and _rename_sent(messages, up_field)
    restored = await _restore(rt, ex, messages, store)
    if renamed or restored.changed:
        _reencode(ex)

    def recorder(turn: Turn, collect_reasoning: bool = False) -> TurnRecorder:
        return TurnRecorder(
            turn,
            collect_reasoning=collect_reasoning,
            store=store,
            tenant=tenant.name,
            prefix=restored.prefix,
            skeleton=restored.skeleton,
            history=list(messages),  # as it goes upstream, before shaping may append to it
            ttl_s=policy.store_ttl_s,
            max_bytes=policy.store_max_bytes,
        )

    turn = Turn()
    if policy.mode == "pass":
        # a parserless vLLM's reasoning moves out of the content into the tenant's field
        shows = policy.field != up_field or think_in_content
        if shows:
            add_transform(
                ex.transforms,
                ReasoningTransform(
                    "pass",
                    policy.field,
                    up_field,
                    turn,
                    split_think=think_in_content,
                    starts_thinking=think_in_content,
                ),
            )
        # without tools (and so without the tool step's transforms) the answer calls none: relay it
        if shows or full_capture or (store is not None and ex.transforms):
            add_transform(ex.transforms, recorder(turn, collect_reasoning=not shows))
        return
    add_transform(
        ex.transforms,
        ReasoningTransform(
            policy.mode,
            policy.field,
            up_field,
            turn,
            redactor=redactor_for(policy.redact) if policy.mode == "redact" else None,
            split_think=True,
            starts_thinking=think_in_content,
        ),
    )
    add_transform(ex.transforms, recorder(turn))


def _reencode(ex: Exchange) -> None:
    """The body's bytes again: the reservation bounds the prompt from them, and they are what goes
    upstream unless a later step changes the body again (which sets ``dirty`` once more)."""
    ex.raw = orjson.dumps(ex.body)
    ex.dirty = False


def recorder_of(ex: Exchange) -> TurnRecorder | None:
    for transform in ex.transforms:
        if isinstance(transform, TurnRecorder):
            return transform
    return None
