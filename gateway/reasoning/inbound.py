"""Request side of the reasoning modes, run once a candidate is chosen (its upstream decides the
reasoning field) and before the budget reservation (restored reasoning is prompt the budget pays).

* Reasoning a client sends back goes upstream in the field that upstream reads (Moonshot
  ``reasoning_content``, vLLM >= 0.16 ``reasoning``), for every tenant.
* For strip/redact tenants, each assistant tool-call message gets its original reasoning back from
  the store (a client of a redact tenant only holds the redacted copy); only when the store has
  none and the client sent none does it get the placeholder K2 accepts, counted in
  ``gateway_reasoning_restored{source="placeholder"}``.
* The response transforms for the tenant's mode are set on the exchange; a pass tenant whose clients
  read the upstream's own field name (and without full capture) gets none: its bytes are relayed.
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

from typing import TYPE_CHECKING, Any

import orjson

from gateway.observability import REASONING_RESTORED
from gateway.reasoning.modes import FIELDS, ReasoningTransform, Turn
from gateway.reasoning.record import TurnRecorder
from gateway.reasoning.redact import redactor_for
from gateway.reasoning.store import ReasoningStore, prefix_digests, turn_key
from gateway.tools.aliases import alias_history
from gateway.transforms.order import add_transform

if TYPE_CHECKING:
    from gateway.pipeline import Exchange, Runtime

PLACEHOLDER = " "  # the minimum Moonshot accepts (protocols.md §2.1); "" is not known to pass


def _client_reasoning(msg: dict[str, Any]) -> str | None:
    for name in FIELDS:
        value = msg.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def put_reasoning(msg: dict[str, Any], name: str, text: str) -> bool:
    """Set ``msg[name]`` keeping key order: a reasoning field under the other name is renamed in
    place, a duplicate under the other name removed. Returns whether the message changed."""
    other = FIELDS[1] if name == FIELDS[0] else FIELDS[0]
    if other not in msg:
        if msg.get(name) == text:
            return False
        msg[name] = text
        return True
    items = [(name if key == other else key, text if key in (name, other) else value) for key, value in msg.items()]
    msg.clear()
    for key, value in items:
        msg.setdefault(key, value)
    return True


def _rename_sent(messages: list[Any], name: str) -> bool:
    changed = False
    for msg in messages:
        if isinstance(msg, dict) and msg.get("role") == "assistant":
            text = _client_reasoning(msg)
            if text is not None:
                changed = put_reasoning(msg, name, text) or changed
    return changed


async def _restore(
    store: ReasoningStore | None, tenant: str, messages: list[Any], name: str, prefixes: list[bytes]
) -> bool:
    wanted: list[tuple[dict[str, Any], str]] = []
    for i, msg in enumerate(messages):
        if isinstance(msg, dict) and msg.get("role") == "assistant" and msg.get("tool_calls"):
            wanted.append((msg, turn_key(tenant, prefixes[i], msg["tool_calls"]) if store is not None else ""))
    found = await store.recall([key for _, key in wanted]) if store is not None else [None] * len(wanted)
    changed = False
    for (msg, _), kept in zip(wanted, found, strict=True):
        sent = _client_reasoning(msg)
        if kept is not None:
            source, text = "store", kept
        elif sent is not None:
            source, text = "client", sent
        else:
            source, text = "placeholder", PLACEHOLDER
        REASONING_RESTORED.labels(tenant, source).inc()
        changed = put_reasoning(msg, name, text) or changed
    return changed


OTHER_FIELD = {"reasoning_content": b'"reasoning"', "reasoning": b'"reasoning_content"'}


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
    if policy.mode == "pass":
        # the common case costs one substring search over the request bytes
        other = OTHER_FIELD.get(up_field)
        changed = other is not None and other in ex.raw and _rename_sent(messages, up_field)
        if changed:
            _reencode(ex)
        # a parserless vLLM's reasoning moves out of the content into the tenant's field
        shows = policy.field != up_field or think_in_content
        if not shows and not full_capture:
            return
        turn = Turn()
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
        add_transform(ex.transforms, TurnRecorder(turn, collect_reasoning=not shows))
        return
    store = ReasoningStore(rt.kv) if policy.keep_for_tool_loops else None
    # a turn without tools skipped the tool step: its history still names tools the way they went
    # upstream (and were kept) in the turns that declared them
    aliased = "tools" not in ex.body and alias_history(messages, {})
    prefixes = prefix_digests(messages) if store is not None else [b""]
    if await _restore(store, tenant.name, messages, up_field, prefixes) or aliased:
        _reencode(ex)
    turn = Turn()
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
    add_transform(
        ex.transforms,
        TurnRecorder(
            turn,
            store=store,
            tenant=tenant.name,
            prefix=prefixes[-1],
            ttl_s=policy.store_ttl_s,
            max_bytes=policy.store_max_bytes,
        ),
    )


def _reencode(ex: Exchange) -> None:
    ex.raw = orjson.dumps(ex.body)  # the reservation bounds the prompt from these bytes
    ex.dirty = True


def recorder_of(ex: Exchange) -> TurnRecorder | None:
    for transform in ex.transforms:
        if isinstance(transform, TurnRecorder):
            return transform
    return None
